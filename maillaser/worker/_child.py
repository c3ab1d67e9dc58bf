"""
A supervised child process that answers AMP commands on its standard
input and output.

The SMTP front runs the delivery worker this way, and the worker its
payload processes: work that may block (a commit, a parse, a stuck disk)
happens in another process, and the parent's reactor only writes requests
to a pipe and reads answers from another, as it reads sockets.  Each
request has a deadline: a child that misses one is killed (C{SIGKILL}:
a stopped or wedged process ignores anything milder), everything it was
asked fails at once, and a new child is started, no more than once a
second, so the parent answers late rather than never.

The child's standard error carries its log: JSON lines (what
L{maillaser.logs.json_lines} writes), logged here again with their level
and fields; anything else it writes (an interpreter dying with a
traceback) is logged as a warning, and its tail says why the child ended.

Twisted's C{ProcessEndpoint} would connect AMP to a child too, but it
logs the child's standard error as plain text, without levels or fields;
hence a process protocol of our own.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.stdio import PipeAddress
from twisted.logger import InvalidLogLevelError, Logger, LogLevel
from twisted.protocols import amp
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure

import maillaser
from maillaser.logs import observer
from maillaser.timers import cancel_timer

RESTART_INTERVAL = 1.0
"""Seconds between two starts of a child, at the least."""

MAX_RESTART_INTERVAL = 60.0
"""
The longest wait before the next start of a child that keeps failing
before it is ready (the wait doubles with each such failure): a worker
refused for its version, or one whose spool cannot be opened, is not
started sixty times a minute.
"""

SLOW_ANSWER = 2.0
"""Seconds a request may wait for its answer before health calls the child
unresponsive."""

PIPE_SIZE = 1024 * 1024
"""Bytes a pipe to or from a child holds (Linux's largest by default)."""

_TAIL = 4096
"""Bytes of a child's last non-log output kept, to say why it ended."""

Answer = dict[str, Any]
Ask = Callable[..., Deferred[Answer]]
"""C{ask(command, *, timeout, **arguments)}: one request to one child."""


class ChildError(Exception):
    """A child could not answer: it was not running, ended, or was killed."""


class ChildTimeout(ChildError):
    """A child did not answer in time; it is being killed."""


@attrs.frozen
class ChildProgram:
    """
    What a child runs: C{module.function()}, with C{args} as its
    C{sys.argv[1:]}.  Not C{python -m}, which would import the module a
    second time as C{__main__}.
    """

    module: str
    function: str
    args: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        code = f"from {self.module} import {self.function}; {self.function}()"
        return [sys.executable, "-c", code, *self.args]


@attrs.define(eq=False)
class _Request:
    command: type[amp.Command]
    arguments: dict[str, Any]
    timeout: float
    answer: Deferred[Answer] = attrs.field(init=False)
    timer: IDelayedCall | None = None
    connection: _Connection | None = None
    """The child it was sent to; C{None} while it waits for one."""
    sent_at: float = 0.0
    slow: bool = False

    def __attrs_post_init__(self) -> None:
        # Cancelled, a request stops its deadline; its answer is ignored.
        self.answer = Deferred(lambda answer: self.stop_timer())

    def stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()

    def fail(self, error: ChildError) -> None:
        self.stop_timer()
        if not self.answer.called:
            self.answer.errback(Failure(error))


class _ChildTransport(proxyForInterface(IProcessTransport, "process")):  # type: ignore[misc]
    """A process transport as AMP wants one: AMP asks for addresses."""

    def getPeer(self) -> PipeAddress:
        return PipeAddress()

    def getHost(self) -> PipeAddress:
        return PipeAddress()


class _Connection(ProcessProtocol):
    """One child process: its output to AMP, its standard error to the log."""

    def __init__(
        self, relay: LogRelay, on_ended: Callable[[_Connection, Failure], None]
    ) -> None:
        self.amp = amp.AMP()
        self.relay = relay
        self.requests: set[_Request] = set()
        """Sent and not yet answered."""
        self.ready = False
        """Greeted, and taking requests."""
        self.killed = False
        self.finished = False
        self.pid: int | None = None
        self._on_ended = on_ended
        self._waiting: list[Deferred[None]] = []

    @property
    def alive(self) -> bool:
        return not (self.killed or self.finished)

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.amp.makeConnection(_ChildTransport(self.transport))

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self.amp.dataReceived(data)
        else:
            self.relay.feed(data)

    def processEnded(self, reason: Failure) -> None:
        self.finished = True
        self.relay.flush()
        self.amp.connectionLost(reason)
        self._on_ended(self, reason)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def ended(self) -> Deferred[None]:
        """Fires once the process has ended and its pipes are closed."""
        if self.finished:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def kill(self) -> None:
        self.killed = True
        assert self.transport is not None
        with suppress(ProcessExitedAlready):
            self.transport.signalProcess("KILL")

    def describe_end(self, reason: Failure) -> str:
        """The reason a process ended, with the last words it wrote."""
        why = reason.getErrorMessage()
        tail = self.relay.tail()
        return f"{why}: {tail}" if tail else why


class ChildProcess:
    """
    Requests to a child process, each with a deadline.

    L{start} keeps a child running until L{stop}, restarting it whenever
    it ends; without it, the first request starts one, and a child that
    ends is started again only when a request needs it.  Requests made
    while no child is ready wait for one, their deadlines running.

    @ivar name: names the child in logs and health problems.
    """

    _log = Logger(observer=observer)

    def __init__(
        self,
        reactor: Any,
        program: ChildProgram,
        *,
        name: str,
        greet: Callable[[Ask], Deferred[Any]] | None = None,
    ) -> None:
        """
        @param reactor: spawns the child and times the deadlines: an
            C{IReactorProcess} and C{IReactorTime}.
        @param greet: called with each new child's C{ask} before any
            request goes to it; the child is ready once its Deferred
            fires, and is killed if it fails (a worker of another version).
        """
        self._reactor = reactor
        self.program = program
        self.name = name
        self._greet = greet
        self._connection: _Connection | None = None
        self._waiting: list[_Request] = []
        self._supervised = False
        self._stopping = False
        self._starting: IDelayedCall | None = None
        self._started_at: float | None = None
        self._failures = 0
        """Children in a row that ended before they were ready."""
        self._why: str = ""
        """Why no child is ready, for health; empty while one starts."""

    @property
    def ready(self) -> bool:
        connection = self._connection
        return connection is not None and connection.alive and connection.ready

    @property
    def pid(self) -> int | None:
        """The running child's process id."""
        return None if self._connection is None else self._connection.pid

    def start(self) -> None:
        """Keep a child running from now on."""
        self._supervised = True
        self._stopping = False
        self._start_soon()

    def call(
        self,
        command: type[amp.Command],
        *,
        timeout: float,
        slow: bool = False,
        **arguments: Any,
    ) -> Deferred[Answer]:
        """
        Send C{command} to the child, or to the next one if none is ready.

        @param slow: the request may take long by nature (a delivery
            round): health does not count it as a sign of a stuck child.
        @return: fires with the answer's fields, or fails with the
            command's own errors, L{ChildTimeout} past C{timeout} seconds
            (the child is killed), or L{ChildError} when the child ended or
            was killed first.
        """
        if self._stopping:
            return fail(ChildError(f"{self.name} is stopped"))
        request = self._request(command, timeout, arguments)
        request.slow = slow
        if self.ready:
            assert self._connection is not None
            self._send(self._connection, request)
        else:
            self._waiting.append(request)
            self._start_soon()
        return request.answer

    def _request(
        self, command: type[amp.Command], timeout: float, arguments: dict[str, Any]
    ) -> _Request:
        request = _Request(command, arguments, timeout)
        request.answer.addBoth(self._forget, request)
        request.timer = self._reactor.callLater(timeout, self._late, request)
        return request

    def _send(self, connection: _Connection, request: _Request) -> None:
        request.connection = connection
        request.sent_at = self._reactor.seconds()
        connection.requests.add(request)
        arguments, request.arguments = request.arguments, {}
        # Sent, the arguments are in the pipe's buffer: a message's bytes
        # are not held a second time until the answer comes.
        sent = maybeDeferred(connection.amp.callRemote, request.command, **arguments)
        del arguments
        sent.addBoth(self._answered, request, connection)

    def _answered(
        self, result: Answer | Failure, request: _Request, connection: _Connection
    ) -> None:
        if request.answer.called:
            return  # late, killed or cancelled: done with already
        if isinstance(result, Failure) and result.check(ConnectionDone, ConnectionLost):
            why = connection.describe_end(result)
            request.fail(ChildError(f"{self.name} ended: {why}"))
            return
        request.stop_timer()
        if isinstance(result, Failure):
            request.answer.errback(result)
        else:
            request.answer.callback(result)

    def _forget(self, result: object, request: _Request) -> object:
        if request.connection is not None:
            request.connection.requests.discard(request)
        elif request in self._waiting:
            self._waiting.remove(request)
        return result

    def _late(self, request: _Request) -> None:
        error = ChildTimeout(
            f"{self.name} did not answer {request.command.__name__}"
            f" within {request.timeout:g}s"
        )
        connection = request.connection
        if connection is not None:  # killed first: who hears of it may ask again
            connection.requests.discard(request)
            self._kill(connection, error)
        request.fail(error)

    def _kill(self, connection: _Connection, error: ChildError) -> None:
        """Kill the child; what else it had fails now, not when it is reaped."""
        if not connection.alive:
            return
        self._log.error(
            "{error}; killing it (pid {pid})", error=str(error), pid=connection.pid
        )
        self._why = str(error)
        connection.kill()
        for other in list(connection.requests):
            other.fail(ChildError(f"{self.name} was killed: {error}"))

    # Starting

    def _start_soon(self) -> None:
        if self._stopping or self._connection is not None or self._starting:
            return
        delay = 0.0
        if self._started_at is not None:
            interval = min(
                RESTART_INTERVAL * 2 ** max(self._failures - 1, 0),
                MAX_RESTART_INTERVAL,
            )
            delay = self._started_at + interval - self._reactor.seconds()
        if delay > 0:
            self._starting = self._reactor.callLater(delay, self._spawn)
        else:
            self._spawn()

    def _spawn(self) -> None:
        self._starting = None
        self._started_at = self._reactor.seconds()
        connection = _Connection(LogRelay(self.name), self._ended)
        try:
            process = self._reactor.spawnProcess(
                connection,
                sys.executable,
                self.program.argv(),
                env=_environment(),
                childFDs={0: "w", 1: "r", 2: "r"},
            )
        except Exception as error:
            self._log.failure("could not start {name}", name=self.name)
            self._why = f"could not start {self.name}: {error}"
            self._failures += 1
            if self._supervised or self._waiting:
                self._start_soon()
            return
        self._connection = connection
        _widen(process)
        if self._greet is None:
            self._greeted(None, connection)
            return
        greeting = maybeDeferred(self._greet, partial(self._ask, connection))
        greeting.addCallbacks(
            self._greeted,
            self._not_greeted,
            callbackArgs=(connection,),
            errbackArgs=(connection,),
        )

    def _ask(
        self,
        connection: _Connection,
        command: type[amp.Command],
        *,
        timeout: float,
        **arguments: Any,
    ) -> Deferred[Answer]:
        """A request to this very child, ready or not: for the greeting."""
        request = self._request(command, timeout, arguments)
        if connection.alive:
            self._send(connection, request)
        else:
            request.fail(ChildError(f"{self.name} ended"))
        return request.answer

    def _greeted(self, ignored: object, connection: _Connection) -> None:
        if not connection.alive or connection is not self._connection:
            return
        connection.ready = True
        self._failures = 0
        self._why = ""
        self._log.info("{name} ready (pid {pid})", name=self.name, pid=connection.pid)
        waiting, self._waiting = self._waiting, []
        for request in waiting:
            self._send(connection, request)

    def _not_greeted(self, failure: Failure, connection: _Connection) -> None:
        error = failure.value
        why = getattr(error, "description", None) or str(error)
        self._kill(connection, ChildError(f"{self.name} refused: {why}"))

    def _ended(self, connection: _Connection, reason: Failure) -> None:
        why = connection.describe_end(reason)
        if self._connection is connection:
            self._connection = None
        if not connection.ready:
            self._failures += 1
        for request in list(connection.requests):
            request.fail(ChildError(f"{self.name} ended: {why}"))
        if self._stopping:
            self._log.info("{name} exited: {why}", name=self.name, why=why)
            return
        if not connection.killed:  # it ended on its own
            self._log.error("{name} ended: {why}", name=self.name, why=why)
            self._why = f"{self.name} ended: {why}"
        if self._supervised or self._waiting:
            self._start_soon()

    # Health and stopping

    def problems(self) -> list[str]:
        """What is wrong with the child now, for C{/health}."""
        if self._stopping:
            return [f"{self.name} is stopped"]
        problems = []
        if not self.ready:
            problems.append(self._why or f"{self.name} is starting")
        connection = self._connection
        requests = [] if connection is None else connection.requests
        sent = [request.sent_at for request in requests if not request.slow]
        if sent:
            waited = self._reactor.seconds() - min(sent)
            if waited > SLOW_ANSWER:
                problems.append(f"{self.name} has not answered for {waited:.0f}s")
        return problems

    def stop(self, timeout: float) -> Deferred[None]:
        """
        Close the child's input, which ends it once it has answered what it
        was asked; kill it if it has not ended within C{timeout} seconds.
        Requests still waiting for a child fail.
        """
        self._stopping = True
        self._supervised = False
        if self._starting is not None:
            self._starting.cancel()
            self._starting = None
        for request in list(self._waiting):
            request.fail(ChildError(f"{self.name} is stopped"))
        connection = self._connection
        if connection is None:
            return succeed(None)
        ended = connection.ended()
        if connection.alive:
            assert connection.transport is not None
            connection.transport.closeStdin()
            timer = self._reactor.callLater(
                timeout,
                self._kill,
                connection,
                ChildError(f"{self.name} did not exit within {timeout:g}s"),
            )
            ended.addBoth(cancel_timer, timer)
        return ended


class LogRelay:
    """
    A child's standard error, logged here: its JSON lines as events with
    their level and fields, anything else as warnings, the last of which
    are kept to say why the child ended.
    """

    _log = Logger(observer=observer)

    def __init__(self, name: str) -> None:
        self._name = name
        self._partial = b""
        self._tail = b""
        self._loggers: dict[str, Logger] = {}

    def feed(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._line(line)

    def flush(self) -> None:
        """The last line, if the child ended without finishing it."""
        line, self._partial = self._partial, b""
        self._line(line)

    def tail(self) -> str:
        return self._tail.decode("utf-8", "replace").strip()

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            fields = json.loads(line)
            level = LogLevel.levelWithName(fields.pop("level"))
        except (ValueError, KeyError, TypeError, AttributeError, InvalidLogLevelError):
            self._tail = (self._tail + line + b"\n")[-_TAIL:]
            text = line.decode("utf-8", "replace")
            self._log.warn("{child}: {text}", child=self._name, text=text)
            return
        fields.pop("timestamp", None)
        fields.update(child=self._name, text=fields.get("text", ""))
        self._logger(fields.pop("namespace", None)).emit(
            level, "{child}: {text}", **fields
        )

    def _logger(self, namespace: object) -> Logger:
        """
        The child's event keeps its namespace (a search for the class that
        logged it finds it, whichever process it ran in).
        """
        if not isinstance(namespace, str):
            return self._log
        logger = self._loggers.get(namespace)
        if logger is None:
            logger = self._loggers[namespace] = Logger(namespace, self, observer)
        return logger


def _widen(process: Any) -> None:
    """
    Pipes of L{PIPE_SIZE}, where Linux allows: through the usual 64 KiB, a
    large message takes a turn of each reactor per 64 KiB.
    """
    size_option = getattr(fcntl, "F_SETPIPE_SZ", None)
    if size_option is None:
        return
    for pipe in getattr(process, "pipes", {}).values():
        with suppress(OSError):
            fcntl.fcntl(pipe.fileno(), size_option, PIPE_SIZE)


def _environment() -> dict[str, str]:
    """Ours, with this very package first on the child's path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(maillaser.__file__)))
    path = [root, *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


__all__ = [
    "MAX_RESTART_INTERVAL",
    "RESTART_INTERVAL",
    "SLOW_ANSWER",
    "Answer",
    "Ask",
    "ChildError",
    "ChildProcess",
    "ChildProgram",
    "ChildTimeout",
    "LogRelay",
]
