"""
The SMTP front under attack, on loopback with the raw client: every limit
crossed and then the session or the server shown to still work, clients
that vanish, lines that never end, thousands of connections, pipelining
and 8-bit content.  The factory serves a recording sink; what the webhook
then receives is the bridge's business (tests.test_end_to_end).
"""

from __future__ import annotations

import fcntl
import gc
import re
import sys
import termios
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from maillaser.smtp import MailLaserESMTP
from maillaser.smtp._protocol import (
    MAX_COMMAND_LINE,
    MAX_DATA_LINE,
    MAX_ERRORS,
    MAX_INPUT_BACKLOG,
)
from tests.helpers import (
    TARGET,
    RawClient,
    connect_raw,
    poll,
    send_mail,
    simple_message,
)
from tests.test_smtp_helpers import Listening, listen

GREETING = b"220 mx.test ESMTP MailLaser"
EHLO_REPLY = [
    b"250-mx.test",
    b"250-PIPELINING",
    b"250-SIZE 10485760",
    b"250-8BITMIME",
    b"250-SMTPUTF8",
    b"250 ENHANCEDSTATUSCODES",
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
HELP_REPLY = (
    b"214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY"
    b" STARTTLS\r\n"
)
QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as (msg_[0-9a-f]{28})$")

EHLO = b"EHLO client.test\r\n"
ENVELOPE = b"MAIL FROM:<sender@test.com>\r\nRCPT TO:<target@example.com>\r\nDATA\r\n"
"""Pipelined up to DATA: three replies, the last C{354}."""

FIVE_MB = 5 * 1024 * 1024
READ_SIZE = 65536
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


def subjects(server: Listening) -> list[bytes]:
    return [
        re.search(rb"\r\nSubject: ([^\r]*)\r\n", m.raw).group(1)  # type: ignore[union-attr]
        for m in server.sink.messages
    ]


class Watch:
    """Wraps a live session's C{dataReceived} to count the bytes it has read."""

    def __init__(self, session: MailLaserESMTP) -> None:
        self.read = 0
        self._original = session.dataReceived
        session.dataReceived = self._data_received  # type: ignore[method-assign]

    def _data_received(self, data: bytes) -> None:
        self.read += len(data)
        self._original(data)


def only_session(server: Listening) -> MailLaserESMTP:
    [session] = server.factory.sessions
    return session


def send_in_chunks(client: RawClient, total: int, chunk: bytes) -> None:
    for _ in range(total // len(chunk)):
        client.send(chunk)


async def server_still_works(server: Listening, delivered: int) -> None:
    """No session is left, and a new message goes through, exactly once."""
    await server.sessions_gone()
    result = await deferToThread(
        send_mail, server.port, simple_message(subject="still working")
    )
    assert result["code"] == 250, result
    assert len(server.sink.messages) == delivered + 1, server.sink.messages
    assert subjects(server)[-1] == b"still working"
    await server.sessions_gone()


class LimitTests(TestCase):
    """Each limit crossed, then the same session (or the server) still works."""

    async def test_size_parameter_over_the_limit_is_552_at_once(self) -> None:
        server = await listen(self, max_message_size=10_000)
        client = await connect_raw(self, server.port)
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
        self.assertEqual(subjects(server), [b"fits"])
        self.assertEqual(server.sink.messages[0].id, queued_id(reply))

    async def test_message_over_the_limit_then_one_that_fits(self) -> None:
        server = await listen(self, max_message_size=10_000)
        client = await connect_raw(self, server.port)
        await exchange(client, EHLO, 1)
        self.assertEqual(
            await exchange(client, ENVELOPE, 3), [SENDER_OK, RECIPIENT_OK, GO_AHEAD]
        )
        big = b"Subject: big\r\n\r\n" + b"y" * 98 + b"\r\n"
        client.send(big * 60)  # 6.9 KB: under the limit so far
        replies = await exchange(client, big * 60 + b".\r\n", 1)
        self.assertEqual(replies, [TOO_BIG])
        await deliver(client, b"after")
        self.assertEqual(subjects(server), [b"after"])

    async def test_too_many_recipients_is_452_and_the_rest_is_kept(self) -> None:
        server = await listen(self, max_recipients=1)
        client = await connect_raw(self, server.port)
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
        [message] = server.sink.messages
        self.assertEqual(message.envelope.recipients, (TARGET,))

    async def test_command_line_over_512_bytes(self) -> None:
        server = await listen(self)
        client = await connect_raw(self, server.port)
        at_limit = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 7) + b"\r\n"
        over = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 6) + b"\r\n"
        self.assertEqual((len(at_limit), len(over)), (512, 513))
        replies = await exchange(client, at_limit + over + b"NOOP\r\n", 3)
        self.assertEqual(replies, [OK, LINE_TOO_LONG, OK])

    async def test_data_line_over_64k_is_never_run_as_commands(self) -> None:
        server = await listen(self, max_message_size=1_000_000)
        client = await connect_raw(self, server.port)
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
        self.assertEqual(subjects(server), [b"after"])

    async def test_idle_timeout_is_421_then_close(self) -> None:
        server = await listen(self, timeout=0.5)
        started = reactor.seconds()
        client = await connect_raw(self, server.port)
        await client.wait_closed(timeout=5)
        self.assertGreaterEqual(reactor.seconds() - started, 0.5)
        self.assertEqual(
            client.replies(), [GREETING, b"421 4.4.2 mx.test Idle timeout, closing"]
        )
        await server.sessions_gone()
        fresh = await connect_raw(self, server.port)
        self.assertEqual(await exchange(fresh, b"NOOP\r\n", 1), [OK])

    async def test_global_connection_cap(self) -> None:
        server = await listen(self, max_connections=3, max_connections_per_ip=2)
        admitted = [
            await connect_raw(self, server.port, source)
            for source in ("127.0.0.1", "127.0.0.1", "127.0.0.2")
        ]
        extra = await connect_raw(self, server.port, "127.0.0.3")
        await extra.wait_closed()
        self.assertEqual(
            extra.replies(), [b"421 4.7.0 mx.test Too many connections, try later"]
        )
        for client in admitted:
            self.assertEqual(await exchange(client, b"NOOP\r\n", 1), [OK])
        await exchange(admitted[0], b"QUIT\r\n", 1)
        await poll(lambda: len(server.factory.sessions) == 2)
        later = await connect_raw(self, server.port, "127.0.0.3")
        self.assertEqual(later.replies(), [GREETING])
        await exchange(later, EHLO, 1)
        await deliver(later, b"after the cap")
        self.assertEqual(subjects(server), [b"after the cap"])

    async def test_per_address_connection_cap(self) -> None:
        server = await listen(self, max_connections_per_ip=2)
        first = await connect_raw(self, server.port)
        second = await connect_raw(self, server.port)
        extra = await connect_raw(self, server.port)
        await extra.wait_closed()
        self.assertEqual(
            extra.replies(), [b"421 4.7.0 mx.test Too many connections from you"]
        )
        elsewhere = await connect_raw(self, server.port, "127.0.0.2")
        self.assertEqual(elsewhere.replies(), [GREETING])
        self.assertEqual(await exchange(second, b"NOOP\r\n", 1), [OK])
        await exchange(first, EHLO, 1)
        await deliver(first, b"under the cap")
        await exchange(second, b"QUIT\r\n", 1)
        await poll(lambda: len(server.factory.sessions) == 2)
        again = await connect_raw(self, server.port)
        self.assertEqual(again.replies(), [GREETING])

    async def test_too_many_errors_is_421_then_close(self) -> None:
        server = await listen(self)
        client = await connect_raw(self, server.port)
        client.send(b"BOGUS\r\n" * (MAX_ERRORS + 5))
        await client.wait_closed()
        self.assertEqual(
            client.replies(),
            [GREETING, *[UNKNOWN] * MAX_ERRORS, b"421 4.7.0 Too many errors, closing"],
        )
        await server.sessions_gone()
        fresh = await connect_raw(self, server.port)
        self.assertEqual(await exchange(fresh, b"NOOP\r\n", 1), [OK])


class DisconnectTests(TestCase):
    """Clients that vanish: nothing partial is delivered, nothing is left over."""

    async def vanish_mid_data(self, abort: bool) -> None:
        server = await listen(self)
        client = await connect_raw(self, server.port)
        await exchange(client, EHLO + ENVELOPE, 4)
        watch = Watch(only_session(server))
        client.send(b"Subject: partial\r\n\r\nhalf a bo")
        await poll(lambda: watch.read == 29)
        if abort:
            await client.abort()
        else:
            client.transport.loseConnection()  # type: ignore[union-attr]
            await client.wait_closed()
        await server_still_works(server, delivered=0)

    async def test_client_resets_mid_data(self) -> None:
        await self.vanish_mid_data(abort=True)

    async def test_client_hangs_up_mid_data(self) -> None:
        await self.vanish_mid_data(abort=False)

    async def test_client_vanishes_mid_command(self) -> None:
        server = await listen(self)
        client = await connect_raw(self, server.port)
        await exchange(client, EHLO, 1)
        watch = Watch(only_session(server))
        client.send(b"MAIL FROM:<sender@te")
        await poll(lambda: watch.read == 20)
        await client.abort()
        await server_still_works(server, delivered=0)

    async def test_client_hangs_up_right_after_the_dot(self) -> None:
        """The message was complete, so it is accepted, exactly once."""
        server = await listen(self)
        client = await connect_raw(self, server.port)
        await exchange(client, EHLO + ENVELOPE, 4)
        client.send(b"Subject: complete\r\n\r\nx\r\n.\r\n")
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.wait_closed()
        await poll(lambda: len(server.sink.messages) == 1)
        self.assertEqual(subjects(server), [b"complete"])
        await server_still_works(server, delivered=1)


class EndlessLineTests(TestCase):
    """
    5 MB without a newline: one 500, all of it read, a usable session.
    (What it holds meanwhile: tests.test_smtp, measured with tracemalloc.)
    """

    async def test_command_line_that_never_ends(self) -> None:
        server = await listen(self)
        client = await connect_raw(self, server.port)
        watch = Watch(only_session(server))
        send_in_chunks(client, FIVE_MB, b"A" * 65536)
        replies = await exchange(client, b"\r\nNOOP\r\n", 2)
        self.assertEqual(replies, [LINE_TOO_LONG, OK])
        self.assertEqual(watch.read, FIVE_MB + 8)

    async def test_data_line_that_never_ends(self) -> None:
        server = await listen(self)
        client = await connect_raw(self, server.port)
        await exchange(client, EHLO + ENVELOPE, 4)
        watch = Watch(only_session(server))
        send_in_chunks(client, FIVE_MB, b"B" * 65536)
        self.assertEqual(await exchange(client, b"\r\n.\r\n", 1), [LINE_TOO_LONG])
        self.assertEqual(watch.read, FIVE_MB + 5)
        await deliver(client, b"after")
        self.assertEqual(subjects(server), [b"after"])


def queued_bytes(transport: Any, request: int) -> int:
    """Bytes in a socket's kernel queue (C{FIONREAD} in, C{TIOCOUTQ} out)."""
    result = fcntl.ioctl(transport.getHandle().fileno(), request, b"\0\0\0\0")
    return int.from_bytes(result, sys.byteorder)


class OneClientCannotHurtTheOthersTests(TestCase):
    async def test_address_made_for_regex_backtracking_is_answered_at_once(
        self,
    ) -> None:
        """
        "a.a.a...a" (no "@", so it can never match) makes a regex with a
        nested quantifier try every split of the dots: about 2**n steps, on
        the reactor thread, stalling every session.
        """
        server = await listen(self)
        attacker = await connect_raw(self, server.port)
        bystander = await connect_raw(self, server.port, "127.0.0.2")
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
        does while a sink decides, rather than buffer replies without bound.
        """
        if not sys.platform.startswith("linux"):
            raise SkipTest("counts the kernel's socket queues with Linux ioctls")
        server = await listen(self)
        client = await connect_raw(self, server.port)
        client.transport.pauseProducing()  # type: ignore[union-attr]
        session = only_session(server)
        watch = Watch(session)
        written = 0
        send_line = session.sendLine

        def counting(line: bytes) -> None:
            nonlocal written
            written += len(line) + 2
            send_line(line)

        session.sendLine = counting  # type: ignore[method-assign]
        sent = 0
        for _ in range(17):
            client.send(b"HELP\r\n" * 10_000)
            sent += 60_000
        server_side: Any = session.transport  # a TCP connection: a read descriptor
        await poll(
            lambda: watch.read == sent or server_side not in reactor.getReaders()
        )
        in_kernel = queued_bytes(session.transport, termios.TIOCOUTQ) + queued_bytes(
            client.transport, termios.FIONREAD
        )
        # The server may answer one read (64 KiB, ~11,000 HELPs) before it
        # hears that the buffer is full: about 14 times that in replies.
        self.assertLessEqual(written - len(client.received) - in_kernel, 16 * READ_SIZE)
        # Nor hold the commands it has not answered yet.
        unanswered = watch.read - written // len(HELP_REPLY) * len(b"HELP\r\n")
        self.assertLessEqual(unanswered, MAX_INPUT_BACKLOG + 2 * READ_SIZE)
        client.transport.resumeProducing()  # type: ignore[union-attr]
        await client.wait_for_replies(1 + sent // 6)
        self.assertEqual(set(client.lines()[1:]), {HELP_REPLY[:-2]})

    async def test_client_that_never_reads_is_still_timed_out(self) -> None:
        """
        The idle timeout frees the connection slot even when the 421 cannot
        be delivered because the client never reads: otherwise a few such
        clients hold the per-address and global caps for ever.
        """
        server = await listen(self, timeout=0.5, max_connections_per_ip=1)
        client = await connect_raw(self, server.port)
        client.transport.pauseProducing()  # type: ignore[union-attr]
        for _ in range(17):
            client.send(b"HELP\r\n" * 10_000)
        await poll(lambda: not server.factory.sessions, 5)
        again = await connect_raw(self, server.port)
        self.assertEqual(again.replies(), [GREETING])


class LeakTests(TestCase):
    async def test_thousands_of_connections_leave_nothing_behind(self) -> None:
        """
        2,000 connections, 40 at a time from four addresses: a quarter say
        EHLO and QUIT, the rest vanish after the greeting, mid-command or
        mid-DATA.  Afterwards no session and no session object remains, and
        every address may use its whole quota again.
        """
        server = await listen(self, max_connections_per_ip=10)
        factory = server.factory
        admitted: list[MailLaserESMTP] = []
        admit = factory.admit

        def counting(session: MailLaserESMTP) -> bytes | None:
            admitted.append(session)
            return admit(session)

        factory.admit = counting  # type: ignore[method-assign]
        port = server.port

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
                await exchange(client, EHLO + ENVELOPE, 4)
                client.send(b"Subject: cut\r\n")
            await client.abort()

        for batch in range(0, 2000, 40):
            await gatherResults(
                [Deferred.fromCoroutine(one(n)) for n in range(batch, batch + 40)]
            )
        await server.sessions_gone()
        self.assertEqual(len(admitted), 2000)
        del admitted[:]
        gc.collect()
        left = [
            o
            for o in gc.get_objects()
            if isinstance(o, MailLaserESMTP) and o.factory is factory
        ]
        self.assertEqual(left, [])
        self.assertEqual(server.sink.messages, [])
        clients = [await connect_raw(self, port) for _ in range(10)]
        self.assertEqual([c.replies() for c in clients], [[GREETING]] * 10)
        for client in clients:
            await client.abort()
        await server_still_works(server, delivered=0)


class PipeliningTests(TestCase):
    async def test_groups_pipelined_over_a_real_socket(self) -> None:
        """
        RFC 2920 groups, each in one write: replies come back complete and
        in order, and each message carries the recipients of its own group.
        """
        server = await listen(self)
        client = await connect_raw(self, server.port)
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
        by_id = {m.id: m for m in server.sink.messages}
        self.assertEqual(
            {
                (m.envelope.sender, m.envelope.recipients, m.raw.split(b"\r\n")[-2])
                for m in by_id.values()
            },
            {
                ("sender@test.com", (TARGET, "Second@Example.com"), b"first"),
                ("", ("second@example.com",), b"second"),
            },
        )
        self.assertEqual(set(by_id), {first, second})


EIGHT_BIT = [
    # No charset and not UTF-8; UTF-8; NUL bytes; a declared charset.
    b"From: Ren\xe9 <rene@test.com>\r\nSubject: caf\xe9\r\n\r\n"
    b"caf\xe9 na\xefve \x80 \xa3\r\n",
    "From: Grüße <g@test.com>\r\nSubject: Grüße ☃\r\n\r\nGrüße ☃ 日本\r\n".encode(),
    b"From: nul@test.com\r\nSubject: nul\r\n\r\na\x00b\x00\r\n",
    b"From: g@test.com\r\nSubject: greek\r\n"
    b"Content-Type: text/plain; charset=iso-8859-7\r\n\r\n\xe1\xe2\xe3\r\n",
]


class EightBitTests(TestCase):
    """Bytes are bytes on the wire: what the client sent is what is accepted."""

    async def test_eight_bit_and_non_utf8_content(self) -> None:
        server = await listen(self)
        client = await connect_raw(self, server.port)
        await exchange(client, EHLO, 1)
        for raw in EIGHT_BIT:
            replies = await exchange(
                client,
                b"MAIL FROM:<sender@test.com> BODY=8BITMIME\r\n"
                b"RCPT TO:<target@example.com>\r\nDATA\r\n",
                3,
            )
            self.assertEqual(replies, [SENDER_OK, RECIPIENT_OK, GO_AHEAD])
            [reply] = await exchange(client, raw + b".\r\n", 1)
            queued_id(reply)
        self.assertEqual(len(server.sink.messages), len(EIGHT_BIT))
        for message, raw in zip(server.sink.messages, EIGHT_BIT, strict=True):
            self.assertTrue(message.raw.endswith(b" -0000\r\n" + raw))
