"""
The message of one SMTP transaction, handed to the L{IMessageSink} once
whatever the number of recipients.

Twisted asks C{validateTo}'s callable for one L{IMessageSMTP} per recipient
and feeds every line to each.  The first one made is the leader, which
keeps the content and hands the message over; the others are followers,
which ignore the lines and answer with the leader's outcome.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.mail.interfaces import IMessageSMTP
from twisted.mail.smtp import SMTPServerError
from twisted.python.failure import Failure
from zope.interface import implementer

from maillaser.interfaces import IMessageSink
from maillaser.logs import observer
from maillaser.message import Envelope, Message, Refusal
from maillaser.smtp._content import HandOverGate, MessageContent
from maillaser.smtp._replies import printable

_CRLF = b"\r\n"


@implementer(IMessageSMTP)
class AcceptedMessage:
    """
    The leader: collects the content (a line at a time from Twisted, or in
    bulk from L{maillaser.smtp.MailLaserESMTP}), then builds the L{Message}
    and calls C{sink.receive} at the end of DATA.

    Its L{eomReceived} fires with the C{250} reply text, or fails with the
    L{SMTPServerError} to answer instead: a L{Refusal}'s reply, or C{451}
    for anything else (sender keeps the mail and retries).
    """

    _log = Logger(observer=observer)

    def __init__(
        self,
        *,
        sink: IMessageSink,
        message_id: str,
        envelope: Envelope,
        clock: IReactorTime,
        spill_dir: str | None = None,
        gate: HandOverGate | None = None,
    ) -> None:
        """
        @param spill_dir: where a large message's content waits (see
            L{MessageContent}); the system's temporary directory if C{None}.
        @param gate: shared by the messages of all sessions, it bounds how
            many are in memory whole; a gate of their own if C{None}.
        """
        self.id = message_id
        self.envelope = envelope
        self._sink = sink
        self._clock = clock
        self._content = MessageContent(spill_dir)
        self._gate = gate or HandOverGate()
        self._outcome: bytes | Failure | None = None
        self._waiters: list[Deferred[bytes]] = []

    def lineReceived(self, line: bytes) -> None:
        self._content.write(line + _CRLF)

    def write(self, data: bytes) -> None:
        """Content in bulk: unstuffed bytes, lines ending in CRLF."""
        self._content.write(data)

    def connectionLost(self) -> None:
        self._content.discard()

    def eomReceived(self) -> Deferred[bytes]:
        outcome = Deferred.fromCoroutine(self._hand_over())
        outcome.addBoth(self._settle)
        return outcome

    def follower(self) -> IMessageSMTP:
        """The message Twisted gets for another recipient of this transaction."""
        return _Follower(self)

    def outcome(self) -> Deferred[bytes]:
        """A new Deferred firing as L{eomReceived}'s did (or will)."""
        waiter: Deferred[bytes] = Deferred()
        if self._outcome is None:
            self._waiters.append(waiter)
        else:
            _fire(waiter, self._outcome)
        return waiter

    def _take_message(self) -> Message:
        raw = self._content.read()
        return Message(self.id, self.envelope, raw, self._clock.seconds())

    async def _hand_over(self) -> bytes:
        size = self._content.size
        await self._gate.acquire(size)
        try:
            return await self._handed_over(size)
        finally:
            self._gate.release(size)

    async def _handed_over(self, size: int) -> bytes:
        # The message is not kept here while the sink works: its bytes
        # are the sink's to drop once they are on their way.
        try:
            await maybeDeferred(self._sink.receive, self._take_message())
        except Refusal as refusal:
            self._log.info(
                "refused {message_id} from {peer}: {code} {reason}",
                message_id=self.id,
                peer=self.envelope.peer,
                code=refusal.code,
                reason=refusal.text,
            )
            raise SMTPServerError(refusal.code, reply_text(refusal).encode()) from None
        except Exception:
            self._log.failure("could not accept {message_id}", message_id=self.id)
            raise SMTPServerError(
                451, b"4.3.0 Temporary failure, please try again later"
            ) from None
        self._log.info(
            "accepted {message_id} from {peer}: {size} bytes for {count} recipient(s)",
            message_id=self.id,
            peer=self.envelope.peer,
            size=size,
            count=len(self.envelope.recipients),
        )
        return f"2.0.0 Ok: queued as {self.id}".encode()

    def _settle(self, outcome: bytes | Failure) -> bytes | Failure:
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            _fire(waiter, outcome)
        return outcome


@implementer(IMessageSMTP)
class _Follower:
    """Another recipient's view of the leader: no content, the same outcome."""

    def __init__(self, leader: AcceptedMessage) -> None:
        self._leader = leader

    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> Deferred[bytes]:
        return self._leader.outcome()

    def connectionLost(self) -> None:
        pass


def _fire(waiter: Deferred[bytes], outcome: bytes | Failure) -> None:
    if isinstance(outcome, Failure):
        waiter.errback(outcome)
    else:
        waiter.callback(outcome)


def reply_text(refusal: Refusal) -> str:
    """The text after the code of the reply a L{Refusal} names."""
    return printable(f"{refusal.status} {refusal.text}")
