"""
When the SMTP client hears 250: after the worker's commit, or the
webhook's answer; and what it hears when the worker is not there.  The
sinks over a fake worker, on a C{Clock}.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from maillaser.config import Config
from maillaser.interfaces import IMessageSink
from maillaser.message import Envelope, Message, Refusal
from maillaser.worker import (
    BATCH_BYTES,
    STORE_WINDOW,
    ChildTimeout,
    QueueSink,
    SyncSink,
    WorkerStatus,
    sync_deadline,
)
from maillaser.worker._commands import Deliver, Reply, Store


def message(n: int = 0) -> Message:
    envelope = Envelope("a@example.net", ("target@example.com",), "client", "1.2.3.4")
    return Message(f"msg_{n}", envelope, b"Subject: %d\r\n\r\nhi\r\n" % n, 17.0)


def status(**changes: Any) -> WorkerStatus:
    return attrs.evolve(
        WorkerStatus(
            breaker="closed",
            pending=0,
            dead=0,
            bytes=0,
            writable=True,
            problems=(),
            at=0.0,
        ),
        **changes,
    )


@attrs.define
class Call:
    command: type[amp.Command]
    timeout: float
    slow: bool
    arguments: dict[str, Any]
    answer: Deferred[dict[str, Any]] = attrs.Factory(Deferred)


class FakeWorker:
    """What the sinks see of a L{DeliveryWorker}: its requests wait here."""

    def __init__(self) -> None:
        self.ready = True
        self.status: WorkerStatus | None = status()
        self.calls: list[Call] = []
        self.spool_counts: list[tuple[int, int]] = []
        self.breaker_states: list[str] = []

    def call(
        self,
        command: type[amp.Command],
        *,
        timeout: float,
        slow: bool = False,
        **arguments: Any,
    ) -> Deferred[dict[str, Any]]:
        self.calls.append(Call(command, timeout, slow, arguments))
        return self.calls[-1].answer

    def spool_changed(self, pending: int, size: int) -> None:
        self.spool_counts.append((pending, size))

    def breaker_changed(self, state: str) -> None:
        self.breaker_states.append(state)


def stored(*replies: Reply, pending: int, size: int) -> dict[str, Any]:
    """A L{Store} answer."""
    return {"replies": list(replies), "spool": (pending, size)}


def delivered(reply: Reply, breaker: str) -> dict[str, Any]:
    """A L{Deliver} answer."""
    return {"reply": reply, "breaker": breaker}


OK = Reply(250, "2.0.0", "Ok")


class SinkTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.worker = FakeWorker()
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def refusal(self, d: Deferred[None]) -> str:
        return str(self.failureResultOf(d, Refusal).value)

    def refused_now(self, sink: QueueSink | SyncSink) -> str:
        with self.assertRaises(Refusal) as raised:
            sink.check_capacity()
        return str(raised.exception)

    def assert_not_ready_refused(self, sink: QueueSink | SyncSink) -> None:
        self.worker.ready = False
        self.assertEqual(self.refused_now(sink), "451 4.3.0 Not ready, try again later")
        self.worker.ready, self.worker.status = True, None
        self.assertEqual(self.refused_now(sink), "451 4.3.0 Not ready, try again later")


class QueueSinkTests(SinkTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        self.sink = QueueSink(
            self.worker, self.clock, max_messages=2, max_bytes=100, timeout=3.0
        )

    def receive(self, *messages: Message) -> list[Deferred[None]]:
        """Hand over C{messages} in one turn of the reactor, which then ends."""
        received = [self.sink.receive(each) for each in messages]
        self.clock.advance(0)
        return received

    def test_an_imessagesink(self) -> None:
        self.assertTrue(verifyObject(IMessageSink, self.sink))

    def test_250_once_the_worker_committed(self) -> None:
        [d] = self.receive(message(1))
        [call] = self.worker.calls
        self.assertEqual(
            (call.command, call.timeout, call.slow, call.arguments),
            (Store, 3.0, False, {"messages": [message(1)]}),
        )
        self.assertNoResult(d)
        call.answer.callback(stored(OK, pending=1, size=20))
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.worker.spool_counts, [(1, 20)])

    def test_one_request_per_turn(self) -> None:
        """
        The messages of one turn share a request, each with its own reply;
        the next turn's go in the next request.
        """
        first, second = self.receive(message(1), message(2))
        [third] = self.receive(message(3))
        self.assertEqual(
            [call.arguments for call in self.worker.calls],
            [{"messages": [message(1), message(2)]}, {"messages": [message(3)]}],
        )
        full = Reply(452, "4.3.1", "Insufficient system storage")
        self.worker.calls[0].answer.callback(stored(OK, full, pending=2, size=9))
        self.assertIsNone(self.successResultOf(first))
        self.assertEqual(self.refusal(second), "452 4.3.1 Insufficient system storage")
        self.assertNoResult(third)

    def test_a_large_batch_goes_at_once(self) -> None:
        big = attrs.evolve(message(1), raw=b"x" * BATCH_BYTES)
        self.sink.receive(big)
        self.assertEqual(len(self.worker.calls), 1)
        self.sink.receive(message(2))
        self.assertEqual(len(self.worker.calls), 1)
        self.clock.advance(0)
        self.assertEqual(self.worker.calls[1].arguments, {"messages": [message(2)]})

    def test_stores_wait_for_the_window(self) -> None:
        """
        Past STORE_WINDOW unanswered bytes the next Store waits for an
        answer (one always goes), rather than pile up in the pipe's buffer.
        """
        size = STORE_WINDOW // 2 + 1
        big = [attrs.evolve(message(n), raw=b"x" * size) for n in range(3)]
        received = [self.sink.receive(each) for each in big]
        self.assertEqual(len(self.worker.calls), 1)
        self.worker.calls[0].answer.callback(stored(OK, pending=1, size=size))
        self.assertEqual(len(self.worker.calls), 2)
        self.worker.calls[1].answer.errback(ChildTimeout("no answer"))
        self.assertEqual(self.refusal(received[1])[:3], "451")
        self.assertEqual(len(self.worker.calls), 3)
        self.assertEqual(
            [call.arguments["messages"][0].id for call in self.worker.calls],
            ["msg_0", "msg_1", "msg_2"],
        )

    def test_small_stores_share_the_window(self) -> None:
        self.receive(message(1))
        self.receive(message(2))
        self.assertEqual(len(self.worker.calls), 2)

    def test_the_workers_refusal(self) -> None:
        [d] = self.receive(message(1))
        self.worker.calls[0].answer.callback(
            stored(
                Reply(452, "4.3.1", "Insufficient system storage"), pending=2, size=9
            )
        )
        self.assertEqual(self.refusal(d), "452 4.3.1 Insufficient system storage")
        self.assertEqual(self.worker.spool_counts, [(2, 9)])

    def test_no_answer_in_time_is_451(self) -> None:
        [d] = self.receive(message(1))
        self.worker.calls[0].answer.errback(ChildTimeout("no answer within 3s"))
        self.assertEqual(
            self.refusal(d), "451 4.3.0 Could not store the message, try again later"
        )
        [event] = self.events
        self.assertEqual(
            formatEvent(event),
            "the delivery worker could not store msg_1: no answer within 3s",
        )
        self.assertEqual(event["message_id"], "msg_1")

    def test_back_pressure_from_the_last_status(self) -> None:
        self.sink.check_capacity()
        full = "452 4.3.1 Insufficient system storage, try again later"
        self.worker.status = status(pending=2)
        self.assertEqual(self.refused_now(self.sink), full)
        self.worker.status = status(pending=1, bytes=100)
        self.assertEqual(self.refused_now(self.sink), full)
        self.worker.status = status(pending=1, bytes=99, breaker="open")
        self.sink.check_capacity()  # queue mode takes mail whatever the breaker

    def test_a_spool_that_cannot_commit_is_offered_no_mail(self) -> None:
        self.worker.status = status(writable=False)
        self.assertEqual(
            self.refused_now(self.sink),
            "451 4.3.0 Could not store the message, try again later",
        )

    def test_no_worker_ready(self) -> None:
        self.assert_not_ready_refused(self.sink)


class SyncSinkTests(SinkTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.sink = SyncSink(self.worker, concurrency=2, timeout=40.0)

    def test_an_imessagesink(self) -> None:
        self.assertTrue(verifyObject(IMessageSink, self.sink))

    def test_rounds_at_once_are_bounded(self) -> None:
        """The third waits for a slot, then goes; nobody is refused."""
        waiting = [self.sink.receive(message(n)) for n in range(3)]
        self.assertEqual(len(self.worker.calls), 2)
        self.assertEqual(
            [(c.command, c.timeout, c.slow) for c in self.worker.calls],
            [(Deliver, 40.0, True)] * 2,
        )
        self.assertNoResult(waiting[2])
        self.worker.calls[0].answer.callback(delivered(OK, "closed"))
        self.assertIsNone(self.successResultOf(waiting[0]))
        self.assertEqual(len(self.worker.calls), 3)
        self.assertEqual(self.worker.calls[2].arguments, {"message": message(2)})

    def test_the_webhooks_answer_is_the_reply(self) -> None:
        d = self.sink.receive(message(1))
        self.worker.calls[0].answer.callback(
            delivered(Reply(550, "5.6.0", "no such queue"), "closed")
        )
        self.assertEqual(self.refusal(d), "550 5.6.0 no such queue")
        d = self.sink.receive(message(2))
        self.worker.calls[1].answer.callback(
            delivered(Reply(451, "4.4.1", "Webhook unavailable"), "open")
        )
        self.assertEqual(self.refusal(d), "451 4.4.1 Webhook unavailable")
        self.assertEqual(self.worker.breaker_states, ["closed", "open"])

    def test_no_answer_in_time_is_451(self) -> None:
        d = self.sink.receive(message(1))
        self.worker.calls[0].answer.errback(ChildTimeout("late"))
        self.assertEqual(
            self.refusal(d), "451 4.3.0 Temporary failure, try again later"
        )
        self.assertEqual(self.events[0]["message_id"], "msg_1")
        self.sink.receive(message(2))
        self.assertEqual(len(self.worker.calls), 2)  # its slot is free again

    def test_an_open_breaker_is_451_at_mail_from(self) -> None:
        self.sink.check_capacity()
        self.worker.status = status(breaker="half-open", pending=10**9)
        self.sink.check_capacity()
        self.worker.status = status(breaker="open")
        self.assertEqual(
            self.refused_now(self.sink),
            "451 4.4.1 Webhook unavailable, try again later",
        )

    def test_no_worker_ready(self) -> None:
        self.assert_not_ready_refused(self.sink)


class SyncDeadlineTests(SynchronousTestCase):
    def test_the_longest_round_and_the_workers_own_deadline(self) -> None:
        config = Config(
            target_emails=("a@example.com",),
            webhook_url="http://127.0.0.1/hook",
            webhook_timeout=30.0,
            webhook_max_retries=3,
            payload_timeout=10.0,
            worker_timeout=5.0,
        )
        # two tries at the payload, four attempts, 0.1 + 0.2 + 0.4 of backoff
        self.assertAlmostEqual(sync_deadline(config), 20 + 120 + 0.7 + 5)
