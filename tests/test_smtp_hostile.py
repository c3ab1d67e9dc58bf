"""
The SMTP side under attack.  On a real bridge over loopback: every limit
crossed and then the session or the server shown to still work, clients
that vanish, lines that never end, thousands of connections, pipelining and
8-bit content from a raw socket.  In memory: valid sessions mutated at
random.
"""

from __future__ import annotations

import gc
import json
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from maillaser.interfaces import IMessageSink
from maillaser.message import Message
from maillaser.smtp import (
    MAX_COMMAND_LINE,
    MAX_DATA_LINE,
    MAX_ERRORS,
    SMTPServerFactory,
    SMTPSession,
)
from tests.helpers import (
    REPLY_LINE,
    TARGET,
    Bridge,
    RawClient,
    connect_raw,
    count_admissions,
    poll,
    settled,
    simple_message,
    start_bridge,
    start_quiet_bridge,
    stop_service,
)

GREETING = b"220 mx.test ESMTP MailLaser"
EHLO_REPLY = [
    b"250-mx.test",
    b"250-PIPELINING",
    b"250-SIZE 10485760",
    b"250-8BITMIME",
    b"250-SMTPUTF8",
    b"250-ENHANCEDSTATUSCODES",
    b"250 STARTTLS",
]
SENDER_OK = b"250 2.1.0 Sender OK"
RECIPIENT_OK = b"250 2.1.5 Recipient OK"
NO_SUCH_USER = b"550 5.1.1 No such user here"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>"
OK = b"250 2.0.0 OK"
BYE = b"221 2.0.0 Bye"
TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum"
LINE_TOO_LONG = b"500 5.5.2 Line too long"
UNKNOWN = b"500 5.5.2 Command not recognized"
QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as (msg_[0-9a-f]{28})$")

EHLO = b"EHLO client.test\r\n"
ENVELOPE = b"MAIL FROM:<sender@test.com>\r\nRCPT TO:<target@example.com>\r\nDATA\r\n"
"""Pipelined up to DATA: three replies, the last C{354}."""

FIVE_MB = 5 * 1024 * 1024
READ_SIZE = tcp.Connection.bufferSize
"""The most a Twisted TCP transport hands its protocol per read."""


def queued_id(reply: bytes) -> str:
    match = QUEUED.match(reply)
    assert match is not None, reply
    return match.group(1).decode()


async def exchange(client: RawClient, data: bytes, count: int) -> list[bytes]:
    """Send C{data}; return the C{count} (or more) replies it brings."""
    before = len(client.replies())
    client.send(data)
    replies = await client.wait_for_replies(before + count)
    return replies[before:]


async def deliver(client: RawClient, subject: bytes, body: bytes = b"x\r\n") -> str:
    """One message to TARGET on an EHLO'd session; returns its queue id."""
    replies = await exchange(client, ENVELOPE, 3)
    assert replies == [SENDER_OK, RECIPIENT_OK, GO_AHEAD], replies
    [reply] = await exchange(
        client, b"Subject: " + subject + b"\r\n\r\n" + body + b".\r\n", 1
    )
    return queued_id(reply)


async def payloads(bridge: Bridge, count: int) -> list[Any]:
    """The JSON of exactly C{count} webhook requests, once all is delivered."""
    return [request.json() for request in await settled(bridge, count)]


async def sessions_gone(bridge: Bridge) -> None:
    await poll(lambda: not bridge.service.smtp_factory.sessions)


class Watch:
    """
    Wraps a live session's C{dataReceived} to record, after every read,
    how many bytes the session holds, how many replies wait to be sent, and
    how many bytes it has read in all.
    """

    def __init__(self, session: SMTPSession) -> None:
        self.read = 0
        self.held: list[int] = []
        self.unsent: list[int] = []
        self._session = session
        self._original = session.dataReceived
        session.dataReceived = self._data_received  # type: ignore[method-assign]

    def _data_received(self, data: bytes) -> None:
        self._original(data)
        self.read += len(data)
        self.held.append(len(self._session._buffer) + len(self._session._data))
        self.unsent.append(unsent(self._session.transport))


def watch_only_session(bridge: Bridge) -> Watch:
    [session] = bridge.service.smtp_factory.sessions
    return Watch(session)


def send_in_chunks(client: RawClient, total: int, chunk: bytes) -> None:
    for _ in range(total // len(chunk)):
        client.send(chunk)


class LimitTests(TestCase):
    """Each limit crossed, then the same session (or the server) still works."""

    async def test_size_parameter_over_the_limit_is_552_at_once(self) -> None:
        bridge = await start_quiet_bridge(self, max_message_size=10_000)
        client = await connect_raw(self, bridge.smtp_port)
        await exchange(client, EHLO, 1)
        self.assertIn(b"250-SIZE 10000", client.lines())
        replies = await exchange(
            client,
            b"MAIL FROM:<sender@test.com> SIZE=10001\r\n"
            b"MAIL FROM:<sender@test.com> SIZE=10000\r\n",
            2,
        )
        self.assertEqual(replies, [TOO_BIG, SENDER_OK])
        replies = await exchange(client, b"RCPT TO:<target@example.com>\r\nDATA\r\n", 2)
        self.assertEqual(replies, [RECIPIENT_OK, GO_AHEAD])
        [reply] = await exchange(client, b"Subject: fits\r\n\r\nx\r\n.\r\n", 1)
        [payload] = await payloads(bridge, 1)
        self.assertEqual(payload["subject"], "fits")
        self.assertEqual(
            bridge.receiver.requests[0].headers["webhook-id"], queued_id(reply)
        )

    async def test_message_over_the_limit_then_one_that_fits(self) -> None:
        bridge = await start_quiet_bridge(self, max_message_size=10_000)
        client = await connect_raw(self, bridge.smtp_port)
        await exchange(client, EHLO, 1)
        self.assertEqual(
            await exchange(client, ENVELOPE, 3), [SENDER_OK, RECIPIENT_OK, GO_AHEAD]
        )
        big = b"Subject: big\r\n\r\n" + b"y" * 98 + b"\r\n"
        client.send(big * 60)  # 6.9 KB: under the limit so far
        replies = await exchange(client, big * 60 + b".\r\n", 1)
        self.assertEqual(replies, [TOO_BIG])
        await deliver(client, b"after")
        [payload] = await payloads(bridge, 1)
        self.assertEqual(payload["subject"], "after")

    async def test_too_many_recipients_is_452_and_the_rest_is_kept(self) -> None:
        bridge = await start_quiet_bridge(self, max_recipients=1)
        client = await connect_raw(self, bridge.smtp_port)
        replies = await exchange(
            client,
            EHLO + b"MAIL FROM:<sender@test.com>\r\nRCPT TO:<target@example.com>\r\n"
            b"RCPT TO:<second@example.com>\r\nDATA\r\n",
            5,
        )
        self.assertEqual(
            replies[-4:],
            [SENDER_OK, RECIPIENT_OK, b"452 4.5.3 Too many recipients", GO_AHEAD],
        )
        await exchange(client, b"Subject: one\r\n\r\nx\r\n.\r\n", 1)
        [payload] = await payloads(bridge, 1)
        self.assertEqual(payload["recipients"], [TARGET])

    async def test_command_line_over_512_bytes(self) -> None:
        bridge = await start_quiet_bridge(self)
        client = await connect_raw(self, bridge.smtp_port)
        at_limit = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 7) + b"\r\n"
        over = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 6) + b"\r\n"
        self.assertEqual((len(at_limit), len(over)), (512, 513))
        replies = await exchange(client, at_limit + over + b"NOOP\r\n", 3)
        self.assertEqual(replies, [OK, LINE_TOO_LONG, OK])

    async def test_data_line_over_64k_is_never_run_as_commands(self) -> None:
        bridge = await start_quiet_bridge(self, max_message_size=1_000_000)
        client = await connect_raw(self, bridge.smtp_port)
        await exchange(client, EHLO, 1)
        await exchange(client, ENVELOPE, 3)
        smuggled = (
            b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<target@example.com>\r\n"
            b"DATA\r\nSubject: smuggled\r\n\r\nQUIT\r\n"
        )
        content = (
            b"Subject: long\r\n\r\n"
            + b"x" * (MAX_DATA_LINE + 1)
            + b"\r\n"
            + smuggled
            + b".\r\n"
        )
        self.assertEqual(await exchange(client, content, 1), [LINE_TOO_LONG])
        # Had any body line run as a command, its reply would come first.
        self.assertEqual(await exchange(client, b"NOOP\r\n", 1), [OK])
        await deliver(client, b"after")
        [payload] = await payloads(bridge, 1)
        self.assertEqual(payload["subject"], "after")

    async def test_idle_timeout_is_421_then_close(self) -> None:
        bridge = await start_quiet_bridge(self, smtp_timeout=0.5)
        started = reactor.seconds()
        client = await connect_raw(self, bridge.smtp_port)
        await client.wait_closed(timeout=5)
        self.assertGreaterEqual(reactor.seconds() - started, 0.5)
        self.assertEqual(
            client.replies(), [GREETING, b"421 4.4.2 mx.test Idle timeout, closing"]
        )
        await sessions_gone(bridge)
        fresh = await connect_raw(self, bridge.smtp_port)
        self.assertEqual(await exchange(fresh, b"NOOP\r\n", 1), [OK])

    async def test_global_connection_cap(self) -> None:
        bridge = await start_quiet_bridge(
            self, max_connections=3, max_connections_per_ip=2
        )
        admitted = [
            await connect_raw(self, bridge.smtp_port, source)
            for source in ("127.0.0.1", "127.0.0.1", "127.0.0.2")
        ]
        extra = await connect_raw(self, bridge.smtp_port, "127.0.0.3")
        await extra.wait_closed()
        self.assertEqual(
            extra.replies(), [b"421 4.7.0 mx.test Too many connections, try later"]
        )
        for client in admitted:
            self.assertEqual(await exchange(client, b"NOOP\r\n", 1), [OK])
        await exchange(admitted[0], b"QUIT\r\n", 1)
        await poll(lambda: len(bridge.service.smtp_factory.sessions) == 2)
        later = await connect_raw(self, bridge.smtp_port, "127.0.0.3")
        self.assertEqual(later.replies(), [GREETING])
        await exchange(later, EHLO, 1)
        await deliver(later, b"after the cap")
        await payloads(bridge, 1)

    async def test_per_address_connection_cap(self) -> None:
        bridge = await start_quiet_bridge(self, max_connections_per_ip=2)
        first = await connect_raw(self, bridge.smtp_port)
        second = await connect_raw(self, bridge.smtp_port)
        extra = await connect_raw(self, bridge.smtp_port)
        await extra.wait_closed()
        self.assertEqual(
            extra.replies(), [b"421 4.7.0 mx.test Too many connections from you"]
        )
        elsewhere = await connect_raw(self, bridge.smtp_port, "127.0.0.2")
        self.assertEqual(elsewhere.replies(), [GREETING])
        self.assertEqual(await exchange(second, b"NOOP\r\n", 1), [OK])
        await exchange(first, EHLO, 1)
        await deliver(first, b"under the cap")
        await payloads(bridge, 1)
        self.assertEqual(
            dict(bridge.service.smtp_factory._per_host),
            {
                "127.0.0.1": 2,
                "127.0.0.2": 1,
            },
        )

    async def test_too_many_errors_is_421_then_close(self) -> None:
        bridge = await start_quiet_bridge(self)
        client = await connect_raw(self, bridge.smtp_port)
        client.send(b"BOGUS\r\n" * (MAX_ERRORS + 5))
        await client.wait_closed()
        self.assertEqual(
            client.replies(),
            [GREETING, *[UNKNOWN] * MAX_ERRORS, b"421 4.7.0 Too many errors, closing"],
        )
        await sessions_gone(bridge)
        fresh = await connect_raw(self, bridge.smtp_port)
        self.assertEqual(await exchange(fresh, b"NOOP\r\n", 1), [OK])


async def server_still_works(bridge: Bridge, delivered: int) -> None:
    """No session is left, and a new message goes through, exactly once."""
    await sessions_gone(bridge)
    result = await bridge.send(simple_message(subject="still working"))
    assert result["code"] == 250, result
    received = await payloads(bridge, delivered + 1)
    assert received[-1]["subject"] == "still working", received
    await sessions_gone(bridge)


class DisconnectTests(TestCase):
    """Clients that vanish: nothing partial is delivered, nothing is left over."""

    async def vanish_mid_data(self, abort: bool) -> None:
        bridge = await start_quiet_bridge(self)
        client = await connect_raw(self, bridge.smtp_port)
        await exchange(client, EHLO + ENVELOPE, 4)
        [session] = bridge.service.smtp_factory.sessions
        client.send(b"Subject: partial\r\n\r\nhalf a bo")
        await poll(lambda: b"half a bo" in session._data)
        if abort:
            await client.abort()
        else:
            client.transport.loseConnection()  # type: ignore[union-attr]
            await client.wait_closed()
        await server_still_works(bridge, delivered=0)

    async def test_client_resets_mid_data(self) -> None:
        await self.vanish_mid_data(abort=True)

    async def test_client_hangs_up_mid_data(self) -> None:
        await self.vanish_mid_data(abort=False)

    async def test_client_vanishes_mid_command(self) -> None:
        bridge = await start_quiet_bridge(self)
        client = await connect_raw(self, bridge.smtp_port)
        await exchange(client, EHLO, 1)
        [session] = bridge.service.smtp_factory.sessions
        client.send(b"MAIL FROM:<sender@te")
        await poll(lambda: session._buffer == b"MAIL FROM:<sender@te")
        await client.abort()
        await server_still_works(bridge, delivered=0)

    async def test_client_hangs_up_right_after_the_dot(self) -> None:
        """The message was complete, so it is delivered, exactly once."""
        bridge = await start_quiet_bridge(self)
        client = await connect_raw(self, bridge.smtp_port)
        client.send(EHLO + ENVELOPE + b"Subject: complete\r\n\r\nx\r\n.\r\n")
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.wait_closed()
        [payload] = await payloads(bridge, 1)
        self.assertEqual(payload["subject"], "complete")
        await server_still_works(bridge, delivered=1)


class EndlessLineTests(TestCase):
    """5 MB without a newline: one 500, bounded buffers, a usable session."""

    async def test_command_line_that_never_ends(self) -> None:
        bridge = await start_quiet_bridge(self)
        client = await connect_raw(self, bridge.smtp_port)
        watch = watch_only_session(bridge)
        send_in_chunks(client, FIVE_MB, b"A" * 65536)
        replies = await exchange(client, b"\r\nNOOP\r\n", 2)
        self.assertEqual(replies, [LINE_TOO_LONG, OK])
        self.assertEqual(watch.read, FIVE_MB + 8)
        self.assertLess(max(watch.held), MAX_COMMAND_LINE)

    async def test_data_line_that_never_ends(self) -> None:
        bridge = await start_quiet_bridge(self)
        client = await connect_raw(self, bridge.smtp_port)
        await exchange(client, EHLO + ENVELOPE, 4)
        watch = watch_only_session(bridge)
        send_in_chunks(client, FIVE_MB, b"B" * 65536)
        self.assertEqual(await exchange(client, b"\r\n.\r\n", 1), [LINE_TOO_LONG])
        self.assertEqual(watch.read, FIVE_MB + 5)
        # Until the line is too long it might still end, so up to the limit
        # is held, plus one read; after that only what the end marker needs.
        self.assertLessEqual(max(watch.held), MAX_DATA_LINE + 2 + READ_SIZE)
        self.assertLessEqual(max(watch.held[-10:-1]), 5)
        await deliver(client, b"after")
        [payload] = await payloads(bridge, 1)
        self.assertEqual(payload["subject"], "after")


def unsent(transport: Any) -> int:
    """Reply bytes a Twisted TCP transport holds because the peer is not reading."""
    return int(transport._tempDataLen + len(transport.dataBuffer) - transport.offset)


class OneClientCannotHurtTheOthersTests(TestCase):
    async def test_address_made_for_regex_backtracking_is_answered_at_once(
        self,
    ) -> None:
        """
        "a.a.a...a" (no "@", so it can never match) makes a regex with a
        nested quantifier try every split of the dots: about 2**n steps, on
        the reactor thread, stalling every session and every delivery.
        """
        bridge = await start_quiet_bridge(self)
        attacker = await connect_raw(self, bridge.smtp_port)
        bystander = await connect_raw(self, bridge.smtp_port, "127.0.0.2")
        await exchange(attacker, EHLO, 1)
        await exchange(bystander, EHLO, 1)
        started = reactor.seconds()
        attacker.send(b"MAIL FROM:<" + b"a." * 24 + b"a>\r\n")
        self.assertEqual(await exchange(bystander, b"NOOP\r\n", 1), [OK])
        self.assertLess(reactor.seconds() - started, 0.25)
        self.assertEqual(
            await attacker.wait_for_replies(3),
            [GREETING, EHLO_REPLY[-1], b"501 5.1.7 Bad sender address syntax"],
        )

    async def test_client_that_never_reads_cannot_grow_server_memory(self) -> None:
        """
        Pipelined HELPs (6 bytes in, 80 out) from a client that never reads
        its replies: once they back up, the server must stop reading, as it
        does while the spool decides, rather than buffer replies without
        bound.
        """
        bridge = await start_quiet_bridge(self)
        client = await connect_raw(self, bridge.smtp_port)
        client.transport.pauseProducing()  # type: ignore[union-attr]
        [session] = bridge.service.smtp_factory.sessions
        server = session.transport
        # None out first: mypy takes isinstance on an Optional for never true
        assert server is not None
        assert isinstance(server, tcp.Server)  # what the reactor reads from
        watch = Watch(session)
        sent = 0
        for _ in range(17):
            client.send(b"HELP\r\n" * 10_000)
            sent += 60_000
        await poll(lambda: watch.read == sent or server not in reactor.getReaders())
        # The server may answer one read (64 KiB, ~11,000 HELPs) before it
        # hears that the buffer is full: about 14 times that in replies.
        self.assertLessEqual(max(watch.unsent), 16 * READ_SIZE)

    async def test_client_that_never_reads_is_still_timed_out(self) -> None:
        """
        The idle timeout frees the connection slot even when the 421 cannot
        be delivered because the client never reads: otherwise a few such
        clients hold the per-address and global caps for ever.
        """
        bridge = await start_quiet_bridge(self, smtp_timeout=0.5)
        client = await connect_raw(self, bridge.smtp_port)
        client.transport.pauseProducing()  # type: ignore[union-attr]
        for _ in range(17):
            client.send(b"HELP\r\n" * 10_000)
        await poll(lambda: not bridge.service.smtp_factory.sessions, 5)
        self.assertEqual(dict(bridge.service.smtp_factory._per_host), {})


class LeakTests(TestCase):
    async def test_thousands_of_connections_leave_nothing_behind(self) -> None:
        """
        2,000 connections, 40 at a time from four addresses: a quarter say
        EHLO and QUIT, the rest vanish after the greeting, mid-command or
        mid-DATA.  Afterwards no session, counter or session object remains.
        """
        bridge = await start_quiet_bridge(self)
        factory = bridge.service.smtp_factory
        admitted = count_admissions(factory)
        port = bridge.smtp_port

        async def one(n: int) -> None:
            client = await connect_raw(self, port, f"127.0.0.{1 + n % 4}")
            style = n // 4 % 4
            if style == 0:
                replies = await exchange(client, EHLO + b"QUIT\r\n", 2)
                self.assertEqual(replies, [EHLO_REPLY[-1], BYE])
                await client.wait_closed()
                return
            if style == 2:
                client.send(b"MAIL FROM:<a@")
            elif style == 3:
                await exchange(client, EHLO + ENVELOPE + b"Subject: cut\r\n", 4)
            await client.abort()

        for batch in range(0, 2000, 40):
            await gatherResults(
                [Deferred.fromCoroutine(one(n)) for n in range(batch, batch + 40)]
            )
        await sessions_gone(bridge)
        self.assertEqual(len(admitted), 2000)
        self.assertEqual(dict(factory._per_host), {})
        gc.collect()
        left = [
            o
            for o in gc.get_objects()
            if isinstance(o, SMTPSession) and o.factory is factory
        ]
        self.assertEqual(left, [])
        await server_still_works(bridge, delivered=0)


class PipeliningTests(TestCase):
    async def test_groups_pipelined_over_a_real_socket(self) -> None:
        """
        RFC 2920 groups, each in one write: replies come back complete and
        in order, and each message carries the recipients of its own group.
        """
        bridge = await start_quiet_bridge(self)
        client = await connect_raw(self, bridge.smtp_port)
        replies = await exchange(
            client,
            EHLO + b"MAIL FROM:<sender@test.com>\r\nRCPT TO:<target@example.com>\r\n"
            b"RCPT TO:<nobody@example.com>\r\nRCPT TO:<Second@Example.com>\r\n"
            b"DATA\r\n",
            6,
        )
        self.assertEqual(client.lines()[1 : 1 + len(EHLO_REPLY)], EHLO_REPLY)
        self.assertEqual(
            replies,
            [
                EHLO_REPLY[-1],
                SENDER_OK,
                RECIPIENT_OK,
                NO_SUCH_USER,
                RECIPIENT_OK,
                GO_AHEAD,
            ],
        )
        replies = await exchange(
            client,
            b"Subject: one\r\n\r\nfirst\r\n.\r\n"
            b"MAIL FROM:<>\r\nRCPT TO:<second@example.com>\r\nDATA\r\n",
            4,
        )
        first = queued_id(replies[0])
        self.assertEqual(replies[1:], [SENDER_OK, RECIPIENT_OK, GO_AHEAD])
        replies = await exchange(
            client, b"Subject: two\r\n\r\nsecond\r\n.\r\nQUIT\r\n", 2
        )
        second = queued_id(replies[0])
        self.assertEqual(replies[1], BYE)
        await client.wait_closed()
        await payloads(bridge, 2)
        by_id = {r.headers["webhook-id"]: r.json() for r in bridge.receiver.requests}
        self.assertEqual(
            by_id,
            {
                first: {
                    "sender": "sender@test.com",
                    "recipient": TARGET,
                    "recipients": [TARGET, "Second@Example.com"],
                    "subject": "one",
                    "body": "first\r\n",
                },
                second: {
                    "sender": "",
                    "recipient": "second@example.com",
                    "recipients": ["second@example.com"],
                    "subject": "two",
                    "body": "second\r\n",
                },
            },
        )


EIGHT_BIT = [
    # (raw message, expected sender_name, subject, body)
    # No charset and not UTF-8: windows-1252 (0x80 is the euro sign).
    (
        b"From: Ren\xe9 <rene@test.com>\r\nSubject: caf\xe9\r\n\r\n"
        b"caf\xe9 na\xefve \x80 \xa3\r\n",
        "René",
        "café",
        "café naïve € £\r\n",
    ),
    # No charset, valid UTF-8.
    (
        "From: Grüße <g@test.com>\r\nSubject: Grüße ☃\r\n\r\nGrüße ☃ 日本\r\n".encode(),
        "Grüße",
        "Grüße ☃",
        "Grüße ☃ 日本\r\n",
    ),
    # NUL bytes are content too.
    (
        b"From: nul@test.com\r\nSubject: nul\r\n\r\na\x00b\x00\r\n",
        None,
        "nul",
        "a\x00b\x00\r\n",
    ),
    # A declared charset wins over guessing.
    (
        b"From: g@test.com\r\nSubject: greek\r\n"
        b"Content-Type: text/plain; charset=iso-8859-7\r\n\r\n\xe1\xe2\xe3\r\n",
        None,
        "greek",
        "αβγ\r\n",
    ),
]


class EightBitTests(TestCase):
    """Bytes are bytes on the wire; the payload decodes them by SPEC §4."""

    async def test_eight_bit_and_non_utf8_content(self) -> None:
        bridge = await start_quiet_bridge(self)
        client = await connect_raw(self, bridge.smtp_port)
        await exchange(client, EHLO, 1)
        expected: dict[str, dict[str, object]] = {}
        for raw, sender_name, subject, body in EIGHT_BIT:
            replies = await exchange(
                client,
                b"MAIL FROM:<sender@test.com> BODY=8BITMIME\r\n"
                b"RCPT TO:<target@example.com>\r\nDATA\r\n",
                3,
            )
            self.assertEqual(replies, [SENDER_OK, RECIPIENT_OK, GO_AHEAD])
            [reply] = await exchange(client, raw + b".\r\n", 1)
            payload: dict[str, object] = {"sender": "sender@test.com"}
            if sender_name is not None:
                payload["sender_name"] = sender_name
            payload.update(
                recipient=TARGET, recipients=[TARGET], subject=subject, body=body
            )
            expected[queued_id(reply)] = payload
        await payloads(bridge, len(EIGHT_BIT))
        for request in bridge.receiver.requests:
            self.assertEqual(request.headers["content-type"], "application/json")
            # Well-formed: strict UTF-8, valid JSON, exactly the decoded text.
            self.assertEqual(
                json.loads(request.body.decode("utf-8")),
                expected[request.headers["webhook-id"]],
            )


class StartStopTests(TestCase):
    async def test_stopping_right_after_start_logs_no_error(self) -> None:
        """
        A port scanner's favourite moment: the bridge stops while its
        dispatcher is still taking its first look at the spool.  Stopping
        must wait for that look, not close the spool under it (which logs
        "could not read the spool": spool is closed).  A few rounds, since
        the race is lost only about half the time.
        """
        for _ in range(8):
            bridge = await start_bridge(self)
            stopping = stop_service(bridge.service)
            assert stopping is not None  # start_bridge left it running
            await stopping
            await bridge.receiver.stop()


# In memory: valid sessions, mutated.

FUZZ_MAX_SIZE = 500

VALID = (
    b"EHLO client.test\r\nMAIL FROM:<sender@test.com> BODY=8BITMIME\r\n"
    b"RCPT TO:<target@example.com>\r\nRCPT TO:<nobody@example.com>\r\nDATA\r\n"
    b"Subject: fuzz\r\n\r\nbody \xe9\r\n..dot\r\n.\r\nNOOP\r\nQUIT\r\n"
)
VALID_CONTENT = b"Subject: fuzz\r\n\r\nbody \xe9\r\n.dot\r\n"
VALID_CODES = [b"220", b"250", b"250", b"250", b"550", b"354", b"250", b"250", b"221"]


@implementer(IMessageSink)
class CountingSink:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    def check_capacity(self) -> None:
        pass

    def receive(self, message: Message) -> Deferred[None]:
        self.messages.append(message)
        return succeed(None)


def fresh_session() -> tuple[SMTPSession, StringTransport, CountingSink]:
    sink = CountingSink()
    factory = SMTPServerFactory(
        sink=sink,
        clock=Clock(),
        hostname="mx.test",
        targets=[TARGET],
        max_message_size=FUZZ_MAX_SIZE,
        max_recipients=3,
        timeout=300,
    )
    session = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1))
    assert session is not None
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1))
    session.makeConnection(transport)
    return session, transport, sink


def mutate(data: bytes, mutations: list[tuple[str, int, Any]]) -> bytes:
    for kind, where, what in mutations:
        at = where % (len(data) + 1)
        if kind == "flip":
            data = data[:at] + bytes([data[at % len(data)] ^ what]) + data[at + 1 :]
        elif kind == "insert":
            data = data[:at] + what + data[at:]
        elif kind == "delete":
            data = data[:at] + data[at + what :]
        else:  # repeat a slice, as a retransmitting or confused client might
            data = data[:at] + data[at : at + what] + data[at:]
    return data


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks, start, n = [], 0, 0
    while start < len(data):
        size = sizes[n % len(sizes)]
        chunks.append(data[start : start + size])
        start, n = start + size, n + 1
    return chunks


_position = st.integers(min_value=0, max_value=10_000)
_mutation = st.one_of(
    st.tuples(st.just("flip"), _position, st.integers(1, 255)),
    st.tuples(st.just("insert"), _position, st.binary(min_size=1, max_size=700)),
    st.tuples(
        st.just("insert"),
        _position,
        st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"\r\n.\r\n", b"\x00", b" "]),
    ),
    st.tuples(st.just("delete"), _position, st.integers(1, 40)),
    st.tuples(st.just("repeat"), _position, st.integers(1, 60)),
)
_chunk_sizes = st.lists(st.integers(1, 80), min_size=1, max_size=20)


class MutationFuzzTests(SynchronousTestCase):
    def feed(
        self, data: bytes, sizes: list[int]
    ) -> tuple[SMTPSession, StringTransport, CountingSink]:
        """Feed C{data} in chunks, checking the buffers after every one."""
        session, transport, sink = fresh_session()
        for chunk in split(data, sizes):
            session.dataReceived(chunk)
            self.assertLess(len(session._buffer), MAX_COMMAND_LINE)
            self.assertLessEqual(len(session._data), FUZZ_MAX_SIZE + 12)
        output = transport.value()
        self.assertTrue(output.endswith(b"\r\n"))
        for line in output.split(b"\r\n")[:-1]:
            self.assertRegex(line, REPLY_LINE)
        return session, transport, sink

    @settings(max_examples=150, deadline=None)
    @given(_chunk_sizes)
    def test_any_chunking_of_a_valid_session_delivers_once(
        self, sizes: list[int]
    ) -> None:
        _, transport, sink = self.feed(VALID, sizes)
        [message] = sink.messages
        self.assertTrue(message.raw.startswith(b"Received: from client.test "))
        self.assertTrue(message.raw.endswith(b"\r\n" + VALID_CONTENT))
        self.assertEqual(message.envelope.recipients, (TARGET,))
        codes = [
            line[:3] for line in transport.value().splitlines() if line[3:4] == b" "
        ]
        self.assertEqual(codes, VALID_CODES)
        self.assertTrue(transport.disconnecting)

    @settings(
        max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(st.lists(_mutation, min_size=1, max_size=4), _chunk_sizes)
    def test_mutated_sessions(
        self, mutations: list[tuple[str, int, Any]], sizes: list[int]
    ) -> None:
        data = mutate(VALID, mutations)
        session, transport, sink = self.feed(data, sizes)
        # Every delivery needs a DATA command of its own.
        self.assertLessEqual(len(sink.messages), data.upper().count(b"DATA"))
        if data == VALID:
            self.assertEqual(len(sink.messages), 1)
        for message in sink.messages:
            self.assertLessEqual(len(message.raw), FUZZ_MAX_SIZE + 200)
        if transport.disconnecting:
            return
        # Still usable: end whatever is half-sent (a command, maybe DATA or
        # QUIT, then the message), then a whole transaction goes through.
        transport.clear()
        if not session._in_data:
            session.dataReceived(b"\r\n")
        if session._in_data and not transport.disconnecting:
            session.dataReceived(b"\r\n.\r\n")
        if not transport.disconnecting:
            session.dataReceived(b"RSET\r\nEHLO c\r\n" + ENVELOPE + b"x\r\n.\r\n")
        last = transport.value().splitlines()[-1]
        if transport.disconnecting:
            self.assertIn(last, (BYE, b"421 4.7.0 Too many errors, closing"))
        else:
            self.assertRegex(last, QUEUED)
