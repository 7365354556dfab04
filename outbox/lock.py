"""One writer per outbox: an exclusive lock held for the life of the process that polls and publishes.

Two `straw run` on one outbox would both poll from the same position and both
publish: every row twice. The lock is an OS file lock (flock, through filelock)
on a sidecar `<outbox>.lock`, so the kernel drops it when its holder dies, even
by kill -9: there is never a stale lock to clean up. The holder writes its PID
into the file so that the process refused can name it. Readers (`status`,
`dead-letters`, metrics) never take it: SQLite lets them read alongside.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

from outbox.store import explain


class OutboxBusy(Exception):
    """Another process holds the outbox."""


def lock_path(outbox: Path) -> Path:
    return outbox.with_name(outbox.name + ".lock")


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def holder(outbox: Path) -> str:
    """The PID written by the lock's holder (it may still be writing it: try a moment)."""
    for _ in range(20):
        try:
            text = lock_path(outbox).read_text().strip()
        except OSError:
            text = ""
        if text:
            return text
        time.sleep(0.01)
    return "unknown"


class OutboxLock:
    """`with OutboxLock(path, wait=…):` holds the outbox or raises OutboxBusy (after `wait` seconds)."""

    def __init__(self, outbox: Path, wait: float = 0.0) -> None:
        self.outbox = outbox
        self.wait = wait
        self._lock = FileLock(lock_path(outbox), on_acquired=_write_pid, thread_local=False)

    def acquire(self) -> None:
        try:
            self.outbox.parent.mkdir(parents=True, exist_ok=True)
            self._lock.acquire(timeout=self.wait, poll_interval=0.1)
        except OSError as exc:
            if not isinstance(exc, Timeout):  # a TimeoutError, hence an OSError, but not the disk's
                raise explain(self.outbox, exc) from exc  # a read-only folder, a full disk: naming the outbox
            waited = f" (waited {self.wait:g}s)" if self.wait else ""
            raise OutboxBusy(
                f"outbox {self.outbox} is in use by another straw process (PID {holder(self.outbox)}){waited}; "
                "one process per outbox: stop it first, or use `run --once --wait-lock 60s` to wait for it"
            ) from None

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> OutboxLock:
        self.acquire()
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _exc: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.release()
