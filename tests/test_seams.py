"""
The seam between MailLaser and Twisted users, both ways, on loopback with
smtplib: MailLaser's delivery factory served by Twisted's own ESMTP server,
and MailLaser's SMTP factory serving a delivery of the user's own.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress
from twisted.internet.threads import deferToThread
from twisted.mail import smtp
from twisted.mail.interfaces import (
    IMessageDelivery,
    IMessageDeliveryFactory,
    IMessageSMTP,
)
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from maillaser.smtp import MailLaserDeliveryFactory, MailLaserSMTPFactory
from tests.helpers import LOOPBACK, TARGET, poll, send_mail, simple_message
from tests.test_smtp_helpers import RecordingSink


class PlainTwistedFactory(smtp.SMTPFactory):
    """Twisted's own ESMTP server, as a user would set it up."""

    protocol = smtp.ESMTP

    def __init__(self, delivery_factory: IMessageDeliveryFactory) -> None:
        super().__init__()
        self.delivery_factory = delivery_factory

    def buildProtocol(self, addr: IAddress | None) -> smtp.SMTP:
        server: smtp.SMTP = super().buildProtocol(addr)
        server.deliveryFactory = self.delivery_factory
        return server


@implementer(IMessageSMTP)
class UserMessage:
    """A user's message: keeps the lines it is given."""

    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self) -> Deferred[None]:
        return succeed(None)

    def connectionLost(self) -> None:
        del self.lines[:]


@implementer(IMessageDelivery, IMessageDeliveryFactory)
class UserDelivery:
    """A user's delivery: anything to example.com, each line recorded."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def getMessageDelivery(self) -> UserDelivery:
        return self

    def receivedHeader(self, helo: Any, origin: smtp.Address, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> Any:
        if user.dest.domain != b"example.com":
            raise smtp.SMTPBadRcpt(user)
        return lambda: UserMessage(self.received)


async def serve(test: TestCase, factory: smtp.SMTPFactory) -> int:
    port = await serverFromString(reactor, LOOPBACK).listen(factory)
    test.addCleanup(port.stopListening)
    number: int = port.getHost().port
    return number


class MailLaserDeliveryOnTwistedTests(TestCase):
    async def test_plain_twisted_server_with_maillaser_delivery(self) -> None:
        """One message for several recipients reaches MailLaser's sink once."""
        sink = RecordingSink()
        deliveries = MailLaserDeliveryFactory(
            sink=sink,
            targets=[TARGET, "second@example.com"],
            max_recipients=10,
            hostname="mx.test",
            clock=reactor,
        )
        port = await serve(self, PlainTwistedFactory(deliveries))
        result = await deferToThread(
            send_mail,
            port,
            simple_message(subject="via twisted"),
            recipients=(TARGET, "nobody@example.com", "Second@Example.com"),
        )
        self.assertEqual(result["code"], 250)
        self.assertEqual(
            result["refused"],
            {"nobody@example.com": (550, b"5.1.1 No such user here")},
        )
        [message] = sink.messages
        self.assertEqual(message.envelope.sender, "sender@test.com")
        self.assertEqual(message.envelope.recipients, (TARGET, "Second@Example.com"))
        self.assertTrue(message.raw.startswith(b"Received: from client.test ([127."))
        self.assertIn(b"(MailLaser) with ESMTP id " + message.id.encode(), message.raw)
        self.assertIn(b"\r\nSubject: via twisted\r\n", message.raw)


class UserDeliveryOnMailLaserTests(TestCase):
    async def test_maillaser_server_with_a_users_delivery(self) -> None:
        """A generic message gets its lines through lineReceived, one by one."""
        delivery = UserDelivery()
        factory = MailLaserSMTPFactory(
            delivery_factory=delivery,
            clock=reactor,
            hostname="mx.test",
            max_message_size=100_000,
            timeout=30,
        )
        port = await serve(self, factory)
        result = await deferToThread(
            send_mail,
            port,
            b"Subject: mine\r\n\r\nfirst\r\n.dotted\r\n",
            recipients=("anyone@example.com", "other@elsewhere.test"),
        )
        self.assertEqual(result["code"], 250)
        self.assertEqual(result["reply"], b"2.0.0 Message accepted")
        self.assertEqual(result["refused"]["other@elsewhere.test"][0], 550)
        self.assertEqual(
            delivery.received, [b"Subject: mine", b"", b"first", b".dotted"]
        )
        await poll(lambda: not factory.sessions)
