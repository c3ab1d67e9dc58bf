"""
The SMTP front under random input, in memory: command streams and
garbage, valid sessions mutated at random, and DATA contents on which the
bulk and line-at-a-time paths must agree byte for byte and reply for reply.
"""

from __future__ import annotations

import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.mail.smtp import DATA
from twisted.trial.unittest import SynchronousTestCase

from maillaser.smtp._protocol import MAX_COMMAND_LINE, MAX_DATA_LINE
from tests.helpers import REPLY_LINE
from tests.test_smtp_helpers import (
    TARGETS,
    RecordingSink,
    Session,
    after_data,
    make_factory,
)

BYE = b"221 2.0.0 Bye"
TOO_MANY_ERRORS = b"421 4.7.0 Too many errors, closing"
IMPROPER_PIPELINING = b"554 5.5.0 Improper command pipelining after DATA"
QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as (msg_[0-9a-f]{28})$")
ENVELOPE = b"MAIL FROM:<sender@test.com>\r\nRCPT TO:<target@example.com>\r\nDATA\r\n"


def fresh_session(bulk: bool, **overrides: Any) -> tuple[Session, RecordingSink]:
    sink = RecordingSink()
    factory = make_factory(sink, Clock(), **overrides)
    return Session(factory, bulk=bulk), sink


class FuzzTestCase(SynchronousTestCase):
    def feed(self, session: Session, data: bytes, sizes: list[int]) -> None:
        """
        Feed C{data} in chunks of C{sizes}, checking what is held after
        each; a new chunk after each DATA line, as a client waits for 354.
        """
        n = 0
        for piece in after_data(data):
            start = 0
            while start < len(piece):
                size = sizes[n % len(sizes)]
                session.protocol.dataReceived(piece[start : start + size])
                start, n = start + size, n + 1
                limit = (
                    MAX_DATA_LINE if session.protocol.mode == DATA else MAX_COMMAND_LINE
                )
                self.assertLess(session.buffered(), limit + 2)

    def assert_well_formed(self, session: Session) -> None:
        output = session.transport.value()
        self.assertTrue(output.endswith(b"\r\n"))
        for line in output.split(b"\r\n")[:-1]:
            self.assertRegex(line, REPLY_LINE)

    def assert_still_usable(self, session: Session, sink: RecordingSink) -> None:
        """
        End whatever is half-sent (a command, maybe DATA or QUIT, then the
        message), then a whole transaction goes through, unless the session
        was closed on purpose (QUIT, or one error too many).
        """
        transport = session.transport
        if not transport.disconnecting and session.protocol.mode != DATA:
            session.protocol.dataReceived(b"\r\n")
        if not transport.disconnecting and session.protocol.mode == DATA:
            session.protocol.dataReceived(b"\r\n.\r\n")
        transport.clear()
        delivered = len(sink.messages)
        if not transport.disconnecting:
            session.send(b"RSET\r\nEHLO c\r\n" + ENVELOPE + b"x\r\n.\r\n")
        if transport.disconnecting:
            last = session.transport.value().splitlines() or [BYE]
            self.assertIn(last[-1], (BYE, TOO_MANY_ERRORS, IMPROPER_PIPELINING))
        else:
            self.assertRegex(session.output()[-1], QUEUED)
            self.assertEqual(len(sink.messages), delivered + 1)


_commands = st.sampled_from(
    [
        b"EHLO c",
        b"HELO c",
        b"MAIL FROM:<a@b.test>",
        b"MAIL FROM:<>",
        b"MAIL FROM:<x",
        b"MAIL FROM:<a@b.test> SIZE=99999999",
        b"MAIL FROM:<a@b.test> BODY=8BITMIME SMTPUTF8",
        b"RCPT TO:<target@example.com>",
        b"RCPT TO:<Second@example.com>",
        b"RCPT TO:<bad@x.test>",
        b"RCPT TO:",
        b"DATA",
        b"RSET",
        b"NOOP",
        b"VRFY x",
        b"HELP",
        b"STARTTLS",
        b"AUTH PLAIN",
        b".",
        b"..",
        b"",
        b"QUIT",
        b"BDAT 10",
        b"\x00\xff\xfe",
        "MAIL FROM:<δ@π.δ>".encode(),
    ]
)
_stream = st.lists(
    st.one_of(_commands.map(lambda c: c + b"\r\n"), st.binary(max_size=700)),
    max_size=40,
)
_chunk_sizes = st.lists(st.integers(1, 80), min_size=1, max_size=20)


class CommandStreamTests(FuzzTestCase):
    @settings(
        max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(_stream, _chunk_sizes, st.booleans())
    def test_any_input_gets_well_formed_replies(
        self, pieces: list[bytes], sizes: list[int], bulk: bool
    ) -> None:
        session, sink = fresh_session(bulk, max_message_size=2000)
        self.feed(session, b"".join(pieces), sizes)
        self.assert_well_formed(session)
        self.assert_still_usable(session, sink)


# Valid sessions, mutated.

FUZZ_MAX_SIZE = 500

VALID = (
    b"EHLO client.test\r\nMAIL FROM:<sender@test.com> BODY=8BITMIME\r\n"
    b"RCPT TO:<target@example.com>\r\nRCPT TO:<nobody@example.com>\r\nDATA\r\n"
    b"Subject: fuzz\r\n\r\nbody \xe9\r\n..dot\r\n.\r\nNOOP\r\nQUIT\r\n"
)
VALID_CONTENT = b"Subject: fuzz\r\n\r\nbody \xe9\r\n.dot\r\n"
VALID_CODES = [b"220", b"250", b"250", b"250", b"550", b"354", b"250", b"250", b"221"]


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


class MutationTests(FuzzTestCase):
    @settings(max_examples=100, deadline=None)
    @given(_chunk_sizes, st.booleans())
    def test_any_chunking_of_a_valid_session_delivers_once(
        self, sizes: list[int], bulk: bool
    ) -> None:
        session, sink = fresh_session(bulk, max_message_size=FUZZ_MAX_SIZE)
        self.feed(session, VALID, sizes)
        self.assert_well_formed(session)
        [message] = sink.messages
        self.assertTrue(message.raw.startswith(b"Received: from client.test "))
        self.assertTrue(message.raw.endswith(b"\r\n" + VALID_CONTENT))
        self.assertEqual(message.envelope.recipients, (TARGETS[0],))
        codes = [line[:3] for line in session.output() if line[3:4] == b" "]
        self.assertEqual(codes, VALID_CODES)
        self.assertTrue(session.transport.disconnecting)

    @settings(
        max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(st.lists(_mutation, min_size=1, max_size=4), _chunk_sizes, st.booleans())
    def test_mutated_sessions(
        self, mutations: list[tuple[str, int, Any]], sizes: list[int], bulk: bool
    ) -> None:
        data = mutate(VALID, mutations)
        session, sink = fresh_session(bulk, max_message_size=FUZZ_MAX_SIZE)
        self.feed(session, data, sizes)
        self.assert_well_formed(session)
        # Every delivery needs a DATA command of its own.
        self.assertLessEqual(len(sink.messages), data.upper().count(b"DATA"))
        if data == VALID:
            self.assertEqual(len(sink.messages), 1)
        for message in sink.messages:
            self.assertLessEqual(len(message.raw), FUZZ_MAX_SIZE + 200)
        self.assert_still_usable(session, sink)


# The two DATA paths agree.

_line = st.one_of(
    st.sampled_from(
        [
            b"",
            b".",
            b"..",
            b".x",
            b"Subject: s",
            b"text",
            b"a\n.\nb",
            b"\r",
            b"x\r",
            b"caf\xe9",
            b":",
            b"x" * 120,
            b"." + b"y" * 120,
            b"z" * 121,
            b"z" * 300,
        ]
    ),
    st.binary(max_size=30).map(lambda b: b.replace(b"\r\n", b"")),
)
_content = st.lists(_line, max_size=30).map(lambda lines: b"\r\n".join(lines))
_ends = st.sampled_from([b"\r\n.\r\n", b".\r\n", b"\r\n.\r\nNOOP\r\n"])


def normalised(lines: list[bytes]) -> list[bytes]:
    return [QUEUED.sub(rb"250 2.0.0 Ok: queued as ID", line) for line in lines]


class PathAgreementTests(SynchronousTestCase):
    """
    Bulk DATA must be exactly Twisted's DATA path with our limits: same
    replies, same message bytes, whatever the content and chunking.  The
    limits are small here (120-byte lines, 600-byte messages), so long
    lines and oversized messages come up often.
    """

    @settings(
        max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(
        _content,
        _ends,
        _chunk_sizes,
        st.integers(50, 600),
        st.sampled_from(["normalize", "reject"]),
    )
    def test_bulk_and_line_paths_agree(
        self, content: bytes, end: bytes, sizes: list[int], max_size: int, bare: str
    ) -> None:
        """Bare CRs and LFs too, made CRLFs or refused (MAIL_LASER_BARE_NEWLINE)."""
        outcomes = []
        for bulk in (True, False):
            session, sink = fresh_session(
                bulk, max_message_size=max_size, bare_newline=bare
            )
            session.protocol.max_data_line = 120
            session.send(b"EHLO c\r\n" + ENVELOPE)
            session.transport.clear()
            data = content + end
            start, n = 0, 0
            while start < len(data):
                size = sizes[n % len(sizes)]
                session.protocol.dataReceived(data[start : start + size])
                start, n = start + size, n + 1
            raws = [m.raw.replace(m.id.encode(), b"ID") for m in sink.messages]
            outcomes.append((normalised(session.output()), raws))
        self.assertEqual(outcomes[0], outcomes[1])
