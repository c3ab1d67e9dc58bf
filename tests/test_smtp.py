"""
The SMTP front in memory: every reply, limit and state change of a session
driven through a StringTransport with a Clock, and the delivery, message
and factory objects on their own.

DATA is taken in bulk for MailLaser's own messages and a line at a time
otherwise; the DATA tests run on both paths.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.mail.interfaces import (
    IMessageDelivery,
    IMessageDeliveryFactory,
    IMessageSMTP,
)
from twisted.mail.smtp import SMTPServerError
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from maillaser.message import Envelope, Message, Refusal
from maillaser.smtp import (
    AcceptedMessage,
    MailLaserDelivery,
    MailLaserDeliveryFactory,
)
from maillaser.smtp._data import BulkData
from maillaser.smtp._protocol import CLOSE_GRACE, MAX_DATA_LINE, MAX_INPUT_BACKLOG
from tests.test_smtp_helpers import (
    TARGETS,
    RecordingSink,
    Session,
    TLSStringTransport,
    chunks,
    make_factory,
)

QUEUED = rb"^250 2\.0\.0 Ok: queued as msg_[0-9a-f]{28}$"


class SessionTestCase(SynchronousTestCase):
    bulk = True

    def setUp(self) -> None:
        self.clock = Clock()
        self.sink = RecordingSink()
        self.factory = make_factory(self.sink, self.clock)
        self.session = self.connect()
        self.transport = self.session.transport

    def connect(self, host: str = "192.0.2.1") -> Session:
        return Session(self.factory, host, bulk=self.bulk)

    def send(self, data: bytes) -> list[bytes]:
        return self.session.send(data)

    def open_transaction(self) -> None:
        self.send(b"EHLO client.test\r\nMAIL FROM:<sender@test.com>\r\n")
        self.send(b"RCPT TO:<target@example.com>\r\n")

    def deliver(self, body: bytes) -> list[bytes]:
        self.open_transaction()
        self.send(b"DATA\r\n")
        return self.send(body)


class GreetingAndEhloTests(SessionTestCase):
    def test_greeting(self) -> None:
        self.assertEqual(self.transport.value(), b"220 mx.test ESMTP MailLaser\r\n")

    def test_ehlo_advertises_extensions(self) -> None:
        self.assertEqual(
            self.send(b"EHLO client.test\r\n"),
            [
                b"250-mx.test",
                b"250-PIPELINING",
                b"250-SIZE 10000",
                b"250-8BITMIME",
                b"250-SMTPUTF8",
                b"250 ENHANCEDSTATUSCODES",
            ],
        )

    def test_ehlo_advertises_starttls_until_tls_is_active(self) -> None:
        self.factory.tls_context = object()  # type: ignore[assignment]
        session = Session(self.factory, "192.0.2.7", transport=TLSStringTransport())
        self.assertEqual(session.send(b"EHLO c\r\n")[-1], b"250 STARTTLS")
        self.assertEqual(
            session.send(b"STARTTLS\r\n"), [b"220 2.0.0 Ready to start TLS"]
        )
        self.assertIs(session.transport.tls_started_with, self.factory.tls_context)  # type: ignore[attr-defined]
        self.assertEqual(session.send(b"EHLO c\r\n")[-1], b"250 ENHANCEDSTATUSCODES")
        self.assertEqual(
            session.send(b"STARTTLS\r\n"), [b"503 5.5.1 TLS already active"]
        )

    def test_refused_starttls_keeps_the_session(self) -> None:
        self.factory.tls_context = object()  # type: ignore[assignment]
        session = Session(self.factory, "192.0.2.7", transport=TLSStringTransport())
        session.send(b"EHLO c\r\nSTARTTLS\r\n")
        session.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
        self.assertEqual(
            session.send(b"STARTTLS\r\nRCPT TO:<target@example.com>\r\n"),
            [b"503 5.5.1 TLS already active", b"250 2.1.5 Recipient OK"],
        )

    def test_helo(self) -> None:
        self.assertEqual(self.send(b"HELO client.test\r\n"), [b"250 mx.test"])

    def test_ehlo_needs_a_domain(self) -> None:
        self.assertEqual(self.send(b"EHLO\r\n"), [b"501 5.5.4 Syntax: EHLO hostname"])
        self.assertEqual(
            self.send(b"HELO \x01\r\n"), [b"501 5.5.4 Syntax: EHLO hostname"]
        )

    def test_commands_are_case_insensitive(self) -> None:
        replies = self.send(
            b"ehlo c\r\nmail from:<a@b.test>\r\nRcpt To:<TARGET@example.COM>\r\n"
        )
        self.assertEqual(
            replies[-2:], [b"250 2.1.0 Sender OK", b"250 2.1.5 Recipient OK"]
        )

    def test_prefix_is_not_a_command(self) -> None:
        self.assertEqual(
            self.send(b"HELOX c\r\n"), [b"500 5.5.2 Command not recognized"]
        )


class TransactionTests(SessionTestCase):
    def test_message_reaches_the_sink(self) -> None:
        replies = self.deliver(b"Subject: hi\r\n\r\nbody\r\n..dot\r\n.\r\n")
        [message] = self.sink.messages
        self.assertEqual(replies, [f"250 2.0.0 Ok: queued as {message.id}".encode()])
        self.assertEqual(message.envelope.sender, "sender@test.com")
        self.assertEqual(message.envelope.recipients, ("target@example.com",))
        self.assertEqual(message.envelope.helo, "client.test")
        self.assertEqual(message.envelope.peer, "192.0.2.1")
        self.assertEqual(
            message.raw,
            b"Received: from client.test ([192.0.2.1])\r\n"
            b"\tby mx.test (MailLaser) with ESMTP id " + message.id.encode() + b"\r\n"
            b"\tfor <target@example.com>;\r\n"
            b"\tThu, 01 Jan 1970 00:00:00 -0000\r\n"
            b"Subject: hi\r\n\r\nbody\r\n.dot\r\n",
        )
        self.assertRegex(message.id, r"^msg_[0-9a-f]{28}$")

    def test_message_id_is_made_at_mail_from(self) -> None:
        """The benchmark measures latency from it: the clock at MAIL FROM."""
        self.clock.advance(250)
        self.open_transaction()
        self.clock.advance(5)
        self.send(b"DATA\r\nx\r\n.\r\n")
        [message] = self.sink.messages
        self.assertEqual(message.id[4:16], f"{250 * 1000:012x}")
        self.assertEqual(message.received_at, 255)

    def test_null_sender(self) -> None:
        self.send(b"EHLO c\r\n")
        self.assertEqual(self.send(b"MAIL FROM:<>\r\n"), [b"250 2.1.0 Sender OK"])
        self.send(b"RCPT TO:<target@example.com>\r\nDATA\r\n")
        self.send(b"x\r\n.\r\n")
        self.assertEqual(self.sink.messages[0].envelope.sender, "")

    def test_recipients_in_order_as_written(self) -> None:
        self.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
        replies = self.send(
            b"RCPT TO:<nobody@example.com>\r\n"
            b"RCPT TO:<second@example.com>\r\n"
            b"RCPT TO:<Target@Example.com>\r\n"
            b"RCPT TO:<target@example.com>\r\n"
        )
        self.assertEqual(
            replies,
            [
                b"550 5.1.1 No such user here",
                b"250 2.1.5 Recipient OK",
                b"250 2.1.5 Recipient OK",
                b"250 2.1.5 Recipient OK",
            ],
        )
        self.send(b"DATA\r\nx\r\n.\r\n")
        [message] = self.sink.messages
        self.assertEqual(
            message.envelope.recipients, ("second@example.com", "Target@Example.com")
        )
        self.assertNotIn(b"\tfor <", message.raw)  # only for a single recipient

    def test_one_message_whatever_the_number_of_recipients(self) -> None:
        self.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
        self.send(b"RCPT TO:<target@example.com>\r\nRCPT TO:<second@example.com>\r\n")
        replies = self.send(b"DATA\r\nSubject: one\r\n\r\nx\r\n.\r\n")
        self.assertEqual(len(self.sink.messages), 1)
        self.assertRegex(replies[-1], QUEUED)

    def test_too_many_recipients(self) -> None:
        self.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
        replies = self.send(
            b"RCPT TO:<target@example.com>\r\nRCPT TO:<second@example.com>\r\n"
            b"RCPT TO:<third@example.com>\r\n"
        )
        self.assertEqual(replies[-1], b"452 4.5.3 Too many recipients")

    def test_data_without_recipient_is_503_never_354(self) -> None:
        self.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@nowhere.test>\r\n")
        self.assertEqual(self.send(b"DATA\r\n"), [b"503 5.5.1 No valid recipients"])
        self.assertEqual(self.send(b"NOOP\r\n"), [b"250 2.0.0 OK"])

    def test_data_without_mail(self) -> None:
        self.send(b"EHLO c\r\n")
        self.assertEqual(self.send(b"DATA\r\n"), [b"503 5.5.1 Need MAIL command first"])

    def test_data_takes_no_argument(self) -> None:
        self.open_transaction()
        self.assertEqual(
            self.send(b"DATA x\r\n"), [b"501 5.5.4 DATA takes no arguments"]
        )

    def test_mail_needs_helo(self) -> None:
        self.assertEqual(
            self.send(b"MAIL FROM:<a@b.test>\r\n"), [b"503 5.5.1 Send HELO/EHLO first"]
        )

    def test_rcpt_needs_mail(self) -> None:
        self.send(b"EHLO c\r\n")
        self.assertEqual(
            self.send(b"RCPT TO:<target@example.com>\r\n"),
            [b"503 5.5.1 Need MAIL command first"],
        )

    def test_nested_mail(self) -> None:
        self.open_transaction()
        self.assertEqual(
            self.send(b"MAIL FROM:<a@b.test>\r\n"), [b"503 5.5.1 Nested MAIL command"]
        )

    def test_bad_addresses(self) -> None:
        self.send(b"EHLO c\r\n")
        self.assertEqual(
            self.send(b"MAIL FROM:<not-an-address>\r\n"),
            [b"501 5.1.7 Bad sender address syntax"],
        )
        self.assertEqual(
            self.send(b"MAIL FROM <a@b.test>\r\n"),
            [b"501 5.5.4 Syntax: FROM:<address>"],
        )
        self.send(b"MAIL FROM:<a@b.test>\r\n")
        self.assertEqual(
            self.send(b"RCPT TO:<>\r\n"), [b"501 5.1.3 Bad recipient address syntax"]
        )
        self.assertEqual(
            self.send(b"RCPT TO:<target@example.com> NOTIFY=NEVER\r\n"),
            [b"555 5.5.4 Unsupported parameter"],
        )

    def test_unbracketed_address_and_source_route(self) -> None:
        self.send(b"EHLO c\r\n")
        self.assertEqual(
            self.send(b"MAIL FROM: a@b.test\r\n"), [b"250 2.1.0 Sender OK"]
        )
        self.assertEqual(
            self.send(b"RCPT TO:<@relay.test:target@example.com>\r\n"),
            [b"250 2.1.5 Recipient OK"],
        )

    def test_rset_forgets_the_transaction(self) -> None:
        self.open_transaction()
        self.assertEqual(self.send(b"RSET\r\n"), [b"250 2.0.0 OK"])
        self.assertEqual(self.send(b"DATA\r\n"), [b"503 5.5.1 Need MAIL command first"])

    def test_ehlo_again_resets_the_transaction(self) -> None:
        self.open_transaction()
        self.send(b"EHLO again.test\r\n")
        self.assertEqual(self.send(b"DATA\r\n"), [b"503 5.5.1 Need MAIL command first"])

    def test_several_messages_per_connection(self) -> None:
        for n in range(3):
            self.send(
                b"MAIL FROM:<a@b.test>\r\n"
                if n
                else b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n"
            )
            self.send(b"RCPT TO:<target@example.com>\r\nDATA\r\n")
            self.send(b"Subject: %d\r\n\r\n.\r\n" % n)
        self.assertEqual(len(self.sink.messages), 3)
        self.assertEqual(len({m.id for m in self.sink.messages}), 3)

    def test_other_commands(self) -> None:
        self.assertEqual(self.send(b"NOOP\r\n"), [b"250 2.0.0 OK"])
        self.assertEqual(self.send(b"VRFY someone\r\n")[0][:10], b"252 2.5.2 ")
        self.assertEqual(self.send(b"HELP\r\n")[0][:10], b"214 2.0.0 ")
        self.assertEqual(self.send(b"EXPN list\r\n"), [b"502 5.5.1 EXPN not supported"])
        for command in (b"AUTH PLAIN", b"BDAT 10", b"TURN", b"ETRN x"):
            self.assertEqual(
                self.send(command + b"\r\n"), [b"502 5.5.1 Command not implemented"]
            )
        self.assertEqual(self.send(b"\r\n"), [b"500 5.5.2 Command not recognized"])
        self.assertEqual(self.send(b"QUIT\r\n"), [b"221 2.0.0 Bye"])
        self.assertTrue(self.transport.disconnecting)

    def test_starttls_without_tls_transport(self) -> None:
        self.send(b"EHLO c\r\n")
        self.assertEqual(self.send(b"STARTTLS\r\n"), [b"454 4.7.0 TLS not available"])

    def test_smtputf8(self) -> None:
        """RFC 6531: UTF-8 in the envelope, kept as written; traced as such."""
        sender = "用户@例子.广告".encode()
        self.send(b"EHLO c\r\n")
        self.assertEqual(
            self.send(b"MAIL FROM:<" + sender + b"> SMTPUTF8 BODY=8BITMIME\r\n"),
            [b"250 2.1.0 Sender OK"],
        )
        self.send(b"RCPT TO:<target@example.com>\r\nDATA\r\n")
        self.send("Subject: café\r\n\r\nx\r\n.\r\n".encode())
        [message] = self.sink.messages
        self.assertEqual(message.envelope.sender, "用户@例子.广告")
        self.assertIn(b") with UTF8SMTP id msg_", message.raw)
        self.assertEqual(
            self.send(b"MAIL FROM:<a@b.test> SMTPUTF8=yes\r\n"),
            [b"501 5.5.4 SMTPUTF8 takes no value"],
        )

    def test_utf8_recipient_is_compared_with_the_targets(self) -> None:
        self.send(b"EHLO c\r\nMAIL FROM:<a@b.test> SMTPUTF8\r\n")
        self.assertEqual(
            self.send("RCPT TO:<δοκιμή@παράδειγμα.δοκιμή>\r\n".encode()),
            [b"550 5.1.1 No such user here"],
        )

    def test_targets_compare_by_ascii_case_only(self) -> None:
        """The long s and the Kelvin sign fold to s and k outside ASCII."""
        self.send(b"EHLO c\r\nMAIL FROM:<a@b.test> SMTPUTF8\r\n")
        for lookalike in ("target@exampl\u212a.com", "targe\u0442@example.com"):
            self.assertEqual(
                self.send(f"RCPT TO:<{lookalike}>\r\n".encode()),
                [b"550 5.1.1 No such user here"],
            )
        factory = make_factory(self.sink, self.clock, targets=("alerts@example.com",))
        session = Session(factory, "192.0.2.8")
        session.send(b"EHLO c\r\nMAIL FROM:<a@b.test> SMTPUTF8\r\n")
        self.assertEqual(
            session.send("RCPT TO:<alert\u017f@example.com>\r\n".encode()),
            [b"550 5.1.1 No such user here"],
        )
        self.assertEqual(
            session.send(b"RCPT TO:<ALERTS@EXAMPLE.COM>\r\n"),
            [b"250 2.1.5 Recipient OK"],
        )

    def test_size_parameter(self) -> None:
        self.send(b"EHLO c\r\n")
        self.assertEqual(
            self.send(b"MAIL FROM:<a@b.test> SIZE=10001\r\n"),
            [b"552 5.3.4 Message size exceeds fixed maximum"],
        )
        self.assertEqual(
            self.send(b"MAIL FROM:<a@b.test> SIZE=big\r\n"),
            [b"501 5.5.4 Bad SIZE parameter"],
        )
        self.assertEqual(
            self.send(b"MAIL FROM:<a@b.test> SIZE=10000 BODY=8BITMIME\r\n"),
            [b"250 2.1.0 Sender OK"],
        )

    def test_body_parameter(self) -> None:
        self.send(b"EHLO c\r\n")
        self.assertEqual(
            self.send(b"MAIL FROM:<a@b.test> BODY=BINARYMIME\r\n"),
            [b"555 5.5.4 Unsupported BODY type"],
        )
        self.assertEqual(
            self.send(b"MAIL FROM:<a@b.test> BODY=7bit\r\n"), [b"250 2.1.0 Sender OK"]
        )

    def test_unknown_or_malformed_mail_parameter(self) -> None:
        self.send(b"EHLO c\r\n")
        self.assertEqual(
            self.send(b"MAIL FROM:<a@b.test> RET=FULL\r\n"),
            [b"555 5.5.4 Unsupported parameter RET"],
        )
        self.assertEqual(
            self.send(b"MAIL FROM:<a@b.test> =x\r\n"),
            [b"501 5.5.4 Malformed parameter"],
        )


class DataTests(SessionTestCase):
    """DATA taken in bulk (MailLaser's own messages)."""

    def test_only_crlf_dot_crlf_ends_data(self) -> None:
        replies = self.deliver(b"a\n.\nb\r\n.\nc\n.\r\n")
        self.assertEqual(replies, [])
        self.send(b"\r\n.\r\n")
        # The bare line ends became CRLFs (MAIL_LASER_BARE_NEWLINE=normalize),
        # after dot-unstuffing: only the line ".\nc\n." lost its dot.
        self.assertTrue(
            self.sink.messages[0].raw.endswith(
                b"\r\n\r\na\r\n.\r\nb\r\n\r\nc\r\n.\r\n\r\n"
            )
        )

    def test_empty_message(self) -> None:
        self.deliver(b".\r\n")
        raw = self.sink.messages[0].raw
        self.assertRegex(raw[raw.index(b";\r\n\t") :], rb"^;\r\n\t[^\r\n]+\r\n$")

    def test_content_without_header_is_set_off_from_the_trace_header(self) -> None:
        """As Twisted's DATA path does: a blank line before a first line
        that is neither a header nor empty."""
        self.deliver(b"just text\r\n.\r\n")
        self.deliver(b"Subject: x\r\n.\r\n")
        first, second = (m.raw.split(b"\r\n")[4:] for m in self.sink.messages)
        self.assertEqual(first, [b"", b"just text", b""])
        self.assertEqual(second, [b"Subject: x", b""])

    def test_end_marker_split_across_chunks(self) -> None:
        self.deliver(b"Subject: x\r\n\r\nhello\r")
        for piece in (b"\n", b".", b"\r", b"\n"):
            self.assertEqual(self.sink.messages, [])
            self.send(piece)
        self.assertTrue(self.sink.messages[0].raw.endswith(b"\r\nhello\r\n"))

    def test_dot_stuffing_split_across_chunks(self) -> None:
        self.deliver(b"Subject: x\r\n\r\na\r")
        self.send(b"\n.")
        self.send(b".b\r\n.")
        self.send(b"\r\n")
        self.assertTrue(self.sink.messages[0].raw.endswith(b"\r\n\r\na\r\n.b\r\n"))

    def test_eight_bit_bytes_pass_through(self) -> None:
        body = b"Subject: caf\xe9\r\n\r\n\xff\xfe\x00 na\xefve\r\n"
        self.deliver(body + b".\r\n")
        self.assertTrue(self.sink.messages[0].raw.endswith(body))

    def test_oversized_message_552_and_session_usable(self) -> None:
        self.deliver(b"x" * 60 + b"\r\n")
        for _ in range(200):
            self.send(b"y" * 98 + b"\r\n")
        replies = self.send(b".\r\n")
        self.assertEqual(replies, [b"552 5.3.4 Message size exceeds fixed maximum"])
        self.assertEqual(self.sink.messages, [])
        self.deliver(b"small\r\n.\r\n")
        self.assertEqual(len(self.sink.messages), 1)

    def test_size_limit_counts_the_content_without_dot_stuffing(self) -> None:
        """RFC 1870: CRLFs count, the dots added for transparency do not."""
        line = b".." + b"x" * 97 + b"\r\n"  # 100 bytes unstuffed
        self.deliver(line * 100 + b".\r\n")
        self.assertEqual(len(self.sink.messages), 1)
        self.assertEqual(
            self.deliver(line * 100 + b"z\r\n.\r\n"),
            [b"552 5.3.4 Message size exceeds fixed maximum"],
        )

    def test_long_data_line_never_becomes_commands(self) -> None:
        self.factory.max_message_size = 1_000_000
        self.deliver(b"x" * (MAX_DATA_LINE + 10) + b"\r\n")
        replies = self.send(
            b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<target@example.com>\r\n"
        )
        self.assertEqual(replies, [])
        self.assertEqual(self.send(b".\r\n"), [b"500 5.5.2 Line too long"])
        self.assertEqual(self.sink.messages, [])
        self.assertEqual(self.send(b"NOOP\r\n"), [b"250 2.0.0 OK"])

    def test_long_line_inside_one_chunk(self) -> None:
        self.factory.max_message_size = 1_000_000
        replies = self.deliver(
            b"a\r\n" + b"x" * (MAX_DATA_LINE + 10) + b"\r\nb\r\n.\r\nNOOP\r\n"
        )
        self.assertEqual(replies, [b"500 5.5.2 Line too long", b"250 2.0.0 OK"])

    def test_line_at_the_limit_is_fine(self) -> None:
        self.factory.max_message_size = 1_000_000
        self.deliver(b"x" * MAX_DATA_LINE + b"\r\n.\r\n")
        self.assertEqual(len(self.sink.messages), 1)

    def test_data_line_that_never_ends_holds_little_memory(self) -> None:
        self.factory.max_message_size = 100_000_000
        self.deliver(b"Subject: endless\r\n\r\n")
        chunk = b"B" * 65536
        tracemalloc.start()
        try:
            start = tracemalloc.get_traced_memory()[0]
            for _ in range(80):  # 5 MiB
                self.session.protocol.dataReceived(chunk)
            peak = tracemalloc.get_traced_memory()[1] - start
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 1_000_000)
        self.assertEqual(self.send(b"\r\n.\r\n"), [b"500 5.5.2 Line too long"])
        self.assertEqual(len(self.deliver(b"fine\r\n.\r\n")), 1)
        self.assertEqual(len(self.sink.messages), 1)

    def test_client_gone_mid_data(self) -> None:
        self.deliver(b"Subject: cut\r\n\r\nhalf")
        self.session.protocol.connectionLost()
        self.assertEqual(self.sink.messages, [])
        self.assertEqual(self.factory.sessions, set())


class LineDataTests(DataTests):
    """The same, a line at a time through Twisted's DATA path."""

    bulk = False


class CommandLineTests(SessionTestCase):
    def test_command_line_too_long(self) -> None:
        at_limit = b"NOOP " + b"x" * 505 + b"\r\n"
        over = b"NOOP " + b"x" * 506 + b"\r\n"
        self.assertEqual((len(at_limit), len(over)), (512, 513))
        self.assertEqual(
            self.send(at_limit + over + b"NOOP\r\n"),
            [b"250 2.0.0 OK", b"500 5.5.2 Line too long", b"250 2.0.0 OK"],
        )

    def test_line_that_never_ends_does_not_grow_memory(self) -> None:
        self.send(b"x" * 1000)
        for _ in range(100):
            self.send(b"x" * 10_000)
        self.assertLess(self.session.buffered(), 512)
        self.send(b"x\r")
        self.assertEqual(self.send(b"\nNOOP\r\n"), [b"250 2.0.0 OK"])

    def test_too_many_errors(self) -> None:
        replies = self.send(b"BOGUS\r\n" * 25)
        self.assertEqual(replies[-1], b"421 4.7.0 Too many errors, closing")
        self.assertEqual(len(replies), 21)
        self.assertTrue(self.transport.disconnecting)

    def test_refused_recipients_are_not_errors(self) -> None:
        unknown = b"".join(b"RCPT TO:<nobody%d@x.test>\r\n" % n for n in range(20))
        replies = self.send(
            b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n"
            + unknown
            + b"RCPT TO:<target@example.com>\r\nDATA\r\nx\r\n.\r\n"
        )
        self.assertEqual(replies.count(b"550 5.1.1 No such user here"), 20)
        self.assertRegex(replies[-1], QUEUED)
        self.assertEqual(len(self.sink.messages), 1)

    def test_an_accepted_message_forgives_earlier_errors(self) -> None:
        transaction = (
            b"BOGUS\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<target@example.com>\r\n"
            b"DATA\r\nx\r\n.\r\n"
        )
        replies = self.send(b"EHLO c\r\n" + transaction * 25)
        self.assertEqual(len(self.sink.messages), 25)
        self.assertFalse(self.transport.disconnecting)
        self.assertNotIn(b"421 4.7.0 Too many errors, closing", replies)


class SlowSink(RecordingSink):
    """Answers each message when the test fires its Deferred."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Deferred[None]] = []

    def receive(self, message: Message) -> Deferred[None]:
        super().receive(message)
        self.waiting.append(Deferred())
        return self.waiting[-1]


class PipeliningTests(SessionTestCase):
    def test_replies_in_order(self) -> None:
        replies = self.send(
            b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<nobody@x.test>\r\n"
            b"RCPT TO:<target@example.com>\r\nDATA\r\nSubject: p\r\n\r\nbody\r\n.\r\n"
            b"MAIL FROM:<>\r\nRCPT TO:<second@example.com>\r\nDATA\r\nx\r\n.\r\n"
            b"QUIT\r\n"
        )
        codes = [line[:3] for line in replies if not line.startswith(b"250-")]
        self.assertEqual(
            codes,
            b"250 250 550 250 354 250 250 250 354 250 221".split(),
        )
        self.assertEqual(len(self.sink.messages), 2)

    def test_input_waits_while_the_sink_decides(self) -> None:
        pending: Deferred[None] = Deferred()
        self.sink.result = pending
        replies = self.deliver(b"x\r\n.\r\nNOOP\r\n")
        self.assertEqual(replies, [])
        self.assertEqual(self.transport.producerState, "paused")
        self.sink.result = None
        self.transport.clear()
        pending.callback(None)
        self.assertEqual([line[:3] for line in self.session.output()], [b"250", b"250"])
        self.assertEqual(self.transport.producerState, "producing")

    def test_many_pipelined_messages_do_not_recurse(self) -> None:
        self.send(b"EHLO c\r\n")
        one = (
            b"MAIL FROM:<a@b.test>\r\nRCPT TO:<target@example.com>\r\n"
            b"DATA\r\nx\r\n.\r\n"
        )
        self.send(one * 3000)
        self.assertEqual(len(self.sink.messages), 3000)

    def test_many_pipelined_messages_with_a_slow_sink(self) -> None:
        """Each end of DATA waits for the sink, then the next message goes."""
        one = (
            b"MAIL FROM:<a@b.test>\r\nRCPT TO:<target@example.com>\r\n"
            b"DATA\r\nx\r\n.\r\n"
        )
        sink = SlowSink()
        session = Session(make_factory(sink, self.clock), "192.0.2.6")
        envelope = one[: one.index(b"DATA\r\n") + 6]
        session.send(b"EHLO c\r\n" + envelope)
        for n in range(200):
            # The content after its 354; the next envelope pipelined after it.
            session.protocol.dataReceived(b"x\r\n.\r\n" + envelope)
            self.assertEqual(len(sink.waiting), n + 1)
            sink.waiting[n].callback(None)
        queued = [line for line in session.output() if line.startswith(b"250 2.0.0")]
        self.assertEqual(len(queued), 200)


class RefusalTests(SessionTestCase):
    def test_sink_refusal_is_the_reply(self) -> None:
        self.sink.result = fail(Refusal(550, "5.6.0", "Rejected: spam"))
        self.assertEqual(self.deliver(b"x\r\n.\r\n"), [b"550 5.6.0 Rejected: spam"])

    def test_refusal_text_is_one_printable_line(self) -> None:
        self.sink.result = fail(Refusal(550, "5.6.0", "bad\r\n250 fake\x00 caf\u00e9"))
        self.assertEqual(
            self.deliver(b"x\r\n.\r\n"), [b"550 5.6.0 bad??250 fake? caf?"]
        )

    def test_unexpected_failure_is_451_never_550(self) -> None:
        self.sink.result = fail(RuntimeError("boom"))
        self.assertEqual(
            self.deliver(b"x\r\n.\r\n"),
            [b"451 4.3.0 Temporary failure, please try again later"],
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.send(b"NOOP\r\n"), [b"250 2.0.0 OK"])

    def test_back_pressure_at_mail(self) -> None:
        self.sink.capacity = Refusal(452, "4.3.1", "Insufficient system storage")
        self.send(b"EHLO c\r\n")
        self.assertEqual(
            self.send(b"MAIL FROM:<a@b.test>\r\n"),
            [b"452 4.3.1 Insufficient system storage"],
        )
        self.sink.capacity = None
        self.assertEqual(
            self.send(b"MAIL FROM:<a@b.test>\r\n"), [b"250 2.1.0 Sender OK"]
        )


class ReplyCountTests(SessionTestCase):
    def test_on_reply_hears_250_at_data_end_and_every_error(self) -> None:
        heard: list[int] = []
        self.factory.on_reply = heard.append
        self.send(b"EHLO c\r\nBOGUS\r\nMAIL FROM:<a@b.test>\r\n")
        self.send(b"RCPT TO:<x@y.test>\r\nRCPT TO:<target@example.com>\r\n")
        self.send(b"DATA\r\nx\r\n.\r\nQUIT\r\n")
        self.assertEqual(heard, [500, 550, 250])


class TimeoutAndLimitTests(SessionTestCase):
    def test_idle_timeout(self) -> None:
        self.clock.advance(299)
        self.send(b"NOOP\r\n")
        self.clock.advance(299)
        self.assertFalse(self.transport.disconnecting)
        self.transport.clear()
        self.clock.advance(1)
        self.assertEqual(
            self.transport.value(), b"421 4.4.2 mx.test Idle timeout, closing\r\n"
        )
        self.assertTrue(self.transport.disconnecting)

    def test_a_line_must_end_within_the_timeout_of_its_first_byte(self) -> None:
        for _ in range(10):
            self.clock.advance(40)
            self.send(b"NOOP " + b"x" * 100)
        self.assertTrue(self.transport.disconnecting)

    def test_no_timeout_while_the_sink_works(self) -> None:
        self.sink.result = Deferred()
        self.deliver(b"x\r\n.\r\n")
        self.clock.advance(10_000)
        self.assertFalse(self.transport.disconnecting)
        self.sink.result.callback(None)
        self.clock.advance(300)
        self.assertTrue(self.transport.disconnecting)

    def test_per_address_cap(self) -> None:
        second = self.connect()
        third = self.connect()
        self.assertEqual(
            third.transport.value(),
            b"421 4.7.0 mx.test Too many connections from you\r\n",
        )
        self.assertTrue(third.transport.disconnecting)
        second.protocol.connectionLost()
        fourth = self.connect()
        self.assertTrue(fourth.transport.value().startswith(b"220 "))

    def test_global_cap(self) -> None:
        self.connect("192.0.2.2")
        self.connect("192.0.2.3")
        refused = self.connect("192.0.2.4")
        self.assertEqual(
            refused.transport.value(),
            b"421 4.7.0 mx.test Too many connections, try later\r\n",
        )
        refused.protocol.connectionLost()
        self.assertEqual(len(self.factory.sessions), 3)


class DrainTests(SessionTestCase):
    def test_idle_sessions_are_told_421(self) -> None:
        d = self.factory.drain(5)
        self.assertEqual(
            self.session.output()[-1], b"421 4.3.2 mx.test Service shutting down"
        )
        self.successResultOf(d)

    def test_data_in_progress_may_finish(self) -> None:
        self.deliver(b"partial\r\n")
        d = self.factory.drain(5)
        self.assertNoResult(d)
        replies = self.send(b".\r\nMAIL FROM:<a@b.test>\r\n")
        self.assertRegex(replies[0], QUEUED)
        self.assertEqual(replies[1:], [b"421 4.3.2 mx.test Service shutting down"])
        self.session.protocol.connectionLost()
        self.successResultOf(d)

    def test_a_waiting_sink_may_finish(self) -> None:
        self.sink.result = Deferred()
        self.deliver(b"x\r\n.\r\nNOOP\r\n")
        d = self.factory.drain(5)
        self.assertNoResult(d)
        self.sink.result.callback(None)
        replies = self.session.output()
        self.assertRegex(replies[0], QUEUED)
        self.assertEqual(replies[1:], [b"421 4.3.2 mx.test Service shutting down"])

    def test_grace_period_ends(self) -> None:
        self.deliver(b"partial\r\n")
        d = self.factory.drain(5)
        self.clock.advance(5)
        self.successResultOf(d)
        self.assertEqual(
            self.session.output()[-1], b"421 4.3.2 mx.test Service shutting down"
        )
        self.assertEqual(self.sink.messages, [])

    def test_new_connections_refused_while_draining(self) -> None:
        self.factory.drain(5)
        refused = self.connect("192.0.2.9")
        self.assertEqual(
            refused.transport.value(), b"421 4.3.2 mx.test Service shutting down\r\n"
        )


class FullSendBuffer(TLSStringTransport):
    """A transport that pauses its producer past C{limit} unsent bytes, as
    Twisted's do when the peer does not read."""

    limit = 4096

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.value()) > self.limit and self.producer is not None:
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.clear()
        assert self.producer is not None
        self.producer.resumeProducing()


class BackPressureTests(SessionTestCase):
    """A client that does not read its replies cannot make us buffer them."""

    def setUp(self) -> None:
        super().setUp()
        self.session = Session(self.factory, "192.0.2.5", transport=FullSendBuffer())
        self.transport = self.session.transport

    def test_replies_stop_when_the_send_buffer_is_full(self) -> None:
        [help_reply] = self.send(b"HELP\r\n")
        self.transport.clear()
        self.session.protocol.dataReceived(b"HELP\r\n" * 20_000)
        written = len(self.transport.value())
        self.assertLess(written, FullSendBuffer.limit + 200)
        answered = written
        while self.transport.value():
            self.transport.drain()  # type: ignore[attr-defined]
            answered += len(self.transport.value())
        self.assertEqual(answered, 20_000 * (len(help_reply) + 2))

    def test_reading_stops_only_when_input_piles_up(self) -> None:
        """During a TLS handshake the TLS layer pauses us too, yet must read."""
        self.session.protocol.pauseProducing()
        self.send(b"NOOP\r\n")
        self.assertEqual(self.transport.producerState, "producing")
        self.send(b"NOOP\r\n" * (MAX_INPUT_BACKLOG // 6 + 1))
        self.assertEqual(self.transport.producerState, "paused")
        self.transport.drain()  # type: ignore[attr-defined]
        self.assertEqual(self.transport.producerState, "paused")  # still behind
        while self.transport.value():
            self.transport.drain()  # type: ignore[attr-defined]
        self.assertEqual(self.transport.producerState, "producing")

    def test_closing_on_a_client_that_does_not_read_aborts(self) -> None:
        self.session.protocol.pauseProducing()
        self.session.protocol.timeoutConnection()
        self.assertTrue(self.transport.disconnected)

    def test_a_polite_close_is_cut_after_the_grace(self) -> None:
        self.send(b"QUIT\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.transport.producer)  # else TLS would never close
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(CLOSE_GRACE)
        self.assertTrue(self.transport.disconnected)


class AddressTests(SessionTestCase):
    def test_dotted_address_without_at_is_rejected_quickly(self) -> None:
        self.send(b"EHLO c\r\n")
        replies = self.send(b"MAIL FROM:<" + b"a." * 200 + b"a>\r\n")
        self.assertEqual(replies, [b"501 5.1.7 Bad sender address syntax"])

    def test_dotted_address_is_accepted(self) -> None:
        self.send(b"EHLO c\r\n")
        replies = self.send(b"MAIL FROM:<first.last.x@mail.example.com>\r\n")
        self.assertEqual(replies, [b"250 2.1.0 Sender OK"])

    def test_quoted_local_part(self) -> None:
        self.send(b"EHLO c\r\n")
        self.assertEqual(
            self.send(b'MAIL FROM:<"john doe"@example.com>\r\n'),
            [b"250 2.1.0 Sender OK"],
        )
        self.send(b"RCPT TO:<target@example.com>\r\nDATA\r\nx\r\n.\r\n")
        self.assertEqual(
            self.sink.messages[0].envelope.sender, '"john doe"@example.com'
        )


# The parts on their own


def delivery_factory(sink: RecordingSink, **overrides: Any) -> MailLaserDeliveryFactory:
    settings: dict[str, Any] = dict(
        sink=sink, targets=TARGETS, max_recipients=5, hostname="mx.test", clock=Clock()
    )
    settings.update(overrides)
    return MailLaserDeliveryFactory(**settings)


class InterfaceTests(SynchronousTestCase):
    def test_providers(self) -> None:
        factory = delivery_factory(RecordingSink())
        delivery = factory.getMessageDelivery()
        self.assertTrue(verifyObject(IMessageDeliveryFactory, factory))
        self.assertTrue(verifyObject(IMessageDelivery, delivery))
        message = AcceptedMessage(
            sink=RecordingSink(),
            message_id="msg_1",
            envelope=Envelope("a@b.test", ("target@example.com",)),
            clock=Clock(),
        )
        self.assertTrue(verifyObject(IMessageSMTP, message))
        self.assertTrue(verifyObject(IMessageSMTP, message.follower()))

    def test_one_delivery_per_transaction(self) -> None:
        factory = delivery_factory(RecordingSink())
        self.assertIsNot(factory.getMessageDelivery(), factory.getMessageDelivery())
        self.assertIsInstance(factory.getMessageDelivery(), MailLaserDelivery)


class AcceptedMessageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sink = RecordingSink()
        self.leader = AcceptedMessage(
            sink=self.sink,
            message_id="msg_1",
            envelope=Envelope("a@b.test", ("x@y.test", "z@y.test")),
            clock=Clock(),
        )

    def test_followers_fire_with_the_leaders_outcome_on_their_own_deferreds(
        self,
    ) -> None:
        pending: Deferred[None] = Deferred()
        self.sink.result = pending
        follower = self.leader.follower()
        for line in (b"Subject: x", b"", b"body"):
            self.leader.lineReceived(line)
            follower.lineReceived(line)
        early = follower.eomReceived()
        mine = self.leader.eomReceived()
        late = follower.eomReceived()
        self.assertEqual(len({id(early), id(mine), id(late)}), 3)
        self.assertNoResult(early)
        pending.callback(None)
        reply = b"2.0.0 Ok: queued as msg_1"
        self.assertEqual(
            [self.successResultOf(d) for d in (early, mine, late)], [reply] * 3
        )
        [message] = self.sink.messages
        self.assertEqual(message.raw, b"Subject: x\r\n\r\nbody\r\n")

    def test_refusal_reaches_every_follower(self) -> None:
        self.sink.result = fail(Refusal(451, "4.4.1", "Webhook unavailable"))
        follower = self.leader.follower()
        results = [self.leader.eomReceived(), follower.eomReceived()]
        for d in results:
            error = self.failureResultOf(d, SMTPServerError).value
            self.assertEqual(
                (error.code, error.resp), (451, b"4.4.1 Webhook unavailable")
            )

    def test_lost_connection_drops_the_content(self) -> None:
        self.leader.write(b"Subject: x\r\n")
        self.leader.connectionLost()
        self.successResultOf(self.leader.eomReceived())
        self.assertEqual(self.sink.messages[0].raw, b"")


class DeliveryTests(SynchronousTestCase):
    def test_refusal_at_mail_from_keeps_its_code(self) -> None:
        sink = RecordingSink()
        sink.capacity = Refusal(451, "4.3.0", "Delivery worker not ready")
        delivery = delivery_factory(sink).getMessageDelivery()
        with self.assertRaises(SMTPServerError) as caught:
            delivery.validateFrom((b"c", b"192.0.2.1"), object())  # type: ignore[arg-type]
        self.assertEqual(
            (caught.exception.code, caught.exception.resp),
            (451, "4.3.0 Delivery worker not ready"),
        )

    def test_message_id_before_any_data(self) -> None:
        clock = Clock()
        clock.advance(2)
        delivery = delivery_factory(RecordingSink(), clock=clock).getMessageDelivery()
        delivery.validateFrom((None, "192.0.2.1"), object())  # type: ignore[arg-type]
        self.assertTrue(delivery.message_id.startswith("msg_0000000007d0"))


class BulkDataTests(SynchronousTestCase):
    """The bulk reader's own bounds, which the sessions above cannot see."""

    def test_oversized_content_is_dropped_as_it_arrives(self) -> None:
        written: list[bytes] = []
        reader = BulkData(written.append, max_size=1000, max_line=100)
        for piece in chunks((b"y" * 98 + b"\r\n") * 200, 7):
            self.assertIsNone(reader.feed(piece))
        self.assertEqual(
            reader.error, (552, b"5.3.4 Message size exceeds fixed maximum")
        )
        self.assertLessEqual(reader.held, 4)
        self.assertEqual(reader.feed(b"\r\n.\r\nNOOP\r\n"), b"NOOP\r\n")

    def test_incomplete_line_is_all_that_is_held(self) -> None:
        written: list[bytes] = []
        reader = BulkData(written.append, max_size=10**6, max_line=100)
        reader.feed(b"Subject: x\r\n\r\n" + b"z" * 90)
        self.assertEqual(reader.held, 92)
        self.assertEqual(b"".join(written), b"Subject: x\r\n")
        reader.feed(b"\r\n.\r\n")
        self.assertEqual(b"".join(written), b"Subject: x\r\n\r\n" + b"z" * 90 + b"\r\n")
