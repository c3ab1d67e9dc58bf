"""
The SMTP session in memory: every reply, limit and state change, driven
through a StringTransport with a Clock.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from maillaser.interfaces import IMessageSink
from maillaser.message import Message, Refusal
from maillaser.smtp import CLOSE_GRACE, MAX_DATA_LINE, SMTPServerFactory, SMTPSession
from tests.helpers import REPLY_LINE

TARGETS = ["target@example.com", "Second@Example.com", "third@example.com"]


@implementer(IMessageSink)
class RecordingSink:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.result: Deferred[None] | None = None
        self.capacity: Refusal | None = None

    def check_capacity(self) -> None:
        if self.capacity is not None:
            raise self.capacity

    def receive(self, message: Message) -> Deferred[None]:
        self.messages.append(message)
        return self.result if self.result is not None else succeed(None)


def make_factory(
    sink: RecordingSink, clock: Clock, **overrides: object
) -> SMTPServerFactory:
    settings: dict[str, object] = dict(
        sink=sink,
        clock=clock,
        hostname="mx.test",
        targets=TARGETS,
        max_message_size=10_000,
        max_recipients=2,
        timeout=300,
        max_connections=3,
        max_connections_per_ip=2,
    )
    settings.update(overrides)
    return SMTPServerFactory(**settings)  # type: ignore[arg-type]


class SessionTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sink = RecordingSink()
        self.factory = make_factory(self.sink, self.clock)
        self.session, self.transport = self.connect()

    def connect(self, host: str = "192.0.2.1") -> tuple[SMTPSession, StringTransport]:
        session = self.factory.buildProtocol(IPv4Address("TCP", host, 40000))
        assert isinstance(session, SMTPSession)
        transport = StringTransport(
            peerAddress=IPv4Address("TCP", host, 40000),
            hostAddress=IPv4Address("TCP", "127.0.0.1", 2525),
        )
        session.makeConnection(transport)
        return session, transport

    def send(self, data: bytes, session: SMTPSession | None = None) -> list[bytes]:
        """Feed C{data}; return the reply lines it produced."""
        transport = self.transport if session is None else session.transport
        assert isinstance(transport, StringTransport)  # as connect() made it
        transport.clear()
        (session or self.session).dataReceived(data)
        written: bytes = transport.value()
        return written.splitlines()

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

    def test_helo(self) -> None:
        self.assertEqual(self.send(b"HELO client.test\r\n"), [b"250 mx.test"])

    def test_ehlo_needs_a_domain(self) -> None:
        self.assertEqual(self.send(b"EHLO\r\n"), [b"501 5.5.4 Syntax: EHLO hostname"])

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
        self.assertTrue(
            message.raw.startswith(b"Received: from client.test ([192.0.2.1])\r\n")
        )
        self.assertIn(
            b"by mx.test (MailLaser) with ESMTP id " + message.id.encode(), message.raw
        )
        self.assertTrue(message.raw.endswith(b"Subject: hi\r\n\r\nbody\r\n.dot\r\n"))
        self.assertRegex(message.id, r"^msg_[0-9a-f]{28}$")

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
        self.assertEqual(
            self.sink.messages[0].envelope.recipients,
            ("second@example.com", "Target@Example.com"),
        )

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
        self.assertEqual(self.send(b"MAIL FROM <a@b.test>\r\n")[0][:3], b"501")
        self.send(b"MAIL FROM:<a@b.test>\r\n")
        self.assertEqual(
            self.send(b"RCPT TO:<>\r\n"), [b"501 5.1.3 Bad recipient address syntax"]
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
        self.assertEqual(
            self.send(b"AUTH PLAIN\r\n"), [b"502 5.5.1 Command not implemented"]
        )
        self.assertEqual(self.send(b"\r\n"), [b"500 5.5.2 Command not recognized"])
        self.assertEqual(self.send(b"QUIT\r\n"), [b"221 2.0.0 Bye"])
        self.assertTrue(self.transport.disconnecting)

    def test_starttls_without_tls_transport(self) -> None:
        self.send(b"EHLO c\r\n")
        self.assertEqual(self.send(b"STARTTLS\r\n"), [b"454 4.7.0 TLS not available"])


class DataTests(SessionTestCase):
    def test_only_crlf_dot_crlf_ends_data(self) -> None:
        replies = self.deliver(b"a\n.\nb\r\n.\nc\n.\r\n")
        self.assertEqual(replies, [])
        self.send(b"\r\n.\r\n")
        self.assertTrue(
            self.sink.messages[0].raw.endswith(b"a\n.\nb\r\n\nc\n.\r\n\r\n")
        )

    def test_empty_message(self) -> None:
        self.deliver(b".\r\n")
        raw = self.sink.messages[0].raw
        self.assertRegex(raw[raw.index(b";\r\n\t") :], rb"^;\r\n\t[^\r\n]+\r\n$")

    def test_end_marker_split_across_chunks(self) -> None:
        self.deliver(b"hello\r")
        for piece in (b"\n", b".", b"\r", b"\n"):
            self.assertEqual(self.sink.messages, [])
            self.send(piece)
        self.assertTrue(self.sink.messages[0].raw.endswith(b"\r\nhello\r\n"))

    def test_eight_bit_bytes_pass_through(self) -> None:
        body = b"Subject: caf\xe9\r\n\r\n\xff\xfe\x00 na\xefve\r\n"
        self.deliver(body + b".\r\n")
        self.assertTrue(self.sink.messages[0].raw.endswith(body))

    def test_oversized_message_552_and_session_usable(self) -> None:
        replies = self.deliver(b"x" * 60 + b"\r\n")
        for _ in range(200):
            self.send(b"y" * 98 + b"\r\n")
        self.assertLess(len(self.session._data), 20_000)
        replies = self.send(b".\r\n")
        self.assertEqual(replies, [b"552 5.3.4 Message size exceeds fixed maximum"])
        self.assertEqual(self.sink.messages, [])
        self.deliver(b"small\r\n.\r\n")
        self.assertEqual(len(self.sink.messages), 1)

    def test_size_parameter_over_the_limit(self) -> None:
        self.send(b"EHLO c\r\n")
        self.assertEqual(
            self.send(b"MAIL FROM:<a@b.test> SIZE=10001\r\n"),
            [b"552 5.3.4 Message size exceeds fixed maximum"],
        )
        self.assertEqual(
            self.send(b"MAIL FROM:<a@b.test> SIZE=10000 BODY=8BITMIME\r\n"),
            [b"250 2.1.0 Sender OK"],
        )

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

    def test_unknown_mail_parameter(self) -> None:
        self.send(b"EHLO c\r\n")
        self.assertEqual(
            self.send(b"MAIL FROM:<a@b.test> RET=FULL\r\n"),
            [b"555 5.5.4 Unsupported parameter RET"],
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
            b"a\r\n" + b"x" * (MAX_DATA_LINE + 10) + b"\r\nb\r\n.\r\n"
        )
        self.assertEqual(replies, [b"500 5.5.2 Line too long"])

    def test_line_at_the_limit_is_fine(self) -> None:
        self.factory.max_message_size = 1_000_000
        self.deliver(b"x" * MAX_DATA_LINE + b"\r\n.\r\n")
        self.assertEqual(len(self.sink.messages), 1)


class CommandLineTests(SessionTestCase):
    def test_command_line_too_long(self) -> None:
        self.assertEqual(
            self.send(b"NOOP " + b"x" * 600 + b"\r\n"), [b"500 5.5.2 Line too long"]
        )
        self.assertEqual(self.send(b"NOOP\r\n"), [b"250 2.0.0 OK"])

    def test_line_that_never_ends_does_not_grow_memory(self) -> None:
        self.send(b"x" * 1000)
        for _ in range(100):
            self.send(b"x" * 10_000)
        self.assertLess(len(self.session._buffer), 1000)
        self.assertEqual(self.send(b"\r\nNOOP\r\n"), [b"250 2.0.0 OK"])

    def test_too_many_errors(self) -> None:
        replies = self.send(b"BOGUS\r\n" * 25)
        self.assertEqual(replies[-1], b"421 4.7.0 Too many errors, closing")
        self.assertEqual(len(replies), 21)
        self.assertTrue(self.transport.disconnecting)

    def test_refused_recipients_are_not_errors(self) -> None:
        unknown = b"".join(b"RCPT TO:<nobody%d@x.test>\r\n" % n for n in range(30))
        replies = self.send(
            b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n"
            + unknown
            + b"RCPT TO:<target@example.com>\r\nDATA\r\nx\r\n.\r\n"
        )
        self.assertEqual(replies.count(b"550 5.1.1 No such user here"), 30)
        self.assertTrue(replies[-1].startswith(b"250 2.0.0 Ok: queued as msg_"))
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
        lines = self.transport.value().splitlines()
        self.assertEqual([line[:3] for line in lines], [b"250", b"250"])
        self.assertEqual(self.transport.producerState, "producing")

    def test_many_pipelined_messages_do_not_recurse(self) -> None:
        self.factory.max_recipients = 5
        self.send(b"EHLO c\r\n")
        one = (
            b"MAIL FROM:<a@b.test>\r\nRCPT TO:<target@example.com>\r\n"
            b"DATA\r\nx\r\n.\r\n"
        )
        self.send(one * 3000)
        self.assertEqual(len(self.sink.messages), 3000)


class RefusalTests(SessionTestCase):
    def test_sink_refusal_is_the_reply(self) -> None:
        self.sink.result = fail(Refusal(550, "5.6.0", "Rejected: spam"))
        self.assertEqual(self.deliver(b"x\r\n.\r\n"), [b"550 5.6.0 Rejected: spam"])

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

    def test_no_timeout_while_the_sink_works(self) -> None:
        self.sink.result = Deferred()
        self.deliver(b"x\r\n.\r\n")
        self.clock.advance(10_000)
        self.assertFalse(self.transport.disconnecting)

    def test_per_address_cap(self) -> None:
        second, _ = self.connect()
        _third, transport = self.connect()
        self.assertEqual(
            transport.value(), b"421 4.7.0 mx.test Too many connections from you\r\n"
        )
        self.assertTrue(transport.disconnecting)
        second.connectionLost()
        _fourth, transport = self.connect()
        self.assertTrue(transport.value().startswith(b"220 "))

    def test_global_cap(self) -> None:
        self.connect("192.0.2.2")
        self.connect("192.0.2.3")
        _, transport = self.connect("192.0.2.4")
        self.assertEqual(
            transport.value(), b"421 4.7.0 mx.test Too many connections, try later\r\n"
        )


class DrainTests(SessionTestCase):
    def test_idle_sessions_are_told_421(self) -> None:
        d = self.factory.drain(5)
        self.assertEqual(
            self.transport.value().splitlines()[-1],
            b"421 4.3.2 mx.test Service shutting down",
        )
        self.successResultOf(d)

    def test_data_in_progress_may_finish(self) -> None:
        self.deliver(b"partial\r\n")
        d = self.factory.drain(5)
        self.assertNoResult(d)
        replies = self.send(b".\r\n")
        self.assertEqual(replies[0][:3], b"250")
        self.assertEqual(replies[1], b"421 4.3.2 mx.test Service shutting down")
        self.session.connectionLost()
        self.successResultOf(d)

    def test_grace_period_ends(self) -> None:
        self.deliver(b"partial\r\n")
        d = self.factory.drain(5)
        self.clock.advance(5)
        self.successResultOf(d)
        self.assertEqual(
            self.transport.value().splitlines()[-1],
            b"421 4.3.2 mx.test Service shutting down",
        )
        self.assertEqual(self.sink.messages, [])

    def test_new_connections_refused_while_draining(self) -> None:
        self.factory.drain(5)
        _, transport = self.connect("192.0.2.9")
        self.assertEqual(
            transport.value(), b"421 4.3.2 mx.test Service shutting down\r\n"
        )


_commands = st.sampled_from(
    [
        b"EHLO c",
        b"HELO c",
        b"MAIL FROM:<a@b.test>",
        b"MAIL FROM:<>",
        b"MAIL FROM:<x",
        b"RCPT TO:<target@example.com>",
        b"RCPT TO:<bad@x.test>",
        b"RCPT TO:",
        b"DATA",
        b"RSET",
        b"NOOP",
        b"VRFY x",
        b"HELP",
        b"STARTTLS",
        b".",
        b"..",
        b"",
        b"QUIT",
        b"MAIL FROM:<a@b.test> SIZE=99999999",
        b"BDAT 10",
        b"\x00\xff\xfe",
    ]
)
_stream = st.lists(
    st.one_of(_commands.map(lambda c: c + b"\r\n"), st.binary(max_size=700)),
    max_size=40,
)


class FuzzTests(SynchronousTestCase):
    @settings(
        max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(_stream, st.integers(min_value=1, max_value=64))
    def test_any_input_gets_well_formed_replies(
        self, pieces: list[bytes], chunk: int
    ) -> None:
        sink = RecordingSink()
        factory = make_factory(sink, Clock(), max_message_size=2000)
        session = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1))
        assert session is not None
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1))
        session.makeConnection(transport)
        data = b"".join(pieces)
        for start in range(0, len(data), chunk):
            session.dataReceived(data[start : start + chunk])
        for line in transport.value().split(b"\r\n")[:-1]:
            self.assertRegex(line, REPLY_LINE)
        self.assertLessEqual(len(session._buffer), 4096)
        if not transport.disconnecting:
            # Finish whatever is half-sent, then the session must still work,
            # unless those last bytes were the error that used up its patience.
            transport.clear()
            session.dataReceived(b"\r\n.\r\n" if session._in_data else b"\r\n")
            session.dataReceived(b"RSET\r\nNOOP\r\n")
            last = transport.value().splitlines()[-1]
            if transport.disconnecting:
                self.assertEqual(last, b"421 4.7.0 Too many errors, closing")
            else:
                self.assertEqual(last, b"250 2.0.0 OK")


class BackPressureTests(SessionTestCase):
    """A client that does not read its replies cannot make us buffer them."""

    def test_full_send_buffer_stops_processing(self) -> None:
        self.session.pauseProducing()  # what the transport does when it is full
        self.assertEqual(self.send(b"NOOP\r\nNOOP\r\n"), [])
        self.transport.clear()
        self.session.resumeProducing()
        self.assertEqual(self.transport.value().splitlines(), [b"250 2.0.0 OK"] * 2)

    def test_reading_stops_only_when_input_piles_up(self) -> None:
        self.session.pauseProducing()
        self.send(b"NOOP\r\n")
        self.assertEqual(self.transport.producerState, "producing")
        self.send(b"NOOP\r\n" * 20_000)
        self.assertEqual(self.transport.producerState, "paused")
        self.session.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")

    def test_closing_on_a_client_that_does_not_read_aborts(self) -> None:
        self.session.pauseProducing()
        self.session.timeoutConnection()
        self.assertTrue(self.transport.disconnected)

    def test_a_polite_close_is_cut_after_the_grace(self) -> None:
        self.send(b"QUIT\r\n")
        self.assertTrue(self.transport.disconnecting)
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
