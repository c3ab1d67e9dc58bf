"""
The worker's end (L{WorkerProtocol}, L{DeliveryStack}) driven by the
front's (L{DeliveryWorker}), both in this process on one C{Clock}, with
an in-memory spool and a scripted webhook.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone
from twisted.logger import formatEvent
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from maillaser.config import Config
from maillaser.message import Refusal, SpoolStats, WebhookResponse
from maillaser.spool import SpoolError
from maillaser.testing import MemorySpool
from maillaser.worker import (
    ChildProcess,
    DeliveryStack,
    DeliveryWorker,
    PayloadBuilder,
    WorkerProtocol,
    payload_program,
    worker_program,
)
from maillaser.worker._commands import Reply, Status
from tests.doubles import ScriptedPoster
from tests.test_sinks import message
from tests.test_worker_child import FakeReactor, events_logged
from tests.test_worker_front import config


@attrs.define
class FlakySpool(MemorySpool):
    """A spool with a bug: its counts fail while C{flaky}."""

    flaky: bool = False

    def stats(self) -> SpoolStats:
        if self.flaky:
            raise RuntimeError("oops")
        return super().stats()


class WorkerTestCase(SynchronousTestCase):
    """A front and a worker, and what the worker's stack is made of."""

    def setUp(self) -> None:
        self.reactor = FakeReactor(self.worker_protocol)
        self.events = events_logged(self)
        self.spool: MemorySpool = MemorySpool()
        self.poster = ScriptedPoster()
        self.closed = 0
        self.stacks: list[DeliveryStack] = []
        self.broken: Exception | None = None

    def worker_protocol(self) -> WorkerProtocol:
        return WorkerProtocol(self.reactor, build=self.build)

    def build(self, config: Config, clock: Any) -> DeliveryStack:
        if self.broken is not None:
            raise self.broken
        stack = DeliveryStack.assemble(
            config,
            clock,
            spool=self.spool if config.delivery_mode == "queue" else None,
            poster=self.poster,
            payloads=PayloadBuilder(
                clock, config.header_prefixes, 1.0, payload_program("info")
            ),
            closing=[self.close],
        )
        self.stacks.append(stack)
        return stack

    def close(self) -> Deferred[None]:
        self.closed += 1
        return succeed(None)

    def front(self, **changes: Any) -> DeliveryWorker:
        settings: dict[str, Any] = {"webhook_max_retries": 0, **changes}
        worker = DeliveryWorker(config(**settings), self.reactor)
        worker.startService()
        self.pump()
        return worker

    def pump(self) -> None:
        self.reactor.process.pump()

    def receive(self, worker: DeliveryWorker, n: int) -> Deferred[None]:
        d = worker.sink.receive(message(n))
        self.reactor.advance(0)  # the end of the turn, when Store goes
        self.pump()
        return d

    def refusal(self, d: Deferred[None]) -> str:
        return str(self.failureResultOf(d, Refusal).value)


class HelloTests(WorkerTestCase):
    def test_the_stack_is_built_from_the_fronts_config(self) -> None:
        worker = self.front(header_prefixes=("X-",), retry_schedule=(1.0, 2.0))
        self.assertTrue(worker.ready)
        [stack] = self.stacks
        self.assertEqual(stack.config, worker.config)
        assert stack.dispatcher is not None
        self.assertTrue(stack.dispatcher.running)

    def test_a_stack_that_cannot_be_built(self) -> None:
        self.broken = SpoolError("database disk image is malformed")
        worker = self.front()
        self.assertFalse(worker.ready)
        self.assertEqual(
            worker.problems(),
            ["delivery worker refused: database disk image is malformed"],
        )
        self.assertEqual(len(self.flushLoggedErrors(SpoolError)), 1)

    def test_nothing_before_hello(self) -> None:
        child = ChildProcess(self.reactor, worker_program("info"), name="worker")
        d = child.call(Status, timeout=1.0)
        self.pump()
        error = self.failureResultOf(d, amp.RemoteAmpError).value
        self.assertEqual(error.description, "Hello comes first")

    def test_a_bug_answers_its_request_only(self) -> None:
        """The worker is not ended by it: the next request is answered."""
        self.spool = spool = FlakySpool()
        worker = self.front()
        spool.flaky = True
        d = worker.call(Status, timeout=1.0)
        self.pump()
        self.failureResultOf(d, amp.UnknownRemoteError)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        spool.flaky = False
        d = worker.call(Status, timeout=1.0)
        self.pump()
        self.assertEqual(self.successResultOf(d)["pending"], 0)


class UnreachableSpool(MemorySpool):
    def problem(self) -> str | None:
        return "spool database unreachable: connection refused" if self.broken else None


class QueueModeTests(WorkerTestCase):
    def test_stored_then_delivered(self) -> None:
        worker = self.front()
        self.poster.script.append(None)  # the webhook holds the first
        accepted = self.receive(worker, 1)
        self.assertIsNone(self.successResultOf(accepted))
        self.assertEqual(list(self.spool.pending), ["msg_1"])
        [(body, headers)] = self.poster.requests
        self.assertEqual(headers[b"webhook-id"], b"msg_1")
        self.assertEqual(json.loads(body)["subject"], "1")
        assert worker.status is not None
        self.assertEqual(worker.status.pending, 1)  # from Store's answer
        self.poster.hanging[0].callback(WebhookResponse(200))
        self.assertEqual(self.spool.pending, {})
        self.reactor.advance(1.0)
        self.pump()
        self.assertEqual(worker.status.pending, 0)  # from the heartbeat
        metrics = worker.metrics_text()
        self.pump()
        self.assertIn(
            b'maillaser_deliveries_total{outcome="delivered"} 1.0',
            self.successResultOf(metrics),
        )

    def test_a_full_spool(self) -> None:
        worker = self.front(spool_max_messages=1)
        self.poster.default = 503  # nothing leaves the spool
        self.assertIsNone(self.successResultOf(self.receive(worker, 1)))
        self.assertEqual(
            self.refusal(self.receive(worker, 2)),
            "452 4.3.1 Insufficient system storage, try again later",
        )
        with self.assertRaises(Refusal) as raised:
            worker.sink.check_capacity()
        self.assertEqual(raised.exception.code, 452)

    def test_a_spool_that_cannot_commit(self) -> None:
        worker = self.front()
        self.spool.broken = True
        self.assertEqual(
            self.refusal(self.receive(worker, 1)),
            "451 4.3.0 Could not store the message, try again later",
        )
        self.reactor.advance(1.0)
        self.pump()
        self.assertEqual(worker.problems(), ["spool is not writable"])
        [event] = [e for e in self.events if e.get("message_id") == "msg_1"]
        self.assertEqual(formatEvent(event), "could not store msg_1: spool is broken")

    def test_health_gets_the_spools_reason(self) -> None:
        """A shared spool says why it cannot take mail: health shows that."""
        self.spool = UnreachableSpool(broken=True)
        worker = self.front()
        self.reactor.advance(1.0)
        self.pump()
        self.assertEqual(
            worker.problems(), ["spool database unreachable: connection refused"]
        )

    def test_stop(self) -> None:
        """Rounds in flight get the grace period; the spool says what stays."""
        worker = self.front()
        self.poster.script.append(None)
        self.receive(worker, 1)
        stopped = worker.stop(2.0)
        self.pump()
        self.reactor.advance(1.9)
        self.assertNoResult(stopped)
        self.reactor.advance(0.1)
        self.pump()
        self.assertEqual(self.closed, 1)
        self.reactor.process.exit(ProcessDone(0))
        self.assertEqual(self.successResultOf(stopped), 1)
        self.assertEqual(list(self.spool.pending), ["msg_1"])
        late = Deferred.fromCoroutine(self.stacks[0].store([message(2)]))
        self.assertEqual(
            self.successResultOf(late),
            {
                "replies": [Reply(451, "4.3.0", "Shutting down, try again later")],
                "spool": (1, len(message(1).raw)),
            },
        )

    def test_the_front_gone_closes_at_once(self) -> None:
        self.front()
        self.poster.script.append(None)
        self.reactor.process.child.connectionLost(Failure(ProcessDone(0)))
        self.assertEqual(self.closed, 1)


class SyncModeTests(WorkerTestCase):
    def test_the_webhooks_answer(self) -> None:
        worker = self.front(delivery_mode="sync")
        self.assertEqual(self.stacks[0].spool, None)
        self.poster.script.extend(
            [200, WebhookResponse(422, reason="no such queue"), 503]
        )
        self.assertIsNone(self.successResultOf(self.receive(worker, 1)))
        self.assertEqual(
            self.refusal(self.receive(worker, 2)), "550 5.6.0 no such queue"
        )
        self.assertEqual(
            self.refusal(self.receive(worker, 3)),
            "451 4.4.1 Webhook temporarily unavailable, try again later",
        )

    def test_an_open_breaker(self) -> None:
        worker = self.front(delivery_mode="sync", circuit_breaker_threshold=1)
        self.poster.script.append(503)
        self.refusal(self.receive(worker, 1))
        assert worker.status is not None
        self.assertEqual(worker.status.breaker, "open")  # from Deliver's answer
        with self.assertRaises(Refusal) as raised:
            worker.sink.check_capacity()
        self.assertEqual(raised.exception.code, 451)
        self.assertEqual(
            self.refusal(self.receive(worker, 2)),
            "451 4.4.1 Webhook unavailable, try again later",
        )
        self.assertEqual(len(self.poster.requests), 1)

    def test_stop_cancels_a_round_past_the_grace_period(self) -> None:
        worker = self.front(delivery_mode="sync")
        self.poster.script.append(None)
        waiting = self.receive(worker, 1)
        stopped = worker.stop(1.0)
        self.pump()
        self.reactor.advance(1.0)
        self.pump()
        self.assertEqual(
            self.refusal(waiting), "451 4.3.0 Shutting down, try again later"
        )
        self.reactor.process.exit(ProcessDone(0))
        self.assertEqual(self.successResultOf(stopped), 0)
        late = self.stacks[0].deliver(message(2))
        self.assertEqual(
            self.successResultOf(Deferred.fromCoroutine(late))["reply"],
            Reply(451, "4.3.0", "Shutting down, try again later"),
        )
