"""When a source polls: an interval or a cron expression, a jitter, and time windows.

Legacy databases often must not be read during business hours or the nightly batch:
`windows` lists the times a source may poll (`"Mon-Fri 19:00-07:00"`, `"Sat-Sun"`), in
the source's `schedule_timezone`. Times are wall-clock times of that zone (daylight
saving included); the runner turns them into monotonic due times.
"""

from __future__ import annotations

import datetime as dt
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from croniter import croniter
from pydantic import AfterValidator, Field, model_validator
from pydantic_core import PydanticCustomError

from straw.config_types import Seconds, Strict, TimeZone

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_TIMES = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")
_DAY_MINUTES = 24 * 60
_WINDOW_EXAMPLE = "e.g. 'Mon-Fri 19:00-07:00', 'Sat-Sun' or '22:00-06:00'"


@dataclass(frozen=True, slots=True)
class Window:
    """Days it opens on (0 = Monday) and minutes of the day; `end <= start` runs past midnight."""

    days: frozenset[int]
    start: int
    end: int

    def contains(self, local: dt.datetime) -> bool:
        minute = local.hour * 60 + local.minute + local.second / 60
        day = local.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        # Past midnight: the evening belongs to the day it opened, the morning to the day before's window.
        return (day in self.days and minute >= self.start) or ((day - 1) % 7 in self.days and minute < self.end)

    def openings(self, local: dt.datetime) -> list[dt.datetime]:
        """Its opening times in the week from `local`'s day on (as aware datetimes of `local`'s zone)."""
        found = []
        for offset in range(8):
            day = local.date() + dt.timedelta(days=offset)
            if day.weekday() in self.days:
                at = dt.time(self.start // 60, self.start % 60)
                found.append(dt.datetime.combine(day, at, tzinfo=local.tzinfo))
        return found


def _window_error(value: str, problem: str) -> PydanticCustomError:
    return PydanticCustomError(
        "window", "not a time window: '{value}' ({problem}); " + _WINDOW_EXAMPLE,
        {"value": value[:60], "problem": problem},
    )


def _day(name: str, value: str) -> int:
    lowered = name.lower()
    if lowered in DAYS:
        return DAYS.index(lowered)
    if lowered in _FULL_DAYS:
        return _FULL_DAYS.index(lowered)
    raise _window_error(value, f"unknown day '{name[:20]}'; use Mon, Tue, Wed, Thu, Fri, Sat, Sun")


def _days(text: str, value: str) -> frozenset[int]:
    days: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.partition("-")
        start = _day(first, value)
        end = _day(last, value) if dash else start
        days.update((start + i) % 7 for i in range((end - start) % 7 + 1))  # Fri-Mon wraps the week
    return frozenset(days)


def _minutes(hours: str, minutes: str, value: str, *, end: bool) -> int:
    h, m = int(hours), int(minutes)
    if m > 59 or h > 24 or (h == 24 and (m or not end)):
        raise _window_error(value, f"no such time {hours}:{minutes}")
    return h * 60 + m


def parse_window(value: str) -> Window:
    """`[days] [HH:MM-HH:MM]`: days alone are whole days, times alone are every day."""
    parts = value.split()
    if not parts or len(parts) > 2:
        raise _window_error(value, "days, hours, or days then hours")
    days = frozenset(range(7))
    start, end = 0, _DAY_MINUTES
    times = _TIMES.match(parts[-1])
    if times:
        start = _minutes(times[1], times[2], value, end=False)
        end = _minutes(times[3], times[4], value, end=True)
        if start == end % _DAY_MINUTES:
            raise _window_error(value, "it opens and closes at the same time; for whole days leave the hours out")
        if len(parts) == 2:
            days = _days(parts[0], value)
    elif len(parts) == 2:
        raise _window_error(value, f"'{parts[1][:20]}' is not hours like 19:00-07:00")
    else:
        days = _days(parts[0], value)
    return Window(days, start, end)


def _check_window(value: str) -> str:
    parse_window(value)
    return value


def _check_cron(value: str) -> str:
    text = value.strip()
    fields = len(text.split())
    # Five fields (minute hour day month weekday) or a nickname; seconds are what `poll_interval` is for.
    if not (text.startswith("@") or fields == 5):
        raise PydanticCustomError(
            "cron", "not a cron expression: '{value}' (it has {fields} fields, cron has 5: minute hour "
            "day-of-month month day-of-week); e.g. '*/5 * * * *' or '0 2 * * Mon-Fri'",
            {"value": value[:60], "fields": fields},
        )
    try:
        croniter(text, dt.datetime(2026, 1, 1, tzinfo=dt.UTC)).get_next(dt.datetime)
    except Exception as exc:  # croniter raises several kinds (CroniterError, ValueError, KeyError…)
        raise PydanticCustomError(
            "cron", "not a cron expression: '{value}' ({problem}); e.g. '*/5 * * * *' or '0 2 * * Mon-Fri'",
            {"value": value[:60], "problem": " ".join(str(exc).split())[:80] or type(exc).__name__},
        ) from None
    return text


Cron = Annotated[str, AfterValidator(_check_cron)]
WindowText = Annotated[str, AfterValidator(_check_window)]


class Scheduled(Strict):
    """The schedule keys every kind of source has (with its own `poll_interval` and `timezone`)."""

    schedule: Cron | None = Field(
        default=None,
        description="a cron expression (5 fields, `*/15 * * * *`, `0 2 * * Mon-Fri`, or `@hourly`) instead of "
        "`poll_interval` (giving both is an error); a poll that runs past cron times does not make them up: the "
        "next is the first cron time after it ended. See [Schedules and windows](#schedules-and-windows)",
    )
    jitter: Seconds = Field(
        default=0.0, description="each poll waits a random part of this longer (`30s`), so many sources or "
        "instances do not hit the database on the same second")
    windows: list[WindowText] = Field(
        default_factory=list, json_schema_extra={"x-default": "none (always)"},
        description="the times the source may poll: `[\"Mon-Fri 19:00-07:00\", \"Sat-Sun\"]`; outside them it waits "
        "for the next opening",
    )
    schedule_timezone: TimeZone | None = Field(
        default=None, json_schema_extra={"x-default": "the source's `timezone`"},
        description="IANA zone of `schedule` and `windows` (daylight saving followed)",
    )

    @model_validator(mode="after")
    def _schedule_or_interval(self) -> Scheduled:
        if self.schedule is not None and "poll_interval" in self.model_fields_set:
            raise PydanticCustomError(
                "schedule", "give `schedule` (cron) or `poll_interval`, not both; remove one",
                {"at": ("schedule",)},
            )
        if self.schedule is not None and self.windows and schedule_of(self).first_due(_PROBE) is None:
            raise PydanticCustomError(
                "schedule", "`schedule` never fires inside `windows` (looked a year ahead); change one of them",
                {"at": ("schedule",)},
            )
        return self


_PROBE = dt.datetime(2026, 1, 1, tzinfo=dt.UTC).timestamp()


class Schedule:
    """Next due times (wall-clock seconds) of one source."""

    def __init__(
        self,
        *,
        interval: float,
        cron: str | None = None,
        jitter: float = 0.0,
        windows: Sequence[Window] = (),
        zone: ZoneInfo | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.interval = interval
        self.cron = cron
        self.jitter = jitter
        self.windows = tuple(windows)
        self.zone = zone or ZoneInfo("UTC")
        self._rand = rand

    def is_open(self, when: float) -> bool:
        if not self.windows:
            return True
        local = dt.datetime.fromtimestamp(when, self.zone)
        return any(w.contains(local) for w in self.windows)

    def first_due(self, now: float) -> float | None:
        """When a freshly started source first polls: now (or its window's opening), or its next cron time."""
        return self._jittered(self._cron_after(now) if self.cron else self.open_from(now))

    def next_due(self, now: float, *, capped: bool = False, started: float | None = None) -> float | None:
        """After a poll that ended at `now` (and began at `started`); `capped`: it stopped at max_rows_per_poll,
        so at once if still open.

        The interval runs from the poll's start, so the time a poll takes (a settle re-look, a slow
        query) does not stretch every cycle: at 100 ms it added 7 ms at p50 and 40 at p99 (issue 14).
        A poll that ran past that time is followed an interval after it ended, as before, and a poll that
        ran past cron times by the first cron time after it ended: neither makes up for the ones it
        missed, and neither polls back to back (a poll re-looking 1 s behind an open transaction, every
        1 s, still leaves the database a second's rest). None: never again (a cron that never fires
        inside the windows; refused at load).
        """
        if capped and self.is_open(now):
            return now
        if self.cron:
            return self._jittered(self._cron_after(now))
        due = now + self.interval
        if started is not None and started + self.interval >= now:
            due = started + self.interval
        return self._jittered(self.open_from(due))

    def _jittered(self, due: float | None) -> float | None:
        if due is None or not self.jitter:
            return due
        return due + self.jitter * self._rand()

    def open_from(self, when: float) -> float:
        """`when` if a window is open then, else the next opening (wall-clock seconds)."""
        if self.is_open(when):
            return when
        local = dt.datetime.fromtimestamp(when, self.zone)
        return min(at.timestamp() for w in self.windows for at in w.openings(local) if at.timestamp() > when)

    def _cron_after(self, when: float) -> float | None:
        """The first cron time after `when` inside a window; None if none within a year."""
        cron = self.cron
        if cron is None:
            return None
        times = croniter(cron, dt.datetime.fromtimestamp(when, self.zone))
        if not self.windows:
            return float(times.get_next(float))  # a rare date (29 Feb) is still a date: no year limit
        limit = when + 366 * 86400
        for _ in range(10_000):
            at: float = times.get_next(float)
            if at > limit:
                return None
            if self.is_open(at):
                return at
            opening = self.open_from(at)
            if opening > at:  # skip the closed stretch at once rather than cron time by cron time
                times = croniter(cron, dt.datetime.fromtimestamp(opening - 1e-3, self.zone))
        return None


def schedule_of(spec: Any) -> Schedule:
    """The Schedule of a source spec (a Scheduled with `poll_interval` and `timezone`)."""
    zone = ZoneInfo(spec.schedule_timezone or getattr(spec, "timezone", "UTC"))
    return Schedule(
        interval=spec.poll_interval,
        cron=spec.schedule,
        jitter=spec.jitter,
        windows=[parse_window(text) for text in spec.windows],
        zone=zone,
    )
