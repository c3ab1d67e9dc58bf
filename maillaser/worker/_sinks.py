"""
What happens at the end of DATA, i.e. when the SMTP client may hear C{250}.

C{queue} mode answers once the delivery worker has committed the message
to its spool (L{Store}); C{sync} mode has the worker run a delivery round
first and answers with what the webhook said (L{Deliver}).  Both are
L{IMessageSink}s, so the SMTP session does not know which one it talks
to, nor that the work happens in another process.

Neither asks the worker anything at C{MAIL FROM}: back-pressure and the
breaker are read from the worker's last status, which its heartbeat keeps
fresh.  An answer the worker does not give in time is a C{451}: the
client keeps the message and tries again later.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from maillaser.config import Config
from maillaser.interfaces import IMessageSink
from maillaser.logs import observer
from maillaser.message import Message, Refusal
from maillaser.webhook import quick_backoff
from maillaser.worker._commands import Deliver, Reply, Store
from maillaser.worker._payloads import payload_deadline

if TYPE_CHECKING:
    from maillaser.worker._front import WorkerStatus


class Worker(Protocol):
    """What the sinks use of L{maillaser.worker.DeliveryWorker}."""

    @property
    def ready(self) -> bool: ...

    @property
    def status(self) -> WorkerStatus | None: ...

    def call(
        self,
        command: type[amp.Command],
        *,
        timeout: float,
        slow: bool = False,
        **arguments: Any,
    ) -> Deferred[dict[str, Any]]: ...

    def spool_changed(self, pending: int, size: int) -> None: ...

    def breaker_changed(self, state: str) -> None: ...


def sync_deadline(config: Config) -> float:
    """
    How long the front waits for a L{Deliver} answer: the longest a round
    can take (its payload, every attempt with its quick backoff), plus the
    worker's own deadline.
    """
    retries = config.webhook_max_retries
    backoffs = sum(quick_backoff(retry) for retry in range(1, retries + 1))
    return (
        payload_deadline(config.payload_timeout)
        + (retries + 1) * config.webhook_timeout
        + backoffs
        + config.worker_timeout
    )


def _ready_status(worker: Worker) -> WorkerStatus:
    status = worker.status
    if not worker.ready or status is None:
        raise Refusal(451, "4.3.0", "Not ready, try again later")
    return status


def _no_answer(log: Logger, what: str, message_id: str, failure: Failure) -> None:
    log.warn(
        "the delivery worker could not {what} {message_id}: {error}",
        what=what,
        message_id=message_id,
        error=failure.getErrorMessage(),
    )


def _refusal(reply: Reply) -> Refusal | None:
    """The worker's reply, unless it is C{250}, as the L{Refusal} it is."""
    if reply.code == 250:
        return None
    return Refusal(reply.code, reply.status, reply.text)


BATCH_BYTES = 1024 * 1024
"""Message bytes past which a L{Store} goes at once, not at the end of the turn."""

STORE_WINDOW = 8 * 1024 * 1024
"""
Message bytes sent to the worker and not yet answered, past which the next
L{Store} waits for an answer (one always goes).  What is sent sits in the
pipe's buffer, which Twisted copies whole when it refills its send buffer;
what waits here is only the message, once.
"""

_Batch = list[tuple[Message, Deferred[None]]]


@implementer(IMessageSink)
@attrs.define
class QueueSink:
    """
    C{250} only once the worker has committed the message to its spool.

    The messages whose DATA ends in one turn of the reactor go to the
    worker in one L{Store} (as the worker commits them in one
    transaction): a request costs both processes more than its messages.
    """

    worker: Worker
    clock: IReactorTime
    max_messages: int
    max_bytes: int
    timeout: float
    """Seconds the worker has to answer L{Store}."""
    _batch: _Batch = attrs.field(factory=list)
    _batch_bytes: int = 0
    _sending: IDelayedCall | None = None
    _queued: deque[tuple[_Batch, int]] = attrs.field(factory=deque)
    """Batches waiting for the window, with their bytes."""
    _unanswered: int = 0
    """Bytes of the L{Store}s sent and not answered yet."""
    _log = Logger(observer=observer)

    def check_capacity(self) -> None:
        status = _ready_status(self.worker)
        if status.pending >= self.max_messages or status.bytes >= self.max_bytes:
            raise Refusal(452, "4.3.1", "Insufficient system storage, try again later")
        if not status.writable:  # until the spool's probe commits again
            raise _store_failed()

    def receive(self, message: Message) -> Deferred[None]:
        stored: Deferred[None] = Deferred()
        self._batch.append((message, stored))
        self._batch_bytes += len(message.raw)
        if self._batch_bytes >= BATCH_BYTES:
            self._send()
        elif self._sending is None:
            self._sending = self.clock.callLater(0, self._send)
        return stored

    def _send(self) -> None:
        if self._sending is not None and self._sending.active():
            self._sending.cancel()
        self._sending = None
        self._queued.append((self._batch, self._batch_bytes))
        self._batch, self._batch_bytes = [], 0
        self._send_queued()

    def _send_queued(self) -> None:
        while self._queued and (
            not self._unanswered
            or self._unanswered + self._queued[0][1] <= STORE_WINDOW
        ):
            queued, size = self._queued.popleft()
            messages = [message for message, _ in queued]
            # Only the ids are kept for the answer: the bytes, once encoded
            # for the pipe, are not held twice while the worker commits them.
            batch = [(message.id, stored) for message, stored in queued]
            del queued
            self._unanswered += size
            d = self.worker.call(Store, timeout=self.timeout, messages=messages)
            del messages
            d.addCallbacks(
                self._stored,
                self._not_stored,
                callbackArgs=(batch,),
                errbackArgs=(batch,),
            )
            d.addBoth(self._answered, size)

    def _answered(self, result: object, size: int) -> None:
        self._unanswered -= size
        self._send_queued()

    def _stored(
        self, answer: dict[str, Any], batch: list[tuple[str, Deferred[None]]]
    ) -> None:
        self.worker.spool_changed(*answer["spool"])
        for (_, stored), reply in zip(batch, answer["replies"], strict=True):
            refusal = _refusal(reply)
            if refusal is None:
                stored.callback(None)
            else:
                stored.errback(refusal)

    def _not_stored(
        self, failure: Failure, batch: list[tuple[str, Deferred[None]]]
    ) -> None:
        for message_id, stored in batch:
            _no_answer(self._log, "store", message_id, failure)
            stored.errback(_store_failed())


def _store_failed() -> Refusal:
    return Refusal(451, "4.3.0", "Could not store the message, try again later")


@implementer(IMessageSink)
@attrs.define
class SyncSink:
    """
    The webhook's answer becomes the SMTP answer (SPEC section 5).

    At most C{concurrency} rounds run at once; the SMTP sessions past that
    wait their turn, holding their reply.  The bound is kept here, not in
    the worker, so that a round's deadline counts the round only.
    """

    worker: Worker
    concurrency: int
    timeout: float
    """Seconds the worker has to answer L{Deliver}: see L{sync_deadline}."""
    _slots: DeferredSemaphore = attrs.field(init=False)
    _log = Logger(observer=observer)

    def __attrs_post_init__(self) -> None:
        self._slots = DeferredSemaphore(self.concurrency)

    def check_capacity(self) -> None:
        if _ready_status(self.worker).breaker == "open":
            raise Refusal(451, "4.4.1", "Webhook unavailable, try again later")

    def receive(self, message: Message) -> Deferred[None]:
        return self._slots.run(self._deliver, message)

    def _deliver(self, message: Message) -> Deferred[None]:
        d = self.worker.call(Deliver, timeout=self.timeout, slow=True, message=message)
        return d.addCallbacks(
            self._delivered, self._not_delivered, errbackArgs=(message,)
        )

    def _delivered(self, answer: dict[str, Any]) -> None:
        self.worker.breaker_changed(answer["breaker"])
        refusal = _refusal(answer["reply"])
        if refusal is not None:
            raise refusal

    def _not_delivered(self, failure: Failure, message: Message) -> None:
        _no_answer(self._log, "deliver", message.id, failure)
        raise Refusal(451, "4.3.0", "Temporary failure, try again later")


__all__ = [
    "BATCH_BYTES",
    "STORE_WINDOW",
    "QueueSink",
    "SyncSink",
    "Worker",
    "sync_deadline",
]
