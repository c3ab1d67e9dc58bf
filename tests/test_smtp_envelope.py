"""
Tests for what the SMTP session adds to the envelope for issue 13 (the
TLS it ran under) and for C{MAIL_LASER_TARGET_DOMAINS}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from maillaser.message import TLSInfo
from maillaser.smtp import MailLaserDeliveryFactory, session_tls
from maillaser.smtp._delivery import domain_key
from tests.test_smtp_helpers import RecordingSink, Session, make_factory


class FakeConnection:
    """What pyOpenSSL's C{Connection} tells once the handshake is done."""

    def get_protocol_version_name(self) -> str:
        return "TLSv1.3"

    def get_cipher_name(self) -> str:
        return "TLS_AES_256_GCM_SHA384"


@implementer(ISSLTransport)
class TLSTransport(StringTransport):  # type: ignore[misc]
    """A transport TLS runs on, as after STARTTLS or on an ssl: endpoint."""

    def __init__(self, handle: object = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.handle = FakeConnection() if handle is None else handle

    def getHandle(self) -> object:
        return self.handle

    def getPeerCertificate(self) -> None:
        return None


class Holder:
    """Anything with a C{transport}, as L{session_tls} asks of a session."""

    def __init__(self, transport: object) -> None:
        self.transport = transport


class SessionTLSTests(SynchronousTestCase):
    def test_cleartext(self) -> None:
        self.assertIsNone(session_tls(Holder(StringTransport())))
        self.assertIsNone(session_tls(Holder(None)))
        self.assertIsNone(session_tls(object()))

    def test_tls(self) -> None:
        self.assertEqual(
            session_tls(Holder(TLSTransport())),
            TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384"),
        )

    def test_a_handle_that_is_not_openssl(self) -> None:
        self.assertEqual(
            session_tls(Holder(TLSTransport(handle=object()))),
            TLSInfo("unknown", "unknown"),
        )

    def test_the_envelope_of_a_tls_session(self) -> None:
        sink = RecordingSink()
        factory = make_factory(sink, Clock())
        for transport, tls in [
            (
                TLSTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 40000)),
                TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384"),
            ),
            (None, None),
        ]:
            session = Session(factory, "192.0.2.9", transport=transport)
            session.send(
                b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<target@example.com>\r\n"
                b"DATA\r\nSubject: s\r\n\r\nx\r\n.\r\n"
            )
            self.assertEqual(sink.messages[-1].envelope.tls, tls)
            self.assertEqual(sink.messages[-1].envelope.peer, "192.0.2.9")


class TargetDomainTests(SynchronousTestCase):
    def test_domain_key(self) -> None:
        self.assertEqual(domain_key("A@Mail.EXAMPLE"), "mail.example")
        self.assertEqual(domain_key('"a@b"@Example.com'), "example.com")
        self.assertEqual(domain_key("no-at-sign"), "")
        self.assertEqual(domain_key("@example.com"), "")
        self.assertEqual(domain_key("a@exampl\u212a.com"), "exampl\u212a.com")

    def test_serves(self) -> None:
        factory = MailLaserDeliveryFactory(
            sink=RecordingSink(),
            targets=("one@other.example",),
            max_recipients=5,
            hostname="mx.test",
            clock=Clock(),
            domains=("Inbound.Example", "bücher.example"),
        )
        for address, served in [
            ("x@inbound.example", True),
            ("X@INBOUND.EXAMPLE", True),
            ("ONE@other.example", True),
            ("two@other.example", False),
            ("x@sub.inbound.example", False),
            ("x@inbound.example.org", False),
            ("x@bücher.example", True),
            ("x@BÜCHER.example", False),
            ("x@inbound.exampl\u212a", False),
        ]:
            key = address.translate(
                str.maketrans(
                    "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz"
                )
            )
            self.assertEqual((address, factory.serves(address, key)), (address, served))

    def test_kelvin_sign_over_smtputf8(self) -> None:
        """str.lower would map U+212A to k: the domain would match."""
        sink = RecordingSink()
        deliveries = MailLaserDeliveryFactory(
            sink=sink,
            targets=(),
            max_recipients=5,
            hostname="mx.test",
            clock=Clock(),
            domains=("example.com",),
        )
        session = Session(make_factory(sink, Clock(), delivery_factory=deliveries))
        session.send(b"EHLO c\r\nMAIL FROM:<a@b.test> SMTPUTF8\r\n")
        self.assertEqual(
            session.send("RCPT TO:<x@exampl\u212a.com>\r\n".encode()),
            [b"550 5.1.1 No such user here"],
        )
        self.assertEqual(
            session.send(b"RCPT TO:<x@EXAMPLE.com>\r\n"), [b"250 2.1.5 Recipient OK"]
        )
