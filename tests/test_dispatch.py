"""
The dispatcher on a Clock, over a MemorySpool or a real SqliteSpool, with
a scripted deliverer: scheduling without waiting.
"""

from __future__ import annotations

import os
import sqlite3
from collections import defaultdict
from collections.abc import Sequence
from functools import partial
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from maillaser.interfaces import ISpool
from maillaser.message import (
    Attempt,
    Envelope,
    Message,
    QueuedMessage,
    WebhookResponse,
)
from maillaser.spool import (
    Dispatcher,
    MessageNotFound,
    PostgresDatabase,
    PostgresSpool,
    SpoolDatabase,
    SpoolError,
    open_spool,
)
from maillaser.spool._dispatch import (
    POLL_INTERVAL,
    READY_BYTES,
    READY_PER_SLOT,
    ROUND_BYTES,
    backoff_step,
    next_attempt_delay,
)
from maillaser.spool._throttle import REPEAT_INTERVAL
from maillaser.testing import MemorySpool, SpoolFailure
from maillaser.webhook import (
    BreakerState,
    CircuitBreaker,
    Delivered,
    Failed,
    Outcome,
)
from tests.test_spool import expire_leases

SCHEDULE = (5.0, 300.0, 1800.0)

Step = int | WebhookResponse | None


@attrs.define
class ScriptedDeliverer:
    """
    Runs rounds as the webhook's C{Deliverer} does with no quick retries:
    one POST a round, answered from a script (a status, a
    L{WebhookResponse}, or C{None}: no answer until the test gives one
    through C{hanging}) after C{latency} seconds, each round reported to
    the breaker.  When the script runs out every POST gets C{default}.
    """

    clock: Clock
    breaker: CircuitBreaker
    script: list[Step] = attrs.Factory(list)
    default: Step = 200
    latency: float = 0.0
    posts: list[tuple[str, float]] = attrs.Factory(list)
    """The id and time of every POST."""
    hanging: list[Deferred[WebhookResponse]] = attrs.Factory(list)

    @property
    def posted(self) -> list[str]:
        return [message_id for message_id, _ in self.posts]

    def deliver(self, message: Message) -> Deferred[Outcome]:
        self.posts.append((message.id, self.clock.seconds()))
        step = self.script.pop(0) if self.script else self.default
        return self._answer(step).addCallback(self._outcome)

    def _answer(self, step: Step) -> Deferred[WebhookResponse]:
        if step is None:
            hanging: Deferred[WebhookResponse] = Deferred()
            self.hanging.append(hanging)
            return hanging
        response = step if isinstance(step, WebhookResponse) else WebhookResponse(step)
        if self.latency:
            return deferLater(self.clock, self.latency, lambda: response)
        return succeed(response)

    def _outcome(self, response: WebhookResponse) -> Outcome:
        status = response.status
        if 200 <= status < 300:
            self.breaker.succeeded()
            return Delivered((Attempt(self.clock.seconds(), status),))
        attempt = Attempt(self.clock.seconds(), status, f"HTTP {status}")
        permanent = 400 <= status < 500 and status not in (408, 429)
        if permanent:
            self.breaker.succeeded()
        else:
            self.breaker.failed()
        return Failed((attempt,), permanent=permanent, retry_after=response.retry_after)


ENVELOPE = Envelope("someone@test.com", ("target@example.com",))


def message(n: int, at: float = 0.0) -> Message:
    return Message(f"msg_{n:028x}", ENVELOPE, b"Subject: %d\r\n\r\nbody\r\n" % n, at)


def log_events(test: SynchronousTestCase) -> EventLoggingObserver:
    """Every event logged until the end of C{test}."""
    events = EventLoggingObserver()
    globalLogPublisher.addObserver(events)
    test.addCleanup(globalLogPublisher.removeObserver, events)
    return events


class ScheduleTests(SynchronousTestCase):
    def test_steps(self) -> None:
        self.assertEqual(next_attempt_delay(SCHEDULE, 1, None), 5.0)
        self.assertEqual(next_attempt_delay(SCHEDULE, 3, None), 1800.0)
        self.assertIsNone(next_attempt_delay(SCHEDULE, 4, None))

    def test_retry_after_is_honoured(self) -> None:
        self.assertEqual(next_attempt_delay(SCHEDULE, 1, 60.0), 60.0)
        self.assertEqual(next_attempt_delay(SCHEDULE, 2, 60.0), 300.0)

    def test_retry_after_is_capped_by_the_longest_step(self) -> None:
        self.assertEqual(next_attempt_delay(SCHEDULE, 1, 99_999_999_999.0), 1800.0)
        self.assertIsNone(next_attempt_delay(SCHEDULE, 4, 99_999_999_999.0))

    def test_backoff_step_stays_on_the_last_step(self) -> None:
        self.assertEqual(
            [backoff_step(SCHEDULE, rounds, None) for rounds in range(1, 6)],
            [5.0, 300.0, 1800.0, 1800.0, 1800.0],
        )
        self.assertEqual(backoff_step(SCHEDULE, 1, 60.0), 60.0)
        self.assertEqual(backoff_step(SCHEDULE, 9, 99_999_999_999.0), 1800.0)


class DispatcherCase(SynchronousTestCase):
    """A dispatcher over a MemorySpool and a scripted deliverer, on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.spool: ISpool = MemorySpool()
        self.numbers = 0
        self.breaker = CircuitBreaker(threshold=2, reset=60.0, clock=self.clock)

    def deliverer(
        self, *script: Step, default: Step = 200, latency: float = 0.0
    ) -> ScriptedDeliverer:
        return ScriptedDeliverer(
            self.clock, self.breaker, list(script), default=default, latency=latency
        )

    def dispatcher(
        self, deliverer: ScriptedDeliverer, concurrency: int = 4, **kwargs: Any
    ) -> Dispatcher:
        dispatcher = Dispatcher(
            spool=self.spool,
            deliverer=deliverer,
            breaker=self.breaker,
            clock=self.clock,
            concurrency=concurrency,
            schedule=SCHEDULE,
            grace=5.0,
            **kwargs,
        )
        dispatcher.startService()
        self.addCleanup(lambda: dispatcher.running and dispatcher.stopService())
        return dispatcher

    def new_message(self) -> Message:
        self.numbers += 1
        return message(self.numbers, at=self.clock.seconds())

    def add(self, count: int) -> list[str]:
        ids = []
        for _ in range(count):
            added = self.new_message()
            self.spool.add(added)
            ids.append(added.id)
        return ids

    @property
    def memory(self) -> MemorySpool:
        assert isinstance(self.spool, MemorySpool)
        return self.spool


class DispatcherTests(DispatcherCase):
    def test_pending_messages_are_delivered_on_start(self) -> None:
        self.add(3)
        deliverer = self.deliverer()
        self.dispatcher(deliverer)
        self.assertEqual(len(deliverer.posts), 3)
        self.assertEqual(self.spool.stats().pending, 0)
        self.assertEqual(self.spool.stats().dead, 0)

    def test_concurrency_is_bounded(self) -> None:
        self.add(5)
        deliverer = self.deliverer(None, None, None, None, None)
        self.dispatcher(deliverer, concurrency=2)
        self.assertEqual(len(deliverer.posts), 2)
        deliverer.hanging[0].callback(WebhookResponse(200))
        self.assertEqual(len(deliverer.posts), 3)

    def test_bytes_in_rounds_are_bounded(self) -> None:
        """
        Past ROUND_BYTES no other round starts, whatever the free slots
        (one round always may); the spool is read again when one ends.
        """
        size = ROUND_BYTES // 2 + 1
        big = []
        for _ in range(3):
            added = attrs.evolve(self.new_message(), raw=b"x" * size)
            self.spool.add(added)
            big.append(added.id)
        [small] = self.add(1)
        deliverer = self.deliverer(None, None, None, None)
        self.dispatcher(deliverer, concurrency=8)
        self.assertEqual(deliverer.posted, [big[0], small])  # a small one fits
        deliverer.hanging[0].callback(WebhookResponse(200))
        self.assertEqual(deliverer.posted, [big[0], small, big[1]])
        deliverer.hanging[2].callback(WebhookResponse(200))
        self.assertEqual(deliverer.posted, [big[0], small, *big[1:]])
        for hanging in deliverer.hanging[1::2]:
            hanging.callback(WebhookResponse(200))
        self.assertEqual(self.spool.stats().pending, 0)

    def test_failed_round_waits_for_the_schedule_then_dead_letters(self) -> None:
        [mid] = self.add(1)
        deliverer = self.deliverer(default=503)
        dispatcher = self.dispatcher(deliverer)
        self.breaker.threshold = 100
        self.assertEqual(len(deliverer.posts), 1)
        self.assertEqual(self.memory.due_at[mid], 5.0)
        self.clock.advance(4.9)
        self.assertEqual(len(deliverer.posts), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(deliverer.posts), 2)
        self.clock.advance(300)
        self.assertEqual(len(deliverer.posts), 3)
        self.clock.advance(1800)
        self.assertEqual(len(deliverer.posts), 4)
        self.assertEqual(list(self.memory.dead), [mid])
        self.assertEqual(len(self.memory.attempts[mid]), 4)
        self.clock.advance(100_000)
        self.assertEqual(len(deliverer.posts), 4)
        self.assertTrue(dispatcher.running)

    def test_permanent_rejection_dead_letters_at_once(self) -> None:
        [mid] = self.add(1)
        self.dispatcher(self.deliverer(410))
        self.assertEqual(list(self.memory.dead), [mid])

    def test_retry_after_delays_the_next_round(self) -> None:
        [mid] = self.add(1)
        self.dispatcher(self.deliverer(WebhookResponse(429, retry_after=120.0)))
        self.assertEqual(self.memory.due_at[mid], 120.0)

    def test_each_settled_round_is_told(self) -> None:
        """Once the spool recorded it: delivered, retry, rejected, dead."""
        settled: list[str] = []
        self.add(4)
        self.breaker.threshold = 100
        deliverer = self.deliverer(200, 503, 410, 503, default=503)
        self.dispatcher(deliverer, on_settled=settled.append)
        self.assertEqual(settled, ["delivered", "retry", "rejected", "retry"])
        for step in SCHEDULE:
            self.clock.advance(step)
        self.assertEqual(settled[4:], ["retry"] * 4 + ["dead"] * 2)

    def test_open_breaker_sends_nothing_and_keeps_everything(self) -> None:
        self.add(2)
        deliverer = self.deliverer(500, 500)
        dispatcher = self.dispatcher(deliverer)
        self.assertIs(self.breaker.state, BreakerState.open)
        self.add(3)
        dispatcher.wake()
        self.clock.advance(59)
        self.assertEqual(len(deliverer.posts), 2)
        self.assertEqual(self.spool.stats().pending, 5)
        self.clock.advance(1)  # one probe, which succeeds: then the rest flow
        self.assertEqual(len(deliverer.posts), 2 + 5)
        self.assertEqual(self.spool.stats().pending, 0)
        self.assertEqual(self.spool.stats().dead, 0)

    def test_half_open_sends_a_single_probe(self) -> None:
        self.add(2)
        deliverer = self.deliverer(500, 500, None)
        dispatcher = self.dispatcher(deliverer)
        self.add(3)
        self.clock.advance(60)
        self.assertEqual(len(deliverer.posts), 3)
        dispatcher.wake()
        self.assertEqual(len(deliverer.posts), 3)
        deliverer.hanging[0].callback(WebhookResponse(500))
        self.assertIs(self.breaker.state, BreakerState.open)
        self.assertEqual(len(deliverer.posts), 3)

    def test_new_message_wakes_the_dispatcher(self) -> None:
        deliverer = self.deliverer()
        dispatcher = self.dispatcher(deliverer)
        self.add(1)
        dispatcher.wake()
        self.assertEqual(len(deliverer.posts), 1)

    def test_idle_dispatcher_polls_the_spool(self) -> None:
        deliverer = self.deliverer()
        self.dispatcher(deliverer)
        self.add(1)  # e.g. requeued by the admin tool, without a wake-up
        self.clock.advance(5)
        self.assertEqual(len(deliverer.posts), 1)

    def test_stop_waits_for_rounds_in_flight(self) -> None:
        self.add(1)
        deliverer = self.deliverer(None)
        dispatcher = self.dispatcher(deliverer)
        d = dispatcher.stopService()
        self.assertNoResult(d)
        deliverer.hanging[0].callback(WebhookResponse(200))
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.spool.stats().pending, 0)

    def test_stop_cancels_after_grace_and_the_message_stays(self) -> None:
        self.add(1)
        deliverer = self.deliverer(None)
        dispatcher = self.dispatcher(deliverer)
        d = dispatcher.stopService()
        self.clock.advance(5)
        self.successResultOf(d)
        self.assertEqual(self.spool.stats().pending, 1)
        self.assertEqual(self.spool.stats().dead, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class CountingSpool(MemorySpool):
    """A MemorySpool that counts how often messages are read back."""

    reads = 0

    def due(self, now: float, limit: int) -> Deferred[list[QueuedMessage]]:
        self.reads += 1
        return super().due(now, limit)


class OfferTests(DispatcherCase):
    """A message just committed is delivered from memory, never twice."""

    def setUp(self) -> None:
        super().setUp()
        self.counting = self.spool = CountingSpool()

    def offer(self, dispatcher: Dispatcher) -> str:
        offered = self.new_message()
        self.spool.add(offered)
        dispatcher.offer(offered)
        return offered.id

    def test_offered_message_starts_without_reading_the_spool(self) -> None:
        deliverer = self.deliverer(None)
        dispatcher = self.dispatcher(deliverer)
        reads_at_start = self.counting.reads
        message_id = self.offer(dispatcher)
        self.assertEqual(deliverer.posted, [message_id])
        self.assertEqual(self.counting.reads, reads_at_start)
        self.assertIn(message_id, self.counting.claimed)
        deliverer.hanging[0].callback(WebhookResponse(200))
        self.assertEqual(self.spool.stats().pending, 0)

    def test_no_free_slot_keeps_it_waiting_in_memory(self) -> None:
        deliverer = self.deliverer(None, None)
        dispatcher = self.dispatcher(deliverer, concurrency=1)
        reads_at_start = self.counting.reads
        self.offer(dispatcher)
        second = self.offer(dispatcher)
        self.assertEqual(len(deliverer.posts), 1)
        self.assertIn(second, self.counting.claimed)
        deliverer.hanging[0].callback(WebhookResponse(200))
        self.assertEqual(len(deliverer.posts), 2)
        deliverer.hanging[1].callback(WebhookResponse(200))
        self.assertEqual(self.spool.stats().pending, 0)
        self.assertEqual(self.counting.reads, reads_at_start)

    def test_past_the_memory_limit_it_waits_in_the_spool(self) -> None:
        deliverer = self.deliverer(*[None] * (2 + READY_PER_SLOT))
        dispatcher = self.dispatcher(deliverer, concurrency=1)
        for _ in range(1 + READY_PER_SLOT):
            self.offer(dispatcher)
        overflow = self.offer(dispatcher)
        self.assertNotIn(overflow, self.counting.claimed)
        reads = self.counting.reads
        for number in range(1 + READY_PER_SLOT):
            deliverer.hanging[number].callback(WebhookResponse(200))
        self.assertEqual(len(deliverer.posts), 2 + READY_PER_SLOT)
        self.assertEqual(deliverer.posted[-1], overflow)
        self.assertGreater(self.counting.reads, reads)
        deliverer.hanging[-1].callback(WebhookResponse(200))
        self.assertEqual(self.spool.stats().pending, 0)

    def test_memory_for_waiting_messages_is_bounded_in_bytes(self) -> None:
        deliverer = self.deliverer(None)
        dispatcher = self.dispatcher(deliverer, concurrency=1)
        self.offer(dispatcher)
        big = attrs.evolve(self.new_message(), raw=b"x" * (READY_BYTES + 1))
        self.spool.add(big)
        dispatcher.offer(big)
        self.assertNotIn(big.id, self.counting.claimed)
        small = self.offer(dispatcher)
        self.assertIn(small, self.counting.claimed)

    def test_open_breaker_holds_it_until_the_probe(self) -> None:
        deliverer = self.deliverer(500, 500)
        dispatcher = self.dispatcher(deliverer)
        self.offer(dispatcher)
        self.offer(dispatcher)
        self.assertIs(self.breaker.state, BreakerState.open)
        message_id = self.offer(dispatcher)
        self.assertEqual(len(deliverer.posts), 2)
        self.assertEqual(self.spool.stats().pending, 3)
        self.clock.advance(60)  # the breaker's reset: the waiting one probes
        self.assertEqual(deliverer.posted[2], message_id)
        self.assertIs(self.breaker.state, BreakerState.closed)
        self.assertEqual(len(deliverer.posts), 5)  # then the two to retry
        self.assertEqual(self.spool.stats().pending, 0)

    def test_a_message_already_claimed_is_not_started_again(self) -> None:
        deliverer = self.deliverer(None)
        dispatcher = self.dispatcher(deliverer)
        queued = self.new_message()
        self.spool.add(queued)
        dispatcher.wake()  # the spool hands it out first
        dispatcher.offer(queued)
        self.assertEqual(len(deliverer.posts), 1)


class UnrecordedOutcomeTests(DispatcherCase):
    """
    Issue 12, item 6: with the spool's disk full and the webhook answering
    200, 25 messages became 51,985 POSTs in 79 s, and 127 MB of log: the
    delete failed, so each message was due again at once.  Now a message
    whose outcome could not be recorded stays claimed for its next backoff
    step, a step further each time in a row.
    """

    def setUp(self) -> None:
        super().setUp()
        self.settled: list[str] = []
        [self.mid] = self.add(1)
        self.memory.broken = True
        self.breaker.threshold = 100

    def start(self, *script: Step) -> ScriptedDeliverer:
        deliverer = self.deliverer(*script)
        self.dispatcher(deliverer, on_settled=self.settled.append)
        return deliverer

    def test_delivered_it_is_not_posted_again(self) -> None:
        """Only the delete is tried again, until it can be done."""
        deliverer = self.start(200)
        self.clock.advance(5)
        self.clock.advance(299.9)
        self.assertEqual(self.spool.stats().pending, 1)
        self.assertEqual(self.settled, [])
        self.memory.broken = False
        self.clock.advance(0.1)
        self.assertEqual(self.spool.stats().pending, 0)
        self.assertEqual(self.settled, ["delivered"])
        self.assertEqual(deliverer.posts, [(self.mid, 0.0)])
        self.assertEqual(len(self.flushLoggedErrors(SpoolFailure)), 1)

    def test_refused_for_good_it_is_not_posted_again(self) -> None:
        deliverer = self.start(410)
        self.clock.advance(5)
        self.memory.broken = False
        self.clock.advance(300)
        self.assertEqual(list(self.memory.dead), [self.mid])
        self.assertEqual(self.settled, ["rejected"])
        self.assertEqual(deliverer.posts, [(self.mid, 0.0)])
        self.flushLoggedErrors(SpoolFailure)

    def test_a_failed_round_goes_again_after_its_backoff_step(self) -> None:
        deliverer = self.start(503, 503, 503)
        self.clock.advance(4.9)
        self.assertEqual(len(deliverer.posts), 1)
        self.clock.advance(0.1)
        self.clock.advance(299.9)
        self.assertEqual(deliverer.posts, [(self.mid, 0.0), (self.mid, 5.0)])
        self.memory.broken = False
        self.clock.advance(0.1)
        self.assertEqual(deliverer.posts[2], (self.mid, 305.0))
        self.assertEqual(self.settled, ["retry"])
        self.assertEqual(self.memory.due_at[self.mid], 305.0 + SCHEDULE[0])
        self.flushLoggedErrors(SpoolFailure)

    def test_retry_after_counts_for_the_hold(self) -> None:
        """A receiver asking for two minutes gets them, recorded or not."""
        deliverer = self.start(WebhookResponse(503, retry_after=120.0))
        self.clock.advance(119.9)
        self.assertEqual(len(deliverer.posts), 1)
        self.clock.advance(0.1)
        self.assertEqual(deliverer.posts[1], (self.mid, 120.0))
        self.flushLoggedErrors(SpoolFailure)

    def test_stop_forgets_the_holds(self) -> None:
        """No timer outlives the service; the claims go with the process."""
        self.add(1)
        dispatcher = self.dispatcher(self.deliverer())
        self.successResultOf(dispatcher.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.flushLoggedErrors(SpoolFailure)


class TakenOverSpool(MemorySpool):
    """
    A shared spool whose lease on a message expired while its round ran:
    another bridge holds the message now, and this one cannot settle it.
    """

    def reschedule(
        self, message_id: str, at: float, attempts: Sequence[Attempt]
    ) -> Deferred[None]:
        del self.pending[message_id], self.due_at[message_id]  # the other's now
        return fail(MessageNotFound(f"message {message_id} is held by another bridge"))


class SettledElsewhereTests(DispatcherCase):
    def test_the_round_is_dropped_not_held(self) -> None:
        """
        Nothing to record here, nor to try again: the other bridge's round
        settles the message.  Not held for a backoff step, not an error.
        """
        self.spool = TakenOverSpool()
        [mid] = self.add(1)
        events = log_events(self)
        settled: list[str] = []
        deliverer = self.deliverer(503)
        dispatcher = self.dispatcher(deliverer, on_settled=settled.append)
        self.clock.advance(1000)
        self.assertEqual(deliverer.posts, [(mid, 0.0)])
        self.assertEqual(
            (settled, self.memory.claimed, dispatcher._held), ([], set(), {})
        )
        self.assertEqual(
            [e["why"] for e in events if "settled elsewhere" in e["log_format"]],
            [f"message {mid} is held by another bridge"],
        )


class FullDiskTests(DispatcherCase):
    """
    Item 6 end to end: a real SqliteSpool whose settling writes fail as on
    a full disk, 25 messages, a webhook answering after 50 ms, simulated
    minutes.
    """

    def setUp(self) -> None:
        super().setUp()
        self.spool = self.sqlite = open_spool(
            os.path.join(self.mktemp(), "spool"), self.clock
        )
        self.addCleanup(self.sqlite.close)
        self.ids = self.add(25)
        self.clock.advance(0)
        self.full = [
            self.patch(SpoolDatabase, name, self.disk_full)
            for name in ("delete", "reschedule", "bury")
        ]
        self.events = log_events(self)
        self.breaker.threshold = 1000

    def start(self, status: int) -> None:
        self.webhook = self.deliverer(default=status, latency=0.05)
        self.dispatcher(self.webhook)

    @staticmethod
    def disk_full(*args: object) -> int:
        raise sqlite3.OperationalError("database or disk is full")

    def disk_freed(self) -> None:
        for patched in self.full:
            patched.restore()

    def run_for(self, seconds: float, most: int) -> None:
        """
        The clock moves as the real one would, a little at a time; were the
        bug back, this stops at C{most} POSTs, long before the thousands.
        """
        for _ in range(round(seconds * 10)):
            self.clock.advance(0.1)
            self.assertLessEqual(len(self.webhook.posts), most)

    def test_delivered_messages_are_not_posted_again(self) -> None:
        self.start(200)
        self.run_for(600, most=25)
        self.assertEqual(sorted(self.webhook.posted), sorted(self.ids))
        self.assertEqual(self.sqlite.stats().pending, 25)
        self.disk_freed()
        self.run_for(SCHEDULE[2], most=25)
        self.assertEqual(self.sqlite.stats().pending, 0)
        self.assertEqual(self.successResultOf(self.sqlite.refresh()).pending, 0)
        self.flushLoggedErrors(SpoolError)

    def test_failed_rounds_wait_their_backoff_steps(self) -> None:
        self.start(503)
        self.run_for(600, most=3 * 25)
        times: dict[str, list[float]] = defaultdict(list)
        for message_id, at in self.webhook.posts:
            times[message_id].append(at)
        self.assertEqual(sorted(times), sorted(self.ids))
        for posted in times.values():
            self.assertEqual(len(posted), 3)
            first, second, third = posted
            self.assertGreaterEqual(second - first, SCHEDULE[0])
            self.assertGreaterEqual(third - second, SCHEDULE[1])
        self.flushLoggedErrors(SpoolError)

    def test_repeated_failures_log_one_line_per_interval(self) -> None:
        """
        75 outcomes not recorded in ten minutes (each delete tried at once,
        5 s and 5 min later): the first with its traceback, the 49 after it
        told in one line with the next failure an interval later.  The
        spool's own commit failures (its probe tries one every poll) alike:
        the first in full, then a line an interval.
        """
        self.start(200)
        self.run_for(600, most=25)
        errors = [e for e in self.events if e["log_level"] is LogLevel.error]
        unrecorded = [
            ("log_failure" in e, e.get("repeated"), e["delay"])
            for e in errors
            if e["log_format"].startswith("could not record the outcome")
        ]
        self.assertEqual(unrecorded, [(True, None, 5.0), (False, 49, 1800.0)])
        commits = [
            "log_failure" in e
            for e in errors
            if e["log_format"].startswith("spool commit of {count} write(s) failed")
        ]
        self.assertEqual(len(errors), len(unrecorded) + len(commits))
        self.assertEqual(commits[:2], [True, False])
        self.assertNotIn(True, commits[1:])
        self.assertLessEqual(len(commits), 1 + 600 / REPEAT_INTERVAL)
        self.assertEqual(len(self.flushLoggedErrors(SpoolError)), 2)


@pytest.mark.usefixtures("postgres_url")
class SharedSpoolDispatchTests(DispatcherCase):
    """Two dispatchers over one shared spool, as two bridges run them."""

    postgres_url: str

    def shared(self, owner: str) -> PostgresSpool:
        database = PostgresDatabase.open(self.postgres_url, create=True, owner=owner)
        spool = PostgresSpool(
            database, self.clock, database.counts(), run=partial(maybeDeferred)
        )
        self.addCleanup(spool.close)
        return spool

    def test_a_lost_bridges_rounds_are_taken_over(self) -> None:
        """
        Bridge one stores three messages and starts their rounds, then is
        lost; once its leases expire bridge two delivers them; one's late
        answers find them settled elsewhere.
        """
        one, two = self.shared("one"), self.shared("two")
        self.spool = one
        ids = self.add(3)
        self.clock.advance(0)
        lost = self.deliverer(default=None)
        self.dispatcher(lost)
        self.assertEqual(sorted(lost.posted), ids)

        self.spool = two
        survivor = self.deliverer()
        self.dispatcher(survivor)
        self.clock.advance(POLL_INTERVAL)
        self.assertEqual(survivor.posted, [])  # one's leases hold
        expire_leases(self.postgres_url)
        self.clock.advance(POLL_INTERVAL)
        self.assertEqual(sorted(survivor.posted), ids)
        self.clock.advance(0)
        self.assertEqual(two.stats().pending, 0)

        for answer in lost.hanging:
            answer.callback(WebhookResponse(200))
        self.clock.advance(0)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(self.successResultOf(one.refresh()).pending, 0)


class AdminRetryTests(DispatcherCase):
    def test_retry_by_the_admin_tool_is_delivered_within_the_poll(self) -> None:
        """
        ``maillaser-spool retry`` changes the database behind the worker's
        back, with no wake-up: a message rescheduled an hour ahead goes
        within one POLL_INTERVAL of the change.
        """
        directory = self.mktemp()
        spool = open_spool(directory, self.clock)
        self.addCleanup(spool.close)
        self.spool = spool
        deliverer = self.deliverer(503)
        dispatcher = Dispatcher(
            spool=spool,
            deliverer=deliverer,
            breaker=self.breaker,
            clock=self.clock,
            concurrency=4,
            schedule=(3600.0,),
        )
        [message_id] = self.add(1)
        self.clock.advance(0)  # the commit
        dispatcher.startService()
        self.addCleanup(dispatcher.stopService)
        self.clock.advance(0)  # the failed round's settlement
        self.assertEqual(deliverer.posted, [message_id])
        self.clock.advance(600)
        self.assertEqual(deliverer.posted, [message_id])

        admin = SpoolDatabase.open(directory, create=False)
        with admin.transaction():
            self.assertEqual(admin.retry(None, self.clock.seconds()), 1)
        admin.close()
        self.clock.advance(POLL_INTERVAL)
        self.clock.advance(0)
        self.assertEqual(deliverer.posted, [message_id, message_id])
        self.assertEqual(spool.stats().pending, 0)
