"""
The child processes' machinery without the processes: the framing, and how
requests are answered (the processes themselves are in tests/test_spool.py
and tests/test_payload_process.py).
"""

from __future__ import annotations

import pickle

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from maillaser.child import (
    RESPAWN_INTERVAL,
    WRITE_SIZE,
    Answer,
    Batch,
    ChildError,
    ChildProcess,
    FrameReader,
    Request,
    batch_frame,
    frame,
    run_each,
)
from maillaser.message import (
    Attempt,
    Envelope,
    Message,
    QueuedMessage,
    SpoolStats,
)
from tests.helpers import poll, wait


class Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")  # its args cannot make it again


def divide(a: int, b: int) -> float:
    return a / b


def refuse(a: int, b: int) -> None:
    raise Unpicklable(a, b)


def warn(message_id: str) -> str:
    """Run in a real child: it logs, as the payload module does."""
    Logger(namespace="maillaser.payload").warn(
        "could not read {message_id}", message_id=message_id
    )
    return "logged"


class FrameTests(SynchronousTestCase):
    @given(
        st.lists(st.binary(max_size=300), max_size=8),
        st.lists(st.integers(min_value=1, max_value=50), min_size=1),
    )
    def test_values_survive_any_split(
        self, values: list[bytes], sizes: list[int]
    ) -> None:
        stream = b"".join(piece for value in values for piece in frame(value))
        reader = FrameReader()
        received = []
        start = 0
        for size in sizes * (len(stream) // sum(sizes) + 1):
            received += reader.feed(stream[start : start + size])
            start += size
        self.assertEqual(received, values)

    def test_the_values_that_cross_the_pipes(self) -> None:
        """They come out equal, though pickled as their fields only."""
        envelope = Envelope("a@example.net", ("b@example.com", "c@example.com"))
        message = Message("msg_1", envelope, b"Subject: x\r\n\r\nhi\r\n", 17.5)
        values = [
            QueuedMessage(message, rounds=2),
            Attempt(1.0, None, "timed out"),
            SpoolStats(pending=1, dead=2, bytes=3),
        ]
        for value in values:
            copy = pickle.loads(pickle.dumps(value, pickle.HIGHEST_PROTOCOL))
            self.assertEqual((type(copy), copy), (type(value), value))


class RunEachTests(SynchronousTestCase):
    def test_each_answered_its_error_included(self) -> None:
        """A bad request fails alone; the child goes on with the next."""
        batch = run_each(
            [
                Request(0, divide, (1, 2)),
                Request(1, divide, (1, 0)),
                Request(2, refuse, (1, 2)),
                Request(3, divide, (3, 1)),
            ]
        )
        first, zero, refused, last = batch.answers
        self.assertEqual((first, last), (Answer(0, 0.5), Answer(3, 3.0)))
        self.assertEqual((zero.number, zero.failed), (1, True))
        self.assertIsInstance(zero.value, ZeroDivisionError)
        # What pickle could not make again on the bridge's side is described.
        self.assertEqual((refused.number, refused.failed), (2, True))
        self.assertIsInstance(refused.value, ChildError)
        self.assertEqual(str(refused.value), "Unpicklable('1/2')")
        self.assertEqual(batch.transactions, ())


class FakeProcess:
    """What L{ChildProcess} uses of a process transport, recorded."""

    def __init__(self) -> None:
        self.writes: list[list[bytes]] = []
        self.producer: object = None
        self.stdin_closed = False
        self.pipes: dict[int, object] = {}
        self.pid = 4242

    def writeSequence(self, pieces: list[bytes]) -> None:
        self.writes.append(list(pieces))

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.producer = producer

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def requests(self, write: int) -> list[Request]:
        frames = FrameReader().feed(b"".join(self.writes[write]))
        return [Request._make(request) for request in frames]


class FakeReactor(Clock):
    """A clock that starts fake processes."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []

    def spawnProcess(
        self, protocol: ChildProcess, *args: object, **kw: object
    ) -> FakeProcess:
        process = FakeProcess()
        self.processes.append(process)
        protocol.makeConnection(process)
        return process


class ChildProcessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.exits: list[ChildError] = []
        self.child = ChildProcess(
            self.reactor, self.reactor, ["payload"], on_exit=self.exits.append
        )

    def answer(self, *answers: Answer) -> None:
        for piece in batch_frame(Batch(list(answers))):
            self.child.childDataReceived(1, piece)

    def test_what_a_turn_asks_goes_in_one_write(self) -> None:
        first = self.child.request(divide, (1, 2))
        [process] = self.reactor.processes  # started by the first request
        self.assertEqual(len(process.writes), 1)  # which goes at once
        more = [self.child.request(divide, (n, 1)) for n in (3, 4)]
        self.assertEqual(len(process.writes), 1)
        self.reactor.advance(0)
        self.assertEqual([r.args for r in process.requests(1)], [(3, 1), (4, 1)])
        self.answer(Answer(0, 0.5), Answer(1, 3.0), Answer(2, ValueError(), True))
        self.assertEqual(self.successResultOf(first), 0.5)
        self.assertEqual(self.successResultOf(more[0]), 3.0)
        self.failureResultOf(more[1], ValueError)

    def test_a_full_pipe_holds_requests_back(self) -> None:
        self.child.request(divide, (1, 1))
        [process] = self.reactor.processes
        self.child.pauseProducing()
        for n in range(3):
            self.child.request(divide, (n, 1))
        self.reactor.advance(0)
        self.assertEqual(len(process.writes), 1)
        self.child.resumeProducing()
        self.assertEqual(len(process.requests(1)), 3)

    def test_a_megabyte_a_turn(self) -> None:
        self.child.request(divide, (1, 1))
        [process] = self.reactor.processes
        big = b"x" * (WRITE_SIZE // 2)
        for _ in range(5):
            self.child.request(len, (big,))
        self.reactor.advance(0)
        self.assertEqual(len(process.requests(1)), 2)
        self.reactor.advance(0)
        self.assertEqual(len(process.requests(2)), 2)
        self.reactor.advance(0)
        self.assertEqual(len(process.requests(3)), 1)

    def test_stop_sends_what_waits_then_closes(self) -> None:
        self.child.request(divide, (1, 1))
        [process] = self.reactor.processes
        self.child.pauseProducing()
        self.child.request(divide, (2, 1))
        self.child.stop()
        self.assertEqual([r.args for r in process.requests(1)], [(2, 1)])
        self.assertTrue(process.stdin_closed)
        self.failureResultOf(self.child.request(divide, (3, 1)), ChildError)

    def test_a_child_that_dies(self) -> None:
        """What it had fails; the next request waits a second for a new one."""
        lost = self.child.request(divide, (1, 1))
        self.child.childDataReceived(2, b"Killed\n")
        self.child.processEnded(Failure(ProcessTerminated(signal=9)))
        error = self.failureResultOf(lost, ChildError).value
        self.assertIn("child payload ended", str(error))
        self.assertIn("Killed", str(error))
        self.assertEqual(self.exits, [error])
        waiting = self.child.request(divide, (2, 1))
        self.assertEqual(len(self.reactor.processes), 1)
        self.reactor.advance(RESPAWN_INTERVAL)
        [_, second] = self.reactor.processes
        self.assertEqual([r.args for r in second.requests(0)], [(2, 1)])
        self.answer(Answer(1, 2.0))
        self.assertEqual(self.successResultOf(waiting), 2.0)

    def test_the_childs_log_is_logged_here(self) -> None:
        """With its level and fields; what is not a log line, as a warning."""
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        self.child.request(divide, (1, 1))
        self.child.childDataReceived(
            2,
            b'{"timestamp":"t","level":"warn","namespace":"maillaser.payload",'
            b'"text":"could not read msg_1","message_id":"msg_1"}\nTraceb',
        )
        self.child.childDataReceived(2, b"ack: boom\n\n")
        relayed = [
            (e["log_level"], formatEvent(e), e.get("message_id")) for e in events
        ]
        self.assertEqual(
            relayed,
            [
                (LogLevel.warn, "child payload: could not read msg_1", "msg_1"),
                (LogLevel.warn, "child payload: Traceback: boom", None),
            ],
        )


class RealChildTests(TestCase):
    async def test_a_real_child_logs_through_the_bridge(self) -> None:
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        child = ChildProcess(reactor, reactor, ["payload"])
        self.addCleanup(child.stop)
        self.assertEqual(await wait(child.request(warn, ("msg_7",))), "logged")
        await poll(lambda: any(e.get("message_id") == "msg_7" for e in events))
        [event] = [e for e in events if e.get("message_id") == "msg_7"]
        self.assertEqual(
            (event["log_level"], formatEvent(event)),
            (LogLevel.warn, "child payload: could not read msg_7"),
        )
