"""`straw check` on the outbox: can straw write there? Found out without writing or creating anything."""

from __future__ import annotations

import os
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

from outbox.store import backlog_query, explain, runs
from straw.folders import nearest_folder


def _free(folder: Path) -> str:
    free = shutil.disk_usage(folder).free
    return f"{free / 2**30:.1f} GiB free" if free >= 2**30 else f"{free / 2**20:.0f} MiB free"


def _writable_folder(path: Path) -> tuple[bool, str]:
    """A new outbox: the nearest existing folder above it must let us create folders and files."""
    folder, problem = nearest_folder(path.parent)
    if problem:
        return False, f"{path}: cannot be created: {problem}"
    return True, f"{path} (not created yet; {folder} is writable, {_free(folder)})"


def _backlog(path: Path) -> int:
    """Read-only: with a -wal beside it (a run is on, or ended abruptly) through SQLite's shared memory;
    without one, as an immutable file, which needs no -shm either."""
    wal = path.with_name(path.name + "-wal").exists()
    uri = f"{path.resolve().as_uri()}?{'mode=ro' if wal else 'immutable=1'}"
    with closing(sqlite3.connect(uri, uri=True)) as db:
        return int(db.execute(backlog_query(runs(db))).fetchone()[0])  # retained (published) records do not wait


def check_outbox(path: Path) -> tuple[bool, str]:
    """(ok, one line): the outbox exists and is writable, or could be created; nothing is written."""
    if not path.exists():
        return _writable_folder(path)
    if not path.is_file():
        return False, f"{path}: not a file"
    if not os.access(path, os.R_OK | os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
        return False, (f"{path}: not writable for this user (or read-only); the file and its folder "
                       "must be writable (SQLite writes -wal and -shm files beside it)")
    try:
        backlog = _backlog(path)
    except sqlite3.Error as exc:
        return False, str(explain(path, exc))
    return True, f"{path} (backlog {backlog}, {_free(path.parent)})"
