"""The dispatcher with a MemorySpool and a Clock: scheduling without waiting."""

from __future__ import annotations

import itertools

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from maillaser.breaker import BreakerState, CircuitBreaker
from maillaser.delivery import Deliverer
from maillaser.dispatch import (
    READY_BYTES,
    READY_PER_SLOT,
    Dispatcher,
    next_attempt_delay,
)
from maillaser.message import QueuedMessage
from maillaser.testing import MemorySpool
from maillaser.webhook import WebhookResponse
from tests.doubles import ScriptedClient, message

SCHEDULE = (5.0, 300.0, 1800.0)


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


class DispatcherCase(SynchronousTestCase):
    """A dispatcher over a MemorySpool and a scripted webhook, on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.spool = MemorySpool()
        self.numbers = itertools.count()
        self.breaker = CircuitBreaker(threshold=2, reset=60.0, clock=self.clock)

    def dispatcher(self, client: ScriptedClient, concurrency: int = 4) -> Dispatcher:
        deliverer = Deliverer(
            client=client, clock=self.clock, breaker=self.breaker, max_retries=0
        )
        dispatcher = Dispatcher(
            spool=self.spool,
            deliverer=deliverer,
            breaker=self.breaker,
            clock=self.clock,
            concurrency=concurrency,
            schedule=SCHEDULE,
            grace=5.0,
        )
        dispatcher.startService()
        self.addCleanup(lambda: dispatcher.running and dispatcher.stopService())
        return dispatcher

    def add(self, count: int) -> list[str]:
        ids = []
        for _ in range(count):
            queued = message(
                len(self.spool.pending) + len(self.spool.dead), at=self.clock.seconds()
            )
            self.spool.add(queued)
            ids.append(queued.id)
        return ids


class DispatcherTests(DispatcherCase):
    def test_pending_messages_are_delivered_on_start(self) -> None:
        self.add(3)
        client = ScriptedClient()
        self.dispatcher(client)
        self.assertEqual(len(client.requests), 3)
        self.assertEqual(self.spool.stats().pending, 0)
        self.assertEqual(self.spool.stats().dead, 0)

    def test_concurrency_is_bounded(self) -> None:
        self.add(5)
        client = ScriptedClient(None, None, None, None, None)
        self.dispatcher(client, concurrency=2)
        self.assertEqual(len(client.requests), 2)
        client.hanging[0].callback(WebhookResponse(200))
        self.assertEqual(len(client.requests), 3)

    def test_failed_round_waits_for_the_schedule_then_dead_letters(self) -> None:
        [mid] = self.add(1)
        client = ScriptedClient(default=503)
        dispatcher = self.dispatcher(client)
        self.breaker.threshold = 100
        self.assertEqual(len(client.requests), 1)
        self.assertEqual(self.spool.due_at[mid], 5.0)
        self.clock.advance(4.9)
        self.assertEqual(len(client.requests), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(client.requests), 2)
        self.clock.advance(300)
        self.assertEqual(len(client.requests), 3)
        self.clock.advance(1800)
        self.assertEqual(len(client.requests), 4)
        self.assertEqual(list(self.spool.dead), [mid])
        self.assertEqual(len(self.spool.attempts[mid]), 4)
        self.clock.advance(100_000)
        self.assertEqual(len(client.requests), 4)
        self.assertTrue(dispatcher.running)

    def test_permanent_rejection_dead_letters_at_once(self) -> None:
        [mid] = self.add(1)
        self.dispatcher(ScriptedClient(410))
        self.assertEqual(list(self.spool.dead), [mid])

    def test_retry_after_delays_the_next_round(self) -> None:
        [mid] = self.add(1)
        self.dispatcher(ScriptedClient(WebhookResponse(429, retry_after=120.0)))
        self.assertEqual(self.spool.due_at[mid], 120.0)

    def test_open_breaker_sends_nothing_and_keeps_everything(self) -> None:
        self.add(2)
        client = ScriptedClient(500, 500)
        dispatcher = self.dispatcher(client)
        self.assertIs(self.breaker.state, BreakerState.open)
        self.add(3)
        dispatcher.wake()
        self.clock.advance(59)
        self.assertEqual(len(client.requests), 2)
        self.assertEqual(self.spool.stats().pending, 5)
        self.clock.advance(1)  # one probe, which succeeds: then the rest flow
        self.assertEqual(len(client.requests), 2 + 5)
        self.assertEqual(self.spool.stats().pending, 0)
        self.assertEqual(self.spool.stats().dead, 0)

    def test_half_open_sends_a_single_probe(self) -> None:
        self.add(2)
        client = ScriptedClient(500, 500, None)
        dispatcher = self.dispatcher(client)
        self.add(3)
        self.clock.advance(60)
        self.assertEqual(len(client.requests), 3)
        dispatcher.wake()
        self.assertEqual(len(client.requests), 3)
        client.hanging[0].callback(WebhookResponse(500))
        self.assertIs(self.breaker.state, BreakerState.open)
        self.assertEqual(len(client.requests), 3)

    def test_new_message_wakes_the_dispatcher(self) -> None:
        client = ScriptedClient()
        dispatcher = self.dispatcher(client)
        self.add(1)
        dispatcher.wake()
        self.assertEqual(len(client.requests), 1)

    def test_idle_dispatcher_polls_the_spool(self) -> None:
        client = ScriptedClient()
        self.dispatcher(client)
        self.add(1)  # e.g. requeued by the admin tool, without a wake-up
        self.clock.advance(5)
        self.assertEqual(len(client.requests), 1)

    def test_stop_waits_for_rounds_in_flight(self) -> None:
        self.add(1)
        client = ScriptedClient(None)
        dispatcher = self.dispatcher(client)
        d = dispatcher.stopService()
        self.assertNoResult(d)
        client.hanging[0].callback(WebhookResponse(200))
        self.successResultOf(d)
        self.assertEqual(self.spool.stats().pending, 0)

    def test_stop_cancels_after_grace_and_the_message_stays(self) -> None:
        self.add(1)
        client = ScriptedClient(None)
        dispatcher = self.dispatcher(client)
        d = dispatcher.stopService()
        self.clock.advance(5)
        self.successResultOf(d)
        self.assertEqual(self.spool.stats().pending, 1)
        self.assertEqual(self.spool.stats().dead, 0)


class CountingSpool(MemorySpool):
    """A MemorySpool that counts how often messages are read back."""

    reads = 0

    def due(self, now: float, limit: int) -> Deferred[list[QueuedMessage]]:
        self.reads += 1
        return super().due(now, limit)


class OfferTests(DispatcherCase):
    """A message just committed is delivered from memory, never twice."""

    def offer(self, dispatcher: Dispatcher) -> str:
        queued = message(next(self.numbers), at=self.clock.seconds())
        self.spool.add(queued)
        dispatcher.offer(queued)
        return queued.id

    def test_offered_message_starts_without_reading_the_spool(self) -> None:
        self.spool = CountingSpool()
        client = ScriptedClient(None)
        dispatcher = self.dispatcher(client)
        reads_at_start = self.spool.reads
        message_id = self.offer(dispatcher)
        self.assertEqual(len(client.requests), 1)
        self.assertEqual(self.spool.reads, reads_at_start)
        self.assertIn(message_id, self.spool.claimed)
        client.hanging[0].callback(WebhookResponse(200))
        self.assertEqual(self.spool.stats().pending, 0)

    def test_no_free_slot_keeps_it_waiting_in_memory(self) -> None:
        self.spool = CountingSpool()
        client = ScriptedClient(None, None)
        dispatcher = self.dispatcher(client, concurrency=1)
        reads_at_start = self.spool.reads
        self.offer(dispatcher)
        second = self.offer(dispatcher)
        self.assertEqual(len(client.requests), 1)
        self.assertIn(second, self.spool.claimed)
        client.hanging[0].callback(WebhookResponse(200))
        self.assertEqual(len(client.requests), 2)
        client.hanging[1].callback(WebhookResponse(200))
        self.assertEqual(self.spool.stats().pending, 0)
        self.assertEqual(self.spool.reads, reads_at_start)

    def test_past_the_memory_limit_it_waits_in_the_spool(self) -> None:
        self.spool = CountingSpool()
        client = ScriptedClient(*[None] * (2 + READY_PER_SLOT))
        dispatcher = self.dispatcher(client, concurrency=1)
        for _ in range(1 + READY_PER_SLOT):
            self.offer(dispatcher)
        overflow = self.offer(dispatcher)
        self.assertNotIn(overflow, self.spool.claimed)
        reads = self.spool.reads
        for number in range(1 + READY_PER_SLOT):
            client.hanging[number].callback(WebhookResponse(200))
        self.assertEqual(len(client.requests), 2 + READY_PER_SLOT)
        self.assertEqual(client.requests[-1][1][b"webhook-id"], overflow.encode())
        self.assertGreater(self.spool.reads, reads)
        client.hanging[-1].callback(WebhookResponse(200))
        self.assertEqual(self.spool.stats().pending, 0)

    def test_memory_for_waiting_messages_is_bounded_in_bytes(self) -> None:
        client = ScriptedClient(None)
        dispatcher = self.dispatcher(client, concurrency=1)
        self.offer(dispatcher)
        big = message(next(self.numbers), at=self.clock.seconds())
        big = attrs.evolve(big, raw=b"x" * (READY_BYTES + 1))
        self.spool.add(big)
        dispatcher.offer(big)
        self.assertNotIn(big.id, self.spool.claimed)
        small = self.offer(dispatcher)
        self.assertIn(small, self.spool.claimed)

    def test_open_breaker_holds_it_until_the_probe(self) -> None:
        client = ScriptedClient(500, 500)
        dispatcher = self.dispatcher(client)
        self.offer(dispatcher)
        self.offer(dispatcher)
        self.assertIs(self.breaker.state, BreakerState.open)
        message_id = self.offer(dispatcher)
        self.assertEqual(len(client.requests), 2)
        self.assertEqual(self.spool.stats().pending, 3)
        self.clock.advance(60)  # the breaker's reset: the waiting one probes
        self.assertEqual(client.requests[2][1][b"webhook-id"], message_id.encode())
        self.assertIs(self.breaker.state, BreakerState.closed)
        self.assertEqual(len(client.requests), 5)  # then the two to retry
        self.assertEqual(self.spool.stats().pending, 0)

    def test_a_message_already_claimed_is_not_started_again(self) -> None:
        client = ScriptedClient(None)
        dispatcher = self.dispatcher(client)
        queued = message(next(self.numbers), at=self.clock.seconds())
        self.spool.add(queued)
        dispatcher.wake()  # the spool hands it out first
        dispatcher.offer(queued)
        self.assertEqual(len(client.requests), 1)
