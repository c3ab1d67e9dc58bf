"""
One test per defect of C{twisted.mail} that L{MailLaserESMTP} or
L{MailLaserSMTPFactory} overrides; each fails when its override is removed.

Some use a delivery of the test's own, as a Twisted user would write one,
since MailLaser's validates synchronously and its messages take DATA in
bulk; Twisted's own paths are the ones under test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, capturedLogs
from twisted.mail.interfaces import (
    IMessageDelivery,
    IMessageDeliveryFactory,
    IMessageSMTP,
)
from twisted.mail.smtp import Address, SMTPServerError, User
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from maillaser.message import Refusal
from maillaser.smtp._protocol import MAX_DATA_LINE
from tests.helpers import REPLY_LINE
from tests.test_smtp_helpers import (
    RecordingSink,
    Session,
    TLSStringTransport,
    make_factory,
)


@implementer(IMessageSMTP)
class LineMessage:
    """A user's message: lines in a list, C{refusal} raised at a line C{no}."""

    def __init__(self, refusal: SMTPServerError | None = None) -> None:
        self.lines: list[bytes] = []
        self.lost = False
        self._refusal = refusal

    def lineReceived(self, line: bytes) -> None:
        if line == b"no" and self._refusal is not None:
            raise self._refusal
        self.lines.append(line)

    def eomReceived(self) -> Deferred[bytes]:
        return Deferred.fromCoroutine(_done())

    def connectionLost(self) -> None:
        self.lost = True


async def _done() -> bytes:
    return b"2.0.0 Thanks"


@implementer(IMessageDelivery, IMessageDeliveryFactory)
class UserDelivery:
    """
    A user's delivery: anyone may send to anyone; validation takes C{delay}
    seconds of C{clock} when set; messages are C{make()}'s.
    """

    def __init__(self, clock: Clock, delay: float | None = None) -> None:
        self.clock = clock
        self.delay = delay
        self.messages: list[LineMessage] = []
        self.make: Callable[[], LineMessage] = LineMessage

    def getMessageDelivery(self) -> UserDelivery:
        return self

    def receivedHeader(self, helo: Any, origin: Address, recipients: Any) -> bytes:
        return b"X-Received: test"

    def validateFrom(self, helo: Any, origin: Address) -> Any:
        return self._later(origin)

    def validateTo(self, user: User) -> Any:
        return self._later(self._message)

    def _message(self) -> LineMessage:
        self.messages.append(self.make())
        return self.messages[-1]

    def _later(self, result: object) -> Any:
        if self.delay is None:
            return result
        return deferLater(self.clock, self.delay, lambda: result)


def broken() -> LineMessage:
    raise ZeroDivisionError("a bug in the message factory")


class DefectTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sink = RecordingSink()
        self.factory = make_factory(self.sink, self.clock)
        self.session = Session(self.factory)

    def user_session(self, delivery: UserDelivery) -> Session:
        factory = make_factory(self.sink, self.clock, delivery_factory=delivery)
        return Session(factory, "192.0.2.2")

    def transaction(self, session: Session) -> list[bytes]:
        """Up to DATA; the replies to RCPT and DATA."""
        session.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
        return session.send(b"RCPT TO:<target@example.com>\r\nDATA\r\n")


class TemporaryFailureTests(DefectTestCase):
    def test_451_from_the_sink_is_not_turned_into_550(self) -> None:
        """twisted#4904: SMTP._messageHandled answers 550 to every failure."""
        self.sink.result = fail(Refusal(451, "4.3.0", "Spool write failed"))
        self.transaction(self.session)
        self.assertEqual(
            self.session.send(b"x\r\n.\r\n"), [b"451 4.3.0 Spool write failed"]
        )

    def test_failing_message_factory_is_451(self) -> None:
        """twisted: SMTP.do_DATA answers 550 when a message factory fails."""
        delivery = UserDelivery(self.clock)
        delivery.make = broken
        session = self.user_session(delivery)
        self.assertEqual(
            self.transaction(session)[-1], b"451 4.3.0 Internal server error"
        )
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class PipeliningTests(DefectTestCase):
    def test_commands_wait_for_a_deferred_validation(self) -> None:
        """twisted#8126: pipelined DATA ran before RCPT was validated."""
        session = self.user_session(UserDelivery(self.clock, delay=1))
        session.send(b"EHLO c\r\n")
        replies = session.send(
            b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n"
        )
        self.assertEqual(replies, [])
        for _ in range(2):
            self.clock.advance(1)
        self.assertEqual(
            [line[:3] for line in session.output()], [b"250", b"250", b"354"]
        )
        replies = session.send(b"hi\r\n.\r\nNOOP\r\n")
        self.assertEqual([line[:3] for line in replies], [b"250", b"250"])


class LineLengthTests(DefectTestCase):
    def test_long_data_line_does_not_end_data(self) -> None:
        """
        twisted: SMTP.lineLengthExceeded leaves DATA, so the rest of the
        body runs as commands.
        """
        delivery = UserDelivery(self.clock)
        session = self.user_session(delivery)
        self.transaction(session)
        replies = session.send(
            b"x" * (MAX_DATA_LINE + 1) + b"\r\nRSET\r\nQUIT\r\n.\r\nNOOP\r\n"
        )
        self.assertEqual(replies, [b"500 5.5.2 Line too long", b"250 2.0.0 OK"])
        [message] = delivery.messages
        self.assertTrue(message.lost)

    def test_commands_after_a_long_command_line_run(self) -> None:
        """twisted: LineReceiver drops whatever followed a line too long."""
        replies = self.session.send(b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n")
        self.assertEqual(replies, [b"500 5.5.2 Line too long", b"250 2.0.0 OK"])


class SizeTests(DefectTestCase):
    def test_size_parameter_is_checked_at_mail(self) -> None:
        """twisted#8128: SMTP.do_MAIL parses SIZE= and throws it away."""
        self.session.send(b"EHLO c\r\n")
        self.assertEqual(
            self.session.send(b"MAIL FROM:<a@b.test> SIZE=20000\r\n"),
            [b"552 5.3.4 Message size exceeds fixed maximum"],
        )

    def test_message_over_the_size_limit(self) -> None:
        """twisted: no size limit at all; a generic message is refused too."""
        delivery = UserDelivery(self.clock)
        session = self.user_session(delivery)
        self.transaction(session)
        replies = session.send((b"y" * 98 + b"\r\n") * 200 + b".\r\n")
        self.assertEqual(replies, [b"552 5.3.4 Message size exceeds fixed maximum"])
        self.assertTrue(delivery.messages[0].lost)

    def test_utf8_sender(self) -> None:
        """twisted#8128 and RFC 6531: Twisted's Address is ASCII only (553)."""
        self.session.send(b"EHLO c\r\n")
        self.assertEqual(
            self.session.send(
                "MAIL FROM:<δοκιμή@παράδειγμα.δοκιμή> SMTPUTF8\r\n".encode()
            ),
            [b"250 2.1.0 Sender OK"],
        )


class StartTLSTests(DefectTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.factory.tls_context = object()  # type: ignore[assignment]
        self.tls = Session(self.factory, "192.0.2.3", transport=TLSStringTransport())
        self.tls.send(b"EHLO c\r\n")

    def test_cleartext_after_starttls_is_never_run(self) -> None:
        """CVE-2011-0411's class: ESMTP ran pipelined cleartext inside TLS."""
        replies = self.tls.send(b"STARTTLS\r\nNOOP\r\n")
        self.assertEqual(replies, [])
        self.assertTrue(self.tls.transport.disconnected)
        self.assertIsNone(self.tls.transport.tls_started_with)  # type: ignore[attr-defined]

    def test_session_starts_afresh_after_the_handshake(self) -> None:
        """RFC 3207 4.2: ESMTP kept HELO and the sender across STARTTLS."""
        self.tls.send(b"MAIL FROM:<a@b.test>\r\nSTARTTLS\r\n")
        self.assertEqual(
            self.tls.send(b"RCPT TO:<target@example.com>\r\n"),
            [b"503 5.5.1 Need MAIL command first"],
        )
        self.assertEqual(
            self.tls.send(b"MAIL FROM:<a@b.test>\r\n"),
            [b"503 5.5.1 Send HELO/EHLO first"],
        )


class RobustnessTests(DefectTestCase):
    def test_non_ascii_verb(self) -> None:
        """twisted: ESMTP.lookupMethod raises UnicodeDecodeError on it."""
        self.assertEqual(
            self.session.send(b"\xff\xfe\r\nNOOP\r\n"),
            [b"500 5.5.2 Command not recognized", b"250 2.0.0 OK"],
        )

    def test_str_reply_text_from_a_message(self) -> None:
        """
        twisted: an SMTPServerError with a str reply text, raised by a
        message, makes SMTP.dataLineReceived raise TypeError: no reply.
        """
        delivery = UserDelivery(self.clock)
        delivery.make = lambda: LineMessage(SMTPServerError(554, "5.6.0 No thanks"))
        session = self.user_session(delivery)
        self.transaction(session)
        self.assertEqual(session.send(b"no\r\n.\r\n"), [b"554 5.6.0 No thanks"])

    def test_every_reply_carries_an_enhanced_status_code(self) -> None:
        """twisted: its own replies (250 Sender address accepted...) have none."""
        replies = self.session.send(
            b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<target@example.com>\r\n"
            b"RSET\r\n\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<target@example.com>\r\n"
            b"DATA\r\nx\r\n.\r\nQUIT\r\n"
        )
        for line in replies:
            self.assertRegex(line, REPLY_LINE)

    def test_no_envelope_in_the_log(self) -> None:
        """twisted: SMTP.noisy logs every sender and recipient at DATA."""
        with capturedLogs() as events:
            self.transaction(self.session)
        # At debug, commands are logged on purpose (tests.test_logging).
        above_debug = [e for e in events if e["log_level"] is not LogLevel.debug]
        self.assertEqual([e for e in above_debug if "a@b.test" in repr(e)], [])


class FactoryTests(DefectTestCase):
    def test_timeout_reaches_the_protocol(self) -> None:
        """twisted: SMTPFactory.buildProtocol never copies its timeout."""
        factory = make_factory(self.sink, self.clock, timeout=5)
        session = Session(factory, "192.0.2.4")
        self.clock.advance(5)
        self.assertEqual(
            session.output()[-1], b"421 4.4.2 mx.test Idle timeout, closing"
        )
