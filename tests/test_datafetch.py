"""`frugalmesh data fetch` against a real loopback HTTP mirror built from the recorded data.

The mirror is a temp tree with the raw.githubusercontent.com path shape
(``<owner>/<repo>/<commit>/<path>``) whose files link to the originals in FRUGALMESH_DATA.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.datafetch import fetch as datafetch
from services.datafetch.fetch import (
    PROVENANCE_FILE,
    PROVENANCE_MARKER,
    DataFetchError,
    IntegrityError,
    fetch,
    fetch_command,
)
from services.datafetch.manifest import MANIFEST, mirror_path

pytestmark = pytest.mark.unit


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's name
        pass


@pytest.fixture
def mirror(tmp_path: Path, data_dir: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, mirror root): every manifest file, served on 127.0.0.1 at its mirror path."""
    root = tmp_path / "mirror"
    for entry in MANIFEST:
        target = root / mirror_path(entry)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(data_dir / entry.path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    # A short poll: shutdown() waits for serve_forever's next look (0.5 s by default) in every test.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def _no_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datafetch, "RETRY_DELAY_S", 0.0)
    monkeypatch.delenv(datafetch.MIRROR_ENV, raising=False)


def _leftovers(dest: Path) -> list[Path]:
    return [p for p in dest.rglob("*") if p.name.endswith(".part")]


def test_manifest_covers_every_recorded_file(data_dir: Path) -> None:
    on_disk = {
        str(p.relative_to(data_dir))
        for sub in ("routing", "traces")
        for p in (data_dir / sub).rglob("*")
        if p.is_file() and p.name != "README.md"
    }
    assert {e.path for e in MANIFEST} == on_disk
    assert len({e.path for e in MANIFEST}) == len(MANIFEST)
    for entry in MANIFEST:
        path = data_dir / entry.path
        assert path.stat().st_size == entry.size, entry.path
        assert _sha256(path) == entry.sha256, entry.path
        url = entry.url()
        assert url.startswith("https://raw.githubusercontent.com/"), url
        commit = url.split("/")[5]
        assert len(commit) == 40 and all(c in "0123456789abcdef" for c in commit), url


def test_fetch_all_then_nothing(mirror: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, _ = mirror
    dest = tmp_path / "dest"
    report = fetch(dest, base_url=base, progress=False)
    assert sorted(report.fetched) == sorted(e.path for e in MANIFEST)
    assert report.present == []
    assert report.bytes_fetched == sum(e.size for e in MANIFEST)
    for entry in MANIFEST:
        assert _sha256(dest / entry.path) == entry.sha256, entry.path
    assert not _leftovers(dest)
    readme = (dest / PROVENANCE_FILE).read_text()
    assert readme.startswith(PROVENANCE_MARKER)
    assert "lm-sys/RouteLLM" in readme and "CC-BY-4.0" in readme

    # Second run, mirror taken from the environment this time: nothing to download.
    monkeypatch.setenv(datafetch.MIRROR_ENV, base)
    again = fetch(dest, progress=False)
    assert again.fetched == [] and again.bytes_fetched == 0
    assert sorted(again.present) == sorted(e.path for e in MANIFEST)


def test_corrupt_local_file_is_fetched_again(mirror: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = mirror
    dest = tmp_path / "dest"
    fetch(dest, base_url=base, progress=False)
    victim = dest / "routing/mmlu/mmlu_virology.csv"
    victim.write_bytes(victim.read_bytes()[:-10] + b"tampered!\n")
    report = fetch(dest, base_url=base, progress=False)
    assert report.fetched == ["routing/mmlu/mmlu_virology.csv"]
    entry = next(e for e in MANIFEST if e.path == "routing/mmlu/mmlu_virology.csv")
    assert _sha256(victim) == entry.sha256


def test_corrupted_download_raises_and_writes_nothing(mirror: tuple[str, Path], tmp_path: Path, data_dir: Path) -> None:
    base, root = mirror
    entry = next(e for e in MANIFEST if e.path == "traces/azure_llm_2023_code.csv")
    served = root / mirror_path(entry)
    served.unlink()
    data = bytearray((data_dir / entry.path).read_bytes())
    data[1000] ^= 0x01  # same size, different bytes
    served.write_bytes(bytes(data))
    bad_sha = hashlib.sha256(data).hexdigest()

    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError) as err:
        fetch(dest, base_url=base, progress=False)
    message = str(err.value)
    assert entry.path in message and entry.sha256 in message and bad_sha in message
    assert not (dest / entry.path).exists()
    assert not _leftovers(dest)

    # Served bytes that run past the expected size are cut off, still leaving nothing behind.
    served.write_bytes((data_dir / entry.path).read_bytes() + b"extra")
    with pytest.raises(IntegrityError, match="more than the expected"):
        fetch(dest, base_url=base, progress=False)
    assert not (dest / entry.path).exists()
    assert not _leftovers(dest)


def test_missing_file_gives_clear_404(mirror: tuple[str, Path], tmp_path: Path) -> None:
    base, root = mirror
    entry = next(e for e in MANIFEST if e.path == "routing/gsm8k_responses.csv")
    (root / mirror_path(entry)).unlink()
    dest = tmp_path / "dest"
    with pytest.raises(DataFetchError) as err:
        fetch(dest, base_url=base, progress=False)
    message = str(err.value)
    assert not isinstance(err.value, IntegrityError)
    assert "404" in message and entry.url(base) in message and "FRUGALMESH_DATA" in message
    assert not (dest / entry.path).exists()
    assert not _leftovers(dest)


def test_unreachable_host_names_url_and_escape_hatch(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    with pytest.raises(DataFetchError) as err:
        fetch(tmp_path / "dest", base_url=base, progress=False)
    message = str(err.value)
    assert MANIFEST[0].url(base) in message
    assert "FRUGALMESH_DATA" in message
    assert not _leftovers(tmp_path / "dest")


def test_fetch_command_summary_and_exit_status(
    mirror: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, root = mirror
    dest = tmp_path / "dest"
    assert fetch_command(dest, base) == 0
    out = capsys.readouterr().out
    assert f"fetched {len(MANIFEST)} file(s)" in out and "already present 0" in out

    assert fetch_command(dest, base) == 0
    assert "fetched 0 file(s)" in capsys.readouterr().out

    shutil.rmtree(root)
    (dest / MANIFEST[0].path).unlink()
    assert fetch_command(dest, base) == 1
    assert "404" in capsys.readouterr().err


def test_foreign_readme_is_kept(mirror: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = mirror
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / PROVENANCE_FILE).write_text("# someone else's notes\n")
    fetch(dest, base_url=base, progress=False)
    assert (dest / PROVENANCE_FILE).read_text() == "# someone else's notes\n"


def test_default_dest_follows_data_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FRUGALMESH_DATA", str(tmp_path))
    assert datafetch.default_dest() == tmp_path
    monkeypatch.delenv("FRUGALMESH_DATA")
    from services.runtime.data import cache_dir

    assert datafetch.default_dest() == cache_dir()


def test_existing_full_copy_is_left_alone(data_dir: Path) -> None:
    """The read-only shared copy is complete: nothing is fetched and nothing is written there."""
    before = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*") if p.is_file()}
    report = fetch(data_dir, base_url="http://127.0.0.1:9", progress=False)
    assert report.fetched == [] and len(report.present) == len(MANIFEST)
    assert {p: p.stat().st_mtime_ns for p in data_dir.rglob("*") if p.is_file()} == before
