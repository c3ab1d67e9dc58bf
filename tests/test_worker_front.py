"""
The front's handle on the delivery worker (L{DeliveryWorker}), on a
C{Clock}, with a worker in memory that answers as each test says.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.trial.unittest import SynchronousTestCase

import maillaser
from maillaser.config import Config
from maillaser.message import Message, Refusal
from maillaser.worker import (
    START_TIMEOUT,
    ChildError,
    DeliveryWorker,
    QueueSink,
    SyncSink,
    WorkerStatus,
)
from maillaser.worker._commands import (
    PROTOCOL_VERSION,
    Hello,
    Metrics,
    Reply,
    Status,
    Stop,
    Store,
    VersionMismatch,
)
from maillaser.worker._stdio import ChildProtocol
from tests.test_sinks import message
from tests.test_worker_child import FakeReactor, events_logged


class FakeWorkerChild(ChildProtocol):
    """A delivery worker in memory: Store and Stop wait for the test."""

    version = maillaser.__version__
    answered_version: str | None = None
    """What it says it runs, if not its C{version}."""
    starting: Deferred[None] | None = None
    """What its Hello waits for, if anything."""

    def __init__(self) -> None:
        super().__init__()
        self.hellos: list[tuple[str, int, Config]] = []
        self.report: dict[str, Any] = {
            "breaker": "closed",
            "pending": 3,
            "dead": 1,
            "bytes": 300,
            "writable": True,
            "problems": [],
        }
        self.statuses = 0
        self.stores: list[tuple[list[Message], Deferred[dict[str, Any]]]] = []
        self.stops: list[tuple[float, Deferred[dict[str, Any]]]] = []

    @Hello.responder
    def hello(
        self, version: str, protocol: int, config: bytes
    ) -> Deferred[dict[str, Any]] | dict[str, Any]:
        self.hellos.append((version, protocol, Config.from_json(config)))
        if version != self.version:
            raise VersionMismatch(f"this worker runs {self.version}")
        answer = {"version": self.answered_version or self.version, "pid": 4242}
        if self.starting is not None:
            return self.starting.addCallback(lambda ignored: answer)
        return answer

    @Status.responder
    def status(self) -> dict[str, Any]:
        self.statuses += 1
        return dict(self.report)

    @Store.responder
    def store(self, messages: list[Message]) -> Deferred[dict[str, Any]]:
        self.stores.append((messages, Deferred()))
        return self.stores[-1][1]

    @Metrics.responder
    def metrics(self) -> dict[str, Any]:
        return {"text": b"maillaser_deliveries_total 7.0\n"}

    @Stop.responder
    def stop(self, grace: float) -> Deferred[dict[str, Any]]:
        self.stops.append((grace, Deferred()))
        return self.stops[-1][1]


def config(**changes: Any) -> Config:
    settings: dict[str, Any] = {
        "target_emails": ("target@example.com",),
        "webhook_url": "http://127.0.0.1:9/hook",
        "worker_timeout": 2.0,
        "log_level": "warn",
        **changes,
    }
    return Config(**settings)


class DeliveryWorkerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor(FakeWorkerChild)
        self.events = events_logged(self)

    def start(self, **kwargs: Any) -> DeliveryWorker:
        worker = DeliveryWorker(kwargs.pop("config", config()), self.reactor, **kwargs)
        worker.startService()
        self.pump()
        return worker

    @property
    def child(self) -> FakeWorkerChild:
        child = self.reactor.process.child
        assert isinstance(child, FakeWorkerChild)
        return child

    def pump(self) -> None:
        self.reactor.process.pump()

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)
        self.pump()

    def test_started_greeted_and_watched(self) -> None:
        worker = self.start()
        [(_, args, _)] = self.reactor.spawned
        self.assertIn("from maillaser.worker._main import worker_main", args[2])
        self.assertEqual(args[3:], ["warn"])
        self.assertEqual(
            self.child.hellos, [(maillaser.__version__, PROTOCOL_VERSION, config())]
        )
        self.assertTrue(worker.ready)
        self.assertEqual(worker.pid, 1000)
        self.assertEqual(
            worker.status,
            WorkerStatus("closed", 3, 1, 300, True, (), at=0.0),
        )
        self.assertEqual(worker.problems(), [])
        self.child.report.update(
            pending=4, writable=False, problems=["spool is not writable"]
        )
        self.advance(0.9)
        self.assertEqual(self.child.statuses, 1)
        self.advance(0.1)
        self.assertEqual(self.child.statuses, 2)
        assert worker.status is not None
        self.assertEqual((worker.status.pending, worker.status.at), (4, 1.0))
        self.assertEqual(worker.problems(), ["spool is not writable"])

    def test_the_sink_for_the_mode(self) -> None:
        self.assertIsInstance(DeliveryWorker(config(), self.reactor).sink, QueueSink)
        worker = DeliveryWorker(config(delivery_mode="sync"), self.reactor)
        self.assertIsInstance(worker.sink, SyncSink)

    def test_a_worker_that_refuses_our_version(self) -> None:
        worker = self.start(version="0.0.1")
        self.assert_refused(
            worker,
            "delivery worker refused: this worker runs " + maillaser.__version__,
        )

    def test_a_worker_that_says_it_runs_another_version(self) -> None:
        FakeWorkerChild.answered_version = "9.9.9"
        self.addCleanup(setattr, FakeWorkerChild, "answered_version", None)
        worker = self.start()
        self.assert_refused(
            worker,
            "delivery worker refused: the worker runs MailLaser 9.9.9,"
            f" this front {maillaser.__version__}",
        )

    def assert_refused(self, worker: DeliveryWorker, problem: str) -> None:
        self.assertFalse(worker.ready)
        self.assertEqual(self.reactor.process.signals, ["KILL"])
        self.assertEqual(worker.problems(), [problem])
        with self.assertRaises(Refusal) as raised:
            worker.sink.check_capacity()
        self.assertEqual(raised.exception.code, 451)
        self.reactor.process.exit(ProcessTerminated(signal=9))
        self.advance(1.0)
        self.assertEqual(len(self.reactor.processes), 2)  # tried again, later

    def test_a_worker_slow_to_start(self) -> None:
        """Opening the spool may take long; not forever."""
        FakeWorkerChild.starting = Deferred()
        self.addCleanup(setattr, FakeWorkerChild, "starting", None)
        worker = self.start()
        self.advance(START_TIMEOUT - 0.1)
        self.assertFalse(worker.ready)
        self.assertEqual(self.reactor.process.signals, [])
        self.advance(0.1)
        self.assertEqual(self.reactor.process.signals, ["KILL"])
        self.assertEqual(
            worker.problems(), ["delivery worker did not answer Hello within 60s"]
        )

    def test_a_store_past_its_deadline(self) -> None:
        """451 at the deadline; the worker is killed; a new one takes the next."""
        worker = self.start()
        first = self.reactor.process
        refused = worker.sink.receive(message(1))
        self.advance(0)
        [(stored, _)] = self.child.stores
        self.assertEqual(stored, [message(1)])
        self.advance(1.9)
        self.assertNoResult(refused)
        self.advance(0.1)
        self.assertEqual(
            str(self.failureResultOf(refused, Refusal).value),
            "451 4.3.0 Could not store the message, try again later",
        )
        self.assertEqual(first.signals, ["KILL"])
        self.assertEqual(
            worker.problems(), ["delivery worker did not answer Store within 2s"]
        )
        first.exit(ProcessTerminated(signal=9))
        self.advance(0)
        self.assertEqual(len(self.reactor.processes), 2)  # a second after the last
        accepted = worker.sink.receive(message(2))
        self.advance(0)
        [(stored, answer)] = self.child.stores
        self.assertEqual(stored, [message(2)])
        answer.callback({"replies": [Reply(250, "2.0.0", "Ok")], "spool": (4, 9)})
        self.pump()
        self.assertIsNone(self.successResultOf(accepted))
        assert worker.status is not None
        self.assertEqual((worker.status.pending, worker.status.bytes), (4, 9))

    def test_a_worker_that_stops_answering(self) -> None:
        """Health says so after two seconds; the heartbeat's deadline kills it."""
        worker = self.start(config=config(worker_timeout=10.0))
        self.reactor.advance(1.0)  # a heartbeat, not answered
        self.reactor.advance(2.5)
        self.assertEqual(worker.problems(), ["delivery worker has not answered for 2s"])
        self.reactor.advance(8.0)
        self.assertEqual(
            worker.problems(), ["delivery worker did not answer Status within 10s"]
        )
        self.assertEqual(self.reactor.process.signals, ["KILL"])

    def test_a_worker_that_exits_is_restarted(self) -> None:
        worker = self.start()
        self.reactor.process.stderr(b"Segmentation fault\n")
        self.reactor.process.exit(ProcessTerminated(exitCode=139))
        [problem] = worker.problems()
        self.assertTrue(problem.startswith("delivery worker ended: "), problem)
        self.assertTrue(problem.endswith("exit code 139.: Segmentation fault"), problem)
        self.advance(1.0)
        self.assertEqual(len(self.child.hellos), 1)
        self.assertTrue(worker.ready)

    def test_metrics(self) -> None:
        worker = DeliveryWorker(config(), self.reactor)
        self.failureResultOf(worker.metrics_text(), ChildError)
        worker.startService()
        self.pump()
        d = worker.metrics_text()
        self.pump()
        self.assertEqual(self.successResultOf(d), b"maillaser_deliveries_total 7.0\n")

    def test_stop(self) -> None:
        """Stop, then the input closed; fires with what stays spooled."""
        worker = self.start()
        process = self.reactor.process
        stopped = worker.stopService()
        self.assertIs(worker.stop(5.0), stopped)
        self.pump()
        [(grace, answer)] = self.child.stops
        self.assertEqual(grace, 10.0)  # shutdown_grace
        self.assertFalse(process.stdin_closed)
        answer.callback({"pending": 5})
        self.pump()
        self.assertTrue(process.stdin_closed)
        self.advance(1.5)
        self.assertEqual(self.child.statuses, 1)  # no heartbeat since
        process.exit(ProcessDone(0))
        self.assertEqual(self.successResultOf(stopped), 5)
        self.assertEqual(process.signals, [])

    def test_stop_of_a_worker_that_does_not_answer(self) -> None:
        worker = self.start()
        process = self.reactor.process
        stopped = worker.stop(1.0)
        self.advance(2.9)
        self.assertEqual(process.signals, [])
        self.advance(0.1)  # grace plus worker_timeout
        self.assertEqual(process.signals, ["KILL"])
        process.exit(ProcessTerminated(signal=9))
        self.assertEqual(self.successResultOf(stopped), 3)  # as last known
        self.assertIn(
            "the delivery worker did not stop cleanly:"
            " delivery worker did not answer Stop within 3s",
            [e["log_format"].format(**e) for e in self.events if "error" in e],
        )
