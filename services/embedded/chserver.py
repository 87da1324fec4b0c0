"""Serve ClickHouse's HTTP interface from the chdb-core wheel: ``python -m services.embedded.chserver DIR``.

chdb is an in-process engine; ``SYSTEM START LISTEN HTTP`` makes it serve the standard HTTP
interface from inside this process, which then blocks on a long query so the server stays up.
DIR must hold ``conf/config.xml`` and ``conf/users.xml`` (written by EmbeddedClickHouse); the
chosen port is written to ``DIR/http_port``. This is a private entry point of chdb, hence the
pinned chdb-core version and the health check in EmbeddedClickHouse. SIGTERM keeps its default
action (a Python handler could not run while the engine blocks in C).

The statements below run in chdb's in-process session, which logs in as ``default`` with an empty
password (chdb-core hard-codes it, and loads users.xml once, with no reload), so ``default`` is
passwordless in users.xml; it is granted only what these statements need (SYSTEM LISTEN). Clients
log in as ``writer`` or ``analyst`` (EmbeddedClickHouse).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> None:
    data_dir = Path(sys.argv[1]).resolve()
    import chdb._chdb as chdb_engine  # imported late: it is large and only this process needs it

    os.chdir(data_dir / "conf")  # chdb reads config.xml from the working directory
    port_file = data_dir / "http_port"
    # One call: the listener, the port report and the blocking query must share a session
    # (a second call re-initialises the engine and fails).
    # chdb ships a _chdb/__init__.pyi that omits the private query() entry point the module exports.
    result = chdb_engine.query(  # type: ignore[attr-defined]
        "SYSTEM START LISTEN HTTP; "
        f"SELECT getServerPort('http_port') INTO OUTFILE '{port_file}' TRUNCATE FORMAT TabSeparated; "
        "SELECT sum(sleepEachRow(1)) FROM numbers(1000000000) SETTINGS max_block_size = 1",
        "TabSeparated",
        path=str(data_dir / "data"),
    )
    # chdb returns a configuration or query error rather than raising it: say it, and fail.
    if result.has_error():
        sys.exit(f"embedded ClickHouse: {result.error_message()}")


if __name__ == "__main__":
    main()
