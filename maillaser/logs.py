"""
Log output for operators: JSON lines, and the level.

Every event about a message carries a C{message_id} field, the id that
names the SMTP transaction (in the C{Received} header and the C{250}
reply), the spool entry and the C{webhook-id}, so one search finds a
message's whole story.

C{twisted.logger} has no per-logger level: a level is a filter in front of
an observer, so whoever picks the observer must apply it.  Both runners
pick it from their own options after the plugin's options are parsed,
which is when L{configure_runner} adjusts them:

  - C{twistd} takes the observer from C{--logger}: L{json_observer} and
    L{text_observer} apply the level.  Without C{--logger}, twistd would
    build an observer with no level, so it is given the same one at the
    level: L{text_observer} for standard output (C{twistd -n}),
    L{file_observer} for C{--logfile} or a daemon's C{twistd.log}, and
    L{syslog_observer} for C{--syslog}.
  - C{twist} builds a filtered observer itself, so it is told the level
    (unless C{twist --log-level} chose other than its default, info) and,
    for C{--log-format=json} (the default when standard output is not a
    terminal), to write L{json_lines} rather than Twisted's
    record-separated JSON.
"""

from __future__ import annotations

import functools
import json
import math
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsText,
    textFileLogObserver,
)
from twisted.python import usage
from twisted.python.logfile import LogFile

_LEGACY_KEYS = frozenset(
    {"message", "time", "isError", "system", "format", "why", "failure"}
)
"""What C{twisted.python.log} events repeat of the C{log_} fields."""

_process_level = LogLevel.info
"""
The level chosen on the C{twistd}/C{twist} command line (or environment).
Process-wide because the log observers are; a bridge built with
C{maillaser.service.makeService} never reads or sets it.
"""

_twistd_destination = "twistd.log"
"""Where twistd was told to log: its log file, or its syslog prefix."""


def configure_runner(options: usage.Options, level: str) -> None:
    """
    Apply the bridge's log level, and JSON lines, to the runner of this process.

    @param options: the plugin's options, just parsed; C{options.parent} is
        the runner's (C{twist}'s or C{twistd}'s), if any.
    @param level: a L{LogLevel} name, from C{Config.log_level}.
    """
    global _process_level
    _process_level = LogLevel.levelWithName(level)
    runner: Any = options.parent
    if runner is None:
        return
    if "fileLogObserverFactory" in runner:  # twist
        if runner["logLevel"] is runner.defaultLogLevel:
            runner["logLevel"] = _process_level
        if runner.get("logFormat") == "json":
            runner["fileLogObserverFactory"] = json_lines
    elif runner.get("logger") is None:  # twistd, about to pick its own
        observer = _twistd_observer(runner)
        if observer is not None:
            runner["logger"] = f"{__name__}.{observer.__name__}"


def _twistd_observer(runner: Any) -> Callable[[], ILogObserver] | None:
    """
    Ours of the observer twistd would build from C{runner}'s options,
    remembering where it writes.  A daemon told to log to standard output
    is left to twistd, which refuses it.
    """
    global _twistd_destination
    nodaemon, logfile = runner.get("nodaemon"), runner.get("logfile")
    if runner.get("syslog"):
        _twistd_destination = runner.get("prefix") or "twisted"
        return syslog_observer
    if logfile == "-" or (nodaemon and not logfile):  # standard output
        return text_observer if nodaemon else None
    _twistd_destination = logfile or "twistd.log"
    return file_observer


def json_observer() -> ILogObserver:
    """For C{twistd --logger}: L{json_lines} on standard output, at the level."""
    return _at_level(json_lines(sys.stdout))


def text_observer() -> ILogObserver:
    """
    For C{twistd --logger}, and C{twistd -n} without it: Twisted's text
    lines on standard output, at the level.
    """
    return _at_level(textFileLogObserver(sys.stdout))


def file_observer() -> ILogObserver:
    """
    For C{twistd --logfile}, and a daemon's C{twistd.log}: text lines in the
    file twistd would write, rotated as twistd rotates it (at a megabyte,
    and on SIGUSR1 unless something else took that signal), at the level.
    """
    log_file = LogFile.fromFullPath(_twistd_destination)
    if not signal.getsignal(signal.SIGUSR1):
        signal.signal(signal.SIGUSR1, functools.partial(_rotate_soon, log_file))
    return _at_level(textFileLogObserver(log_file))


def _rotate_soon(log_file: LogFile, *signal_arguments: object) -> None:
    """The signal handler: rotate on the reactor's thread, as twistd does."""
    from twisted.internet import reactor
    from twisted.internet.interfaces import IReactorThreads

    IReactorThreads(reactor).callFromThread(log_file.rotate)


def syslog_observer() -> ILogObserver:
    """For C{twistd --syslog}: what twistd would send to syslog, at the level."""
    from twisted.python.syslog import SyslogObserver

    observer = SyslogObserver(_twistd_destination)
    # A plain callable, as twistd itself passes it (typed as an interface).
    return _at_level(LegacyLogObserverWrapper(observer.emit))  # type: ignore[arg-type]


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


def _at_level(observer: ILogObserver) -> ILogObserver:
    predicate = LogLevelFilterPredicate(defaultLogLevel=_process_level)
    return FilteringLogObserver(observer, [predicate])


__all__ = [
    "configure_runner",
    "file_observer",
    "json_lines",
    "json_observer",
    "syslog_observer",
    "text_observer",
]
