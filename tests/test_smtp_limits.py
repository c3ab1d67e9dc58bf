"""
Slow, greedy and abusive clients (issue 15): command lines timed from their
first byte, a minimum DATA rate, the TLS handshake's deadline, the budget
of message bytes in flight, the cap on unknown recipients, bare line ends
in DATA, and content sent before C{354}.

In memory with a Clock first; then the slowloris and a ClientHello in
pieces over real sockets.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import ssl
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import directlyProvides

from maillaser.smtp import tls_context
from maillaser.smtp._data import BulkData
from tests.helpers import RawClient, connect_raw
from tests.test_smtp import SlowSink
from tests.test_smtp_helpers import (
    RecordingSink,
    Session,
    TLSStringTransport,
    listen,
    make_factory,
)
from tests.test_smtp_hostile import exchange

QUEUED = rb"^250 2\.0\.0 Ok: queued as msg_[0-9a-f]{28}$"
ENVELOPE = b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<target@example.com>\r\n"
IDLE = b"421 4.4.2 mx.test Idle timeout, closing"
SLOW_DATA = b"421 4.4.2 mx.test Data rate too low, closing"
NO_ROOM = b"452 4.3.1 Insufficient system storage, try again later"
BARE = b"550 5.5.2 Bare CR or LF in message, use CRLF"
IMPROPER = b"554 5.5.0 Improper command pipelining after DATA"


class LimitTestCase(SynchronousTestCase):
    bulk = True

    def setUp(self) -> None:
        self.clock = Clock()
        self.sink = RecordingSink()

    def session(self, **overrides: Any) -> Session:
        factory = make_factory(self.sink, self.clock, **overrides)
        self.factory = factory
        return Session(factory, bulk=self.bulk)

    def start_data(self, session: Session, mail_parameters: bytes = b"") -> None:
        session.send(ENVELOPE.replace(b"<a@b.test>", b"<a@b.test>" + mail_parameters))
        self.assertEqual(session.send(b"DATA\r\n")[0][:3], b"354")


class CommandLineTimeoutTests(LimitTestCase):
    def test_timeout_counts_from_the_first_byte_of_a_line(self) -> None:
        """Idle for most of the timeout, then a line that takes a while."""
        session = self.session(timeout=300)
        self.clock.advance(299)
        session.send(b"NO")
        self.clock.advance(200)
        self.assertEqual(session.send(b"OP\r\n"), [b"250 2.0.0 OK"])
        self.assertFalse(session.transport.disconnecting)

    def test_bytes_of_a_line_do_not_reset_the_timer(self) -> None:
        session = self.session(timeout=300)
        session.transport.clear()
        for byte in b"NOOP":
            session.protocol.dataReceived(bytes([byte]))
            self.clock.advance(99)
        self.assertEqual(session.output(), [IDLE])
        self.assertTrue(session.transport.disconnecting)

    def test_a_slow_line_after_pipelined_ones(self) -> None:
        """A line begun in the chunk that ended another is timed from then."""
        session = self.session(timeout=300)
        session.send(b"NOOP\r\nNO")
        self.clock.advance(299)
        session.send(b"O")
        self.clock.advance(1)
        self.assertEqual(session.output(), [IDLE])


class DataRateTests(LimitTestCase):
    def trickle(self, session: Session, chunk: bytes, seconds: int) -> None:
        for _ in range(seconds):
            session.protocol.dataReceived(chunk)
            self.clock.advance(1)

    def test_a_trickle_is_cut_after_the_grace(self) -> None:
        session = self.session(min_data_rate=1000, max_message_size=10**6)
        self.start_data(session)
        session.transport.clear()
        self.trickle(session, b"x" * 99 + b"\n", 12)
        self.assertEqual(session.output(), [SLOW_DATA])
        self.assertTrue(session.transport.disconnecting)
        self.assertEqual(self.sink.messages, [])
        session.protocol.connectionLost()
        self.assertEqual(self.factory.inflight_bytes, 0)

    def test_a_slow_start_then_the_whole_message(self) -> None:
        """A small message is not judged on a late first packet."""
        session = self.session(min_data_rate=1000)
        self.start_data(session)
        self.clock.advance(9.5)
        replies = session.send(b"Subject: late\r\n\r\n" + b"y" * 5000 + b"\r\n.\r\n")
        self.assertRegex(replies[-1], QUEUED)

    def test_a_steady_rate_above_the_minimum(self) -> None:
        session = self.session(min_data_rate=1000, max_message_size=10**6)
        self.start_data(session)
        self.trickle(session, b"z" * 1198 + b"\r\n", 120)
        self.assertFalse(session.transport.disconnecting)
        self.assertRegex(session.send(b".\r\n")[-1], QUEUED)
        # The check stopped with DATA: an idle session is the timeout's.
        self.clock.advance(299)
        self.assertFalse(session.transport.disconnecting)

    def test_zero_turns_it_off(self) -> None:
        session = self.session(min_data_rate=0, max_message_size=10**6)
        self.start_data(session)
        self.trickle(session, b"x\r\n", 200)
        self.assertRegex(session.send(b".\r\n")[-1], QUEUED)


class LineDataRateTests(DataRateTests):
    bulk = False


class HandshakeTimeoutTests(LimitTestCase):
    def starttls(self) -> Session:
        factory = make_factory(self.sink, self.clock)
        factory.tls_context = object()  # type: ignore[assignment]
        session = Session(factory, transport=TLSStringTransport())
        self.assertEqual(session.send(b"EHLO c\r\nSTARTTLS\r\n")[-1][:3], b"220")
        return session

    def test_an_unfinished_handshake_is_cut(self) -> None:
        session = self.starttls()
        self.clock.advance(29.9)
        self.assertFalse(session.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(session.transport.disconnecting)
        self.assertIn(
            b"421 4.4.2 mx.test TLS handshake timeout, closing", session.output()
        )

    def test_a_finished_handshake_is_not(self) -> None:
        session = self.starttls()
        session.protocol.handshakeCompleted()
        self.clock.advance(31)
        self.assertFalse(session.transport.disconnecting)


class ImplicitTLSHandshakeTests(LimitTestCase):
    def test_the_deadline_starts_with_the_connection(self) -> None:
        """On an ssl: endpoint the handshake comes first, with the same deadline."""
        transport = StringTransport()
        directlyProvides(transport, ISSLTransport)
        session = Session(make_factory(self.sink, self.clock), transport=transport)
        self.clock.advance(29.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertTrue(session.protocol.startedTLS)


class InflightBudgetTests(LimitTestCase):
    def test_declared_sizes_are_reserved_at_data(self) -> None:
        first = self.session(max_inflight_bytes=3000)
        second = Session(self.factory, "192.0.2.2")
        self.start_data(first, b" SIZE=2500")
        second.send(ENVELOPE.replace(b"<a@b.test>", b"<a@b.test> SIZE=1000"))
        self.assertEqual(second.send(b"DATA\r\n"), [NO_ROOM])
        self.assertFalse(second.transport.disconnecting)
        self.assertRegex(first.send(b"x\r\n.\r\n")[-1], QUEUED)
        self.assertEqual(self.factory.inflight_bytes, 0)
        second.send(
            b"MAIL FROM:<a@b.test> SIZE=1000\r\nRCPT TO:<target@example.com>\r\n"
        )
        self.assertEqual(second.send(b"DATA\r\n")[0][:3], b"354")

    def test_undeclared_content_past_the_budget_is_refused_at_the_dot(self) -> None:
        first = self.session(max_inflight_bytes=3000)
        second = Session(self.factory, "192.0.2.2")
        self.start_data(first)
        self.start_data(second)
        first.send(b"a" * 1998 + b"\r\n")
        second.send(b"b" * 1998 + b"\r\n")
        self.assertEqual(second.send(b".\r\n"), [NO_ROOM])
        self.assertRegex(first.send(b".\r\n")[-1], QUEUED)
        [message] = self.sink.messages
        self.assertIn(b"a" * 1998, message.raw)
        self.assertEqual(self.factory.inflight_bytes, 0)

    def test_acknowledged_messages_are_unaffected(self) -> None:
        """A message waiting for the sink keeps its bytes counted, and its 250."""
        self.sink = SlowSink()
        first = self.session(max_inflight_bytes=3000)
        second = Session(self.factory, "192.0.2.2")
        self.start_data(first)
        first.send(b"a" * 2500 + b"\r\n.\r\n")
        second.send(ENVELOPE)
        self.assertEqual(second.send(b"DATA\r\n")[0][:3], b"354")
        self.assertEqual(second.send(b"b" * 998 + b"\r\n.\r\n"), [NO_ROOM])
        self.sink.waiting[0].callback(None)
        self.assertRegex(first.output()[-1], QUEUED)
        self.assertEqual(self.factory.inflight_bytes, 0)

    def test_a_refused_message_takes_no_more(self) -> None:
        first = self.session(max_inflight_bytes=3000)
        second = Session(self.factory, "192.0.2.2")
        self.start_data(first, b" SIZE=2000")
        self.start_data(second)
        second.send(b"b" * 1498 + b"\r\n")  # past the budget: refused
        self.assertRegex(first.send(b"x\r\n.\r\n")[-1], QUEUED)
        second.send(b"c" * 98 + b"\r\n")
        self.assertEqual(self.factory.inflight_bytes, 0)
        self.assertEqual(second.send(b".\r\n"), [NO_ROOM])

    def test_a_lost_connection_gives_its_bytes_back(self) -> None:
        session = self.session(max_inflight_bytes=3000)
        self.start_data(session, b" SIZE=2000")
        session.send(b"a" * 500 + b"\r\n")
        self.assertGreater(self.factory.inflight_bytes, 0)
        session.protocol.connectionLost()
        self.assertEqual(self.factory.inflight_bytes, 0)


class LineInflightBudgetTests(InflightBudgetTests):
    bulk = False


class UnknownRecipientTests(LimitTestCase):
    def test_past_the_limit_the_session_ends(self) -> None:
        session = self.session(max_unknown_recipients=3)
        session.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
        unknown = b"".join(b"RCPT TO:<n%d@example.com>\r\n" % n for n in range(5))
        replies = session.send(unknown)
        self.assertEqual(
            replies,
            [b"550 5.1.1 No such user here"] * 4
            + [b"421 4.7.0 Too many unknown recipients, closing"],
        )
        self.assertTrue(session.transport.disconnecting)

    def test_the_default_is_twenty(self) -> None:
        session = self.session()
        self.assertEqual(self.factory.max_unknown_recipients, 20)
        session.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
        for n in range(20):
            session.send(b"RCPT TO:<n%d@example.com>\r\n" % n)
        self.assertFalse(session.transport.disconnecting)
        self.assertEqual(
            session.send(b"RCPT TO:<last@example.com>\r\n")[-1][:3], b"421"
        )

    def test_only_ascii_case_is_ignored(self) -> None:
        """U+017F (long s) folds to "s" under casefold; it is not a target."""
        session = self.session(targets=("alerts@example.com",))
        session.send(b"EHLO c\r\nMAIL FROM:<a@b.test> SMTPUTF8\r\n")
        self.assertEqual(
            session.send("RCPT TO:<alert\u017f@example.com>\r\n".encode()),
            [b"550 5.1.1 No such user here"],
        )
        self.assertEqual(
            session.send(b"RCPT TO:<ALERTS@Example.COM>\r\n"),
            [b"250 2.1.5 Recipient OK"],
        )


class BareNewlineTests(LimitTestCase):
    def test_normalized_by_default(self) -> None:
        session = self.session()
        self.start_data(session)
        session.send(b"Subject: a\nX-Hidden: b\r\n\r\nline\rone\n..two\r\n.\r\n")
        [message] = self.sink.messages
        self.assertTrue(
            message.raw.endswith(
                b"Subject: a\r\nX-Hidden: b\r\n\r\nline\r\none\r\n..two\r\n"
            )
        )

    def test_rejected_at_the_dot_and_the_session_goes_on(self) -> None:
        session = self.session(bare_newline="reject")
        self.start_data(session)
        self.assertEqual(session.send(b"Subject: a\nX: b\r\n\r\nx\r\n.\r\n"), [BARE])
        self.assertEqual(self.sink.messages, [])
        self.start_data(session)
        self.assertRegex(session.send(b"Subject: ok\r\n\r\nx\r\n.\r\n")[-1], QUEUED)

    def test_rejected_cr(self) -> None:
        session = self.session(bare_newline="reject")
        self.start_data(session)
        self.assertEqual(session.send(b"x\ry\r\n.\r\n"), [BARE])


class LineBareNewlineTests(BareNewlineTests):
    bulk = False


class EarlyContentTests(LimitTestCase):
    def test_content_with_data_is_improper_pipelining(self) -> None:
        session = self.session()
        replies = session.send_at_once(ENVELOPE + b"DATA\r\nSubject: x\r\n\r\n.\r\n")
        self.assertEqual(replies[-1], IMPROPER)
        self.assertTrue(session.transport.disconnecting)
        self.assertEqual(self.sink.messages, [])

    def test_even_when_data_is_refused(self) -> None:
        """Content after a refused DATA would otherwise run as commands."""
        session = self.session()
        replies = session.send_at_once(
            b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nDATA\r\nRSET\r\n"
        )
        self.assertEqual(replies[-1], IMPROPER)

    def test_data_ending_a_pipelined_group_is_fine(self) -> None:
        session = self.session()
        replies = session.send_at_once(ENVELOPE + b"DATA\r\n")
        self.assertEqual(replies[-1][:3], b"354")
        self.assertRegex(session.send_at_once(b"x\r\n.\r\nNOOP\r\n")[0], QUEUED)


class LineEarlyContentTests(EarlyContentTests):
    bulk = False


# Normalisation under Hypothesis: against a model of RFC 5321 DATA.

_pieces = st.lists(
    st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"a", b"\r\n.", b":"]),
    max_size=40,
).map(b"".join)


def model(content: bytes) -> bytes:
    """What DATA with C{content} then CRLF.CRLF must store: lines split on
    CRLF, dot-unstuffed, then each bare CR or LF made a CRLF."""
    lines = content.split(b"\r\n")
    unstuffed = [line[1:] if line.startswith(b".") else line for line in lines]
    return b"\r\n".join(re.sub(rb"\r|\n", b"\r\n", line) for line in unstuffed) + (
        b"\r\n"
    )


class NormalisationFuzzTests(SynchronousTestCase):
    @settings(
        max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(_pieces, st.lists(st.integers(1, 7), min_size=1, max_size=5))
    def test_normalised_content(self, content: bytes, sizes: list[int]) -> None:
        content = b"Subject: s\r\n\r\n" + content + b"\r\nend"
        assume(b"\r\n.\r\n" not in content)  # the end of DATA, not content
        written: list[bytes] = []
        reader = BulkData(written.append, max_size=10**6, max_line=10**6)
        data = content + b"\r\n.\r\nNOOP\r\n"
        rest, start, n = None, 0, 0
        while rest is None:
            size = sizes[n % len(sizes)]
            rest = reader.feed(data[start : start + size])
            start, n = start + size, n + 1
        stored = b"".join(written)
        self.assertEqual(rest + data[start:], b"NOOP\r\n")
        self.assertIsNone(reader.error)
        self.assertEqual(stored, model(content))
        self.assertEqual(stored.count(b"\r"), stored.count(b"\r\n"))
        self.assertEqual(stored.count(b"\n"), stored.count(b"\r\n"))


# Over real sockets.


class SlowlorisTests(TestCase):
    async def drip(
        self, client: RawClient, data: bytes, size: int, every: float
    ) -> float:
        """
        Send C{data} C{size} bytes every C{every} seconds until the server
        closes; how long that took from the first piece.
        """
        pieces = iter([data[i : i + size] for i in range(0, len(data), size)])

        def send() -> None:
            piece = next(pieces, None)
            if piece is not None and not client.is_closed:
                client.send(piece)

        dripping = LoopingCall(send)
        dripping.clock = reactor
        started = reactor.seconds()
        dripping.start(every)
        try:
            await client.wait_closed(timeout=10)
        finally:
            if dripping.running:
                dripping.stop()
        return reactor.seconds() - started

    async def test_one_byte_at_a_time_is_cut(self) -> None:
        """
        A command sent a byte every 200 ms, against a 1 s timeout: cut
        within the timeout of its first byte, not kept alive by each byte.
        """
        server = await listen(self, timeout=1.0)
        client = await connect_raw(self, server.port)
        took = await self.drip(client, b"EHLO slowloris.example\r\n", 1, 0.2)
        self.assertEqual(client.replies()[-1], IDLE)
        self.assertGreaterEqual(took, 0.9)
        self.assertLess(took, 3.0)
        await server.sessions_gone()

    async def test_data_one_byte_at_a_time_is_cut(self) -> None:
        """
        DATA a byte every 200 ms against 100 bytes/s after a 0.5 s grace:
        each byte used to restart the idle timer, which held the slot for
        as long as the client liked.
        """
        server = await listen(self, timeout=1.0, min_data_rate=100)
        self.patch(server.factory.protocol, "data_rate_grace", 0.5)
        client = await connect_raw(self, server.port)
        replies = await exchange(client, ENVELOPE + b"DATA\r\n", 4)
        self.assertEqual(replies[-1][:3], b"354")
        took = await self.drip(client, b"x" * 1000, 1, 0.2)
        self.assertEqual(client.replies()[-1], SLOW_DATA)
        self.assertLess(took, 3.0)
        self.assertEqual(server.sink.messages, [])
        await server.sessions_gone()
        self.assertEqual(server.factory.inflight_bytes, 0)

    async def test_client_hello_in_pieces_is_cut(self) -> None:
        """STARTTLS, then a ClientHello 3 bytes every 100 ms: cut at the
        handshake's deadline."""
        server = await listen(self, tls_context=tls_context(None, None, "mx.test"))
        self.patch(server.factory.protocol, "handshake_timeout", 1.0)
        client = await connect_raw(self, server.port)
        replies = await exchange(client, b"EHLO c\r\nSTARTTLS\r\n", 2)
        self.assertEqual(replies[-1][:3], b"220")
        hello = client_hello()
        self.assertGreater(len(hello), 3 * 30)  # still coming at the deadline
        took = await self.drip(client, hello, 3, 0.1)
        self.assertGreaterEqual(took, 0.5)  # the deadline began at STARTTLS
        self.assertLess(took, 3.0)
        await server.sessions_gone()


class HandshakeListenerTests(TestCase):
    async def test_a_real_handshake_stops_the_deadline(self) -> None:
        """Twisted's TLS layer tells the session (IHandshakeListener)."""
        server = await listen(self, tls_context=tls_context(None, None, "mx.test"))
        client = await deferToThread(starttls_client, server.port)
        self.addCleanup(deferToThread, client.close)
        [session] = server.factory.sessions
        self.assertTrue(session.startedTLS)
        self.assertIsNone(session._deadline)
        self.assertEqual((await deferToThread(client.noop))[0], 250)


def starttls_client(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="c.test", timeout=10)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client.starttls(context=context)
    client.ehlo()
    return client


def client_hello() -> bytes:
    """The first flight of a real TLS client."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="mx.test")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()
