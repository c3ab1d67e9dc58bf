"""
MailLaser's policy for one SMTP transaction, as Twisted's
L{IMessageDelivery}: which senders may start one (back-pressure), which
recipients we serve, the C{Received:} trace header, and the message that
collects the content.

It works with any C{twisted.mail} server that asks an
L{IMessageDeliveryFactory} for one delivery per C{MAIL FROM} (Twisted's
own L{twisted.mail.smtp.ESMTP} with C{deliveryFactory} set does), not only
with L{maillaser.smtp.MailLaserESMTP}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from email.utils import formatdate
from functools import lru_cache
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.mail.interfaces import (
    IMessageDelivery,
    IMessageDeliveryFactory,
    IMessageSMTP,
)
from twisted.mail.smtp import Address, SMTPBadRcpt, SMTPServerError, User
from zope.interface import implementer

from maillaser.interfaces import IMessageSink
from maillaser.message import Envelope, Refusal, ascii_lower, new_message_id
from maillaser.smtp._content import HandOverGate
from maillaser.smtp._message import AcceptedMessage, reply_text
from maillaser.smtp._tls import session_tls


def address_key(address: str) -> str:
    """What two addresses must share to be the same target (L{ascii_lower})."""
    return ascii_lower(address)


def domain_key(address: str) -> str:
    """
    The domain of C{address} (after its last C{@}) as
    C{MAIL_LASER_TARGET_DOMAINS} entries are matched (L{ascii_lower});
    C{""} when there is no C{@}.
    """
    local, at, domain = address.rpartition("@")
    return ascii_lower(domain) if at and local else ""


@lru_cache(maxsize=1)
def _date(second: int) -> str:
    """The RFC 5322 date of C{second}, made once for all messages in it."""
    return formatdate(second)


def _text(value: bytes | str | None) -> str:
    """A HELO argument or peer as Twisted keeps it: bytes, or str before HELO."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value or ""


@implementer(IMessageDeliveryFactory)
class MailLaserDeliveryFactory:
    """Makes the L{MailLaserDelivery} of each transaction; holds what they share."""

    def __init__(
        self,
        *,
        sink: IMessageSink,
        targets: Iterable[str],
        max_recipients: int,
        hostname: str,
        clock: IReactorTime,
        domains: Iterable[str] = (),
        spill_dir: str | None = None,
    ) -> None:
        """
        @param domains: domains every recipient at which is accepted, as
            well as the C{targets} addresses.
        @param spill_dir: where large messages wait while DATA arrives
            (L{maillaser.smtp._content}); the system's temporary directory
            if C{None}.
        """
        self.sink = sink
        self.spill_dir = spill_dir
        self.gate = HandOverGate()
        self.targets = frozenset(address_key(target) for target in targets)
        self.domains = frozenset(ascii_lower(domain) for domain in domains)
        self.max_recipients = max_recipients
        self.hostname = hostname
        self.clock = clock

    def getMessageDelivery(self) -> MailLaserDelivery:
        return MailLaserDelivery(self)

    def serves(self, address: str, key: str) -> bool:
        """Whether C{address} (whose L{address_key} is C{key}) is ours."""
        return key in self.targets or domain_key(address) in self.domains


@implementer(IMessageDelivery)
class MailLaserDelivery:
    """
    One transaction: the sender, the recipients as the client wrote them,
    the message id (made at C{MAIL FROM}, where the transaction starts),
    and, once DATA has begun, its L{AcceptedMessage}.
    """

    message: AcceptedMessage | None
    """The transaction's message, once DATA has made it."""

    def __init__(self, factory: MailLaserDeliveryFactory) -> None:
        self._factory = factory
        self.message_id = ""
        self.recipients: list[str] = []
        self.message = None
        self._keys: set[str] = set()
        self._sender = ""
        self._helo: tuple[Any, Any] = (None, "")
        self._header: bytes | None = None
        self._session: object = None

    def validateFrom(self, helo: tuple[Any, Any], origin: Address) -> Address:
        """
        Start a transaction, unless the sink must refuse new mail now.

        Everything is reset here, so a delivery serving a whole connection
        (C{SMTP.delivery}) is still one transaction at a time.
        """
        try:
            self._factory.sink.check_capacity()
        except Refusal as refusal:
            raise SMTPServerError(refusal.code, reply_text(refusal)) from None
        self.message_id = new_message_id(self._factory.clock.seconds())
        self.recipients = []
        self.message = None
        self._keys = set()
        self._sender = str(origin)
        self._helo = helo
        self._header = None
        return origin

    def validateTo(self, user: User) -> Callable[[], IMessageSMTP]:
        self._session = user.protocol
        address = str(user.dest)
        key = address_key(address)
        if not self._factory.serves(address, key):
            raise SMTPBadRcpt(user, 550, "5.1.1 No such user here")
        if key not in self._keys:
            if len(self.recipients) >= self._factory.max_recipients:
                raise SMTPServerError(452, "4.5.3 Too many recipients")
            self.recipients.append(address)
            self._keys.add(key)
        return self._message

    def receivedHeader(
        self, helo: tuple[Any, Any], origin: Address, recipients: Sequence[User]
    ) -> bytes:
        """
        RFC 5321 4.4 trace information, without its final CRLF (Twisted
        hands it to the message as a line).  Twisted asks once per
        recipient; the header is made once.
        """
        if self._header is None:
            self._header = self._received_header(recipients[0].protocol)
        return self._header

    def _message(self) -> IMessageSMTP:
        if self.message is not None:
            return self.message.follower()
        self.message = AcceptedMessage(
            sink=self._factory.sink,
            message_id=self.message_id,
            envelope=Envelope(
                sender=self._sender,
                recipients=tuple(self.recipients),
                helo=_text(self._helo[0]),
                peer=_text(self._helo[1]),
                tls=session_tls(self._session),
            ),
            clock=self._factory.clock,
            spill_dir=self._factory.spill_dir,
            gate=self._factory.gate,
        )
        return self.message

    def _received_header(self, smtp: object) -> bytes:
        helo, peer = _text(self._helo[0]) or "unknown", _text(self._helo[1])
        name = "UTF8SMTP" if getattr(smtp, "smtputf8", False) else "ESMTP"
        if getattr(smtp, "startedTLS", False):
            name += "S"
        recipient = (
            f"\r\n\tfor <{self.recipients[0]}>" if len(self.recipients) == 1 else ""
        )
        now = int(self._factory.clock.seconds())
        return (
            f"Received: from {helo} ([{peer}])\r\n"
            f"\tby {self._factory.hostname} (MailLaser) with {name}"
            f" id {self.message_id}{recipient};\r\n\t{_date(now)}"
        ).encode("utf-8", "replace")
