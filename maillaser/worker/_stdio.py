"""
The child's end of L{maillaser.worker._child}: AMP on standard input and
output, a log of JSON lines on standard error, and an end when the input
ends.

A child ignores SIGINT and SIGTERM, which a terminal or a service manager
sends to the whole process group: its parent decides when it stops, by
closing its input.  It then answers what it was asked, and ends.
"""

from __future__ import annotations

import gc
import signal
import sys
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import connectionDone
from twisted.internet.stdio import StandardIO
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
)
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from maillaser.logs import at_level, json_lines, observer, set_level


@implementer(IHalfCloseableProtocol)
class ChildProtocol(amp.AMP):
    """
    Answers until its input ends, then ends once every question asked has
    been answered.

    @ivar finished: fires once the connection is closed and L{closed}'s
        clean-up is done.
    """

    _log = Logger(observer=observer)

    def __init__(self) -> None:
        super().__init__()
        self.finished: Deferred[None] = Deferred()
        self._unanswered = 0
        self._input_ended = False
        self._ending = False

    def dispatchCommand(self, box: amp.AmpBox) -> Deferred[Any]:
        if amp.ASK in box:
            self._unanswered += 1
        answer: Deferred[Any] = super().dispatchCommand(box)
        return answer.addErrback(self._unexpected)

    def _unexpected(self, failure: Failure) -> Failure:
        """
        A bug answers its own request with an error.  AMP would close the
        connection after it, and so end the child and fail every other
        request it is working on.
        """
        if failure.check(amp.RemoteAmpError):
            return failure  # an error the command declares, or ours
        self._log.failure("while answering a request", failure)
        return Failure(amp.RemoteAmpError(amp.UNKNOWN_ERROR_CODE, str(failure.value)))

    def sendBox(self, box: amp.AmpBox) -> None:
        super().sendBox(box)
        if amp.ANSWER in box or amp.ERROR in box:
            self._unanswered -= 1
            self._end_if_done()

    def readConnectionLost(self) -> None:
        self._input_ended = True
        self._end_if_done()

    def writeConnectionLost(self) -> None:
        """
        Nobody reads the answers any more: the parent is gone, so end now.

        Not with C{transport.loseConnection()}: standard I/O's only stops
        reading its input then, so the end of the input is never seen, the
        connection never ends, and the child would outlive its parent.
        """
        self._end()

    def _end_if_done(self) -> None:
        if self._input_ended and not self._unanswered and self.transport:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self._end()

    def _end(self) -> None:
        """Release what the child holds, then L{finished} fires; once."""
        if self._ending:
            return
        self._ending = True
        closing = maybeDeferred(self.closed)
        closing.addErrback(lambda failure: self._log.failure("while closing", failure))
        closing.addBoth(lambda ignored: self.finished.callback(None))

    def closed(self) -> Deferred[Any] | None:
        """The connection is closed; release what the child holds."""
        return None


def run_child(protocol: ChildProtocol, level: str, reactor: Any) -> None:
    """
    Serve C{protocol} on standard input and output until they close, with
    the log at C{level} on standard error, and return.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log_to_stderr(level)
    StandardIO(protocol, reactor=reactor)
    protocol.finished.addBoth(lambda ignored: reactor.stop())
    # The reactor's own handlers (SIGCHLD is needed: a worker has children)
    # include SIGTERM's, which would stop it: ignored again once installed.
    reactor.callWhenRunning(signal.signal, signal.SIGTERM, signal.SIG_IGN)
    reactor.callWhenRunning(freeze_start_up)
    reactor.run()


def freeze_start_up() -> None:
    """
    Move everything start-up made (modules, Twisted) out of the garbage
    collector's sight, as C{twistd maillaser} does in the front: a full
    collection would otherwise walk all of it again, pausing the reactor.
    """
    gc.collect()
    gc.freeze()


def log_to_stderr(level: str) -> None:
    """
    JSON lines on standard error at C{level}, for the parent to log as its
    own.  Whatever is printed goes there too, as log events: standard
    output carries the protocol, and a stray print must not break it.
    """
    set_level(level)
    # AMP says "connection established" and "lost" at info: the parent
    # logs when the child is ready and when it ends.
    quieter = LogLevelFilterPredicate(defaultLogLevel=LogLevel.debug)
    quieter.setLogLevelForNamespace("twisted.protocols.amp", LogLevel.warn)
    destination = FilteringLogObserver(json_lines(sys.stderr), [quieter])
    globalLogBeginner.beginLoggingTo([at_level(destination)], redirectStandardIO=True)


__all__ = ["ChildProtocol", "freeze_start_up", "log_to_stderr", "run_child"]
