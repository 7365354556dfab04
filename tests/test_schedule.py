"""Schedules: cron, jitter and time windows per source; a capped poll goes on at once inside its window;
the relay publishes whatever the schedules say; every schedule mistake is one `file:line` error."""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outbox.store import Outbox
from straw.config_load import ConfigError, parse_config
from straw.schedule import Schedule, parse_window
from tests.bigtable import assert_each_row_once, big_table, items_config, run_until_published
from tests.test_config_fuzz import BASE_DATA, FILE, assert_clear

AMS = ZoneInfo("Europe/Amsterdam")


def at(*parts: int, zone: ZoneInfo = AMS) -> float:
    return dt.datetime(*parts, tzinfo=zone).timestamp()  # type: ignore[misc]


def local(when: float | None, zone: ZoneInfo = AMS) -> dt.datetime:
    assert when is not None
    return dt.datetime.fromtimestamp(when, zone)


NIGHTS_AND_WEEKENDS = [parse_window("Mon-Fri 19:00-07:00"), parse_window("Sat-Sun")]


def test_windows_past_midnight_belong_to_the_day_they_open() -> None:
    s = Schedule(interval=5, windows=NIGHTS_AND_WEEKENDS, zone=AMS)
    # 2026-11-30 is a Monday.
    assert not s.is_open(at(2026, 11, 30, 12, 0))
    assert s.is_open(at(2026, 11, 30, 19, 0)) and s.is_open(at(2026, 12, 1, 6, 59))
    assert not s.is_open(at(2026, 12, 1, 7, 0))
    assert s.is_open(at(2026, 12, 5, 12, 0))  # Saturday
    assert s.is_open(at(2026, 12, 5, 6, 0))  # Saturday morning: Friday's night and Saturday both
    assert not s.is_open(at(2026, 12, 7, 6, 0))  # Monday 06:00: Sunday opens no night window
    assert local(s.next_due(at(2026, 11, 30, 12, 0))) == dt.datetime(2026, 11, 30, 19, 0, tzinfo=AMS)
    # Inside the window: the interval as always.
    assert s.next_due(at(2026, 11, 30, 20, 0)) == at(2026, 11, 30, 20, 0, 5)


def test_windows_follow_daylight_saving_in_their_zone() -> None:
    s = Schedule(interval=5, windows=[parse_window("09:00-17:00")], zone=AMS)
    # 2027-03-28: clocks go from 02:00 to 03:00 in Amsterdam; the window opens at 09:00 local either side.
    for day in (27, 28, 29):
        due = s.next_due(at(2027, 3, day, 8, 0))
        assert local(due).hour == 9 and local(due).minute == 0
    assert at(2027, 3, 29, 9, 0) - at(2027, 3, 28, 9, 0) == 86400
    assert at(2027, 3, 28, 9, 0) - at(2027, 3, 27, 9, 0) == 86400 - 3600


def test_cron_skips_times_outside_the_windows_and_never_piles_up() -> None:
    s = Schedule(interval=5, cron="*/15 * * * *", windows=[parse_window("Sat-Sun")], zone=AMS)
    assert local(s.next_due(at(2026, 11, 30, 12, 0))) == dt.datetime(2026, 12, 5, 0, 0, tzinfo=AMS)
    # A poll that ran past two cron times: the next is the first cron time after it ended, no catching up.
    assert local(s.next_due(at(2026, 12, 5, 0, 40))) == dt.datetime(2026, 12, 5, 0, 45, tzinfo=AMS)
    assert local(s.first_due(at(2026, 12, 5, 13, 1))) == dt.datetime(2026, 12, 5, 13, 15, tzinfo=AMS)
    leap = Schedule(interval=5, cron="0 0 29 2 *", zone=AMS)  # more than a year ahead, yet due
    assert local(leap.next_due(at(2026, 12, 5, 0, 0))) == dt.datetime(2028, 2, 29, 0, 0, tzinfo=AMS)


def test_the_interval_runs_from_the_polls_start_and_a_long_poll_is_followed_at_once() -> None:
    s = Schedule(interval=5, windows=NIGHTS_AND_WEEKENDS, zone=AMS)
    began = at(2026, 11, 30, 20, 0)
    # A poll that took 1.5 s of its 5: the next is due 5 s after it began, not 5 s after it ended.
    assert s.next_due(began + 1.5, started=began) == began + 5
    # A poll that ran past its next due time: the next an interval after it ended, none made up, no rush.
    assert s.next_due(began + 12, started=began) == began + 17
    assert s.next_due(began + 5, started=began) == began + 5
    # Due after the window closed: the next opening, as for a poll that ended there.
    closing = at(2026, 12, 1, 6, 59, 58)
    assert local(s.next_due(closing + 1, started=closing)) == dt.datetime(2026, 12, 1, 19, 0, tzinfo=AMS)


@given(interval=st.floats(min_value=0.05, max_value=3600), began=st.floats(min_value=1e9, max_value=3e9),
       took=st.floats(min_value=0, max_value=7200))
def test_a_poll_is_due_an_interval_after_it_began_or_if_it_ran_past_that_after_it_ended(
    interval: float, began: float, took: float
) -> None:
    due = Schedule(interval=interval).next_due(began + took, started=began)
    assert due is not None and began + took <= due  # never before the last poll ended: no overlap
    assert due == (began + interval if took <= interval else began + took + interval)


def test_a_capped_poll_goes_on_at_once_inside_its_window_and_waits_outside() -> None:
    s = Schedule(interval=3600, cron="0 * * * *", windows=NIGHTS_AND_WEEKENDS, zone=AMS)
    night = at(2026, 11, 30, 22, 17)
    assert s.next_due(night, capped=True) == night
    morning = at(2026, 12, 1, 7, 5)  # the window closed during the poll
    assert local(s.next_due(morning, capped=True)) == dt.datetime(2026, 12, 1, 19, 0, tzinfo=AMS)


@given(jitter=st.floats(min_value=0.001, max_value=600), now=st.floats(min_value=1e9, max_value=3e9),
       draw=st.floats(min_value=0, max_value=0.999999))
def test_jitter_delays_by_at_most_itself(jitter: float, now: float, draw: float) -> None:
    s = Schedule(interval=5, jitter=jitter, rand=lambda: draw)
    due = s.next_due(now)
    assert due is not None and now + 5 <= due < now + 5 + jitter + 1e-6
    assert s.next_due(now, capped=True) == now  # more rows waiting: no jitter either


@pytest.mark.parametrize(("window", "days", "start", "end"), [
    ("Sat-Sun", {5, 6}, 0, 1440),
    ("fri-mon 22:00-24:00", {4, 5, 6, 0}, 1320, 1440),
    ("Monday,Wed 8:30-9:00", {0, 2}, 510, 540),
    ("00:00-07:00", set(range(7)), 0, 420),
])
def test_window_syntax(window: str, days: set[int], start: int, end: int) -> None:
    parsed = parse_window(window)
    assert (set(parsed.days), parsed.start, parsed.end) == (days, start, end)


def source_config(**schedule: Any) -> str:
    data = yaml.safe_load(yaml.safe_dump(BASE_DATA))
    if "schedule" in schedule:
        del data["sources"][0]["poll_interval"]  # BASE sets it; a cron source has none
    data["sources"][0].update(schedule)
    return yaml.safe_dump(data, allow_unicode=True)


@pytest.mark.parametrize(("keys", "expected"), [
    ({"windows": ["Mon-Fri 19:00-7"]}, "sources[0].windows[0]: not a time window: 'Mon-Fri 19:00-7'"),
    ({"windows": ["Mo-Fr"]}, "unknown day 'Mo'"),
    ({"windows": ["08:00-08:00"]}, "opens and closes at the same time"),
    ({"windows": ["25:00-07:00"]}, "no such time 25:00"),
    ({"schedule": "*/5 * * *"}, "sources[0].schedule: not a cron expression: '*/5 * * *' (it has 4 fields"),
    ({"schedule": "61 * * * *"}, "sources[0].schedule: not a cron expression: '61 * * * *'"),
    ({"schedule": "*/5 * * * *", "poll_interval": "5s"}, "give `schedule` (cron) or `poll_interval`, not both"),
    ({"schedule": "0 12 * * *", "windows": ["Mon 19:00-23:00"]}, "never fires inside `windows`"),
    ({"schedule_timezone": "europe/amsterdam"}, "did you mean 'Europe/Amsterdam'"),
    ({"jitter": -1}, "sources[0].jitter: a duration cannot be negative"),
])
def test_schedule_mistakes_are_one_line_with_file_and_line(keys: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(source_config(**keys), FILE)
    (problem,) = caught.value.problems
    assert expected in str(problem) and problem.line is not None
    assert "\n" not in str(problem)


def test_a_good_schedule_loads() -> None:
    config = parse_config(source_config(schedule="0 2 * * Mon-Fri", jitter="30s",
                                        windows=["Mon-Fri 19:00-07:00", "Sat-Sun"],
                                        schedule_timezone="Europe/Amsterdam"), FILE)
    source = config.sources[0]
    assert source.schedule == "0 2 * * Mon-Fri" and source.jitter == 30.0 and len(source.windows) == 2


WINDOWISH = st.text(alphabet="MonTueWdhFrSatSu-,:0123456789 \t*/@?LW#x", max_size=30)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(window=st.one_of(WINDOWISH, st.text(max_size=20)), cron=st.one_of(WINDOWISH, st.text(max_size=20)))
def test_hostile_windows_and_cron_strings_load_or_fail_in_one_line(window: str, cron: str) -> None:
    assert_clear(lambda: parse_config(source_config(windows=[window]), FILE), yaml_parsed=True)
    assert_clear(lambda: parse_config(source_config(schedule=cron), FILE), yaml_parsed=True)


def _now_window(open_now: bool) -> str:
    """A window that holds the present moment (in UTC), or one that does not, for the next hours."""
    now = dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(hours=1) if open_now else now + dt.timedelta(hours=2)
    end = start + dt.timedelta(hours=3)
    return f"{start:%a} {start:%H}:00-{end:%H}:00"


def test_run_polls_only_the_source_inside_its_window_and_the_relay_publishes(
    tmp_path: Path, redis_client: redis.Redis, redis_url: str, stream_name: str
) -> None:
    open_db = big_table(tmp_path / "open.db", 300)
    closed_db = big_table(tmp_path / "closed.db", 200, first=10_000)
    path = items_config(tmp_path, db_url=open_db, redis_url=redis_url, stream=stream_name, batch_size=50,
                        max_rows_per_poll=100, poll_interval="1h", windows=[_now_window(True)])
    data = yaml.safe_load(path.read_text())
    closed = {**data["sources"][0], "name": "closed", "url": closed_db, "windows": [_now_window(False)]}
    data["sources"].append(closed)
    path.write_text(yaml.safe_dump(data))
    # Three capped polls of 100 rows: each goes on at once inside the window, not an hour later.
    run_until_published(path, redis_client, stream_name, 300, linger=0.5)
    assert_each_row_once(redis_client, stream_name, 300)
    outbox = Outbox(tmp_path / "outbox.db")
    try:
        states = {s.source: s for s in outbox.sources()}
    finally:
        outbox.close()
    assert states["items"].polled_at is not None
    assert "closed" not in states or states["closed"].polled_at is None  # never polled out of its window


def test_idle_polls_are_noted_within_a_second_and_on_close(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    outbox = Outbox(path)
    try:
        outbox.polled("a")
        outbox.polled("b")
        with closing(sqlite3.connect(path)) as db:
            noted = dict(db.execute("SELECT source, polled_at FROM positions").fetchall())
        assert set(noted) <= {"a", "b"}  # the first may be written at once; the next waits for the second
        time.sleep(1.05)
        outbox.polled("c")
        with closing(sqlite3.connect(path)) as db:
            noted = dict(db.execute("SELECT source, polled_at FROM positions").fetchall())
        assert set(noted) == {"a", "b", "c"}
        outbox.polled("d")
        outbox.polled("c", error="boom")  # an error is written at once, and a queued idle note does not undo it
        outbox.close()
        with closing(sqlite3.connect(path)) as db:
            rows = dict(db.execute("SELECT source, error FROM positions").fetchall())
        assert rows["c"] == "boom" and "d" in rows
    finally:
        outbox.close()  # a second close is harmless
