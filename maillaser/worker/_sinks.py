"""
What happens at the end of DATA, i.e. when the SMTP client may hear C{250}.

C{queue} mode answers once the message is committed to the spool and lets
the dispatcher deliver it later; C{sync} mode calls the webhook first and
answers with what it said.  Both are L{IMessageSink}s, so the SMTP session
does not know which one it talks to.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.python.failure import Failure
from zope.interface import implementer

from maillaser.breaker import CircuitBreaker
from maillaser.delivery import Deliverer, Failed, Outcome, settlement
from maillaser.dispatch import Dispatcher
from maillaser.interfaces import IMessageSink, ISpool
from maillaser.message import Message, Refusal


@implementer(IMessageSink)
@attrs.define
class QueueSink:
    """C{250} only after the spool commit; then wake the dispatcher."""

    spool: ISpool
    dispatcher: Dispatcher
    max_messages: int
    max_bytes: int

    def check_capacity(self) -> None:
        stats = self.spool.stats()
        if stats.pending >= self.max_messages or stats.bytes >= self.max_bytes:
            raise Refusal(452, "4.3.1", "Insufficient system storage, try again later")

    def receive(self, message: Message) -> Deferred[None]:
        d: Deferred[None] = self.spool.add(message)
        d.addCallbacks(self._stored, self._not_stored, callbackArgs=(message,))
        return d

    def _stored(self, ignored: object, message: Message) -> None:
        self.dispatcher.offer(message)

    def _not_stored(self, failure: Failure) -> None:
        raise Refusal(451, "4.3.0", "Could not store the message, try again later")


@implementer(IMessageSink)
@attrs.define
class SyncSink:
    """
    The webhook's answer becomes the SMTP answer (SPEC section 5).

    At most C{concurrency} rounds run at once, as in queue mode; the SMTP
    sessions past that wait their turn, holding their reply.
    """

    deliverer: Deliverer
    breaker: CircuitBreaker
    concurrency: int
    on_settled: Callable[[str], object] = lambda settlement: None
    """Told how each round ended: delivered, rejected, or retry (by the client)."""
    _slots: DeferredSemaphore = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._slots = DeferredSemaphore(self.concurrency)

    def check_capacity(self) -> None:
        if self.breaker.allowance() == 0:
            raise Refusal(451, "4.4.1", "Webhook unavailable, try again later")

    def receive(self, message: Message) -> Deferred[None]:
        if not self.breaker.acquire():
            raise Refusal(451, "4.4.1", "Webhook unavailable, try again later")
        delivered = self._slots.run(self.deliverer.deliver, message)
        return delivered.addCallback(self._settled)

    def _settled(self, outcome: Outcome) -> None:
        self.on_settled(settlement(outcome))
        _reply_for(outcome)


def _reply_for(outcome: Outcome) -> None:
    if not isinstance(outcome, Failed):
        return
    if outcome.permanent:
        status = outcome.attempts[-1].status
        raise Refusal(
            550, "5.6.0", outcome.reason or f"Rejected by the webhook (HTTP {status})"
        )
    raise Refusal(451, "4.4.1", "Webhook temporarily unavailable, try again later")
