"""
The SMTP front's handle on its delivery worker.

The front must never wait on the worker for long, and must know at once,
without asking, what back-pressure, the breaker and C{/health} need.  So
the worker is asked for its L{Status} every second and the answer is kept
(L{DeliveryWorker.status}), while every request has a deadline
(L{maillaser.worker._child}): a worker that misses one is killed and
replaced, and the message in hand gets a C{451}.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

import maillaser
from maillaser.config import Config
from maillaser.interfaces import IMessageSink
from maillaser.logs import observer
from maillaser.worker._child import Answer, Ask, ChildError, ChildProcess, ChildProgram
from maillaser.worker._commands import (
    PROTOCOL_VERSION,
    FetchPart,
    Hello,
    Metrics,
    Status,
    Stop,
    VersionMismatch,
)
from maillaser.worker._main import worker_program
from maillaser.worker._payloads import payload_deadline
from maillaser.worker._sinks import QueueSink, SyncSink, sync_deadline

HEARTBEAT = 1.0
"""Seconds between two L{Status} requests."""

START_TIMEOUT = 60.0
"""
Seconds a new worker has to answer L{Hello}, at the least: it opens the
spool first, and SQLite's check reads the whole database.
"""


@attrs.frozen
class WorkerStatus:
    """The worker's last answer to L{Status}, and when it came."""

    breaker: str
    pending: int
    dead: int
    bytes: int
    writable: bool
    problems: tuple[str, ...]
    at: float


class DeliveryWorker(Service):
    """
    Starts the delivery worker with the service, keeps one running, and
    stops it last.

    @ivar sink: what the SMTP front hands messages to: a L{QueueSink} or a
        L{SyncSink}, as C{config.delivery_mode} says.
    @ivar status: the last L{Status} answer; C{None} until the first.
    """

    _log = Logger(observer=observer)

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        program: ChildProgram | None = None,
        version: str = maillaser.__version__,
    ) -> None:
        """
        @param reactor: spawns the worker and times everything: an
            C{IReactorProcess} and C{IReactorTime}.
        @param program: the worker's program (tests give their own).
        @param version: ours, which the worker must share.
        """
        self.config = config
        self._reactor = reactor
        self._version = version
        self._child = ChildProcess(
            reactor,
            program or worker_program(config.log_level),
            name="delivery worker",
            greet=self._hello,
        )
        self.status: WorkerStatus | None = None
        self.sink: IMessageSink = (
            SyncSink(self, config.delivery_concurrency, sync_deadline(config))
            if config.delivery_mode == "sync"
            else QueueSink(
                self,
                reactor,
                config.spool_max_messages,
                config.spool_max_bytes,
                config.worker_timeout,
            )
        )
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = reactor
        self._beating = False
        self._stopped: Deferred[int] | None = None

    @property
    def ready(self) -> bool:
        """A worker of our version is running and has its spool open."""
        return self._child.ready

    @property
    def pid(self) -> int | None:
        return self._child.pid

    def startService(self) -> None:
        super().startService()
        self._stopped = None
        self._child.start()
        self._heartbeat.start(HEARTBEAT, now=False)

    def stopService(self) -> Deferred[int]:
        super().stopService()
        return self.stop(self.config.shutdown_grace)

    def call(
        self,
        command: type[amp.Command],
        *,
        timeout: float,
        slow: bool = False,
        **arguments: Any,
    ) -> Deferred[Answer]:
        """One request to the worker (see L{ChildProcess.call})."""
        return self._child.call(command, timeout=timeout, slow=slow, **arguments)

    def _hello(self, ask: Ask) -> Deferred[None]:
        """The greeting: versions checked, configuration sent, status known."""
        return Deferred.fromCoroutine(self._greeting(ask))

    async def _greeting(self, ask: Ask) -> None:
        timeout = self.config.worker_timeout
        answer = await ask(
            Hello,
            timeout=max(timeout, START_TIMEOUT),
            version=self._version,
            protocol=PROTOCOL_VERSION,
            config=self.config.to_json(),
        )
        if answer["version"] != self._version:
            raise VersionMismatch(
                f"the worker runs MailLaser {answer['version']},"
                f" this front {self._version}"
            )
        self._remember(await ask(Status, timeout=timeout))

    def _beat(self) -> None:
        if self._beating or not self.ready:
            return  # the last one is still on its way, or no worker to ask
        self._beating = True
        d = self.call(Status, timeout=self.config.worker_timeout)
        d.addCallbacks(self._remember, self._no_status)
        d.addBoth(self._beaten)

    def _no_status(self, failure: Failure) -> None:
        if not failure.check(ChildError):  # which the child's supervisor logs
            self._log.failure("the delivery worker's status", failure)

    def _beaten(self, ignored: object) -> None:
        self._beating = False

    def _remember(self, answer: Answer) -> None:
        self.status = WorkerStatus(
            breaker=answer["breaker"],
            pending=answer["pending"],
            dead=answer["dead"],
            bytes=answer["bytes"],
            writable=answer["writable"],
            problems=tuple(answer["problems"]),
            at=self._reactor.seconds(),
        )

    def spool_changed(self, pending: int, size: int) -> None:
        """A L{Store} answer's counts: back-pressure needs them before the
        next heartbeat."""
        if self.status is not None:
            self.status = attrs.evolve(self.status, pending=pending, bytes=size)

    def breaker_changed(self, state: str) -> None:
        """A L{Deliver} answer's breaker state."""
        if self.status is not None:
            self.status = attrs.evolve(self.status, breaker=state)

    def problems(self) -> list[str]:
        """
        Why C{/health} should answer C{503}: no worker ready, one slow to
        answer, or what the worker itself reported (a spool that cannot
        commit).
        """
        problems = self._child.problems()
        if self.ready and self.status is not None:
            problems += self.status.problems
        return problems

    def metrics_text(self) -> Deferred[bytes]:
        """The worker's metrics, in Prometheus' text format."""
        if not self.ready:
            return fail(ChildError("delivery worker is not ready"))
        d = self.call(Metrics, timeout=self.config.worker_timeout)
        return d.addCallback(lambda answer: answer["text"])

    def fetch_part(self, message_id: str, index: str) -> Deferred[Answer]:
        """
        The part an attachment link names (L{FetchPart}); L{ChildError} if
        no worker is ready.  Its deadline allows for a payload process's
        (a large message is parsed there); a slow answer is no sign of a
        stuck worker.
        """
        if not self.ready:
            return fail(ChildError("delivery worker is not ready"))
        config = self.config
        return self.call(
            FetchPart,
            timeout=config.worker_timeout + payload_deadline(config.payload_timeout),
            slow=True,
            message_id=message_id,
            index=index,
        )

    def stop(self, grace: float) -> Deferred[int]:
        """
        Stop the worker: rounds in flight get C{grace} seconds, the spool is
        closed, then the worker's input, and it is killed if it does not
        exit in time.  Fires with the number of messages left spooled (as
        last known, if the worker could not say).
        """
        if self._stopped is None:
            self._stopped = Deferred.fromCoroutine(self._stop(grace))
        return self._stopped

    async def _stop(self, grace: float) -> int:
        if self._heartbeat.running:
            self._heartbeat.stop()
        pending = 0 if self.status is None else self.status.pending
        if self.ready:
            try:
                answer = await self.call(
                    Stop,
                    timeout=grace + self.config.worker_timeout,
                    slow=True,
                    grace=grace,
                )
                pending = answer["pending"]
            except Exception as error:
                self._log.error(
                    "the delivery worker did not stop cleanly: {error}",
                    error=str(error),
                )
        await self._child.stop(self.config.worker_timeout)
        return pending


__all__ = ["HEARTBEAT", "START_TIMEOUT", "DeliveryWorker", "WorkerStatus"]
