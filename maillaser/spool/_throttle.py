"""
Log a condition that repeats once per interval, not once per occurrence.

A full disk fails every write, and every write is tried again: logged each
time, a full disk once buried the log under tracebacks and hid everything
else.  The first occurrence of a condition is worth its
traceback; while it lasts, one line per interval saying how often it
recurred tells an operator as much.
"""

from __future__ import annotations

from collections.abc import Hashable

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

REPEAT_INTERVAL = 60.0
"""Seconds between two reports of the same condition."""


@attrs.frozen
class Report:
    """An occurrence to log, and what to say with it."""

    first: bool
    """
    The condition is new: never reported, or reported more than an interval
    ago with nothing since.
    """
    repeated: int
    """Occurrences since the last report that were not logged."""


@attrs.define
class _Reported:
    at: float
    unreported: int = 0


@attrs.define
class LogThrottle:
    """
    Decides which occurrences of a condition to log: one per interval per
    key, each report counting the occurrences not logged since the last,
    so none goes untold once the condition recurs.  The key says what "the
    same condition" is: for a failure, its type and text, so that one full
    disk failing many messages' writes is one condition.
    """

    clock: IReactorTime
    interval: float = REPEAT_INTERVAL
    _reported: dict[Hashable, _Reported] = attrs.Factory(dict)

    def report(self, key: Hashable) -> Report | None:
        """
        An occurrence of C{key} now: a L{Report} if it is to be logged,
        C{None} if it is only counted, to be told with the next report.
        """
        now = self.clock.seconds()
        reported = self._reported.get(key)
        if reported is None or self._over(reported, now):
            self._forget_over(now)
            self._reported[key] = _Reported(now)
            return Report(first=True, repeated=0)
        if now - reported.at < self.interval:
            reported.unreported += 1
            return None
        report = Report(first=False, repeated=reported.unreported)
        reported.at, reported.unreported = now, 0
        return report

    def failure(
        self, log: Logger, format: str, failure: Failure, **fields: object
    ) -> None:
        """
        Log C{failure} under C{format} at error level: with its traceback
        when the condition is new, then one line per interval with the
        number of occurrences not logged.  The condition is C{format} with
        the failure's type and message.
        """
        report = self.report((format, failure.type, failure.getErrorMessage()))
        if report is None:
            return
        if report.first:
            log.failure(format, failure, LogLevel.error, **fields)
            return
        log.error(
            format + " ({repeated} more like it since the last report): {error}",
            repeated=report.repeated,
            error=failure.getErrorMessage(),
            **fields,
        )

    def _over(self, reported: _Reported, now: float) -> bool:
        """Reported an interval ago, and nothing since: the condition ended."""
        return now - reported.at >= self.interval and not reported.unreported

    def _forget_over(self, now: float) -> None:
        over = [key for key, when in self._reported.items() if self._over(when, now)]
        for key in over:
            del self._reported[key]


__all__ = ["REPEAT_INTERVAL", "LogThrottle", "Report"]
