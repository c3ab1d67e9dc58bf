"""
The circuit breaker in front of the webhook.

Unlike upstream, an open breaker never drops mail: it only decides whether
a delivery may *start*.  Queued messages wait in the spool, and in sync mode
the SMTP client is told ``451`` and keeps the message.  After the reset
period exactly one probe goes out; its result closes the breaker or opens it
again at once (a real half-open state).

Bridges that share a spool share one breaker per webhook too
(L{SharedBreaker}): one opening opens it for all, one probe goes out per
reset period, and its result closes or reopens it for all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from enum import Enum

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from maillaser.interfaces import IBreakerStore
from maillaser.logs import observer

SHARED_SYNC_INTERVAL = 1.0
"""Seconds between looks at the shared state: how late a bridge may learn
that another one opened or closed the breaker."""


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
    shared: SharedBreaker | None = None
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
            return 1 if self.shared is None or self.shared.permitted() else 0
        return 0

    def acquire(self) -> bool:
        """Ask to start a delivery; in the half-open state this claims the probe."""
        allowance = self.allowance()
        if allowance == 0:
            return False
        if allowance == 1:
            self._probing = True
            if self.shared is not None:
                self.shared.probe_taken()
            self._log.info("circuit breaker half-open, sending one probe")
        return True

    def succeeded(self) -> None:
        if self._opened_at is not None:
            self._log.info("circuit breaker closed")
            if self.shared is not None:
                self.shared.closed()
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
            if self.shared is not None:
                self.shared.opened(self._opened_at)
            self._log.warn(
                "circuit breaker open after {failures} consecutive failures;"
                " next probe in {reset}s",
                failures=self._failures,
                reset=self.reset,
            )

    def follow(self, opened_at: float | None) -> None:
        """
        Take the shared state another bridge wrote: opened (later than this
        breaker knows), or closed by a probe.  A probe in flight here is
        left to finish: its result is news to the others.
        """
        if self._probing:
            return
        if opened_at is None and self._opened_at is not None:
            self._log.info("circuit breaker closed by another bridge's probe")
            self._failures = 0
            self._opened_at = None
        elif opened_at is not None and (
            self._opened_at is None or opened_at > self._opened_at
        ):
            if self._opened_at is None:
                self._log.warn("circuit breaker opened by another bridge")
            self._opened_at = opened_at


def webhook_key(url: str) -> str:
    """The shared breaker's key: the webhook, without its secrets in the clear."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


@attrs.define(eq=False)
class SharedBreaker:
    """
    Keeps a L{CircuitBreaker} in step with the state the bridges share in
    C{store}: what it does is told there, what the others did is read every
    L{SHARED_SYNC_INTERVAL}, and its probe must be claimed there first.

    When the store cannot be reached the breaker decides alone, as a
    breaker of a single bridge does: sharing saves probes, it is never a
    reason to keep mail back.
    """

    store: IBreakerStore
    webhook: str
    wake: Callable[[], object] = lambda: None
    """Called when a probe was granted: the dispatcher may send it now."""
    interval: float = SHARED_SYNC_INTERVAL
    _breaker: CircuitBreaker | None = None
    _permit: bool = False
    _asking: bool = False
    _changes: int = 0
    """Local transitions: a read that a transition overtook is stale."""
    _loop: LoopingCall | None = None
    _failing: bool = False
    _log = Logger(observer=observer)

    def start(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        breaker.shared = self
        self._loop = LoopingCall(self._sync)
        self._loop.clock = breaker.clock
        self._loop.start(self.interval, now=False).addErrback(self._failed)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _sync(self) -> None:
        changes = self._changes
        read = self.store.opened_at(self.webhook)
        read.addCallbacks(self._follow, self._failed, callbackArgs=(changes,))

    def _follow(self, opened_at: float | None, changes: int) -> None:
        self._succeeded()
        if changes == self._changes and self._breaker is not None:
            self._breaker.follow(opened_at)

    def permitted(self) -> bool:
        """
        Whether this bridge holds the period's probe; if not, ask for it
        (L{wake} is called when it is granted).
        """
        if self._permit:
            return True
        if not self._asking and self._breaker is not None:
            self._asking = True
            breaker = self._breaker
            claim = self.store.claim_probe(
                self.webhook, breaker.clock.seconds(), breaker.reset
            )
            claim.addBoth(self._answered)
        return False

    def _answered(self, granted: bool | Failure) -> None:
        self._asking = False
        if isinstance(granted, Failure):
            self._failed(granted)
            granted = True  # alone, the breaker probes as it would alone
        else:
            self._succeeded()
        if granted:
            self._permit = True
            self.wake()

    def probe_taken(self) -> None:
        self._permit = False

    def opened(self, now: float) -> None:
        self._changes += 1
        self.store.record_open(self.webhook, now).addCallbacks(
            lambda _: self._succeeded(), self._failed
        )

    def closed(self) -> None:
        self._changes += 1
        self.store.record_closed(self.webhook).addCallbacks(
            lambda _: self._succeeded(), self._failed
        )

    def _failed(self, failure: Failure) -> None:
        if not self._failing:
            self._failing = True
            self._log.warn(
                "circuit breaker state cannot be shared; deciding alone: {error}",
                error=failure.getErrorMessage(),
            )

    def _succeeded(self) -> None:
        if self._failing:
            self._failing = False
            self._log.info("circuit breaker state is shared again")
