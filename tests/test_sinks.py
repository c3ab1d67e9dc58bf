"""When the SMTP client hears 250: after the spool commit, or the webhook's answer."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from maillaser.breaker import CircuitBreaker
from maillaser.delivery import Deliverer
from maillaser.dispatch import Dispatcher
from maillaser.message import Refusal
from maillaser.sinks import QueueSink, SyncSink
from maillaser.testing import MemorySpool
from maillaser.webhook import WebhookResponse
from tests.doubles import ScriptedClient, message


def refusal(test: SynchronousTestCase, d: Deferred[None]) -> str:
    failure: Failure = test.failureResultOf(d, Refusal)
    return str(failure.value)


class QueueSinkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.spool = MemorySpool()
        breaker = CircuitBreaker(1, 60.0, self.clock)
        client = ScriptedClient(None)
        deliverer = Deliverer(
            client=client, clock=self.clock, breaker=breaker, max_retries=0
        )
        self.dispatcher = Dispatcher(
            self.spool, deliverer, breaker, self.clock, 1, (5.0,)
        )
        self.client = client
        self.sink = QueueSink(
            self.spool, self.dispatcher, max_messages=2, max_bytes=10_000
        )

    def test_committed_then_dispatched(self) -> None:
        self.dispatcher.startService()
        self.successResultOf(self.sink.receive(message(1)))
        self.assertEqual(self.spool.stats().pending, 1)
        self.assertEqual(len(self.client.requests), 1)
        self.dispatcher.stopService()

    def test_failed_write_is_451_never_250(self) -> None:
        self.spool.broken = True
        self.assertEqual(
            refusal(self, self.sink.receive(message(1))),
            "451 4.3.0 Could not store the message, try again later",
        )

    def test_back_pressure_by_count(self) -> None:
        self.sink.check_capacity()
        self.spool.add(message(1))
        self.spool.add(message(2))
        with self.assertRaises(Refusal) as raised:
            self.sink.check_capacity()
        self.assertEqual(
            str(raised.exception),
            "452 4.3.1 Insufficient system storage, try again later",
        )

    def test_back_pressure_by_bytes(self) -> None:
        self.sink.max_bytes = len(message(1).raw)
        self.spool.add(message(1))
        self.assertRaises(Refusal, self.sink.check_capacity)


class SyncSinkTests(SynchronousTestCase):
    def sink(
        self, *script: int | WebhookResponse | Exception | None, concurrency: int = 4
    ) -> SyncSink:
        clock = Clock()
        self.breaker = CircuitBreaker(1, 60.0, clock)
        self.client = ScriptedClient(*script)
        deliverer = Deliverer(
            client=self.client, clock=clock, breaker=self.breaker, max_retries=0
        )
        return SyncSink(deliverer, self.breaker, concurrency)

    def test_rounds_at_once_are_bounded(self) -> None:
        """The third waits for a slot, then goes; nobody is refused."""
        sink = self.sink(None, None, concurrency=2)
        waiting = [sink.receive(message(n)) for n in range(3)]
        self.assertEqual(len(self.client.requests), 2)
        self.assertNoResult(waiting[2])
        self.client.hanging[0].callback(WebhookResponse(200))
        self.assertEqual(len(self.client.requests), 3)
        self.assertIsNone(self.successResultOf(waiting[0]))
        self.assertIsNone(self.successResultOf(waiting[2]))
        self.assertNoResult(waiting[1])

    def test_2xx_is_250(self) -> None:
        self.assertIsNone(self.successResultOf(self.sink(200).receive(message())))

    def test_5xx_is_451(self) -> None:
        self.assertEqual(
            refusal(self, self.sink(503).receive(message())),
            "451 4.4.1 Webhook temporarily unavailable, try again later",
        )

    def test_permanent_4xx_is_550_with_reason(self) -> None:
        d = self.sink(WebhookResponse(422, reason="no such queue")).receive(message())
        self.assertEqual(refusal(self, d), "550 5.6.0 no such queue")

    def test_open_breaker_is_451_without_a_request(self) -> None:
        sink = self.sink(500)
        refusal(self, sink.receive(message(1)))
        with self.assertRaises(Refusal) as raised:
            sink.check_capacity()
        self.assertEqual(raised.exception.code, 451)
        self.assertRaises(Refusal, sink.receive, message(2))
