"""``frugalmesh data fetch``: fill a data directory from the original public sources.

Every file the project reads (``routing/`` and ``traces/``, the layout described in
:mod:`services.runtime.data`) is listed in :data:`MANIFEST` with the repository, the commit and the
path it comes from, its size and its sha256. :func:`fetch` downloads whatever is missing or does not
match, verifies it, and leaves a ``README.md`` of provenance next to the files.

Sources (``raw.githubusercontent.com`` at full commit ids, so the bytes cannot drift):

* ``routing/``  lm-sys/RouteLLM ``0b64fdafe049e596a3f5657c219329f24af24198``, Apache-2.0
  (Ong et al., "RouteLLM", ICLR 2025).
* ``traces/azure_llm_2023_*.csv``  Azure/AzurePublicDataset, CC-BY-4.0 (Patel et al., "Splitwise",
  ISCA 2024); the source names are ``data/AzureLLMInferenceTrace_{conv,code}.csv``.
* ``traces/mooncake_*_trace.jsonl``  kvcache-ai/Mooncake ``FAST25-release/traces/``, Apache-2.0
  (Qin et al., "Mooncake", FAST 2025).

The data README names the Azure and Mooncake commits by short ids only (``b469a113``,
``3b5a5941``, kept in :attr:`Entry.pinned`); GitHub's raw host needs a full id, so those entries
point at full commits where the same file was found with the same size. Either way the sha256 in the
manifest is the contract: a file whose bytes differ is never accepted.

Mirror layout
-------------
A URL is ``{base}/{owner}/{repo}/{commit}/{path}``, with ``base`` =
``https://raw.githubusercontent.com`` by default. A mirror (``base_url=`` / ``--mirror`` /
``FRUGALMESH_DATA_MIRROR``) replaces only ``base`` and must serve the same path shape, e.g.::

    {mirror}/lm-sys/RouteLLM/0b64fdafe049e596a3f5657c219329f24af24198/routellm/evals/gsm8k/gsm8k_responses.csv
    {mirror}/Azure/AzurePublicDataset/<commit>/data/AzureLLMInferenceTrace_conv.csv

(``base`` may carry a path prefix: ``https://host/some/prefix``.) Build one with
:func:`mirror_path` for each entry of :data:`MANIFEST`. Files served by a mirror are verified
against the same sha256 as the originals.

Behaviour
---------
* Each file is streamed to a hidden temp file in its target directory, hashed while it streams,
  and renamed over the target only when size and sha256 match; on any failure the temp file is
  removed, so nothing half-written is ever left under its real name.
* A file already present with the right size and sha256 is skipped; a present but different one is
  downloaded again (and replaced atomically).
* Failures raise :class:`DataFetchError` (a hash mismatch: :class:`IntegrityError`) naming the
  file and URL; network errors also say that ``FRUGALMESH_DATA`` / ``--data`` can point at an
  existing copy instead.

CLI: ``frugalmesh data fetch [--dest D] [--mirror URL]`` calls :func:`fetch_command`, which prints a
summary and returns the exit status (0 ok, 1 failure).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from services.datafetch.manifest import DEFAULT_BASE, MANIFEST, Entry, Source
from services.runtime.data import cache_dir

MIRROR_ENV = "FRUGALMESH_DATA_MIRROR"
PROVENANCE_FILE = "README.md"
PROVENANCE_MARKER = "<!-- written by frugalmesh data fetch -->"
CHUNK = 1 << 16
RETRIES = 3  # attempts per file for transport errors and 5xx answers
RETRY_DELAY_S = 1.0


class DataFetchError(RuntimeError):
    """A file could not be fetched or verified."""


class IntegrityError(DataFetchError):
    """Downloaded bytes do not match the manifest (size or sha256)."""


@dataclass
class FetchReport:
    dest: Path
    base_url: str
    fetched: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    bytes_fetched: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in MANIFEST)

    def summary(self) -> str:
        return (
            f"fetched {len(self.fetched)} file(s) ({_human(self.bytes_fetched)}), "
            f"already present {len(self.present)}; {len(MANIFEST)} files, {_human(self.total_bytes)} in {self.dest}"
        )


def default_dest() -> Path:
    """Where the project reads data when no ``--data`` is given: ``FRUGALMESH_DATA``, else the cache."""
    env = os.environ.get("FRUGALMESH_DATA")
    return Path(env) if env else cache_dir()


def resolve_base_url(base_url: str | None = None) -> str:
    return (base_url or os.environ.get(MIRROR_ENV) or DEFAULT_BASE).rstrip("/")


def file_digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def is_valid(path: Path, entry: Entry) -> bool:
    """True if ``path`` is a regular file with the entry's size and sha256."""
    try:
        if not path.is_file() or path.stat().st_size != entry.size:
            return False
        return file_digest(path) == (entry.size, entry.sha256)
    except OSError:
        return False


def fetch(dest: Path | None = None, base_url: str | None = None, progress: bool = True) -> FetchReport:
    """Download every manifest file missing (or wrong) under ``dest``, verified by size and sha256.

    ``dest`` defaults to :func:`default_dest`; ``base_url`` to ``FRUGALMESH_DATA_MIRROR``, else
    ``https://raw.githubusercontent.com`` (see the module docstring for the mirror layout).
    Raises :class:`DataFetchError` / :class:`IntegrityError` on the first file that fails; files
    already completed stay in place, so running again resumes.
    """
    dest = Path(dest) if dest is not None else default_dest()
    base = resolve_base_url(base_url)
    report = FetchReport(dest=dest, base_url=base)

    todo: list[Entry] = []
    for entry in MANIFEST:
        if is_valid(dest / entry.path, entry):
            report.present.append(entry.path)
        else:
            todo.append(entry)

    if todo:
        with _client() as client, _progress(progress, sum(e.size for e in todo)) as advance:
            for entry in todo:
                _download(client, entry, dest / entry.path, entry.url(base), advance)
                report.fetched.append(entry.path)
                report.bytes_fetched += entry.size
    if report.fetched or not (dest / PROVENANCE_FILE).exists():
        try:
            _write_provenance(dest, base)
        except OSError as e:
            if report.fetched:  # a copy we just wrote deserves its provenance; a read-only full copy does not
                raise DataFetchError(f"cannot write {dest / PROVENANCE_FILE}: {e}") from e
    return report


def fetch_command(dest: Path | None = None, base_url: str | None = None) -> int:
    """Entry point of ``frugalmesh data fetch``: run :func:`fetch`, print a summary, return the exit status."""
    try:
        report = fetch(dest, base_url, progress=sys.stderr.isatty())
    except DataFetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


# --- internals ------------------------------------------------------------------------------


def _client() -> httpx.Client:
    return httpx.Client(
        follow_redirects=True,
        timeout=httpx.Timeout(60.0, connect=15.0),
        headers={"User-Agent": "frugalmesh-data-fetch"},
    )


def _network_error(url: str, entry: Entry, why: str, error: type[DataFetchError] = DataFetchError) -> DataFetchError:
    return error(
        f"could not download {entry.path} from {url}: {why}. "
        "Check the network (or set FRUGALMESH_DATA_MIRROR / --mirror to a mirror), "
        "or point FRUGALMESH_DATA (or --data) at an existing copy of the data."
    )


class _Retriable(DataFetchError):
    """A transport error or a 5xx answer: worth another try."""


def _download(client: httpx.Client, entry: Entry, target: Path, url: str, advance) -> None:
    """Fetch ``url`` into ``target`` via a temp file, retrying transient failures."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataFetchError(f"cannot create {target.parent} for {entry.path}: {e}") from e
    for attempt in range(1, RETRIES + 1):
        try:
            _download_once(client, entry, target, url, advance)
            return
        except _Retriable as e:
            if attempt == RETRIES:
                raise DataFetchError(str(e)) from e
            time.sleep(RETRY_DELAY_S * attempt)


def _download_once(client: httpx.Client, entry: Entry, target: Path, url: str, advance) -> None:
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as e:
        raise DataFetchError(f"cannot write {entry.path} under {target.parent}: {e}") from e
    tmp = Path(tmp_name)
    counted = 0
    try:
        h = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out:
            try:
                with client.stream("GET", url) as resp:
                    if resp.status_code != 200:
                        error = _Retriable if resp.status_code >= 500 else DataFetchError
                        raise _network_error(url, entry, f"HTTP {resp.status_code} {resp.reason_phrase}", error)
                    for chunk in resp.iter_bytes(CHUNK):
                        size += len(chunk)
                        if size > entry.size:
                            raise IntegrityError(
                                f"{entry.path}: {url} sent more than the expected {entry.size} bytes "
                                f"(expected sha256 {entry.sha256}); nothing was written."
                            )
                        h.update(chunk)
                        out.write(chunk)
                        advance(len(chunk))
                        counted += len(chunk)
            except httpx.HTTPError as e:
                raise _network_error(url, entry, f"{type(e).__name__}: {e}", _Retriable) from e
            out.flush()
            os.fsync(out.fileno())
        got = h.hexdigest()
        if size != entry.size or got != entry.sha256:
            raise IntegrityError(
                f"{entry.path}: checksum mismatch for {url}: expected sha256 {entry.sha256} "
                f"({entry.size} bytes), got sha256 {got} ({size} bytes); nothing was written."
            )
        os.replace(tmp, target)
    except OSError as e:
        advance(-counted)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise DataFetchError(f"cannot write {entry.path} to {target}: {e}") from e
    except BaseException:
        advance(-counted)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    advance(entry.size - counted)


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator:
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as bar:
        task = bar.add_task("frugalmesh data", total=total)
        yield lambda n: bar.advance(task, n)


def _write_provenance(dest: Path, base: str) -> None:
    """Write ``dest/README.md`` unless a README not written by us is already there."""
    path = dest / PROVENANCE_FILE
    if path.exists():
        try:
            if not path.read_text(errors="replace").startswith(PROVENANCE_MARKER):
                return
        except OSError:
            return
    lines = [
        PROVENANCE_MARKER,
        "# Recorded public data, fetched by `frugalmesh data fetch`",
        "",
        f"Fetched {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} from {base}. Each file is a verbatim copy",
        "of the source below, verified by sha256; keep the attribution and licence when you use it.",
        "",
    ]
    seen: list[Source] = []
    for e in MANIFEST:
        if all(e.source is not s for s in seen):
            seen.append(e.source)
    for s in seen:
        lines.append(f"- {s.slug} (commit {s.commit}; data README pin {s.pinned}), {s.licence}. Cite: {s.cite}")
    lines += ["", "| file | source | bytes | sha256 |", "| --- | --- | --- | --- |"]
    for e in MANIFEST:
        lines.append(f"| {e.path} | {e.url(DEFAULT_BASE)} | {e.size} | {e.sha256} |")
    text = "\n".join(lines) + "\n"
    dest.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".README.", suffix=".part", dir=dest)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
