"""
The dispatcher: takes due messages from the spool and runs delivery rounds.

It decides *when*: how many rounds run at once (bounded, so one slow
message never blocks the rest), what the circuit breaker allows, when a
failed message is tried again on the long schedule, and when it is given up
and buried among the dead letters.  Nothing is ever dropped: a message
leaves the spool only when the webhook has taken it.

When the spool cannot record how a round ended (a full disk), the message
is still in the spool in its old state, due at once.  Taken out again at
once, each message would be posted as fast as the webhook answers, with a
traceback each time.  Instead it stays claimed for its next backoff step:
then the webhook's answer is recorded again (delivered, or refused for
good: no second POST), or a failed round goes again, as it would have
anyway.  Repeated failures are logged once per interval.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from maillaser.interfaces import ISpool
from maillaser.logs import observer
from maillaser.message import Message, QueuedMessage
from maillaser.spool._database import MessageNotFound
from maillaser.spool._throttle import LogThrottle
from maillaser.timers import cancel_timer
from maillaser.webhook import (
    BreakerState,
    CircuitBreaker,
    Delivered,
    Failed,
    Outcome,
    settlement,
)

POLL_INTERVAL = 5.0
"""
Look at the spool at least this often: the admin tool changes it with no
wake-up (requeue, retry), and this bounds how long such a message waits.
"""

MIN_SLEEP = 0.01
"""Never spin: even an overdue message waits this long for the next look."""

READY_PER_SLOT = 4
"""
Committed messages kept in memory while every slot is busy, per slot, up
to L{READY_BYTES} of them.  Past that they wait in the spool only and are
read back when due.
"""

READY_BYTES = 16 * 1024 * 1024

ROUND_BYTES = 16 * 1024 * 1024
"""
Message bytes in rounds at once, past which no other round starts (one
always may).  A round holds its message, its payload and the request
body: a few large messages at once, not C{concurrency} of them.
"""


class RoundDeliverer(Protocol):
    """What the dispatcher needs of L{maillaser.webhook.Deliverer}."""

    def deliver(self, message: Message) -> Deferred[Outcome]:
        """
        Run one round (the caller acquired the breaker); it always ends in
        an outcome, and reports it to the breaker.
        """


def next_attempt_delay(
    schedule: Sequence[float], rounds: int, retry_after: float | None
) -> float | None:
    """
    Seconds until round C{rounds + 1}, or C{None} when the schedule is over.

    C{rounds} counts the rounds already failed, this one included.  A
    C{Retry-After} longer than the schedule's step is honoured, up to the
    schedule's longest step: a receiver asking for next year must not keep
    a message from its dead-letter verdict for that long.
    """
    if rounds > len(schedule):
        return None
    return backoff_step(schedule, rounds, retry_after)


def backoff_step(
    schedule: Sequence[float], rounds: int, retry_after: float | None
) -> float:
    """
    As L{next_attempt_delay}, but past the schedule's end its last step:
    how long a message whose outcome could not be recorded waits, however
    often that happened.
    """
    step = schedule[min(rounds, len(schedule)) - 1]
    return max(step, min(retry_after or 0.0, max(schedule)))


@attrs.define(eq=False)
class Dispatcher(Service):
    """
    Delivers what the spool holds, as the breaker and the schedule allow.

    A L{Service}: started, it delivers what is due (after a restart, every
    pending message); stopped, it lets rounds in flight finish within
    C{grace}, and what is not delivered stays spooled.
    """

    spool: ISpool
    deliverer: RoundDeliverer
    breaker: CircuitBreaker
    clock: IReactorTime
    concurrency: int
    schedule: Sequence[float]
    grace: float = 10.0
    on_settled: Callable[[str], object] = lambda settlement: None
    """
    Told how each round was settled, once the spool recorded it: delivered,
    retry, rejected or dead.
    """
    _in_flight: dict[str, Deferred[None]] = attrs.field(factory=dict)
    _in_flight_bytes: int = 0
    _timer: IDelayedCall | None = None
    _pumping: bool = False
    _pump_done: Deferred[None] | None = None
    _again: bool = False
    _ready: deque[QueuedMessage] = attrs.Factory(deque)
    """Claimed messages waiting in memory for a slot, oldest first."""
    _ready_bytes: int = 0
    _backlog: bool = True
    """Whether the spool may hold due messages that are not in memory."""
    _held: dict[str, IDelayedCall] = attrs.Factory(dict)
    """Messages whose outcome could not be recorded, claimed until their timer."""
    _unrecorded: dict[str, int] = attrs.Factory(dict)
    """How many rounds in a row of each message could not be recorded."""
    _throttle: LogThrottle = attrs.field(init=False)
    _log = Logger(observer=observer)

    def __attrs_post_init__(self) -> None:
        self._throttle = LogThrottle(self.clock)

    def startService(self) -> None:
        super().startService()
        self.wake()

    def wake(self) -> None:
        """Look at the spool now: something may be due there."""
        self._backlog = True
        self._look()

    def _look(self) -> None:
        if not self.running:
            return
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        d = Deferred.fromCoroutine(self._pump())
        d.addErrback(self._pump_failed)
        d.addBoth(self._pumped)
        self._pump_done = None if d.called else d

    def offer(self, message: Message) -> None:
        """
        A message just committed: run it from memory as soon as a slot is
        free, sparing a spool read; if too many are waiting already, it
        waits in the spool alone.
        """
        if not (self.running and self.spool.claim(message.id)):
            return
        size = len(message.raw)
        if (
            len(self._ready) < self.concurrency * READY_PER_SLOT
            and self._ready_bytes + size <= READY_BYTES
        ):
            self._ready.append(QueuedMessage(message))
            self._ready_bytes += size
            self._fill()
        else:
            self.spool.release(message.id)
            self._backlog = True

    def _fill(self) -> None:
        """Start rounds for waiting messages while slots and the breaker allow."""
        while (
            self._ready
            and self.running
            and len(self._in_flight) < self.concurrency
            and self._room_for(self._ready[0])
            and self.breaker.acquire()
        ):
            queued = self._ready.popleft()
            self._ready_bytes -= len(queued.message.raw)
            self._start(queued)

    async def _pump(self) -> None:
        self._cancel_timer()
        self._fill()
        slots = self.concurrency - len(self._in_flight)
        allowance = self.breaker.allowance()
        if allowance is not None:
            slots = min(slots, allowance)
        batch: list[QueuedMessage] = []
        if self._in_flight_bytes > ROUND_BYTES // 2:
            slots = 0  # a round's end looks again (see ROUND_BYTES)
        if slots > 0 and self._backlog:
            self._backlog = False  # an offer that overflows meanwhile sets it again
            batch = await self.spool.due(self.clock.seconds(), slots)
            self._backlog = self._backlog or len(batch) == slots
        for queued in batch:
            # The breaker may have changed while the spool was read.
            self._start_or_release(queued)
        if self.running and len(self._in_flight) < self.concurrency:
            await self._schedule_next()

    def _pumped(self, ignored: object) -> None:
        self._pumping = False
        if self._again:
            self._again = False
            self._look()

    def _pump_failed(self, failure: Failure) -> None:
        self._throttle.failure(
            self._log, "could not read the spool; trying again shortly", failure
        )
        self._set_timer(POLL_INTERVAL)

    async def _schedule_next(self) -> None:
        """
        Sleep until the next due message, or the breaker's probe time.

        While a probe is in flight there is nothing to time: its end wakes us.
        """
        delay = POLL_INTERVAL
        probe_at = self.breaker.probe_at
        if self.breaker.state is BreakerState.open and probe_at is not None:
            delay = min(delay, probe_at - self.clock.seconds())
        elif self.breaker.allowance() != 0:
            due = await self.spool.next_due()
            if due is not None:
                delay = min(delay, due - self.clock.seconds())
        self._set_timer(max(delay, MIN_SLEEP))

    def _set_timer(self, delay: float) -> None:
        self._cancel_timer()
        if self.running:
            self._timer = self.clock.callLater(delay, self._poll)

    def _poll(self) -> None:
        """Timer: pick up what is due, and counts the admin tool may have changed."""
        self.spool.refresh().addErrback(self._refresh_failed)
        self.wake()

    def _refresh_failed(self, failure: Failure) -> None:
        self._throttle.failure(self._log, "could not refresh the spool counts", failure)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _room_for(self, queued: QueuedMessage) -> bool:
        size = len(queued.message.raw)
        return not self._in_flight_bytes or self._in_flight_bytes + size <= ROUND_BYTES

    def _start_or_release(self, queued: QueuedMessage) -> None:
        """Start a claimed message's round if allowed, else give the claim back."""
        if not self._room_for(queued):
            self.spool.release(queued.message.id)
            self._backlog = True  # read again when a round ends
        elif self.running and self.breaker.acquire():
            self._start(queued)
        else:
            self.spool.release(queued.message.id)

    def _start(self, queued: QueuedMessage) -> None:
        size = len(queued.message.raw)
        self._in_flight_bytes += size
        d = Deferred.fromCoroutine(self._run(queued))
        if d.called:
            self._in_flight_bytes -= size
        else:
            self._in_flight[queued.message.id] = d

    async def _run(self, queued: QueuedMessage) -> None:
        message_id = queued.message.id
        try:
            outcome = await self.deliverer.deliver(queued.message)
        except CancelledError:
            return  # shutting down: the message simply stays spooled
        finally:
            # The slot is free once the webhook answered; the claim keeps
            # the message from being handed out again until it is settled.
            if self._in_flight.pop(message_id, None) is not None:
                self._in_flight_bytes -= len(queued.message.raw)
            self._fill()
            if self._backlog:
                self._look()
        await self._record(outcome, queued)

    async def _record(self, outcome: Outcome, queued: QueuedMessage) -> None:
        try:
            how = await self._settle(outcome, queued)
        except MessageNotFound as gone:
            # Settled elsewhere: another bridge took the message over once
            # this one's lease had expired, or delivered it already.
            self._log.info(
                "{message_id} was settled elsewhere: {why}",
                message_id=queued.message.id,
                why=str(gone),
            )
            self._unrecorded.pop(queued.message.id, None)
            self.spool.release(queued.message.id)
            return
        except Exception:
            self._hold(outcome, queued, Failure())
            return
        self._unrecorded.pop(queued.message.id, None)
        self.on_settled(how)
        if not isinstance(outcome, Delivered):
            self._look()  # its next round needs a timer

    async def _settle(self, outcome: Outcome, queued: QueuedMessage) -> str:
        """Record the outcome in the spool; how the round was settled."""
        message_id = queued.message.id
        how = settlement(outcome)
        if isinstance(outcome, Delivered):
            await self.spool.delivered(
                message_id, outcome.attempts, keep_until=outcome.keep_until
            )
            return how
        delay = self._retry_delay(outcome, queued)
        if delay is None:
            await self.spool.bury(message_id, outcome.attempts)
            self._log.error(
                "dead-lettered {message_id} after {rounds} round(s): {error}",
                message_id=message_id,
                rounds=queued.rounds + 1,
                error=outcome.attempts[-1].error,
            )
            return "dead" if how == "retry" else how
        await self.spool.reschedule(
            message_id, self.clock.seconds() + delay, outcome.attempts
        )
        self._log.info(
            "{message_id} stays spooled; next round in {delay:.0f}s",
            message_id=message_id,
            delay=delay,
        )
        return how

    def _retry_delay(self, outcome: Failed, queued: QueuedMessage) -> float | None:
        """Seconds until a failed message's next round; C{None}: bury it."""
        if outcome.permanent:
            return None
        return next_attempt_delay(self.schedule, queued.rounds + 1, outcome.retry_after)

    def _hold(self, outcome: Outcome, queued: QueuedMessage, failure: Failure) -> None:
        """
        The outcome was not recorded: keep the message claimed for its next
        backoff step, a step further each time in a row.
        """
        message_id = queued.message.id
        unrecorded = self._unrecorded.get(message_id, 0) + 1
        self._unrecorded[message_id] = unrecorded
        retry_after = outcome.retry_after if isinstance(outcome, Failed) else None
        delay = backoff_step(self.schedule, queued.rounds + unrecorded, retry_after)
        self._throttle.failure(
            self._log,
            "could not record the outcome for {message_id}; it stays spooled,"
            " held for {delay:.0f}s",
            failure,
            message_id=message_id,
            delay=delay,
        )
        if self.running:
            self._held[message_id] = self.clock.callLater(
                delay, self._unhold, outcome, queued
            )

    def _unhold(self, outcome: Outcome, queued: QueuedMessage) -> None:
        """
        A failed round is due again by now: it goes again, and its next
        round records it.  The webhook's answer to any other stands: only
        recording it is tried again.
        """
        message_id = queued.message.id
        del self._held[message_id]
        if (
            isinstance(outcome, Failed)
            and self._retry_delay(outcome, queued) is not None
        ):
            self.spool.release(message_id)
            self.wake()
        else:
            Deferred.fromCoroutine(self._record(outcome, queued))

    def stopService(self) -> Deferred[None]:
        """
        Let rounds in flight finish within the grace period, then cancel
        them; anything not delivered is still in the spool for next time.
        """
        super().stopService()
        self._cancel_timer()
        for timer in self._held.values():
            timer.cancel()
        self._held.clear()
        self._unrecorded.clear()
        # A look at the spool in progress must end before the spool closes.
        looking = [self._pump_done] if self._pumping and self._pump_done else []
        if not (self._in_flight or looking):
            return succeed(None)
        pending = [*self._in_flight.values(), *looking]
        self._log.info("waiting for {count} delivery round(s)", count=len(pending))
        everything = DeferredList(pending, consumeErrors=True)
        timer = self.clock.callLater(self.grace, _cancel_all, pending)
        return everything.addCallback(cancel_timer, timer).addCallback(lambda _: None)


def _cancel_all(pending: list[Deferred[None]]) -> None:
    for d in pending:
        d.cancel()


__all__ = ["Dispatcher", "RoundDeliverer", "backoff_step", "next_attempt_delay"]
