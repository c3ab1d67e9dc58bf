"""
The webhook's HTTP/1.1 client: the response parser on every framing and
every malformation; properties that how the bytes are split never matters
and that junk only ever raises BadResponse; one connection over a
StringTransport; and the pool against a real server on loopback.
"""

from __future__ import annotations

import socket
from itertools import pairwise
from typing import Any

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor, tcp
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredQueue,
    gatherResults,
)
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from maillaser.http import (
    MAX_CHUNK_LINE,
    MAX_HEAD,
    BadResponse,
    ConnectionClosed,
    ConnectionPool,
    HTTP11Connection,
    Response,
    ResponseParser,
    StaleConnection,
)
from tests.helpers import wait

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


class ParserTestCase(SynchronousTestCase):
    def parse(self, data: bytes, limit: int = 1000) -> ResponseParser:
        """Feed C{data} whole, which must complete a response."""
        parser = ResponseParser(limit)
        self.assertTrue(parser.feed(data), "the response should be complete")
        return parser

    def parse_to_close(self, data: bytes, limit: int = 1000) -> ResponseParser:
        """Feed C{data}, which must not complete a response until the close."""
        parser = ResponseParser(limit)
        self.assertFalse(parser.feed(data), "the body should end at the close")
        self.assertIsNone(parser.response)
        response = parser.finish()
        self.assertIs(response, parser.response)
        return parser

    def assertBad(self, *pieces: bytes) -> None:
        """Feeding C{pieces} in order raises L{BadResponse} (and no earlier)."""
        parser = ResponseParser(1000)
        for piece in pieces[:-1]:
            self.assertFalse(parser.feed(piece))
        with self.assertRaises(BadResponse, msg=repr(pieces)):
            parser.feed(pieces[-1])


class FramingTests(ParserTestCase):
    def test_content_length(self) -> None:
        parser = self.parse(
            b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-Thing: a b\r\n\r\nhello"
        )
        self.assertEqual(
            parser.response,
            Response(201, {b"content-length": b"5", b"x-thing": b"a b"}, b"hello"),
        )
        self.assertTrue(parser.reusable)
        self.assertEqual(parser.leftover, b"")

    def test_incomplete_until_the_last_byte(self) -> None:
        parser = ResponseParser(1000)
        self.assertFalse(parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"))
        self.assertFalse(parser.feed(b"\r\nhell"))
        self.assertIsNone(parser.response)
        self.assertTrue(parser.feed(b"o"))
        self.assertEqual(
            parser.response, Response(200, {b"content-length": b"5"}, b"hello")
        )

    def test_bytes_after_the_response_are_left_over(self) -> None:
        parser = self.parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 500 x\r\n"
        )
        self.assertEqual(
            parser.response, Response(200, {b"content-length": b"2"}, b"ok")
        )
        self.assertEqual(parser.leftover, b"HTTP/1.1 500 x\r\n")

    def test_names_lower_cased_values_trimmed(self) -> None:
        parser = self.parse(
            b"HTTP/1.1 200 OK\r\nX-MiXed:  \t value \t\r\nEmpty:\r\nContent-Length:0"
            b"\r\n\r\n"
        )
        self.assertEqual(
            parser.response,
            Response(
                200,
                {b"x-mixed": b"value", b"empty": b"", b"content-length": b"0"},
                b"",
            ),
        )

    def test_repeated_fields_joined(self) -> None:
        parser = self.parse(
            b"HTTP/1.1 200 OK\r\nVary: a\r\nContent-Length: 0\r\nvary: b, c\r\n\r\n"
        )
        assert parser.response is not None
        self.assertEqual(
            parser.response.headers, {b"vary": b"a, b, c", b"content-length": b"0"}
        )
        self.assertEqual(parser.response.header(b"vary"), b"a, b, c")
        self.assertIsNone(parser.response.header(b"Vary"))

    def test_status_line_forms(self) -> None:
        for line, status in [
            (b"HTTP/1.1 202", 202),
            (b"HTTP/1.1 404 ", 404),
            (b"HTTP/1.1 503 Slow Down, please", 503),
            (b"HTTP/1.1 299\tTabbed", 299),
        ]:
            parser = self.parse(line + b"\r\nContent-Length: 0\r\n\r\n")
            assert parser.response is not None
            self.assertEqual(parser.response.status, status, line)

    def test_content_length_zero(self) -> None:
        parser = self.parse(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nnext")
        self.assertEqual(parser.response, Response(200, {b"content-length": b"0"}, b""))
        self.assertTrue(parser.reusable)
        self.assertEqual(parser.leftover, b"next")

    def test_repeated_identical_content_length(self) -> None:
        for head in [
            b"Content-Length: 3\r\nContent-Length: 3",
            b"Content-Length: 3,3",
            b"Content-Length: 3 , 3, 3",
        ]:
            parser = self.parse(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\nabcX")
            assert parser.response is not None
            self.assertEqual(parser.response.body, b"abc", head)
            self.assertEqual(parser.leftover, b"X", head)
            self.assertTrue(parser.reusable, head)

    def test_interim_response_then_the_real_one(self) -> None:
        parser = self.parse(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )
        self.assertEqual(
            parser.response, Response(200, {b"content-length": b"2"}, b"ok")
        )
        self.assertTrue(parser.reusable)

    def test_interim_responses_fed_apart(self) -> None:
        """Their headers are not the response's, and none of them completes it."""
        parser = ResponseParser(1000)
        self.assertFalse(parser.feed(b"HTTP/1.1 100 Continue\r\n\r\n"))
        self.assertFalse(
            parser.feed(
                b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\nConnection: close\r\n"
            )
        )
        self.assertFalse(parser.feed(b"\r\nHTTP/1.1 204 No Content\r\nX: y\r\n"))
        self.assertIsNone(parser.response)
        self.assertTrue(parser.feed(b"\r\n"))
        self.assertEqual(parser.response, Response(204, {b"x": b"y"}, b""))
        self.assertTrue(parser.reusable)

    def test_no_body_statuses(self) -> None:
        for status in (204, 304):
            parser = self.parse(
                b"HTTP/1.1 %d Whatever\r\nContent-Length: 10\r\n\r\n" % status
            )
            self.assertEqual(
                parser.response, Response(status, {b"content-length": b"10"}, b"")
            )
            self.assertTrue(parser.reusable)
            self.assertEqual(parser.leftover, b"")

    def test_bytes_after_a_no_body_status_are_left_over(self) -> None:
        parser = self.parse(b"HTTP/1.1 204 No Content\r\n\r\nstray")
        self.assertEqual(parser.response, Response(204, {}, b""))
        self.assertEqual(parser.leftover, b"stray")

    def test_body_larger_than_the_limit(self) -> None:
        parser = ResponseParser(4)
        self.assertFalse(
            parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
        )
        self.assertFalse(parser.feed(b"cdef"))
        self.assertTrue(parser.feed(b"ghij"))
        self.assertEqual(
            parser.response, Response(200, {b"content-length": b"10"}, b"abcd")
        )
        self.assertTrue(parser.reusable)
        self.assertEqual(parser.leftover, b"")

    def test_chunked_body_larger_than_the_limit(self) -> None:
        parser = self.parse(CHUNKED + b"2\r\nab\r\n3\r\ncde\r\n1\r\nf\r\n0\r\n\r\n", 4)
        self.assertEqual(
            parser.response, Response(200, {b"transfer-encoding": b"chunked"}, b"abcd")
        )
        self.assertTrue(parser.reusable)

    def test_limit_zero_keeps_nothing(self) -> None:
        parser = self.parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", 0)
        self.assertEqual(parser.response, Response(200, {b"content-length": b"3"}, b""))

    def test_chunked(self) -> None:
        parser = self.parse(
            CHUNKED + b"5\r\nhello\r\n6\r\n world\r\nA\r\n0123456789\r\n0\r\n\r\nnext"
        )
        self.assertEqual(
            parser.response,
            Response(200, {b"transfer-encoding": b"chunked"}, b"hello world0123456789"),
        )
        self.assertTrue(parser.reusable)
        self.assertEqual(parser.leftover, b"next")

    def test_chunk_extensions_and_trailers(self) -> None:
        """Extensions are ignored; trailers are read but not made headers."""
        parser = self.parse(
            CHUNKED + b"5;name=value\r\nhello\r\n"
            b'6 \t; a="b; c" ;d\r\n world\r\n'
            b"00;last\r\nExpires: never\r\nX-Checksum: 1\r\n\r\n"
        )
        self.assertEqual(
            parser.response,
            Response(200, {b"transfer-encoding": b"chunked"}, b"hello world"),
        )
        self.assertTrue(parser.reusable)
        self.assertEqual(parser.leftover, b"")

    def test_chunked_is_the_final_coding(self) -> None:
        parser = self.parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, CHUNKED\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
        )
        self.assertEqual(
            parser.response,
            Response(200, {b"transfer-encoding": b"gzip, CHUNKED"}, b"abc"),
        )
        self.assertTrue(parser.reusable)

    def test_other_codings_read_until_close(self) -> None:
        for codings in [b"gzip", b"chunked, gzip", b""]:
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n" % codings
            parser = self.parse_to_close(head + b"3\r\nabc\r\n0\r\n\r\n")
            self.assertEqual(
                parser.response,
                Response(
                    200, {b"transfer-encoding": codings}, b"3\r\nabc\r\n0\r\n\r\n"
                ),
            )
            self.assertFalse(parser.reusable, codings)

    def test_no_length_reads_until_close(self) -> None:
        parser = ResponseParser(6)
        self.assertFalse(parser.feed(b"HTTP/1.1 200 OK\r\nX: y\r\n\r\nsome "))
        self.assertFalse(parser.feed(b"more"))
        self.assertEqual(parser.finish(), Response(200, {b"x": b"y"}, b"some m"))
        self.assertFalse(parser.reusable)

    def test_empty_body_until_close(self) -> None:
        parser = self.parse_to_close(b"HTTP/1.0 500 Oops\r\n\r\n")
        self.assertEqual(parser.response, Response(500, {}, b""))
        self.assertFalse(parser.reusable)

    def test_transfer_encoding_and_content_length(self) -> None:
        """Chunked wins, but whoever sent both is not trusted with another."""
        parser = self.parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked"
            b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        self.assertEqual(
            parser.response,
            Response(
                200,
                {b"content-length": b"100", b"transfer-encoding": b"chunked"},
                b"abc",
            ),
        )
        self.assertFalse(parser.reusable)

    def test_http10_reusable_only_with_keep_alive(self) -> None:
        for connection, reusable in [
            (b"", False),
            (b"Connection: keep-alive\r\n", True),
            (b"Connection: Keep-Alive\r\n", True),
            (b"Connection: foo, KEEP-ALIVE \r\n", True),
            (b"Connection: close\r\n", False),
            (b"Connection: keep-alive-ish\r\n", False),
        ]:
            parser = self.parse(
                b"HTTP/1.0 200 OK\r\n" + connection + b"Content-Length: 0\r\n\r\n"
            )
            self.assertEqual(parser.reusable, reusable, connection)

    def test_http11_not_reusable_with_close(self) -> None:
        for connection, reusable in [
            (b"", True),
            (b"Connection: keep-alive\r\n", True),
            (b"Connection: close\r\n", False),
            (b"Connection: CLOSE\r\n", False),
            (b"Connection: upgrade,close\r\n", False),
            (b"Connection: closed\r\n", True),
        ]:
            parser = self.parse(
                b"HTTP/1.1 200 OK\r\n" + connection + b"Content-Length: 0\r\n\r\n"
            )
            self.assertEqual(parser.reusable, reusable, connection)

    def test_obsolete_line_folding(self) -> None:
        parser = self.parse(
            b"HTTP/1.1 200 OK\r\nX-Long: one\r\n   two  \r\n\tthree\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        self.assertEqual(
            parser.response,
            Response(200, {b"x-long": b"one two three", b"content-length": b"0"}, b""),
        )

    def test_bare_line_feeds(self) -> None:
        parser = self.parse(
            b"HTTP/1.1 100 Continue\n\nHTTP/1.1 200 OK\nTransfer-Encoding: chunked\n"
            b"X: y\n\n3\nabc\n0\nT: u\n\nnext"
        )
        self.assertEqual(
            parser.response,
            Response(200, {b"transfer-encoding": b"chunked", b"x": b"y"}, b"abc"),
        )
        self.assertEqual(parser.leftover, b"next")

    def test_finish_after_complete(self) -> None:
        parser = self.parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
        self.assertIs(parser.finish(), parser.response)

    def test_head_of_exactly_max_head(self) -> None:
        status = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX: "
        head = status + b"a" * (MAX_HEAD - len(status))
        self.assertEqual(len(head), MAX_HEAD)
        parser = self.parse(head + b"\r\n\r\n")
        assert parser.response is not None
        self.assertEqual(parser.response.status, 200)

    def test_head_of_exactly_max_head_split(self) -> None:
        """
        Accepted however it arrives: the first bytes of the end of the head
        do not count towards the limit.
        """
        status = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX: "
        head = status + b"a" * (MAX_HEAD - len(status))
        parser = ResponseParser(1000)
        self.assertFalse(parser.feed(head + b"\r\n"))
        self.assertTrue(parser.feed(b"\r\n"))

    def test_chunk_size_line_split_across_reads(self) -> None:
        """Over TCP, a read may end anywhere, even inside a size line."""
        parser = ResponseParser(1000)
        self.assertFalse(parser.feed(CHUNKED + b"5\r"))
        self.assertTrue(parser.feed(b"\nhello\r\n0\r\n\r\n"))
        self.assertEqual(
            parser.response, Response(200, {b"transfer-encoding": b"chunked"}, b"hello")
        )

    def test_last_chunk_and_trailers_split_across_reads(self) -> None:
        parser = ResponseParser(1000)
        for piece in [CHUNKED, b"3\r\nab", b"c\r", b"\n0", b"\r\nT: ", b"u\r\n", b"\r"]:
            self.assertFalse(parser.feed(piece), piece)
        self.assertTrue(parser.feed(b"\n"))
        self.assertEqual(
            parser.response, Response(200, {b"transfer-encoding": b"chunked"}, b"abc")
        )


class BadResponseTests(ParserTestCase):
    def test_malformed_status_line(self) -> None:
        for line in [
            b"HTTP/2 200 OK",
            b"HTTP/1.1 20 OK",
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 200OK",
            b"http/1.1 200 OK",
            b"ICY 200 OK",
            b" HTTP/1.1 200 OK",
            b"HTTP/1.1  200 OK",
            b"HTTP/1.1 600 Beyond",
            b"HTTP/1.1 099 Before",
            b"",
        ]:
            self.assertBad(line + b"\r\nContent-Length: 0\r\n\r\n")

    def test_malformed_header_field(self) -> None:
        for field in [
            b"No colon",
            b"Name : value",
            b": value",
            b"Na(me: value",
            b"N\xe4me: value",
        ]:
            self.assertBad(b"HTTP/1.1 200 OK\r\n" + field + b"\r\n\r\n")

    def test_continuation_without_a_header(self) -> None:
        self.assertBad(b"HTTP/1.1 200 OK\r\n folded: x\r\nContent-Length: 0\r\n\r\n")
        self.assertBad(b"HTTP/1.1 200 OK\r\n\tx\r\n\r\n")

    def test_conflicting_content_length(self) -> None:
        self.assertBad(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello")
        self.assertBad(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"
        )
        self.assertBad(b"HTTP/1.1 200 OK\r\nContent-Length: 5,\r\n\r\nhello")

    def test_malformed_content_length(self) -> None:
        for value in [b"abc", b"-1", b"+5", b"", b"5 5", b"0x5", b"1" * 16, b"\xb2"]:
            self.assertBad(b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\n")

    def test_malformed_chunk_size(self) -> None:
        for line in [b"xyz", b"", b"-1", b"0x5", b"1" * 16, b"5 junk", b";ext"]:
            self.assertBad(CHUNKED + line + b"\r\n")

    def test_chunk_data_longer_than_its_size(self) -> None:
        self.assertBad(CHUNKED + b"3\r\nhello\r\n0\r\n\r\n")
        self.assertBad(CHUNKED + b"3\r\nabc", b"de\r\n")

    def test_head_too_large(self) -> None:
        """Refused as soon as the buffer passes the limit, not at the end."""
        start = b"HTTP/1.1 200 OK\r\nX: "
        self.assertBad(start + b"a" * (MAX_HEAD - len(start)), b"a")
        self.assertBad(start + b"a" * MAX_HEAD + b"\r\n\r\n")

    def test_chunk_line_too_long(self) -> None:
        self.assertBad(CHUNKED + b"5;" + b"x" * MAX_CHUNK_LINE)
        self.assertBad(CHUNKED + b"0\r\nT: " + b"x" * MAX_CHUNK_LINE)

    def test_complete_chunk_line_too_long(self) -> None:
        """The line limit holds for a line that arrives whole, too."""
        extension = b"5;" + b"x" * MAX_CHUNK_LINE
        parser = ResponseParser(1000)
        with self.assertRaises(BadResponse):
            parser.feed(CHUNKED + extension + b"\r\nhello\r\n0\r\n\r\n")

    def test_closed_before_the_end(self) -> None:
        for data in [
            b"",
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Len",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhell",
            CHUNKED + b"5\r\nhello\r\n",
            CHUNKED + b"5\r\nhello\r\n0\r\n",
        ]:
            parser = ResponseParser(1000)
            self.assertFalse(parser.feed(data) if data else False)
            with self.assertRaises(BadResponse, msg=repr(data)):
                parser.finish()


# Property tests: generated valid responses, whatever the framing.

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
FRAMING_FIELDS = {b"content-length", b"transfer-encoding", b"connection"}
names = (
    st.text(TCHAR, min_size=1, max_size=10)
    .map(str.encode)
    .filter(lambda name: name.lower() not in FRAMING_FIELDS)
)
VISIBLE = [*range(0x21, 0x7F), *range(0x80, 0x100)]
words = (
    st.lists(st.sampled_from([0x20, 0x09, *VISIBLE]), max_size=12)
    .map(bytes)
    .map(lambda word: word.strip(b" \t"))
)
eols = st.sampled_from([b"\r\n", b"\n"])
ows = st.sampled_from([b"", b" ", b"  ", b"\t", b" \t"])


@attrs.frozen
class Case:
    raw: bytes
    limit: int
    expected: Response
    reusable: bool
    trailing: bytes
    """Bytes after the response, which must come back as left over."""


@st.composite
def fields(draw: st.DrawFn, extra: list[tuple[bytes, bytes]]) -> list[bytes]:
    """
    Header lines (each with its line ending) for random fields plus
    C{extra}, in any order, some values folded onto several lines.
    """
    generated = draw(st.lists(st.tuples(names, words), max_size=6))
    lines = []
    for name, value in draw(st.permutations([*generated, *extra])):
        parts = value.split(b" ")
        line = name + b":" + draw(ows) + parts[0]
        for part in parts[1:]:
            if part and draw(st.booleans()):  # obsolete line folding
                line += draw(eols) + draw(st.sampled_from([b" ", b"\t", b"  "]))
            else:
                line += b" "
            line += part
        lines.append(line + draw(ows) + draw(eols))
    return lines


def expected_headers(lines: list[bytes]) -> dict[bytes, bytes]:
    headers: dict[bytes, bytes] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        value = b" ".join(part.strip() for part in value.splitlines()).strip(b" \t")
        name = name.lower()
        headers[name] = headers[name] + b", " + value if name in headers else value
    return headers


@st.composite
def chunked_body(draw: st.DrawFn, body: bytes) -> bytes:
    cuts = draw(st.lists(st.integers(0, len(body)), max_size=5))
    points = sorted({0, len(body), *cuts})
    raw = b""
    for start, end in pairwise(points):
        size = format(end - start, draw(st.sampled_from(["x", "X", "03x"])))
        extension = draw(st.sampled_from([b"", b";a=b", b' \t; q="x y" ;z', b"\t;n"]))
        raw += size.encode() + extension + draw(eols) + body[start:end] + draw(eols)
    raw += draw(st.sampled_from([b"0", b"000"])) + draw(eols)
    for name, value in draw(st.lists(st.tuples(names, words), max_size=2)):
        raw += name + b": " + value + draw(eols)
    return raw + draw(eols)


@st.composite
def responses(draw: st.DrawFn) -> Case:
    minor = draw(st.sampled_from([0, 1]))
    connection = draw(
        st.sampled_from([None, b"close", b"keep-alive", b"Keep-Alive", b"TE, close"])
    )
    framing = draw(st.sampled_from(["length", "chunked", "close", "none"]))
    body = draw(st.binary(max_size=200)) if framing != "none" else b""
    status = draw(st.sampled_from([204, 304])) if framing == "none" else 0
    status = status or draw(st.integers(200, 599).filter(lambda s: s not in (204, 304)))
    extra: list[tuple[bytes, bytes]] = []
    if connection is not None:
        extra.append((b"Connection", connection))
    if framing == "length":
        length = draw(st.sampled_from([b"%d", b"00%d"])) % len(body)
        repeated = length + b", " + length
        extra.append((b"Content-Length", draw(st.sampled_from([length, repeated]))))
        if draw(st.booleans()):  # the same length again, in another field
            extra.append((b"content-length", length))
    elif framing == "chunked":
        codings = [b"chunked", b"Chunked", b"gzip, chunked", b"gzip,chunked"]
        extra.append((b"Transfer-Encoding", draw(st.sampled_from(codings))))
    elif framing == "close" and draw(st.booleans()):
        extra.append((b"Transfer-Encoding", b"gzip"))
    elif framing == "none" and draw(st.booleans()):
        extra.append((b"Content-Length", b"%d" % draw(st.integers(0, 99))))
    lines = draw(fields(extra))

    raw = b""
    for interim in draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2)):
        interim_fields = draw(fields([]))
        raw += b"HTTP/1.1 %d Interim" % interim + draw(eols)
        raw += b"".join(interim_fields) + draw(eols)
    reason = draw(st.sampled_from([b"", b" ", b" OK", b" Some\treason "]))
    raw += b"HTTP/1.%d %d" % (minor, status) + reason + draw(eols)
    raw += b"".join(lines) + draw(eols)
    raw += draw(chunked_body(body)) if framing == "chunked" else body

    tokens = [t.strip().lower() for t in (connection or b"").split(b",")]
    reusable = b"keep-alive" in tokens if minor == 0 else b"close" not in tokens
    limit = draw(st.integers(0, 64))
    return Case(
        raw=raw,
        limit=limit,
        expected=Response(status, expected_headers(lines), body[:limit]),
        reusable=reusable and framing != "close",
        trailing=b"" if framing == "close" else draw(st.binary(max_size=10)),
    )


def split(data: bytes, cuts: list[int] | None) -> list[bytes]:
    """C{data} in pieces cut at C{cuts} (modulo its length), or bytewise."""
    if cuts is None:
        return [data[i : i + 1] for i in range(len(data))]
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[start:end] for start, end in pairwise(points)]


cuts = st.none() | st.lists(st.integers(0, 10**6), max_size=20)


def run(limit: int, pieces: list[bytes]) -> tuple[Response, bool, bytes]:
    """
    Feed C{pieces} until the response is complete, else finish: the
    response, whether it is reusable, and the bytes left unparsed.
    """
    parser = ResponseParser(limit)
    for index, piece in enumerate(pieces):
        if parser.feed(piece):
            assert parser.response is not None
            rest = parser.leftover + b"".join(pieces[index + 1 :])
            return parser.response, parser.reusable, rest
    return parser.finish(), parser.reusable, b""


def outcome(limit: int, pieces: list[bytes]) -> tuple[Response, bool, bytes] | str:
    """L{run}, where only L{BadResponse} may be raised."""
    try:
        result = run(limit, pieces)
    except BadResponse:
        return "BadResponse"
    assert len(result[0].body) <= limit, result
    return result


JUNK = [
    b"HTTP/1.1 ",
    b"HTTP/1.0 ",
    b"200 OK",
    b"100 Continue",
    b"204 ",
    b"304 ",
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n\r\n",
    b":",
    b" ",
    b"\t",
    b",",
    b";",
    b"Content-Length: ",
    b"Transfer-Encoding: ",
    b"chunked",
    b"Connection: ",
    b"close",
    b"keep-alive",
    b"0",
    b"5",
    b"f",
    b"hello",
    b"\x00",
    b"\xff",
]
soup = st.lists(st.sampled_from(JUNK) | st.binary(max_size=6), max_size=60).map(
    b"".join
)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[int, bytes]:
    """A valid response with bytes inserted, deleted or replaced."""
    case = draw(responses())
    raw = case.raw
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw)))
        junk = draw(st.sampled_from(JUNK) | st.binary(min_size=1, max_size=3))
        operation = draw(st.sampled_from(["insert", "delete", "replace"]))
        if operation == "insert":
            raw = raw[:at] + junk + raw[at:]
        elif operation == "delete":
            raw = raw[:at] + raw[at + len(junk) :]
        else:
            raw = raw[:at] + junk + raw[at + len(junk) :]
    return case.limit, raw


junk = st.tuples(st.integers(0, 64), soup) | mutated()


class ParserPropertyTests(SynchronousTestCase):
    @FUZZ
    @given(case=responses())
    def test_valid_response_fed_whole(self, case: Case) -> None:
        self.assertEqual(
            run(case.limit, [case.raw + case.trailing]),
            (case.expected, case.reusable, case.trailing),
        )

    @FUZZ
    @given(case=responses(), cuts=cuts)
    def test_valid_response_split_anywhere(
        self, case: Case, cuts: list[int] | None
    ) -> None:
        """The same response as whole; trailing bytes are never consumed."""
        pieces = split(case.raw + case.trailing, cuts)
        self.assertEqual(
            run(case.limit, pieces), (case.expected, case.reusable, case.trailing)
        )

    @FUZZ
    @given(junk=junk, cuts=cuts)
    def test_junk_only_raises_bad_response(
        self, junk: tuple[int, bytes], cuts: list[int] | None
    ) -> None:
        limit, data = junk
        outcome(limit, [data])
        outcome(limit, split(data, cuts))

    @FUZZ
    @given(junk=junk, cuts=cuts)
    def test_junk_outcome_does_not_depend_on_splitting(
        self, junk: tuple[int, bytes], cuts: list[int] | None
    ) -> None:
        limit, data = junk
        self.assertEqual(outcome(limit, split(data, cuts)), outcome(limit, [data]))


# One connection, in memory.

REQUEST = b"POST /hook HTTP/1.1\r\nHost: hook.test\r\nContent-Length: 0\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
OK_RESPONSE = Response(200, {b"content-length": b"2"}, b"ok")


class HTTP11ConnectionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.released: list[HTTP11Connection] = []
        self.forgotten: list[HTTP11Connection] = []
        self.connection = HTTP11Connection(
            1000, self.released.append, self.forgotten.append
        )
        self.transport = StringTransport()
        self.connection.makeConnection(self.transport)

    def lose(self) -> None:
        self.connection.connectionLost(Failure(ConnectionDone()))

    def test_request_written_once(self) -> None:
        d = self.connection.request(REQUEST)
        self.assertEqual(self.transport.value(), REQUEST)
        self.connection.dataReceived(OK)
        self.assertEqual(self.successResultOf(d), OK_RESPONSE)
        self.assertEqual(self.transport.value(), REQUEST)

    def test_reusable_response_releases(self) -> None:
        """Released before the result fires, so a callback can reuse it."""
        released_first: list[bool] = []

        def check(response: Response) -> Response:
            released_first.append(bool(self.released))
            return response

        d = self.connection.request(REQUEST).addCallback(check)
        self.connection.dataReceived(OK[:10])
        self.assertNoResult(d)
        self.connection.dataReceived(OK[10:])
        self.assertEqual(self.successResultOf(d), OK_RESPONSE)
        self.assertEqual(released_first, [True])
        self.assertEqual(self.released, [self.connection])
        self.assertFalse(self.transport.disconnecting)

        self.transport.clear()
        again = self.connection.request(b"second")
        self.assertEqual(self.transport.value(), b"second")
        self.connection.dataReceived(
            b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertEqual(
            self.successResultOf(again), Response(202, {b"content-length": b"0"}, b"")
        )
        self.assertEqual(self.released, [self.connection, self.connection])
        self.assertEqual(self.forgotten, [])

    def test_connection_close_is_not_released(self) -> None:
        d = self.connection.request(REQUEST)
        self.connection.dataReceived(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
        )
        self.assertEqual(self.successResultOf(d).body, b"ok")
        self.assertEqual(self.released, [])
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.disconnected)  # closed, not aborted

    def test_bytes_after_the_response_close(self) -> None:
        d = self.connection.request(REQUEST)
        self.connection.dataReceived(OK + b"HTTP/1.1 200 OK\r\n")
        self.assertEqual(self.successResultOf(d), OK_RESPONSE)
        self.assertEqual(self.released, [])
        self.assertTrue(self.transport.disconnecting)

    def test_bad_response_aborts(self) -> None:
        d = self.connection.request(REQUEST)
        self.connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
        self.failureResultOf(d, BadResponse)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.released, [])
        self.lose()
        self.assertEqual(self.forgotten, [self.connection])
        self.assertIsNone(self.successResultOf(self.connection.lost))

    def test_lost_mid_body(self) -> None:
        d = self.connection.request(REQUEST)
        self.connection.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"
        )
        self.assertNoResult(d)
        self.assertNoResult(self.connection.lost)
        self.lose()
        self.failureResultOf(d, ConnectionClosed)
        self.assertEqual(self.forgotten, [self.connection])
        self.assertEqual(self.released, [])
        self.assertIsNone(self.successResultOf(self.connection.lost))

    def test_lost_before_any_response(self) -> None:
        d = self.connection.request(REQUEST)
        self.lose()
        self.failureResultOf(d, ConnectionClosed)

    def test_body_until_close_completes_when_lost(self) -> None:
        d = self.connection.request(REQUEST)
        self.connection.dataReceived(b"HTTP/1.1 200 OK\r\n\r\npart")
        self.connection.dataReceived(b" two")
        self.assertNoResult(d)
        self.lose()
        self.assertEqual(self.successResultOf(d), Response(200, {}, b"part two"))
        self.assertEqual(self.released, [])
        self.assertEqual(self.forgotten, [self.connection])

    def test_cancel_aborts(self) -> None:
        d = self.connection.request(REQUEST)
        self.connection.dataReceived(b"HTTP/1.1 200 OK\r\n")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(self.transport.disconnected)
        self.lose()  # nothing left to fire twice
        self.assertEqual(self.released, [])
        self.assertIsNone(self.successResultOf(self.connection.lost))

    def test_unsolicited_data_closes(self) -> None:
        self.connection.dataReceived(OK)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.released, [])

    def test_data_after_the_response_closes(self) -> None:
        d = self.connection.request(REQUEST)
        self.connection.dataReceived(OK)
        self.successResultOf(d)
        self.assertFalse(self.transport.disconnecting)
        self.connection.dataReceived(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_lost_while_idle(self) -> None:
        d = self.connection.request(REQUEST)
        self.connection.dataReceived(OK)
        self.successResultOf(d)
        self.lose()
        self.assertEqual(self.forgotten, [self.connection])
        self.assertIsNone(self.successResultOf(self.connection.lost))


# The pool, against a real server on loopback.


class Receiver(Protocol):
    """One server-side connection: it answers each request as told."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.requests: list[bytes] = []
        self.closed: Deferred[None] = Deferred()
        self._buffer = b""

    def connectionMade(self) -> None:
        self.server.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\r\n\r\n" in self._buffer:  # the test's requests have no body
            request, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
            self.requests.append(request + b"\r\n\r\n")
            if self.server.hold:
                self.server.held.put(self)
            else:
                self.answer(self.server.script.pop(0) if self.server.script else OK)

    def answer(self, response: bytes) -> None:
        assert self.transport is not None
        self.transport.write(response)
        if self.server.close_after_answer:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)


class Server(Factory):
    """
    Answers each request with the next of C{script}, then C{OK}; or, with
    C{hold} set, queues the connection in C{held} for the test to answer.
    With C{close_after_answer} set, it hangs up after each answer.
    """

    def __init__(self) -> None:
        self.connections: list[Receiver] = []
        self.script: list[bytes] = []
        self.hold = False
        self.close_after_answer = False
        self.held: DeferredQueue[Receiver] = DeferredQueue()

    def buildProtocol(self, addr: IAddress | None) -> Receiver:
        return Receiver(self)

    def requests(self) -> list[int]:
        """How many requests each connection carried, in connection order."""
        return [len(connection.requests) for connection in self.connections]


@implementer(IStreamClientEndpoint)
class RecordingEndpoint:
    """Keeps every connection the pool makes, to wait for its close."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint
        self.connections: list[HTTP11Connection] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        return self._endpoint.connect(factory).addCallback(self._record)

    def _record(self, protocol: IProtocol) -> IProtocol:
        assert isinstance(protocol, HTTP11Connection)
        self.connections.append(protocol)
        return protocol


def first_of(ds: list[Deferred[Any]]) -> Deferred[Any]:
    """Fires when any of C{ds} does, without cancelling the others."""
    return DeferredList(ds, fireOnOneCallback=True, fireOnOneErrback=True)


class ConnectionPoolTests(TestCase):
    async def start(
        self, max_idle: int = 4, **options: Any
    ) -> tuple[Server, ConnectionPool, RecordingEndpoint]:
        server = Server()
        listening = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port: Any = await listening.listen(server)
        self.addCleanup(port.stopListening)
        endpoint = RecordingEndpoint(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, timeout=5)
        )
        options.setdefault("clock", reactor)
        pool = ConnectionPool(endpoint, max_idle=max_idle, **options)
        self.addCleanup(self.shut, pool, server, endpoint)
        return server, pool, endpoint

    async def shut(
        self, pool: ConnectionPool, server: Server, endpoint: RecordingEndpoint
    ) -> None:
        """Close everything, whatever the test left, and wait until it is."""
        await wait(pool.close())
        for connection in endpoint.connections:
            if not connection.lost.called:
                connection.transport.abortConnection()
            await wait(connection.lost)
        for receiver in server.connections:
            await wait(receiver.closed)

    async def test_sequential_requests_share_a_connection(self) -> None:
        server, pool, endpoint = await self.start()
        self.assertEqual(await wait(pool.request(REQUEST)), OK_RESPONSE)
        self.assertEqual(await wait(pool.request(REQUEST)), OK_RESPONSE)
        self.assertEqual(server.requests(), [2])
        self.assertEqual(server.connections[0].requests, [REQUEST, REQUEST])
        self.assertEqual(len(endpoint.connections), 1)

    async def test_response_limit(self) -> None:
        _, pool, _ = await self.start(response_limit=1)
        self.assertEqual((await wait(pool.request(REQUEST))).body, b"o")

    async def test_connection_close_means_a_new_connection(self) -> None:
        server, pool, endpoint = await self.start()
        server.script = [
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
        ]
        first = await wait(pool.request(REQUEST))
        self.assertEqual(first.header(b"connection"), b"close")
        await wait(endpoint.connections[0].lost)  # the client closed it
        self.assertEqual(await wait(pool.request(REQUEST)), OK_RESPONSE)
        self.assertEqual(server.requests(), [1, 1])

    async def test_bad_response_means_a_new_connection(self) -> None:
        server, pool, endpoint = await self.start()
        server.script = [b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n"]
        with self.assertRaises(BadResponse):
            await wait(pool.request(REQUEST))
        await wait(endpoint.connections[0].lost)
        self.assertEqual(await wait(pool.request(REQUEST)), OK_RESPONSE)
        self.assertEqual(server.requests(), [1, 1])

    async def test_server_closing_an_idle_connection(self) -> None:
        server, pool, endpoint = await self.start()
        await wait(pool.request(REQUEST))
        [receiver] = server.connections
        assert receiver.transport is not None
        receiver.transport.loseConnection()
        await wait(endpoint.connections[0].lost)  # the client has seen it
        self.assertEqual(await wait(pool.request(REQUEST), timeout=5), OK_RESPONSE)
        self.assertEqual(server.requests(), [1, 1])

    async def test_closed_as_the_request_goes_out_means_a_new_connection(
        self,
    ) -> None:
        server, pool, endpoint = await self.start()
        await wait(pool.request(REQUEST))
        [receiver] = server.connections
        # None out first: mypy takes isinstance on an Optional for never true
        assert receiver.transport is not None
        assert isinstance(receiver.transport, tcp.Server)
        # The receiver's close reaches the kernel, not yet our reactor.
        receiver.transport.getHandle().shutdown(socket.SHUT_RDWR)
        self.assertEqual(await wait(pool.request(REQUEST), timeout=5), OK_RESPONSE)
        self.assertEqual(server.requests(), [1, 1])
        self.assertEqual(len(endpoint.connections), 2)

    async def assert_closed_not_retried(self, pool: ConnectionPool) -> None:
        """The request fails as closed, not stale: it was not sent again."""
        with self.assertRaises(ConnectionClosed) as raised:
            await wait(pool.request(REQUEST))
        self.assertNotIsInstance(raised.exception, StaleConnection)

    async def test_a_response_cut_short_is_not_sent_again(self) -> None:
        server, pool, _ = await self.start()
        await wait(pool.request(REQUEST))
        server.script = [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"]
        server.close_after_answer = True
        await self.assert_closed_not_retried(pool)
        self.assertEqual(server.requests(), [2])

    async def test_a_new_connection_is_not_tried_twice(self) -> None:
        server, pool, _ = await self.start()
        server.script = [b""]
        server.close_after_answer = True
        await self.assert_closed_not_retried(pool)
        self.assertEqual(server.requests(), [1])

    async def test_newest_idle_connection_first(self) -> None:
        server, pool, _ = await self.start()
        server.hold = True
        requests = [pool.request(REQUEST), pool.request(REQUEST)]
        older, newer = [await wait(server.held.get()) for _ in requests]
        older.answer(OK)
        await wait(first_of(requests))
        newer.answer(OK)
        await wait(gatherResults(requests))
        third = pool.request(REQUEST)
        self.assertIs(await wait(server.held.get()), newer)
        newer.answer(OK)
        self.assertEqual(await wait(third), OK_RESPONSE)
        self.assertEqual(len(server.connections), 2)

    async def test_max_idle(self) -> None:
        server, pool, endpoint = await self.start(max_idle=2)
        server.hold = True
        requests = [pool.request(REQUEST) for _ in range(3)]
        for _ in requests:
            (await wait(server.held.get())).answer(OK)
        await wait(gatherResults(requests))
        self.assertEqual(len(endpoint.connections), 3)
        await wait(first_of([connection.lost for connection in endpoint.connections]))
        self.assertEqual(sum(c.lost.called for c in endpoint.connections), 1)

        server.hold = False
        again = [pool.request(REQUEST) for _ in range(3)]
        self.assertEqual(await wait(gatherResults(again)), [OK_RESPONSE] * 3)
        self.assertEqual(sorted(server.requests()), [1, 1, 2, 2])

    async def test_idle_timeout(self) -> None:
        clock = Clock()
        server, pool, endpoint = await self.start(clock=clock, idle_timeout=10.0)
        await wait(pool.request(REQUEST))
        [connection] = endpoint.connections
        clock.advance(9)
        await wait(pool.request(REQUEST))  # reused: the timer starts again
        clock.advance(9.5)
        self.assertFalse(connection.transport.disconnecting)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(0.5)
        self.assertTrue(connection.transport.disconnecting)
        self.assertEqual(clock.getDelayedCalls(), [])
        # At once, before the close completes: not handed out while closing.
        self.assertEqual(await wait(pool.request(REQUEST)), OK_RESPONSE)
        await wait(connection.lost)
        await wait(server.connections[0].closed)
        self.assertEqual(server.requests(), [2, 1])

    async def test_close(self) -> None:
        clock = Clock()
        server, pool, endpoint = await self.start(clock=clock)
        server.hold = True
        requests = [pool.request(REQUEST), pool.request(REQUEST)]
        for _ in requests:
            (await wait(server.held.get())).answer(OK)
        await wait(gatherResults(requests))
        self.assertEqual(len(clock.getDelayedCalls()), 2)

        closing = pool.close()
        seen: list[list[bool]] = []
        closing.addCallback(
            lambda _: seen.append([c.lost.called for c in endpoint.connections])
        )
        await wait(closing)
        self.assertEqual(seen, [[True, True]])
        self.assertEqual(clock.getDelayedCalls(), [])
        for receiver in server.connections:
            await wait(receiver.closed)

    async def test_a_closed_pool_keeps_nothing(self) -> None:
        server, pool, _ = await self.start()
        server.hold = True
        request = pool.request(REQUEST)
        held = await wait(server.held.get())
        await wait(pool.close())
        held.answer(OK)
        await wait(request)
        self.assertEqual(pool._idle, [])
        for receiver in server.connections:
            await wait(receiver.closed)

    async def test_close_with_nothing_idle(self) -> None:
        _, pool, _ = await self.start()
        closing = pool.close()
        self.assertTrue(closing.called)
        await closing

    async def test_connection_refused(self) -> None:
        server = Server()
        listening = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port: Any = await listening.listen(server)
        number = port.getHost().port
        await port.stopListening()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", number, timeout=5)
        pool = ConnectionPool(endpoint, Clock(), max_idle=1)
        with self.assertRaises(ConnectionRefusedError):
            await wait(pool.request(REQUEST))
