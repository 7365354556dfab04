"""The JSON Lines loader: one CloudEvent a line, in files per stream rotated by size and by day.

A file is written under a hidden temporary name (`.erp.orders-2026-11-29-0001.jsonl.part`) and renamed to
its final name when closed, so a job that picks up `*.jsonl` never reads a half-written file. Each batch is
fsynced before the SDK acks it. Each line carries the extension attributes `strawstream` and `strawseq`; at
start (and after a batch failed) the last line on disk not marked `strawretry` (a dead letter sent again) says
which `seq` was written last, so a redelivered entry is skipped (a crash between the fsync and the ack writes
nothing twice). One process per directory and loader (a file lock).
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from itertools import groupby
from operator import attrgetter
from pathlib import Path
from typing import IO

import orjson
import structlog
from filelock import FileLock, Timeout

from loaders.records import Record
from loaders.sdk import Failed, TargetDown
from straw.config_loaders import JsonlLoaderSpec

_TAIL = 64 * 1024
log = structlog.get_logger("straw.loader")
_STREAM, _SEQ = attrgetter("stream"), attrgetter("seq")


class DirectoryBusy(Exception):
    """Another process runs this JSON Lines loader on this directory."""


class UnreadableFile(Exception):
    """A file's last line does not say which `seq` was written last: the loader cannot know what to skip."""


@dataclass
class _Open:
    path: Path  # the temporary name
    final: Path
    day: str
    handle: IO[bytes]
    size: int


def _final_name(stream: str, day: str, number: int) -> str:
    return f"{stream}-{day}-{number:04d}.jsonl"


def _part(final: Path) -> Path:
    return final.with_name(f".{final.name}.part")


class JsonlLoader:
    def __init__(self, spec: JsonlLoaderSpec, today: Callable[[], dt.date] | None = None) -> None:
        self.spec = spec
        self.directory = spec.directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.directory / f".straw-{spec.name}.lock"))
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise DirectoryBusy(
                f"loader {spec.name}: {self.directory} is in use by another straw load process") from None
        self._today = today or (lambda: dt.datetime.now(dt.UTC).date())  # files rotate at midnight UTC
        self._open: dict[str, _Open] = {}
        self._stale: set[str] = set()  # streams whose last batch failed: their last seq to be read from disk
        self._suffixes: dict[tuple[str, bool], str] = {}
        self._last: dict[str, int] = {s: self._recover(s) for s in spec.streams}

    def _files(self, stream: str) -> list[Path]:
        return stream_files(self.directory, stream)

    def _recover(self, stream: str) -> int:
        """The last `seq` written for `stream`; a torn last line (a crash mid-write) is cut off first."""
        return last_seq(self.directory, stream, repair=True)

    def _file_for(self, stream: str, size: int, day: str) -> _Open:
        current = self._open.get(stream)
        if current is not None and (current.day != day or current.size + size > self.spec.max_bytes) \
                and current.size > 0:
            self._close(stream)
            current = None
        if current is None:
            files = self._files(stream)
            for path in files:  # a run killed before midnight left its file unrenamed: no job would ever see it
                if path.name.endswith(".part") and f"-{day}-" not in path.name:
                    os.rename(path, path.with_name(path.name[1:-len(".part")]))
                    _fsync_dir(self.directory)
            existing = [p for p in files if f"-{day}-" in p.name]
            leftover = [p for p in existing if p.name.endswith(".part")]
            if leftover:  # our own file from before a crash: go on with it
                path = leftover[-1]
                final = path.with_name(path.name[1:-len(".part")])
            else:
                number = 1 + max((int(p.name.rsplit("-", 1)[1][:4]) for p in existing), default=0)
                final = self.directory / _final_name(stream, day, number)
                path = _part(final)
            # Unbuffered: one write() a batch anyway, and a failed one leaves no bytes in a buffer that a later
            # flush (or the truncate that undoes the batch) would try to write again.
            handle = path.open("ab", buffering=0)
            current = _Open(path, final, day, handle, handle.tell())
            self._open[stream] = current
        return current

    def _close(self, stream: str) -> None:
        current = self._open.pop(stream)
        os.fsync(current.handle.fileno())
        current.handle.close()
        os.rename(current.path, current.final)
        _fsync_dir(self.directory)

    def apply(self, records: Sequence[Record]) -> list[Failed]:
        day = self._today().isoformat()  # one day per batch: a batch is never split over midnight
        if self._stale:
            self._reread_stale()
        lines: dict[str, list[str]] = {}
        tops: dict[str, int] = {}
        # A batch is mostly one run of one stream: its state is looked up once a run, and the run's lines built
        # in a comprehension (C-level grouping, min and max; a third less CPU than a loop with a branch per record).
        for stream, group in groupby(records, _STREAM):
            run = list(group)
            last = self._last.get(stream, 0)
            tops[stream] = max(tops.get(stream, last), max(map(_SEQ, run)))
            suffix = self._suffix(stream)
            if min(map(_SEQ, run)) > last:  # the common run: nothing in it is on disk yet
                # The event as on the stream is written as it is, not re-encoded (see _line).
                lines.setdefault(stream, []).extend([
                    f"{raw[:-1]}{suffix}{record.seq}}}\n" if (raw := record.raw)[-1:] == "}" and raw[:1] == "{"
                    and len(raw) > 2 else _line(record, suffix)
                    for record in run])
            else:
                # At or below `last`: written before the last crash or stop, a redelivery, skipped; unless sent
                # again by `straw dlq retry`, then marked, so that the last line read at start is not taken for
                # the newest one written (see _recover).
                again = self._suffix(stream, retry=True)
                lines.setdefault(stream, []).extend([
                    _line(record, suffix if record.seq > last else again)
                    for record in run if record.seq > last or record.retry])
        touched: list[tuple[_Open, int]] = []  # each file this batch wrote to, and its size before
        try:
            for stream, batch in lines.items():
                if batch:
                    blob = "".join(batch)
                    if blob.count("\n") != len(batch) or "\r" in blob:  # one scan a batch, not one a record
                        batch = [_one_line(line) for line in batch]
                        blob = "".join(batch)
                    self._write(stream, batch, blob, day, touched)
            for target, _ in touched:
                if not target.handle.closed:  # a file rotated out in this batch was fsynced as it closed
                    os.fsync(target.handle.fileno())
                    if os.fstat(target.handle.fileno()).st_nlink == 0:  # removed by hand (or a cleanup job)
                        raise FileNotFoundError(errno.ENOENT, "deleted while being written: the batch is written "
                                                "again to a new file; what was in it is gone from disk (straw "
                                                "replay writes it again)", str(target.path))
        except OSError as exc:  # disk full, unwritable: undo what can be undone, try again later
            self._undo(lines, touched)
            raise TargetDown(f"{exc.filename or self.directory}: {exc.strerror or exc}") from exc
        self._last.update(tops)
        return []

    def _undo(self, lines: dict[str, list[str]], touched: list[tuple[_Open, int]]) -> None:
        """After a failed batch: its lines cut off where that works, and each stream it wrote to read again from
        disk before the next batch. A file rotated out mid-batch was closed and renamed with some of the batch
        in it (fsynced, for good): the stream's last `seq` is then that file's, and the retry skips those."""
        for target, size in touched:
            if not target.handle.closed:
                with suppress(OSError):
                    target.handle.truncate(size)
                with suppress(OSError):
                    target.handle.close()
        for stream in lines:
            if stream in self._open and self._open[stream].handle.closed:
                del self._open[stream]
            self._stale.add(stream)

    def _reread_stale(self) -> None:
        try:
            for stream in list(self._stale):
                self._last[stream] = self._recover(stream)
                self._stale.discard(stream)
        except OSError as exc:
            raise TargetDown(f"{self.directory}: {exc.strerror or exc}") from exc

    def _suffix(self, stream: str, retry: bool = False) -> str:
        """The extension attributes of a line but its `seq`: the same for every line of a stream (and for every
        line of it sent again by `straw dlq retry`)."""
        suffix = self._suffixes.get((stream, retry))
        if suffix is None:
            again = ',"strawretry":true' if retry else ""
            name = orjson.dumps(stream).decode()
            suffix = self._suffixes[stream, retry] = f',"strawstream":{name}{again},"strawseq":'
        return suffix

    def _write(self, stream: str, text: list[str], joined: str, day: str,
               touched: list[tuple[_Open, int]]) -> None:
        """The lines (`joined`: all of them) in as few write() calls as the files' size limit allows: one per file
        and batch."""
        current = self._open.get(stream)
        if current is not None and current.day == day:
            blob = joined.encode()
            if current.size + len(blob) <= self.spec.max_bytes:  # the common case: the batch fits the open file
                touched.append((current, current.size))
                _write_all(current.handle, blob)
                current.size += len(blob)
                return
        lines = [line.encode() for line in text]
        start = 0
        while start < len(lines):
            target = self._file_for(stream, len(lines[start]), day)
            if not any(t is target for t, _ in touched):
                touched.append((target, target.size))
            room = self.spec.max_bytes - target.size
            end, size = start + 1, len(lines[start])  # at least one line, even into an empty file too small
            while end < len(lines) and size + len(lines[end]) <= room:
                size += len(lines[end])
                end += 1
            _write_all(target.handle, b"".join(lines[start:end]))
            target.size += size
            start = end

    def close(self) -> None:
        """Each open file closed and renamed. One that cannot be (deleted by hand, a failing disk) is a warning,
        not an error: each of its batches was fsynced before its ack, and the next start goes on with it."""
        try:
            for stream in list(self._open):
                handle = self._open[stream].handle
                try:
                    self._close(stream)
                except OSError as exc:
                    with suppress(OSError):
                        handle.close()
                    log.warning("file not closed", stream=stream, file=exc.filename, error=exc.strerror or str(exc))
        finally:
            self._lock.release()


def _line(record: Record, suffix: str) -> str:
    """The event as it was on the stream with the extension attributes in `suffix`, not re-encoded (and exact);
    re-encoded only when the text on the stream is not an object's braces with blanks around."""
    raw = record.raw.strip()
    if not (raw.endswith("}") and raw.startswith("{")):
        raw = orjson.dumps(record.event).decode()
    if raw[1:-1].strip():
        return f"{raw[:-1]}{suffix}{record.seq}}}\n"
    return f"{{{suffix[1:]}{record.seq}}}\n"  # an empty object: no comma before the first attribute


def _one_line(line: str) -> str:
    """A line whose event was published spread over several lines (pretty-printed), on one: JSON has CR and LF
    only between tokens (never raw inside a string), so each is a blank there and the values stay as they were."""
    body = line[:-1]
    if "\n" in body or "\r" in body:
        return body.replace("\r\n", " ").replace("\r", " ").replace("\n", " ") + "\n"
    return line


def stream_files(directory: Path, stream: str) -> list[Path]:
    """The stream's files in the directory, oldest first (closed ones and the one being written)."""
    pattern = re.compile(rf"^\.?{re.escape(stream)}-(\d{{4}}-\d{{2}}-\d{{2}})-(\d{{4}})\.jsonl(\.part)?$")
    found = [p for p in directory.iterdir() if pattern.match(p.name)] if directory.is_dir() else []
    return sorted(found, key=lambda p: pattern.match(p.name).groups()[:2])  # type: ignore[union-attr]


def last_seq(directory: Path, stream: str, *, repair: bool) -> int:
    """The last `seq` written for `stream` (0: none). A torn last line (a crash mid-write) is cut off with
    `repair` (the loader, which holds the directory), else skipped (`straw status`, which only looks)."""
    for path in reversed(stream_files(directory, stream)):
        with path.open("rb+" if repair else "rb") as handle:
            end = handle.seek(0, os.SEEK_END)
            if end and _byte_at(handle, end - 1) != b"\n":
                end = _newline_before(handle, end) + 1
                if repair:
                    handle.truncate(end)
                    os.fsync(handle.fileno())
            while end:  # from the last line back: a line sent again by `straw dlq retry` is an old seq
                start = _newline_before(handle, end - 1) + 1
                handle.seek(start)
                seq, again = _seq_of(path, handle.read(end - 1 - start))
                if not again:
                    return seq
                end = start
    return 0


def _byte_at(handle: IO[bytes], position: int) -> bytes:
    handle.seek(position)
    return handle.read(1)


def _newline_before(handle: IO[bytes], end: int) -> int:
    """Where the last newline before `end` is, or -1: read backwards in blocks (a line may be any length)."""
    while end > 0:
        start = max(0, end - _TAIL)
        handle.seek(start)
        found = handle.read(end - start).rfind(b"\n")
        if found >= 0:
            return start + found
        end = start
    return -1


def _seq_of(path: Path, line: bytes) -> tuple[int, bool]:
    """The line's `strawseq`, and whether `straw dlq retry` sent it again."""
    try:
        event = orjson.loads(line)
        seq = event["strawseq"] if isinstance(event, dict) else None
    except (orjson.JSONDecodeError, KeyError):
        seq = None
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise UnreadableFile(
            f"{path}: its last line is not an event this loader wrote (no integer strawseq), so which records "
            "are already on disk is unknown; move the file out of the directory, or cut that line, and start again")
    return seq, event.get("strawretry") is True


def _write_all(handle: IO[bytes], data: bytes) -> None:
    """All of `data`: an unbuffered write may take only part of it (a disk filling up), then fail on the rest."""
    view = memoryview(data)
    while view:
        view = view[handle.write(view):]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
