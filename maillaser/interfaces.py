"""
The seams between stages.

Each stage depends on the interface of the next one, never on its class, so
tests can put a double at any seam (see ``maillaser.testing``), and the
parts on either side of the process boundary (L{maillaser.worker}) can be
run together in one process by a test.

The SMTP front (C{maillaser.smtp}) hands finished messages to an
L{IMessageSink}.  In the delivery worker, the spool is an L{ISpool}, the
webhook is reached through an L{IWebhookPoster}, and payloads are made by
an L{IPayloadBuilder}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred
from zope.interface import Interface

from maillaser.message import (
    Attempt,
    Message,
    Payload,
    QueuedMessage,
    SpoolStats,
    WebhookResponse,
)


class IMessageSink(Interface):
    """Where the SMTP front hands a finished message."""

    def check_capacity() -> None:
        """
        Raise L{maillaser.message.Refusal} if new mail must wait (back-pressure,
        an open breaker in sync mode, a delivery worker that is not ready).

        Called at ``MAIL FROM`` so a busy bridge refuses before the body is
        sent.  It must not block: it reads state the sink already holds.
        """

    def receive(message: Message) -> Deferred[None]:
        """
        Take responsibility for C{message}.

        @return: a Deferred that fires when the SMTP session may answer
            ``250``, or fails with L{maillaser.message.Refusal} naming the
            reply to give instead.  Any other failure means ``451``.  It
            fires within a bounded time whatever happens elsewhere.
        """


class ISpool(Interface):
    """
    A durable queue of accepted messages.

    Messages handed out by L{due} are claimed by this process until one of
    L{delivered}, L{reschedule} or L{bury} settles them or L{release} gives
    them back.  A claim lasts no longer than its process: in memory for the
    SQLite spool, where after a restart every pending message is due again;
    a lease in the database for a shared spool, renewed while held and
    taken over by another bridge once it expired (at-least-once delivery).
    """

    def add(message: Message) -> Deferred[None]:
        """Store C{message}; the Deferred fires only once it is committed."""

    def due(now: float, limit: int) -> Deferred[list[QueuedMessage]]:
        """Claim up to C{limit} pending messages due at C{now}, oldest first."""

    def next_due() -> Deferred[float | None]:
        """Deferred firing with the earliest due time of an unclaimed pending
        message, or C{None} when there is none."""

    def delivered(
        message_id: str, attempts: Sequence[Attempt], keep_until: float | None = None
    ) -> Deferred[None]:
        """
        The webhook accepted the message: forget it, or, with C{keep_until},
        keep its bytes until then (its payload had links), in the same
        transaction.
        """

    def retained_raw(message_id: str, now: float) -> Deferred[bytes | None]:
        """
        The bytes a link to C{message_id} is served from: kept after
        delivery and not expired at C{now}, or still spooled; C{None} if
        neither.
        """

    def expire_retained(now: float) -> Deferred[int]:
        """Forget the kept messages expired at C{now}; fires with how many."""

    def reschedule(
        message_id: str, at: float, attempts: Sequence[Attempt]
    ) -> Deferred[None]:
        """A delivery round failed: try again at C{at}; the round count grows by one."""

    def bury(message_id: str, attempts: Sequence[Attempt]) -> Deferred[None]:
        """Give up: move the message to the dead letters, keeping it on disk."""

    def claim(message_id: str) -> bool:
        """
        Claim a message this process has just added, to deliver it from
        memory rather than read it back; C{False} if it is claimed already.
        """

    def release(message_id: str) -> None:
        """
        Give back a claim without settling the message (it was not started);
        for a shared spool, the lease is given back with the next commit.
        """

    def watch(wake: Callable[[], object]) -> None:
        """
        Call C{wake} (on the reactor thread) whenever another process made
        messages free to take: another bridge gave them back, an operator
        requeued them.  A spool that cannot tell is polled instead.
        """

    def stats() -> SpoolStats:
        """A cheap, synchronous snapshot for health, metrics and back-pressure."""

    def refresh() -> Deferred[SpoolStats]:
        """Re-read the counts from storage, which the admin tool may change."""

    def writable() -> bool:
        """Whether the last write succeeded: a spool that cannot commit must
        not be offered mail (health reports it)."""

    def problem() -> str | None:
        """Why the spool cannot take mail now, for health; C{None} if it can."""

    def close() -> Deferred[None]:
        """Release the storage."""


class IBreakerStore(Interface):
    """
    Where bridges sharing a webhook keep one circuit breaker state, so that
    N bridges probe a webhook that is down once per reset period, not N
    times.  Times are the bridges' own clocks (kept by NTP: a skew of a
    second moves a probe by a second).
    """

    def opened_at(webhook: str) -> Deferred[float | None]:
        """When the shared breaker of C{webhook} (a key) opened; C{None}: closed."""

    def record_open(webhook: str, now: float) -> Deferred[None]:
        """Record that the breaker opened (again) at C{now}."""

    def record_closed(webhook: str) -> Deferred[None]:
        """Record that a probe succeeded: the breaker is closed for everyone."""

    def claim_probe(webhook: str, now: float, reset: float) -> Deferred[bool]:
        """
        Take the one probe of this reset period: C{True} for the bridge
        that may send it, C{False} while the breaker is open for another
        C{reset} or another bridge's probe is out.
        """


class IWebhookPoster(Interface):
    """Sends one request to the webhook."""

    def post(body: bytes, headers: dict[bytes, bytes]) -> Deferred[WebhookResponse]:
        """
        POST C{body} with C{headers} added to the fixed ones.

        @return: a Deferred firing with a L{WebhookResponse} whatever the
            status; it fails only when no complete response arrived in time
            (timeout, connection refused, TLS failure...).
        """


class IPayloadBuilder(Interface):
    """Turns an accepted message into the JSON body of its webhook request."""

    def build(message: Message) -> Deferred[Payload]:
        """
        The request body for C{message}, and until when its links (if any)
        must be served.

        It never fails because of what the message contains, and it fires
        within a bounded time: a message that cannot be read in time is
        delivered with what could be read and a C{parse_error} key.
        """


__all__ = [
    "IBreakerStore",
    "IMessageSink",
    "IPayloadBuilder",
    "ISpool",
    "IWebhookPoster",
]
