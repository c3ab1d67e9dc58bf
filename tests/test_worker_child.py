"""
The supervised child (L{maillaser.worker._child}) and its other end
(L{maillaser.worker._stdio}): deadlines, kills, restarts, health and the
log relay, with a C{Clock} and an in-memory child, then with real
processes.

The fakes here (L{FakeReactor}, L{FakeProcess}) serve the other worker
tests too.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from maillaser.worker._child import (
    MAX_RESTART_INTERVAL,
    PIPE_SIZE,
    RESTART_INTERVAL,
    Ask,
    ChildError,
    ChildProcess,
    ChildProgram,
    ChildTimeout,
    LogRelay,
)
from maillaser.worker._stdio import ChildProtocol, run_child
from tests.helpers import poll, wait


class Echo(amp.Command):
    arguments = [(b"value", amp.Unicode())]
    response = [(b"value", amp.Unicode()), (b"pid", amp.Integer())]


class Warn(amp.Command):
    """Log a warning, and print: what a child prints must not break AMP."""

    arguments = [(b"message_id", amp.Unicode())]
    response = []


class PipeSizes(amp.Command):
    """The sizes of the pipes the child reads and writes AMP on."""

    arguments = []
    response = [(b"sizes", amp.ListOf(amp.Integer()))]


class Exit(amp.Command):
    """Write last words where no log observer sees them, and exit."""

    arguments = [(b"status", amp.Integer())]
    response = []


class Hold(amp.Command):
    """Answered when the test says."""

    arguments = []
    response = []


class EchoChild(ChildProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.held: list[Deferred[dict[str, object]]] = []

    @Hold.responder
    def hold(self) -> Deferred[dict[str, object]]:
        self.held.append(Deferred())
        return self.held[-1]

    @Echo.responder
    def echo(self, value: str) -> dict[str, object]:
        return {"value": value, "pid": os.getpid()}

    @Warn.responder
    def warn(self, message_id: str) -> dict[str, object]:
        log = Logger(namespace="tests.child")
        log.debug("details of {message_id}", message_id=message_id)  # below info
        log.warn("could not read {message_id}", message_id=message_id)
        print("a stray print")
        return {}

    @PipeSizes.responder
    def pipe_sizes(self) -> dict[str, object]:
        get = fcntl.F_GETPIPE_SZ
        return {"sizes": [fcntl.fcntl(fd, get) for fd in (0, 1)]}

    @Exit.responder
    def exit(self, status: int) -> dict[str, object]:
        os.write(2, b"Traceback (most recent call last):\nSystemError: dying words\n")
        os._exit(status)


def echo_main() -> None:
    """The real child of these tests."""
    run_child(EchoChild(), sys.argv[1], reactor)


ECHO = ChildProgram(__name__, echo_main.__name__, ("info",))


def events_logged(test: SynchronousTestCase) -> EventLoggingObserver:
    events = EventLoggingObserver()
    globalLogPublisher.addObserver(events)
    test.addCleanup(globalLogPublisher.removeObserver, events)
    return events


# In memory: a fake reactor whose processes are AMP protocols in this one.


class FakeProcess:
    """
    What a L{ChildProcess} holds of a process: writes are kept until
    L{pump} hands them to the child, whose answers go back the same way.
    """

    def __init__(self, protocol: ProcessProtocol, child: amp.AMP, pid: int) -> None:
        self.pid: int | None = pid
        self.protocol = protocol
        self.child = child
        self.written = bytearray()
        self.signals: list[str] = []
        self.stdin_closed = False
        self.child_transport = StringTransport()
        child.makeConnection(self.child_transport)
        protocol.makeConnection(self)

    def write(self, data: bytes) -> None:
        self.written += data

    def writeSequence(self, data: list[bytes]) -> None:
        self.written += b"".join(data)

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def pump(self) -> None:
        """Requests to the child and answers back, until nothing moves."""
        while self.written or self.child_transport.value():
            data, self.written = bytes(self.written), bytearray()
            if data:
                self.child.dataReceived(data)
            answers = self.child_transport.value()
            self.child_transport.clear()
            if answers:
                self.protocol.childDataReceived(1, answers)

    def stderr(self, data: bytes) -> None:
        self.protocol.childDataReceived(2, data)

    def exit(self, reason: Exception) -> None:
        """The process ends (and is reaped)."""
        self.pid = None
        self.protocol.processEnded(Failure(reason))


class FakeReactor(Clock):
    """A clock that spawns fake processes running C{make_child()}."""

    def __init__(self, make_child: Callable[[], amp.AMP] = EchoChild) -> None:
        super().__init__()
        self.make_child = make_child
        self.processes: list[FakeProcess] = []
        self.spawned: list[tuple[str, list[str], dict[str, str]]] = []

    def spawnProcess(
        self,
        protocol: ProcessProtocol,
        executable: str,
        args: list[str],
        env: dict[str, str],
        childFDs: dict[int, str],  # noqa: N803 (Twisted's name)
    ) -> FakeProcess:
        self.spawned.append((executable, args, env))
        process = FakeProcess(protocol, self.make_child(), 1000 + len(self.processes))
        self.processes.append(process)
        return process

    @property
    def process(self) -> FakeProcess:
        return self.processes[-1]


class ChildProcessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.events = events_logged(self)

    def child(
        self, greet: Callable[[Ask], Deferred[Any]] | None = None
    ) -> ChildProcess:
        return ChildProcess(self.reactor, ECHO, name="echo child", greet=greet)

    def test_the_first_request_starts_a_child(self) -> None:
        child = self.child()
        self.assertEqual(child.problems(), ["echo child is starting"])
        answer = child.call(Echo, timeout=1.0, value="hello")
        [(executable, args, env)] = self.reactor.spawned
        self.assertEqual(
            (executable, args[:2], args[3:]),
            (sys.executable, [sys.executable, "-c"], ["info"]),
        )
        self.assertIn(f"from {__name__} import echo_main", args[2])
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.assertEqual(env["PYTHONPATH"].split(os.pathsep)[0], root)
        self.assertNoResult(answer)
        self.reactor.process.pump()
        self.assertEqual(
            self.successResultOf(answer), {"value": "hello", "pid": os.getpid()}
        )
        self.assertTrue(child.ready)
        self.assertEqual(child.problems(), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])  # no deadline left

    def test_requests_wait_for_the_greeting(self) -> None:
        greeted: Deferred[None] = Deferred()
        asked: list[Ask] = []

        def greet(ask: Ask) -> Deferred[None]:
            asked.append(ask)
            return greeted

        child = self.child(greet)
        child.start()
        answer = child.call(Echo, timeout=5.0, value="later")
        hello = asked[0](Echo, timeout=5.0, value="hello")
        self.reactor.process.pump()
        self.assertEqual(self.successResultOf(hello)["value"], "hello")
        self.assertNoResult(answer)
        self.assertFalse(child.ready)
        greeted.callback(None)
        self.reactor.process.pump()
        self.assertEqual(self.successResultOf(answer)["value"], "later")

    def test_a_missed_deadline_kills_the_child(self) -> None:
        """Everything it had fails at once; a new child answers the next."""
        child = self.child()
        child.start()
        first = self.reactor.process
        late = child.call(Echo, timeout=0.5, value="late")
        other = child.call(Echo, timeout=5.0, value="other")
        self.reactor.advance(0.5)
        error = self.failureResultOf(late, ChildTimeout).value
        self.assertEqual(str(error), "echo child did not answer Echo within 0.5s")
        self.assertIn(
            "echo child was killed", str(self.failureResultOf(other, ChildError).value)
        )
        self.assertEqual(first.signals, ["KILL"])
        self.assertFalse(child.ready)
        self.assertEqual(child.problems(), [str(error)])
        first.exit(ProcessTerminated(signal=9))
        self.assertEqual(len(self.reactor.processes), 1)  # not twice a second
        waiting = child.call(Echo, timeout=5.0, value="next")
        self.reactor.advance(RESTART_INTERVAL - 0.5)
        self.reactor.process.pump()
        self.assertEqual(self.successResultOf(waiting)["value"], "next")
        self.assertEqual(len(self.reactor.processes), 2)
        [killed] = [e for e in self.events if e["log_level"] is LogLevel.error]
        self.assertEqual(formatEvent(killed), f"{error}; killing it (pid 1000)")

    def test_an_answer_after_the_deadline_is_ignored(self) -> None:
        child = self.child()
        late = child.call(Echo, timeout=0.5, value="late")
        self.reactor.advance(0.5)
        self.reactor.process.pump()  # the answer comes, too late
        self.failureResultOf(late, ChildTimeout)

    def test_a_request_that_waits_too_long_for_a_child(self) -> None:
        """Fails alone: there is no child to kill."""
        child = self.child(lambda ask: Deferred())
        child.start()
        waiting = child.call(Echo, timeout=0.5, value="x")
        self.reactor.advance(0.5)
        self.failureResultOf(waiting, ChildTimeout)
        self.assertEqual(self.reactor.process.signals, [])

    def test_a_child_that_ends_on_its_own(self) -> None:
        """What it had fails, with its last words; a new one is started."""
        child = self.child()
        child.start()
        lost = child.call(Echo, timeout=5.0, value="lost")
        self.reactor.process.stderr(b"Traceback (most recent call last):\nMemoryError")
        self.reactor.process.exit(ProcessTerminated(exitCode=1))
        error = str(self.failureResultOf(lost, ChildError).value)
        self.assertTrue(
            error.startswith("echo child ended: A process has ended"), error
        )
        self.assertIn("Traceback (most recent call last):\nMemoryError", error)
        self.assertEqual(child.problems(), [error])
        self.reactor.advance(RESTART_INTERVAL)
        self.assertEqual(len(self.reactor.processes), 2)
        self.assertTrue(child.ready)

    def test_without_start_a_child_comes_back_when_needed(self) -> None:
        child = self.child()
        self.successResultOf(self._echo(child, "one"))
        self.reactor.process.exit(ProcessTerminated(signal=9))
        self.reactor.advance(10)
        self.assertEqual(len(self.reactor.processes), 1)
        self.successResultOf(self._echo(child, "two"))
        self.assertEqual(len(self.reactor.processes), 2)

    def _echo(self, child: ChildProcess, value: str) -> Deferred[Any]:
        d = child.call(Echo, timeout=1.0, value=value)
        self.reactor.process.pump()
        return d

    def test_a_child_refused_at_its_greeting(self) -> None:
        """It is killed; each failure in a row doubles the wait for the next."""

        def refuse(ask: Ask) -> Deferred[None]:
            raise ValueError("wrong version")

        child = self.child(refuse)
        child.start()
        starts = [self.reactor.seconds()]
        for _ in range(9):
            process = self.reactor.process
            self.assertEqual(process.signals, ["KILL"])
            self.assertEqual(child.problems(), ["echo child refused: wrong version"])
            process.exit(ProcessTerminated(signal=9))
            while len(self.reactor.processes) == len(starts):
                self.reactor.advance(0.25)
            starts.append(self.reactor.seconds())
        waits = [later - earlier for earlier, later in itertools.pairwise(starts)]
        self.assertEqual(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60])
        self.assertEqual(MAX_RESTART_INTERVAL, 60)

    def test_health_names_a_child_slow_to_answer(self) -> None:
        child = self.child()
        child.start()
        child.call(Echo, timeout=10.0, slow=True, value="slow by nature")
        self.reactor.advance(1.0)
        child.call(Echo, timeout=10.0, value="quick, usually")
        self.reactor.advance(2.0)
        self.assertEqual(child.problems(), [])
        self.reactor.advance(1.0)
        self.assertEqual(child.problems(), ["echo child has not answered for 3s"])

    def test_a_cancelled_request_has_no_deadline(self) -> None:
        child = self.child()
        child.start()
        d = child.call(Echo, timeout=1.0, value="x")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.reactor.advance(5)
        self.assertEqual(self.reactor.process.signals, [])
        self.reactor.process.pump()
        self.assertEqual(child.problems(), [])

    def test_stop_closes_the_input_then_kills(self) -> None:
        child = self.child(lambda ask: Deferred())  # never ready
        child.start()
        waiting = child.call(Echo, timeout=10.0, value="x")
        stopped = child.stop(2.0)
        self.failureResultOf(waiting, ChildError)
        process = self.reactor.process
        self.assertTrue(process.stdin_closed)
        self.reactor.advance(2.0)
        self.assertEqual(process.signals, ["KILL"])
        self.assertNoResult(stopped)
        process.exit(ProcessTerminated(signal=9))
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(child.problems(), ["echo child is stopped"])
        self.failureResultOf(child.call(Echo, timeout=1.0, value="y"), ChildError)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.processes), 1)

    def test_stop_without_a_child(self) -> None:
        self.assertIsNone(self.successResultOf(self.child().stop(1.0)))

    def test_a_child_that_cannot_be_spawned(self) -> None:
        def broken(*args: object, **kwargs: object) -> None:
            raise OSError("no more processes")

        self.reactor.spawnProcess = broken  # type: ignore[assignment,method-assign]
        child = self.child()
        child.start()
        self.assertEqual(
            child.problems(), ["could not start echo child: no more processes"]
        )
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


class ChildProtocolTests(SynchronousTestCase):
    """The child's end, in memory."""

    def test_ends_once_what_it_was_asked_is_answered(self) -> None:
        child, transport = EchoChild(), StringTransport()
        child.makeConnection(transport)
        parent, sent = amp.AMP(), StringTransport()
        parent.makeConnection(sent)
        answer = parent.callRemote(Hold)
        child.dataReceived(sent.value())
        child.readConnectionLost()  # the parent closed our input
        self.assertFalse(transport.disconnecting)
        child.held[0].callback({})
        self.assertTrue(transport.disconnecting)
        parent.dataReceived(transport.value())
        self.assertEqual(self.successResultOf(answer), {})
        self.assertNoResult(child.finished)
        child.connectionLost(Failure(ProcessDone(0)))
        self.assertIsNone(self.successResultOf(child.finished))


class LogRelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events = events_logged(self)
        self.relay = LogRelay("worker")

    def relayed(self) -> list[tuple[LogLevel, str, object]]:
        return [
            (e["log_level"], formatEvent(e), e.get("message_id")) for e in self.events
        ]

    def test_levels_and_fields_kept(self) -> None:
        self.relay.feed(
            b'{"timestamp":"t","level":"error","namespace":"maillaser.spool",'
            b'"text":"could not store msg_1","message_id":"msg_1","child":"x"}\n'
            b'{"level":"debug","text":"detail {not a format}"}\n'
        )
        self.assertEqual(
            self.relayed(),
            [
                (LogLevel.error, "worker: could not store msg_1", "msg_1"),
                (LogLevel.debug, "worker: detail {not a format}", None),
            ],
        )
        self.assertEqual(self.relay.tail(), "")

    def test_anything_else_is_a_warning_and_the_tail(self) -> None:
        self.relay.feed(b"Traceb")
        self.assertEqual(len(self.events), 0)
        self.relay.feed(b"ack: boom\n\n[1, 2]\n")
        self.relay.feed(b'{"level": "loud", "text": "?"}\nKilled')
        self.relay.flush()
        self.assertEqual(
            [(level, text) for level, text, _ in self.relayed()],
            [
                (LogLevel.warn, "worker: Traceback: boom"),
                (LogLevel.warn, "worker: [1, 2]"),
                (LogLevel.warn, 'worker: {"level": "loud", "text": "?"}'),
                (LogLevel.warn, "worker: Killed"),
            ],
        )
        self.assertEqual(
            self.relay.tail(),
            'Traceback: boom\n[1, 2]\n{"level": "loud", "text": "?"}\nKilled',
        )

    def test_the_tail_is_bounded(self) -> None:
        self.relay.feed(b"x" * 10_000 + b"\nlast words\n")
        tail = self.relay.tail()
        self.assertEqual(len(tail), 4096 - 1)
        self.assertTrue(tail.endswith("\nlast words"))


# Real processes.


class RealChildTests(TestCase):
    def setUp(self) -> None:
        self.events = events_logged(self)

    def child(self, **kwargs: Any) -> ChildProcess:
        child = ChildProcess(reactor, ECHO, name="echo child", **kwargs)
        self.addCleanup(child.stop, 5.0)
        return child

    async def test_answers_and_logs_through_us(self) -> None:
        child = self.child()
        answer = await wait(child.call(Echo, timeout=10.0, value="héllo"))
        self.assertEqual(answer["value"], "héllo")
        self.assertNotEqual(answer["pid"], os.getpid())
        self.assertEqual(answer["pid"], child.pid)
        await wait(child.call(Warn, timeout=10.0, message_id="msg_7"))
        await poll(lambda: any(e.get("message_id") == "msg_7" for e in self.events))
        await poll(lambda: any("a stray print" in formatEvent(e) for e in self.events))
        relayed = {
            formatEvent(e): e["log_level"]
            for e in self.events
            if formatEvent(e).startswith("echo child: ")
        }
        self.assertEqual(
            relayed,
            {
                "echo child: could not read msg_7": LogLevel.warn,
                "echo child: a stray print": LogLevel.info,
            },
        )

    async def test_wide_pipes(self) -> None:
        """A large message crosses in one write, not one per 64 KiB."""
        if not hasattr(fcntl, "F_GETPIPE_SZ"):
            raise SkipTest("Linux only")
        child = self.child()
        answer = await wait(child.call(PipeSizes, timeout=10.0))
        self.assertEqual(answer["sizes"], [PIPE_SIZE, PIPE_SIZE])

    async def test_a_stopped_child_is_killed_and_replaced(self) -> None:
        """SIGSTOP: the request fails at its deadline, the next is answered."""
        child = self.child()
        child.start()
        first = (await wait(child.call(Echo, timeout=10.0, value="1")))["pid"]
        os.kill(first, signal.SIGSTOP)
        self.addCleanup(_kill_quietly, first)
        started = reactor.seconds()
        stuck = child.call(Echo, timeout=0.5, value="2")
        await self.assertFailure(stuck, ChildTimeout)
        self.assertLess(reactor.seconds() - started, 1.0)
        self.assertFalse(child.ready)
        answer = await wait(child.call(Echo, timeout=10.0, value="3"))
        self.assertNotEqual(answer["pid"], first)
        self.assertEqual(answer["value"], "3")
        with self.assertRaises(ProcessLookupError):
            os.kill(first, 0)  # killed, and reaped

    async def test_a_child_that_exits_is_restarted(self) -> None:
        child = self.child()
        child.start()
        first = (await wait(child.call(Echo, timeout=10.0, value="1")))["pid"]
        error = await self.assertFailure(
            child.call(Exit, timeout=10.0, status=3), ChildError
        )
        self.assertIn("exit code 3", str(error))
        self.assertIn("SystemError: dying words", str(error))
        await poll(lambda: child.ready)
        self.assertNotEqual(child.pid, first)
        self.assertEqual(
            (await wait(child.call(Echo, timeout=10.0, value="2")))["value"], "2"
        )

    async def test_ignores_sigterm_and_ends_with_its_input(self) -> None:
        child = self.child()
        await wait(child.call(Echo, timeout=10.0, value="1"))
        pid = child.pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
        self.assertEqual(
            (await wait(child.call(Echo, timeout=10.0, value="2")))["pid"], pid
        )
        asked = child.call(Echo, timeout=10.0, value="3")
        stopping = child.stop(10.0)
        self.assertEqual((await wait(asked))["value"], "3")  # answered before it ends
        await wait(stopping)
        exits = [
            e for e in self.events if formatEvent(e).startswith("echo child exited")
        ]
        self.assertEqual(
            [formatEvent(e) for e in exits],
            [
                "echo child exited: A process has ended without apparent errors:"
                " process finished with exit code 0."
            ],
        )


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
