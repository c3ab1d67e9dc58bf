"""
The spool's own process: SQLite, and the fsync behind every ``250``, away
from the reactor.

The bridge used to run the spool's SQLite on a thread.  Every SQLite call
gives up the GIL and takes it back, and each time it took it back the
reactor had to stop and wait, a hand-over at every call: in the benchmark
the bridge did a third more work per message and answered ``250`` several
milliseconds later than with no spool at all.  A process shares no GIL.
The reactor writes requests to a pipe and reads answers from another, as
it reads sockets.

The bridge sends the requests made in one turn of its reactor as one frame
(a length and a pickle) to the child's standard input; the child (L{main},
in a Python of its own) takes every frame that has arrived, runs
consecutive writes in one transaction (a group commit: one fsync for every
SMTP session waiting on it), and answers them all in one frame on its
standard output.  Pickle is safe here: both ends are this package, speaking
over pipes only they hold.  It ignores SIGINT and SIGTERM, which a terminal
or a service manager sends to the whole process group: it ends when its
input ends, because the bridge closed it or died, and so never leaves a
request that reached it unanswered.
"""

from __future__ import annotations

import itertools
import os
import pickle
import signal
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

import maillaser
from maillaser.spool import MessageNotFound, SpoolDatabase, SpoolError

READ_SIZE = 1024 * 1024
"""Bytes the child reads at once: a burst of small messages in one commit."""

RESPAWN_INTERVAL = 1.0
"""Seconds between starts of a child that keeps failing, at the least."""

STOP_TIMEOUT = 10.0
"""Seconds a child has to finish its work and exit before it is killed."""

_LENGTH = struct.Struct(">I")

_CHILD = f"from {__name__} import main; main()"
"""
The child's program.  Not C{-m}, which would run this module as
C{__main__}, and pickle would name its classes after that.
"""


@attrs.frozen
class Request:
    """Run C{function(database, *args)}; a write joins its neighbours' transaction."""

    number: int
    function: Callable[..., object]
    """A function of L{SpoolDatabase}, which pickle names and the child imports."""
    args: tuple[object, ...]
    write: bool


@attrs.frozen
class Answer:
    number: int
    value: object
    """What the function returned, or the exception it raised."""
    failed: bool = False


@attrs.frozen
class Batch:
    """The answers to what one read brought, and how its transactions went."""

    answers: Sequence[Answer]
    transactions: Sequence[tuple[int, SpoolError | None]]
    """Per transaction, in order: how many writes, and the error if it failed."""


def frame(value: object) -> bytes:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


class FrameReader:
    """Whole values out of a byte stream that arrives in arbitrary pieces."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        values = []
        start = 0
        while len(self._buffer) - start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer, start)
            end = start + _LENGTH.size + length
            if len(self._buffer) < end:
                break
            values.append(pickle.loads(self._buffer[start + _LENGTH.size : end]))
            start = end
        del self._buffer[:start]
        return values


# The child.


def run(database: SpoolDatabase, requests: Sequence[Request]) -> Batch:
    """Answer C{requests} in order, each run of writes in one transaction."""
    answers: list[Answer] = []
    transactions: list[tuple[int, SpoolError | None]] = []
    for write, run_of in itertools.groupby(requests, key=lambda r: r.write):
        group = list(run_of)
        if write:
            error = _commit(database, group, answers)
            transactions.append((len(group), error))
        else:
            answers.extend(_read(database, request) for request in group)
    return Batch(answers, transactions)


def _commit(
    database: SpoolDatabase, writes: list[Request], answers: list[Answer]
) -> SpoolError | None:
    operations = [_bound(request) for request in writes]
    try:
        results = database.apply(operations)
    except Exception as error:
        failed = _spool_error(error)
        answers.extend(Answer(request.number, failed, True) for request in writes)
        return failed
    for request, result in zip(writes, results, strict=True):
        if isinstance(result, Failure):
            answers.append(Answer(request.number, result.value, True))
        else:
            answers.append(Answer(request.number, result))
    return None


def _bound(request: Request) -> Callable[[SpoolDatabase], object]:
    return lambda database: request.function(database, *request.args)


def _read(database: SpoolDatabase, request: Request) -> Answer:
    try:
        return Answer(request.number, request.function(database, *request.args))
    except MessageNotFound as error:
        return Answer(request.number, error, True)
    except Exception as error:
        return Answer(request.number, _spool_error(error), True)


def _spool_error(error: Exception) -> SpoolError:
    """The spool's own errors as they are; a bug's, answered all the same."""
    if isinstance(error, SpoolError):
        return error
    return SpoolError(f"spool process: {error!r}")


def serve(database: SpoolDatabase, source: int = 0, sink: int = 1) -> None:
    """Answer requests from C{source} on C{sink} until C{source} ends."""
    reader = FrameReader()
    while chunk := os.read(source, READ_SIZE):
        requests = [request for turn in reader.feed(chunk) for request in turn]
        if requests:
            _write_all(sink, frame(run(database, requests)))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main(argv: Sequence[str] | None = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    [directory] = sys.argv[1:] if argv is None else argv
    try:
        # The bridge checked the database before it started us.
        database = SpoolDatabase.open(directory, create=False, check=False)
    except SpoolError as error:
        sys.exit(str(error))
    try:
        serve(database)
    finally:
        database.close()


# The bridge's end.


class SpoolProcess(ProcessProtocol):
    """
    Requests to the child, each answered through a Deferred.

    The child is started by the first request and, if it ends on its own
    (killed, out of memory), again by a later one, at most once per
    L{RESPAWN_INTERVAL}; whatever was waiting for it then fails with a
    L{SpoolError}, so the SMTP session answers ``451``.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        clock: IReactorTime,
        directory: str,
        on_batch: Callable[[Batch], object],
        on_exit: Callable[[SpoolError], object],
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self._directory = os.path.abspath(directory)
        self._on_batch = on_batch
        self._on_exit = on_exit
        self._numbers = itertools.count()
        self._waiting: dict[int, Deferred[Any]] = {}
        self._outgoing: list[Request] = []
        self._reader = FrameReader()
        self._started_at: float | None = None
        self._stopping = False
        self._ended: Deferred[None] | None = None
        self._errors = b""

    def request(
        self, function: Callable[..., object], args: tuple[object, ...], write: bool
    ) -> Deferred[Any]:
        if self._ended is None and not self._start():
            return fail(SpoolError(f"spool process for {self._directory} is down"))
        number = next(self._numbers)
        answer: Deferred[Any] = Deferred()
        self._waiting[number] = answer
        if not self._outgoing:
            self._reactor.callLater(0, self._send)
        self._outgoing.append(Request(number, function, args, write))
        return answer

    def _send(self) -> None:
        """At the end of the turn: what this turn asked, in one frame."""
        turn, self._outgoing = self._outgoing, []
        if turn and self._ended is not None:
            assert self.transport is not None
            self.transport.write(frame(turn))

    def stop(self) -> Deferred[None]:
        """End the child once it has answered everything asked of it."""
        self._stopping = True
        if self._ended is None:
            return succeed(None)
        self._send()
        assert self.transport is not None
        self.transport.closeStdin()
        ended, timer = self._ended, self._clock.callLater(STOP_TIMEOUT, self._kill)
        return ended.addBoth(_cancel, timer)

    def _start(self) -> bool:
        now = self._clock.seconds()
        if self._stopping or (
            self._started_at is not None and now - self._started_at < RESPAWN_INTERVAL
        ):
            return False
        self._started_at = now
        self._ended = Deferred()
        self._errors = b""
        self._reactor.spawnProcess(
            self,
            sys.executable,
            [sys.executable, "-c", _CHILD, self._directory],
            env=_environment(),
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        return True

    def _kill(self) -> None:
        self._log.warn("spool process did not finish in time; killing it")
        assert self.transport is not None
        self.transport.signalProcess("KILL")

    # ProcessProtocol

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 2:
            self._errors = (self._errors + data)[-4096:]
            return
        for batch in self._reader.feed(data):
            self._on_batch(batch)
            for answer in batch.answers:
                waiting = self._waiting.pop(answer.number)
                if answer.failed:
                    waiting.errback(Failure(answer.value))
                else:
                    waiting.callback(answer.value)

    def processEnded(self, reason: Failure) -> None:
        ended, self._ended = self._ended, None
        self._reader = FrameReader()
        self._outgoing = []
        why = self._errors.decode("utf-8", "replace").strip()
        error = SpoolError(
            f"spool process for {self._directory} ended:"
            f" {reason.getErrorMessage()}" + (f": {why}" if why else "")
        )
        if not (self._stopping and reason.check(ProcessDone)):
            self._on_exit(error)
        waiting, self._waiting = self._waiting, {}
        for answer in waiting.values():  # none, unless it ended on its own
            answer.errback(Failure(error))
        assert ended is not None
        ended.callback(None)


def _environment() -> dict[str, str]:
    """Ours, with this very package first on the child's path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(maillaser.__file__)))
    path = [root, *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def _cancel(result: object, timer: Any) -> object:
    if timer.active():
        timer.cancel()
    return result
