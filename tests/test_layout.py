"""Architecture gates on the source tree: the Bus is the one way to NATS, modules stay small, lines
stay short. Each failure lists every offender with its place, so the fix is where it points."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
# The nats-py connection under FastStream's broker: only the Bus reaches it (services/runtime/bus.py).
RAW_CONNECTION = "broker." + "connection"  # spelled in two parts so this file does not match itself
BUS_MODULE = REPO / "services" / "runtime" / "bus.py"
# A module past this many lines is doing more than one job: split it by role (STYLE.md).
MAX_MODULE_LINES = 400
# ruff's line-length (pyproject.toml), enforced where ruff format does not reach every line.
MAX_LINE_CHARS = 120
SHORT_LINE_PACKAGES = ("frugalmesh", "services", "schemas", "loadtest")
# Not the project's source: environments, build output, caches.
SKIPPED_DIRS = {".venv", "venv", "build", "dist", "node_modules", "__pycache__"}


def python_files(*tops: str) -> list[Path]:
    """The project's .py files under ``tops`` (every one when none is given), skipped folders left out."""
    roots = [REPO / top for top in tops] if tops else [REPO]
    return sorted(
        path
        for root in roots
        for path in root.rglob("*.py")
        if not any(part in SKIPPED_DIRS or part.startswith(".") or part.endswith(".egg-info")
                   for part in path.relative_to(REPO).parts[:-1])
    )  # fmt: skip


def where(path: Path, line: int | None = None) -> str:
    name = str(path.relative_to(REPO))
    return f"{name}:{line}" if line is not None else name


def test_only_the_bus_touches_the_broker_connection():
    offenders = [
        where(path, number)
        for path in python_files()
        if path != BUS_MODULE
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if RAW_CONNECTION in line
    ]
    assert offenders == [], f"{RAW_CONNECTION} outside {where(BUS_MODULE)} (use a Bus method): {offenders}"


def test_no_service_module_is_longer_than_the_limit():
    """Every module under services/ and of the agent SDK (frugalmesh/)."""
    lengths = {where(path): len(path.read_text().splitlines()) for path in python_files("services", "frugalmesh")}
    offenders = {name: lines for name, lines in lengths.items() if lines > MAX_MODULE_LINES}
    assert offenders == {}, f"modules over {MAX_MODULE_LINES} lines: {offenders}"


def test_no_source_line_is_longer_than_the_limit():
    offenders = [
        f"{where(path, number)} ({len(line)})"
        for path in python_files(*SHORT_LINE_PACKAGES)
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if len(line) > MAX_LINE_CHARS
    ]
    assert offenders == [], f"lines over {MAX_LINE_CHARS} characters: {offenders}"


def test_the_gates_see_the_tree():
    """The walks above find the files they are about (a wrong root would pass everything)."""
    assert BUS_MODULE in python_files()
    assert REPO / "services" / "runtime" / "control.py" in python_files("services")
    assert all(python_files(top) for top in SHORT_LINE_PACKAGES)
    assert not any(".venv" in path.parts for path in python_files())
