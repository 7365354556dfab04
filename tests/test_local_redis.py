"""`redis_alive` decides whether the tests and benchmarks use the machine's Redis or start a private one."""

from __future__ import annotations

from straw.local_redis import free_port, redis_alive


def test_a_redis_that_answers_is_alive_and_a_closed_port_is_not(redis_url: str) -> None:
    assert redis_alive(redis_url)
    assert not redis_alive(f"redis://127.0.0.1:{free_port()}/0")
