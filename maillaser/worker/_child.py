"""
Work done in child processes of the bridge: the spool's SQLite (and the
fsync behind every ``250``), and turning messages into payloads.

The reactor thread must only do I/O, and a thread beside it does not keep
it free: a thread shares the interpreter's lock with the reactor, and the
two hand it over at every system call.  Measured in the benchmark, a
spool thread making SQLite calls cost the bridge a quarter of its
throughput on small messages, and a thread rendering HTML (html2text, pure
Python) made the reactor wait up to 70 ms.  A child process shares
nothing: the reactor writes requests to a pipe and reads answers from
another, as it reads sockets, and the work runs on another core.  A bug or
a message that kills a child costs the requests it had, not the bridge.

The bridge sends the requests made in one turn of its reactor, each a frame
(a length and a pickle), in one write to the child's standard input; the
child (L{main}, in a Python of its own) takes every frame that has arrived,
answers them all with its job's handler, and writes the answers in one
frame on its standard output.  Pickle is safe here: both ends are this
package, speaking over pipes only they hold.  A child ignores SIGINT and
SIGTERM, which a terminal or a service manager sends to the whole process
group: it ends when its input ends, because the bridge closed it or died,
and so never leaves a request that reached it unanswered.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import os
import pickle
import signal
import struct
import sys
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import InvalidLogLevelError, Logger, LogLevel, globalLogBeginner
from twisted.python.failure import Failure
from zope.interface import implementer

import maillaser
from maillaser.logs import json_lines
from maillaser.timers import cancel_timer

READ_SIZE = 1024 * 1024
"""Bytes a child reads at once: a burst of small messages in one frame."""

RESPAWN_INTERVAL = 1.0
"""Seconds between starts of a child that keeps failing, at the least."""

WRITE_SIZE = 1024 * 1024
"""Bytes of requests written to a child per turn of the reactor, about."""

PIPE_SIZE = 1024 * 1024
"""Bytes a pipe to or from a child holds (Linux's largest by default)."""

STOP_TIMEOUT = 10.0
"""Seconds a child has to finish its work and exit before it is killed."""

_LENGTH = struct.Struct(">I")

_PROGRAM = f"from {__name__} import main; main()"
"""
A child's program.  Not C{-m}, which would run this module as C{__main__},
and pickle would name its classes after that.
"""


class ChildError(Exception):
    """A child could not answer: it ended, or could not be started."""


class Request(NamedTuple):
    """Run C{function(*args)} in the child (the spool adds its database)."""

    number: int
    function: Callable[..., object]
    """A module-level function, which pickle names and the child imports."""
    args: tuple[object, ...]
    write: bool = False
    """For the spool: a write, committed in one transaction with its neighbours."""


class Answer(NamedTuple):
    number: int
    value: object
    """What the function returned, or the exception it raised."""
    failed: bool = False


class Batch(NamedTuple):
    """The answers to every request that one read of the child's input brought."""

    answers: Sequence[Answer]
    transactions: Sequence[tuple[int, Exception | None]] = ()
    """For the spool, per transaction: how many writes, and why it failed."""


def frame(value: object) -> list[bytes]:
    """C{value}'s frame, in two pieces: a megabyte is not copied to join them."""
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return [_LENGTH.pack(len(data)), data]


# On the pipes these tuples go as plain ones: pickle names a class each time
# it meets one, which for a small request costs more than the request itself.


def request_frame(request: Request) -> list[bytes]:
    return frame(tuple(request))


def batch_frame(batch: Batch) -> list[bytes]:
    return frame(([tuple(answer) for answer in batch.answers], batch.transactions))


def as_batch(value: tuple[list[tuple[Any, ...]], Sequence[Any]]) -> Batch:
    answers, transactions = value
    return Batch([Answer._make(answer) for answer in answers], transactions)


class FrameReader:
    """Whole values out of a byte stream that arrives in arbitrary pieces."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        values = []
        start = 0
        with memoryview(self._buffer) as buffer:  # frames unpickled in place
            while len(buffer) - start >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(buffer, start)
                end = start + _LENGTH.size + length
                if len(buffer) < end:
                    break
                values.append(pickle.loads(buffer[start + _LENGTH.size : end]))
                start = end
        del self._buffer[:start]
        return values


# The child.

Handler = Callable[[Sequence[Request]], Batch]


def run_each(requests: Sequence[Request]) -> Batch:
    """The payload child's handler: each request on its own."""
    return Batch([call(request) for request in requests])


def call(request: Request, *first: object) -> Answer:
    """
    Answer C{request}, the exception included if it raised one: a bug or a
    bad message fails its own request, and the child goes on.
    """
    try:
        return Answer(request.number, request.function(*first, *request.args))
    except Exception as error:
        return Answer(request.number, portable(error), True)


def portable(error: Exception) -> Exception:
    """C{error} if it survives the pipe; else a L{ChildError} describing it."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return ChildError(repr(error))
    return error


def serve(handle: Handler, source: int = 0, sink: int = 1) -> None:
    """Answer requests from C{source} on C{sink} until C{source} ends."""
    reader = FrameReader()
    while chunk := os.read(source, READ_SIZE):
        requests = [Request._make(request) for request in reader.feed(chunk)]
        if requests:
            for piece in batch_frame(handle(requests)):
                _write_all(sink, piece)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main(argv: Sequence[str] | None = None) -> None:
    """A child: C{spool DIRECTORY} or C{payload}."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Log events go to the bridge, which logs them as its own.
    globalLogBeginner.beginLoggingTo(
        [json_lines(sys.stderr)], discardBuffer=True, redirectStandardIO=False
    )
    job, *args = sys.argv[1:] if argv is None else argv
    if job == "payload":
        serve(run_each)
        return
    from maillaser.spool import serve_spool

    serve_spool(*args)


# The bridge's end.


@implementer(IPushProducer)
class ChildProcess(ProcessProtocol):
    """
    Requests to a child, each answered through a Deferred.

    It is the producer for the child's input: while the pipe and Twisted's
    buffer in front of it are full, requests wait in a list, to go in one
    frame once they drain, rather than be copied into that buffer and,
    each time it empties, copied together again.

    The child is started by the first request.  If it ends on its own
    (killed, out of memory), what it had not answered fails with a
    L{ChildError}, and the next request starts a new one, no sooner than
    L{RESPAWN_INTERVAL} after the last start: requests made meanwhile wait.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        clock: IReactorTime,
        job: Sequence[str],
        on_batch: Callable[[Batch], object] = lambda batch: None,
        on_exit: Callable[[ChildError], object] = lambda error: None,
    ) -> None:
        """
        @param reactor: spawns the child and ends each turn of requests: an
            C{IReactorProcess} and C{IReactorTime}.
        @param clock: times restarts and the stop.
        @param job: the child's arguments, for L{main}.
        @param on_batch: told of each batch before its answers go out.
        @param on_exit: told when the child ended without being stopped.
        """
        self._reactor = reactor
        self._clock = clock
        self._job = list(job)
        self._on_batch = on_batch
        self._on_exit = on_exit
        self._numbers = itertools.count()
        self._waiting: dict[int, Deferred[Any]] = {}
        self._outgoing: deque[Request] = deque()
        self._reader = FrameReader()
        self._started_at: float | None = None
        self._starting: IDelayedCall | None = None
        self._stopping = False
        self._paused = False
        self._ended: Deferred[None] | None = None
        """While a child runs: fires when it has ended."""
        self._errors = b""
        self._partial_line = b""

    @property
    def name(self) -> str:
        return " ".join(["child", *self._job])

    def run(self, function: Callable[[], Any]) -> Deferred[Any]:
        """C{function()} in the child: an offload for the deliverer."""
        return self.request(function, ())

    def request(
        self,
        function: Callable[..., object],
        args: tuple[object, ...],
        write: bool = False,
    ) -> Deferred[Any]:
        if self._stopping:
            return fail(ChildError(f"{self.name} is stopped"))
        number = next(self._numbers)
        answer: Deferred[Any] = Deferred()
        self._waiting[number] = answer
        self._outgoing.append(Request(number, function, args, write))
        if self._ended is None:
            self._start_soon()
        elif len(self._outgoing) == 1 and not self._paused:
            self._reactor.callLater(0, self._send)
        return answer

    def _send(self) -> None:
        """At the end of the turn: what this turn asked, in one write."""
        if self._ended is None or self._paused or not self._outgoing:
            return  # no child yet, or a full pipe: they go later
        self._write(WRITE_SIZE)
        if self._outgoing:
            self._reactor.callLater(0, self._send)

    def _write(self, limit: float) -> None:
        """
        Requests as they were asked, up to about C{limit} bytes: their
        pickling is work for the reactor, which must not do it all at once.
        """
        pieces: list[bytes] = []
        size = 0
        while self._outgoing and size < limit:
            pieces += request_frame(self._outgoing.popleft())
            size += len(pieces[-1])
        assert self.transport is not None
        self.transport.writeSequence(pieces)

    def stop(self) -> Deferred[None]:
        """End the child once it has answered everything asked of it."""
        self._stopping = True
        if self._ended is None:
            if self._starting is not None:
                self._starting.cancel()
            self._fail_waiting(ChildError(f"{self.name} is stopped"))
            return succeed(None)
        self._write(math.inf)  # full pipe or not: the child reads it all first
        assert self.transport is not None
        self.transport.closeStdin()
        ended, timer = self._ended, self._clock.callLater(STOP_TIMEOUT, self._kill)
        return ended.addBoth(cancel_timer, timer)

    def _start_soon(self) -> None:
        if self._starting is not None:
            return
        now = self._clock.seconds()
        last = self._started_at
        delay = 0.0 if last is None else last + RESPAWN_INTERVAL - now
        if delay > 0:
            self._starting = self._clock.callLater(delay, self._start)
        else:
            self._start()

    def _start(self) -> None:
        self._starting = None
        self._started_at = self._clock.seconds()
        self._ended = Deferred()
        self._errors = b""
        self._partial_line = b""
        process = self._reactor.spawnProcess(
            self,
            sys.executable,
            [sys.executable, "-c", _PROGRAM, *self._job],
            env=_environment(),
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        _widen(process)
        self._paused = False
        process.registerProducer(self, True)
        self._send()

    def _kill(self) -> None:
        self._log.warn("{name} did not finish in time; killing it", name=self.name)
        assert self.transport is not None
        self.transport.signalProcess("KILL")

    # IPushProducer, for the child's input

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._send()

    def stopProducing(self) -> None:
        pass  # processEnded follows

    # ProcessProtocol

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 2:
            self._relay(data)
            return
        for batch in map(as_batch, self._reader.feed(data)):
            self._on_batch(batch)
            for answer in batch.answers:
                waiting = self._waiting.pop(answer.number)
                if answer.failed:
                    waiting.errback(Failure(answer.value))
                else:
                    waiting.callback(answer.value)

    def _relay(self, data: bytes) -> None:
        """
        The child's log: its JSON lines logged here, with their level and
        fields; anything else (a dying interpreter's traceback) as warnings,
        the last of it kept to say why the child ended.
        """
        *lines, self._partial_line = (self._partial_line + data).split(b"\n")
        for line in filter(bytes.strip, lines):
            try:
                event = json.loads(line)
                level = LogLevel.levelWithName(event.pop("level"))
            except (ValueError, KeyError, InvalidLogLevelError, AttributeError):
                self._errors = (self._errors + line + b"\n")[-4096:]
                text = line.decode("utf-8", "replace")
                self._log.warn("{child}: {text}", child=self.name, text=text)
                continue
            event.pop("timestamp", None)
            event.pop("namespace", None)
            text = event.pop("text", "")
            self._log.emit(
                level, "{child}: {text}", child=self.name, text=text, **event
            )

    def processEnded(self, reason: Failure) -> None:
        ended, self._ended = self._ended, None
        self._reader = FrameReader()
        self._relay(b"\n")  # a last line without its end
        why = self._errors.decode("utf-8", "replace").strip()
        error = ChildError(
            f"{self.name} ended: {reason.getErrorMessage()}"
            + (f": {why}" if why else "")
        )
        if not (self._stopping and reason.check(ProcessDone)):
            self._on_exit(error)
        self._fail_waiting(error)  # none, unless it ended on its own
        assert ended is not None
        ended.callback(None)

    def _fail_waiting(self, error: ChildError) -> None:
        self._outgoing.clear()
        waiting, self._waiting = self._waiting, {}
        for answer in waiting.values():
            answer.errback(Failure(error))


def _widen(process: Any) -> None:
    """
    Pipes of L{PIPE_SIZE}, where Linux allows: through the usual 64 KB a
    large message takes a turn of the reactor per 64 KB, and behind it the
    frames queue up, to be copied together again and again.
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
