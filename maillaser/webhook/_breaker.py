"""
The circuit breaker in front of the webhook.

Unlike upstream, an open breaker never drops mail: it only decides whether
a delivery may *start*.  Queued messages wait in the spool, and in sync mode
the SMTP client is told ``451`` and keeps the message.  After the reset
period exactly one probe goes out; its result closes the breaker or opens it
again at once (a real half-open state).
"""

from __future__ import annotations

from enum import Enum

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from maillaser.logs import observer


class BreakerState(Enum):
    closed = "closed"
    open = "open"
    half_open = "half-open"


@attrs.define
class CircuitBreaker:
    """
    Counts consecutive failed deliveries (rounds, not single requests).

    A webhook that answers with a deliberate ``4xx`` is up, so a permanent
    rejection counts as success here: the breaker is about reachability.
    """

    threshold: int
    reset: float
    clock: IReactorTime
    _failures: int = 0
    _opened_at: float | None = None
    _probing: bool = False
    _log = Logger(observer=observer)

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.closed
        if self._probing or self.clock.seconds() >= self._opened_at + self.reset:
            return BreakerState.half_open
        return BreakerState.open

    @property
    def probe_at(self) -> float | None:
        """When an open breaker will let a probe through; C{None} unless open."""
        return None if self._opened_at is None else self._opened_at + self.reset

    def allowance(self) -> int | None:
        """How many deliveries may start now: C{None} for no limit."""
        state = self.state
        if state is BreakerState.closed:
            return None
        if state is BreakerState.half_open and not self._probing:
            return 1
        return 0

    def acquire(self) -> bool:
        """Ask to start a delivery; in the half-open state this claims the probe."""
        allowance = self.allowance()
        if allowance == 0:
            return False
        if allowance == 1:
            self._probing = True
            self._log.info("circuit breaker half-open, sending one probe")
        return True

    def succeeded(self) -> None:
        if self._opened_at is not None:
            self._log.info("circuit breaker closed")
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def failed(self) -> None:
        self._failures += 1
        if self._probing or (
            self._opened_at is None and self._failures >= self.threshold
        ):
            self._opened_at = self.clock.seconds()
            self._probing = False
            self._log.warn(
                "circuit breaker open after {failures} consecutive failures;"
                " next probe in {reset}s",
                failures=self._failures,
                reset=self.reset,
            )
