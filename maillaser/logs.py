"""
Log output for operators: MailLaser's level, and JSON lines.

Every event about a message carries a C{message_id} field, the id that
names the SMTP transaction (in the C{Received} header and the C{250}
reply), the spool entry and the C{webhook-id}, so one search finds a
message's whole story.

C{twisted.logger} has no per-logger level: a level is a filter in front of
an observer.  The runners (C{twistd}, C{twist}) and a composing program
each pick their own observers, so MailLaser filters its own events where
they are made instead: every MailLaser L{Logger} sends its events to
L{observer}, which passes those at or above the level set by L{set_level}
on to the global log publisher.  The level then holds wherever the log
goes (standard output, C{twistd --logfile} or C{--syslog}, a program's own
observers), and nothing of the runners' options is touched.  The runner
still applies its own level on top: under C{twist}, events below C{twist
--log-level} (default C{info}) are dropped whatever MailLaser's level.

Until L{set_level} is called nothing is dropped here; the C{maillaser}
plugin sets the configured level, and so does the delivery worker.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsText,
    globalLogPublisher,
    textFileLogObserver,
)

_PREDICATE = LogLevelFilterPredicate(defaultLogLevel=LogLevel.debug)

observer: ILogObserver = FilteringLogObserver(globalLogPublisher, [_PREDICATE])
"""
Where MailLaser's loggers send their events, so that they are filtered at
the source: C{_log = Logger(observer=maillaser.logs.observer)} as a class
attribute (or at module level), in every module of the package.
"""


_set: list[LogLevel | None] = [None]
"""The level L{set_level} was given, C{None} before (or after C{None})."""


def set_level(level: str | LogLevel | None) -> None:
    """
    Drop MailLaser's events below C{level} from now on, in this process.

    @param level: a L{LogLevel} or its name, such as C{Config.log_level};
        C{None} is as before any call: nothing dropped, and no debug events
        of the busy paths (L{debugging}).
    """
    chosen = LogLevel.levelWithName(level) if isinstance(level, str) else level
    _set[0] = chosen
    _PREDICATE.setLogLevelForNamespace("", LogLevel.debug if chosen is None else chosen)


def current_level() -> LogLevel:
    """The level L{set_level} last set (C{debug} before)."""
    current: LogLevel = _PREDICATE.logLevelForNamespace("")
    return current


def debugging() -> bool:
    """
    Whether L{set_level} was told C{debug}: a busy path (every SMTP
    command, every webhook request) asks before it builds a debug event,
    so that they cost nothing unless an operator asked for them, not even
    before any level is set.
    """
    return _set[0] is LogLevel.debug


def level_set() -> LogLevel | None:
    """What L{set_level} was given last, C{None} if nothing: what restores it."""
    return _set[0]


def at_level(destination: ILogObserver) -> ILogObserver:
    """
    C{destination}, sent every event (Twisted's own too) at or above
    MailLaser's level, as L{set_level} sets it now or later: for a process
    that is all MailLaser's, such as the delivery worker.
    """
    return FilteringLogObserver(destination, [_PREDICATE])


def json_observer() -> ILogObserver:
    """
    For C{twistd --logger=maillaser.logs.json_observer}: L{json_lines} on
    standard output, L{at_level}.
    """
    return at_level(json_lines(sys.stdout))


def text_observer() -> ILogObserver:
    """
    For C{twistd --logger=maillaser.logs.text_observer}: Twisted's text
    lines on standard output, L{at_level}.
    """
    return at_level(textFileLogObserver(sys.stdout))


_LEGACY_KEYS = frozenset(
    {"message", "time", "isError", "system", "format", "why", "failure"}
)
"""What C{twisted.python.log} events repeat of the C{log_} fields."""


def json_lines(out: IO[Any]) -> ILogObserver:
    """
    One flat JSON object per line, for log collectors: C{timestamp} (ISO
    8601, UTC), C{level}, C{namespace}, C{text} (the message as a text log
    shows it, with the traceback of a failure), then the event's own
    fields, such as C{message_id}.

    Not Twisted's event JSON (C{twist --log-format=json}): that one repeats
    every field in C{log_flattened}, marks objects it cannot store, and
    starts each record with an RS character that line-based tools choke on.
    """
    return FileLogObserver(out, _json_line)


def _json_line(event: LogEvent) -> str:
    line: dict[str, object] = {}
    if "log_time" in event:
        line["timestamp"] = _timestamp(event["log_time"])
    if "log_level" in event:
        line["level"] = event["log_level"].name
    line["namespace"] = event.get("log_namespace", "")
    line["text"] = _text(event)
    line.update(
        {
            key: value
            for key, value in event.items()
            if key[:4] != "log_" and key not in _LEGACY_KEYS and key not in line
        }
    )
    return _ENCODER.encode(line) + "\n"


def _timestamp(when: float) -> str:
    """
    C{datetime.isoformat}'s text for C{when}, in UTC, to the microsecond,
    at a third of its cost: the events of one second share its date.
    """
    second = math.floor(when)
    micro = round((when - second) * 1e6)
    if micro == 1_000_000:
        second, micro = second + 1, 0
    return f"{_second(second)}.{micro:06d}+00:00"


@functools.lru_cache(maxsize=2)
def _second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=repr)
"""Made once: C{json.dumps} with options builds an encoder per call."""


def _text(event: LogEvent) -> str:
    """
    The event's message, as C{eventAsText} renders it.  Plain fields are
    rendered directly, at a third of the cost, since this runs for every
    event of every message; anything else (failures, legacy events, format
    specs C{format_map} cannot do) goes the general way.
    """
    template = event.get("log_format")
    if isinstance(template, str) and "log_failure" not in event:
        try:
            return template.format_map(event)
        except Exception:
            pass
    return eventAsText(event, includeTimestamp=False, includeSystem=False)


__all__ = [
    "at_level",
    "current_level",
    "debugging",
    "json_lines",
    "json_observer",
    "level_set",
    "observer",
    "set_level",
    "text_observer",
]
