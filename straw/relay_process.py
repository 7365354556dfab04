"""The relay in a process of its own, so publishing and polling run on two cores.

The child shares only the outbox file with the poller. It is a plain
`python -m straw.relay_process` (no multiprocessing: nothing of the caller's
`__main__` is re-imported, no SQLite handle crosses a fork) and speaks JSON
lines: the parent sends the configuration, `wake` after each outbox commit that added records (so
they are published at once, not at the child's next idle look), then `drain` once polling is over;
the child reports `{"redis": "down" | "up"}` and a fatal `{"error": …}`. The
child dies with its parent: by `PR_SET_PDEATHSIG` on Linux, and on its stdin
closing anywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from bus.connect import open_bus
from bus.names import JetStreamOptions
from bus.seam import BusRefused, Durability
from outbox.relay import Gap, Health, run_relay
from outbox.retention import Trimmer
from outbox.store import Keep, Outbox, OutboxError
from straw import logs
from straw.redact import redact, register_secret, registered_secrets

if TYPE_CHECKING:  # the child never imports the config models: see `relay_settings`
    from straw.config import Config

_PR_SET_PDEATHSIG = 1


class ReportingHealth(Health):
    """The child's health: each change of Redis reachability is one line to the parent; with `rounds`
    (metrics on), each round that published too."""

    def __init__(self, out: IO[bytes], *, rounds: bool = False) -> None:
        self._out = out
        self._rounds = rounds
        self._down: float | None = None

    @property
    def down_since(self) -> float | None:
        return self._down

    @down_since.setter
    def down_since(self, moment: float | None) -> None:
        if (moment is None) != (self._down is None):
            _send(self._out, {"redis": "up" if moment is None else "down"})
        self._down = moment

    def published(self, stream: str, records: int, seconds: float) -> None:
        if self._rounds:  # nobody listens without metrics: no line to write and parse per batch
            _send(self._out, {"published": stream, "records": records, "seconds": seconds})


def _send(out: IO[bytes], message: dict[str, Any]) -> None:
    out.write(orjson.dumps(message) + b"\n")
    out.flush()


def relay_settings(config: Config) -> dict[str, Any]:
    """What the child needs of the configuration, as plain JSON. The child then never imports straw.config:
    building its pydantic models was 40 % of the child's start-up CPU, and the child's start-up is on the
    critical path of a run (measured on the NATS slice, bench/README.md "Session 5 — bus-speed")."""
    bus = config.bus_spec
    retain = config.outbox.retain
    jetstream = bus.jetstream_options()
    return {
        "log_format": config.log.format,
        "outbox": str(config.outbox.path),
        "bus": {
            "url": bus.url,
            "socket_timeout": bus.socket_timeout,
            "durability": [bus.durability.value, bus.replicas, bus.durability_timeout],
            "jetstream": asdict(jetstream) if jetstream is not None else None,
        },
        "relay": {
            "maxlen": config.relay.maxlen,
            "batch_size": config.relay.batch_size,
            "idle_interval": config.relay.idle_interval,
            "backoff_max": config.relay.backoff_max,
        },
        "streams": config.streams,
        "metrics": config.metrics is not None,
        "max_ages": config.stream_max_ages(),
        "retention_interval": config.retention.interval,
        "keep": [retain.age, retain.records, retain.megabytes << 20],
    }


def child_main() -> int:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    setup = orjson.loads(stdin.readline().strip() or b"{}")
    if not setup or os.getppid() != setup["parent"]:
        return 1  # the parent is gone already
    for secret in setup["secrets"]:
        register_secret(secret)
    settings = setup["settings"]
    logs.setup(setup["log_level"], settings["log_format"])
    stop, drained = threading.Event(), threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which tells us
    wake = threading.Event()

    def halt(*_: Any) -> None:
        stop.set()
        wake.set()

    signal.signal(signal.SIGTERM, halt)

    def listen() -> None:
        for line in stdin:
            command = line.strip()
            if command == b"wake":
                wake.set()
            elif command == b"drain":
                drained.set()
                wake.set()
        halt()  # stdin closed: the parent is gone

    threading.Thread(target=listen, name="parent", daemon=True).start()
    outbox: Outbox | None = None
    try:
        # NORMAL: the relay's commits only mark records published; if power loss undoes one,
        # the Redis checkpoint says what was published and the next round reconciles.
        outbox = Outbox(Path(settings["outbox"]), synchronous="NORMAL")
        bus, relay = settings["bus"], settings["relay"]
        durability = Durability(*bus["durability"])
        jetstream = JetStreamOptions(**bus["jetstream"]) if bus["jetstream"] else None
        run_relay(
            lambda: open_bus(
                bus["url"], socket_timeout=bus["socket_timeout"], maxlen=relay["maxlen"], jetstream=jetstream,
                durability=durability,
            ),
            outbox,
            settings["streams"],
            stop=stop,
            batch_size=relay["batch_size"],
            idle_interval=relay["idle_interval"],
            backoff_max=relay["backoff_max"],
            drained=drained.is_set,
            wake=wake,
            health=ReportingHealth(stdout, rounds=settings["metrics"]),
            after_round=Trimmer(settings["max_ages"], settings["retention_interval"]),
            keep=Keep(*settings["keep"]),
        )
    except (BusRefused, OutboxError, Gap) as exc:  # already the operator's one line
        _send(stdout, {"error": redact(str(exc))})
        return 1
    except Exception as exc:
        _send(stdout, {"error": redact(f"{type(exc).__name__}: {exc}")})
        return 1
    finally:
        if outbox is not None:
            outbox.close()
    return 0


class RelayProcess:
    """The parent's handle on the relay child."""

    def __init__(self, config: Config, log_level: str | None = None) -> None:
        self.config = config
        self.log_level = log_level
        self.down_since: float | None = None  # monotonic time the child said Redis went down
        self._error: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._ended = threading.Event()  # the child's stdout closed: it has exited (or is exiting)
        self._stdin: int | None = None  # the child's stdin, non-blocking once set up (None: `wake` is a no-op)
        # Told of each round that published (stream, records, seconds): the metrics' publish figures.
        self.on_published: Callable[[str, int, float], None] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "straw.relay_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        assert self._process.stdin is not None
        setup = {
            "parent": os.getpid(),
            "secrets": registered_secrets(),
            "log_level": self.log_level,
            "settings": relay_settings(self.config),
        }
        self._process.stdin.write(orjson.dumps(setup) + b"\n")
        self._process.stdin.flush()
        fd = self._process.stdin.fileno()
        # Windows before Python 3.12 has no os.set_blocking (and no non-blocking pipes): no wakes there, the
        # child's idle look still finds every record.
        with contextlib.suppress(OSError, AttributeError):
            # Non-blocking: a `wake` must never stall a poll, even if the child stopped reading its stdin.
            os.set_blocking(fd, False)
            self._stdin = fd
        threading.Thread(target=self._listen, name="relay-listener", daemon=True).start()

    def _listen(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        try:
            for line in self._process.stdout:
                message = orjson.loads(line)
                if "redis" in message:
                    self.down_since = time.monotonic() if message["redis"] == "down" else None
                if "published" in message and self.on_published is not None:
                    self.on_published(message["published"], message["records"], message["seconds"])
                if "error" in message:
                    self._error = str(message["error"])
        except (ValueError, OSError):
            # The pipe closed under us at shutdown, or a child killed mid-line left half a message: the child's
            # exit status says what happened (error()), and a daemon thread's traceback would only add noise.
            pass
        finally:
            self._ended.set()

    def wake(self) -> None:
        """Records were just committed to the outbox: the child publishes them now rather than at its next
        idle look (`relay.idle_interval`, 200 ms: on average 100 ms of every change's latency)."""
        if self._stdin is None:
            return
        try:
            os.write(self._stdin, b"wake\n")  # 5 bytes: one atomic write, never interleaved with another line
        except BlockingIOError:
            pass  # the pipe is full of lines the child has yet to read, wakes among them: it will look anyway
        except OSError:
            pass  # the child has exited; error() says why

    def drain(self) -> None:
        """Polling is over: publish what is in the outbox, then exit."""
        self._write(b"drain\n")

    def _write(self, data: bytes) -> None:
        try:
            assert self._process is not None and self._process.stdin is not None
            if self._stdin is None:
                self._process.stdin.write(data)
                self._process.stdin.flush()
                return
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(self._stdin, view):]
                except BlockingIOError:  # the child reads its stdin all the time: room comes soon, unless it died
                    if not self.is_alive():
                        return
                    time.sleep(0.01)
        except (BrokenPipeError, OSError):
            pass  # the child has exited; error() says why

    def is_alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def join(self, timeout: float) -> None:
        if self._process is not None:
            # Woken by the child's stdout closing as it exits: Popen.wait's polling would notice up to
            # tens of milliseconds later, at the end of every run (measured: 11-27 ms of a one-second slice).
            deadline = time.monotonic() + timeout
            self._ended.wait(timeout)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(max(0.0, deadline - time.monotonic()))

    def error(self) -> str | None:
        """Why the relay stopped, if it stopped on an error."""
        if self._process is None or self._process.returncode in (None, 0, -signal.SIGTERM):
            return None
        return self._error or f"relay process exited with code {self._process.returncode}"

    def shutdown(self, timeout: float = 10.0, *, by_stdin: bool = os.name == "nt") -> None:
        """Stop the child: SIGTERM; or, `by_stdin` (Windows, where send_signal(SIGTERM) is TerminateProcess and
        the child would exit with code 1), by closing its stdin, which it takes as the same request."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            if by_stdin and process.stdin is not None:
                process.stdin.close()
            else:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()


if __name__ == "__main__":
    code = child_main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: the stdin listener thread may sit in a read, which teardown cannot interrupt.
    os._exit(code)
