"""
The end of a delivered message's retention: once every link in its
payload has expired, its bytes go.

Links carry their expiry, so nothing is lost by sweeping late: a link
past its time is refused whether or not its bytes are still on disk.
The sweep only bounds how long the disk holds them past their time.
"""

from __future__ import annotations

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from maillaser.interfaces import ISpool
from maillaser.logs import observer

SWEEP_INTERVAL = 60.0
"""Seconds between two sweeps: an expired message stays at most this long."""


@attrs.define(eq=False)
class RetentionSweep:
    """Deletes expired retained messages every L{SWEEP_INTERVAL}, on C{clock}."""

    spool: ISpool
    clock: IReactorTime
    interval: float = SWEEP_INTERVAL
    _call: LoopingCall | None = None
    _log = Logger(observer=observer)

    def start(self) -> None:
        self._call = LoopingCall(self._sweep)
        self._call.clock = self.clock
        self._call.start(self.interval, now=True)

    def stop(self) -> None:
        if self._call is not None and self._call.running:
            self._call.stop()

    def _sweep(self) -> object:
        swept = self.spool.expire_retained(self.clock.seconds())
        return swept.addCallbacks(self._swept, self._failed)

    def _swept(self, count: int) -> None:
        if count:
            self._log.info("{count} expired retained message(s) deleted", count=count)

    def _failed(self, failure: Failure) -> None:
        # The next sweep tries again; a failing spool is reported by health.
        self._log.warn(
            "could not delete expired retained messages: {error}",
            error=failure.getErrorMessage(),
        )


__all__ = ["SWEEP_INTERVAL", "RetentionSweep"]
