"""
HTTP/1.1 to one origin, the webhook's: keep-alive connections, one request
at a time on each, responses parsed as RFC 9112 frames them.

Why not treq and Twisted's C{Agent}: the bridge sends one kind of request,
to one URL, thousands of times a second.  treq re-parses and IDNA-encodes
the URL, wraps the agent in a cookie agent and a content decoder, and the
Agent then parses the URL again, looks up its pool, and reads the response
one line at a time through several layers of protocols.  Profiled under
load, that was over half of the reactor thread's time.  Here the request
head is built once (L{WebhookClient<maillaser.webhook.WebhookClient>}),
each request is one write, and a response is parsed from whole buffers.

What it deliberately does not do: redirects (a redirected POST would resend
a signed body to a URL we were not given), cookies, content decoding,
proxies, and retries (POST is not idempotent; the deliverer decides).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from maillaser.wire import write_now

MAX_HEAD = 64 * 1024
"""A response head (status line and headers) larger than this is refused."""

MAX_CHUNK_LINE = 4096

MAX_BODY = 64 * 1024
"""Keep at most this much of a response body; the rest is read and dropped."""


class BadResponse(Exception):
    """The receiver's response is not HTTP/1.1 we can frame."""


class ConnectionClosed(Exception):
    """The connection ended before a complete response."""


class StaleConnection(ConnectionClosed):
    """
    A kept-alive connection ended before any byte of the response came: the
    receiver closed it while it was idle, just as our request went out, and
    did not read the request.
    """


@attrs.frozen
class Response:
    status: int
    headers: dict[bytes, bytes]
    """Lower-cased names; repeated fields joined with C{", "} (RFC 9110 5.3)."""
    body: bytes
    """At most the parser's C{limit} bytes; the rest was read and dropped."""

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)


_HEAD_END = re.compile(rb"\r?\n\r?\n")
_STATUS_LINE = re.compile(rb"HTTP/1\.([0-9]) ([1-5][0-9]{2})(?:[ \t][^\r\n]*)?")
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?")
_UNTIL_CLOSE = -1


class ResponseParser:
    """
    An incremental parser for one response (after any interim C{1xx}).

    L{feed} takes bytes as they arrive and says when the response is
    complete; L{finish} is for the end of the connection, which completes a
    body delimited by closing.  Anything malformed raises L{BadResponse}.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buffer = b""
        self._in_head = True
        self._status = 0
        self._headers: dict[bytes, bytes] = {}
        self._remaining = 0
        """Bytes of body (or of the current chunk) still to come."""
        self._chunked = False
        self._in_trailers = False
        self._chunk_crlf = False
        self._body: list[bytes] = []
        self._kept = 0
        self.reusable = False
        """Whether the connection may carry another request afterwards."""
        self.response: Response | None = None
        self.leftover = b""
        """Bytes that arrived after the end of the response."""

    def feed(self, data: bytes) -> bool:
        """Add received bytes; C{True} once the response is complete."""
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        if self._in_head:
            buffer = self._head(buffer)
            if self._in_head:
                return False
        if self._chunked:
            buffer = self._chunks(buffer)
            if self.response is None:
                return False  # the rest, if any, is kept for the next read
        elif self._remaining != _UNTIL_CLOSE:
            take = min(self._remaining, len(buffer))
            self._keep(buffer[:take])
            self._remaining -= take
            buffer = buffer[take:]
            if not self._remaining:
                self._complete()
        else:
            self._keep(buffer)
            buffer = b""
        if self.response is not None:
            self.leftover = buffer
            return True
        self._buffer = buffer
        return False

    def finish(self) -> Response:
        """The connection closed: the response, if closing completes it."""
        if self.response is None:
            if self._in_head or self._remaining != _UNTIL_CLOSE or self._chunked:
                raise BadResponse("connection closed before the response ended")
            self._complete()
        assert self.response is not None
        return self.response

    def _head(self, buffer: bytes) -> bytes:
        while self._in_head:
            end = _HEAD_END.search(buffer)
            if end is None:
                if len(buffer.rstrip(b"\r\n")) > MAX_HEAD:  # not counting a partial end
                    raise BadResponse("response head too large")
                self._buffer = buffer
                return b""
            if end.start() > MAX_HEAD:
                raise BadResponse("response head too large")
            self._parse_head(buffer[: end.start()])
            buffer = buffer[end.end() :]
        return buffer

    def _parse_head(self, head: bytes) -> None:
        status_line, *lines = head.split(b"\n")
        match = _STATUS_LINE.fullmatch(status_line.rstrip(b"\r"))
        if match is None:
            raise BadResponse("malformed status line")
        status = int(match[2])
        if 100 <= status < 200:
            return  # interim (e.g. 100 Continue): the real response follows
        headers = _fields(lines)
        minor = match[1]
        connection = _tokens(headers.get(b"connection", b""))
        self.reusable = (
            b"keep-alive" in connection if minor == b"0" else b"close" not in connection
        )
        self._status, self._headers, self._in_head = status, headers, False
        self._frame(status, headers)

    def _frame(self, status: int, headers: dict[bytes, bytes]) -> None:
        """How the body ends (RFC 9112 section 6.3)."""
        if status in (204, 304):
            self._complete()
            return
        codings = headers.get(b"transfer-encoding")
        if codings is not None:
            if _tokens(codings)[-1:] == [b"chunked"]:
                self._chunked = True
            else:
                self._remaining = _UNTIL_CLOSE
            if b"content-length" in headers:
                self.reusable = False  # a smuggling attempt or a broken server
        elif b"content-length" in headers:
            self._remaining = _content_length(headers[b"content-length"])
        else:
            self._remaining = _UNTIL_CLOSE
        if self._remaining == _UNTIL_CLOSE:
            self.reusable = False
        elif not self._chunked and not self._remaining:
            self._complete()

    def _chunks(self, buffer: bytes) -> bytes:
        while self.response is None:
            if self._remaining:
                take = min(self._remaining, len(buffer))
                self._keep(buffer[:take])
                self._remaining -= take
                buffer = buffer[take:]
                if self._remaining:
                    return buffer
                self._chunk_crlf = True
            line, buffer = _line(buffer)
            if line is None:
                self._buffer = buffer
                return b""
            if self._chunk_crlf:
                if line:
                    raise BadResponse("chunk data longer than its size")
                self._chunk_crlf = False
            elif self._in_trailers:
                if not line:
                    self._complete()
            else:
                match = _CHUNK_SIZE.fullmatch(line)
                if match is None:
                    raise BadResponse("malformed chunk size")
                self._remaining = int(match[1], 16)
                self._in_trailers = not self._remaining
        return buffer

    def _keep(self, data: bytes) -> None:
        room = self._limit - self._kept
        if room > 0 and data:
            self._body.append(data[:room])
            self._kept += min(room, len(data))

    def _complete(self) -> None:
        self.response = Response(self._status, self._headers, b"".join(self._body))


def _line(buffer: bytes) -> tuple[bytes | None, bytes]:
    """The first line of C{buffer} without its ending, and what follows."""
    end = buffer.find(b"\n")
    if (end if end >= 0 else len(buffer)) > MAX_CHUNK_LINE:
        raise BadResponse("chunk line too long")
    if end < 0:
        return None, buffer
    return buffer[:end].rstrip(b"\r"), buffer[end + 1 :]


def _fields(lines: list[bytes]) -> dict[bytes, bytes]:
    fields: dict[bytes, bytes] = {}
    name = b""
    for raw in lines:
        line = raw.rstrip(b"\r")
        if line[:1] in (b" ", b"\t"):  # obsolete line folding: one field
            if not name:
                raise BadResponse("header continuation without a header")
            fields[name] += b" " + line.strip()
            continue
        name, colon, value = line.partition(b":")
        if not colon or _FIELD_NAME.fullmatch(name) is None:
            raise BadResponse("malformed header field")
        name = name.lower()
        value = value.strip(b" \t")
        fields[name] = fields[name] + b", " + value if name in fields else value
    return fields


def _tokens(value: bytes) -> list[bytes]:
    return [token.strip().lower() for token in value.split(b",") if token.strip()]


def _content_length(value: bytes) -> int:
    """A length, allowing a repeated identical value (RFC 9110 8.6)."""
    lengths = {token.strip() for token in value.split(b",")}
    if len(lengths) != 1:
        raise BadResponse("conflicting Content-Length values")
    [length] = lengths
    if not length.isdigit() or len(length) > 15:
        raise BadResponse("malformed Content-Length")
    return int(length)


class HTTP11Connection(Protocol):
    """One connection: one request written whole, then its response."""

    transport: Any
    """TCP or TLS: an C{ITCPTransport}, which can also abort."""

    def __init__(
        self,
        limit: int,
        release: Callable[[HTTP11Connection], None],
        forget: Callable[[HTTP11Connection], None],
    ) -> None:
        self._limit = limit
        self._release = release
        self._forget = forget
        self._parser: ResponseParser | None = None
        self._waiting: Deferred[Response] | None = None
        self._answered = 0
        """Responses completed on this connection so far."""
        self._heard = False
        """Whether any byte of the current response has arrived."""
        self.lost: Deferred[None] = Deferred()
        """Fires when the connection has closed, for an orderly shutdown."""

    def request(self, data: bytes) -> Deferred[Response]:
        assert self._waiting is None, "one request at a time"
        self._heard = False
        self._parser = ResponseParser(self._limit)
        self._waiting = Deferred(self._cancel)
        write_now(self.transport, data)
        return self._waiting

    def dataReceived(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            self.transport.loseConnection()  # a response nobody asked for
            return
        self._heard = True
        try:
            complete = parser.feed(data)
        except BadResponse as error:
            waiting = self._take()
            self.transport.abortConnection()
            waiting.errback(Failure(error))
            return
        if complete:
            assert parser.response is not None
            self._answered += 1
            waiting = self._take()
            if parser.reusable and not parser.leftover:
                self._release(self)
            else:
                self.transport.loseConnection()
            waiting.callback(parser.response)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._forget(self)
        if self._parser is not None:
            try:
                response = self._parser.finish()
            except BadResponse as error:
                stale = self._answered and not self._heard
                closed = StaleConnection if stale else ConnectionClosed
                why = reason.getErrorMessage()
                self._take().errback(Failure(closed(f"{error}: {why}")))
            else:
                self._take().callback(response)
        self.lost.callback(None)

    def _take(self) -> Deferred[Response]:
        """The pending request's Deferred; the connection is free again."""
        waiting = self._waiting
        assert waiting is not None
        self._waiting = self._parser = None
        return waiting

    def _cancel(self, waiting: Deferred[Response]) -> None:
        self._waiting = self._parser = None
        self.transport.abortConnection()


class _Connecting(Factory):
    """
    C{connectProtocol}, without its log line for every new connection.
    """

    noisy = False

    def __init__(self, connection: HTTP11Connection) -> None:
        self._connection = connection

    def buildProtocol(self, addr: object) -> HTTP11Connection:
        return self._connection


@attrs.define
class ConnectionPool:
    """
    Keep-alive connections to one endpoint.

    Idle connections are reused newest first, so that under light load the
    older ones reach C{idle_timeout} and close; at most C{max_idle} are
    kept.  The number open at once is bounded by the callers (the
    dispatcher's concurrency, or the number of SMTP sessions in sync mode).
    """

    endpoint: IStreamClientEndpoint
    clock: IReactorTime
    max_idle: int
    idle_timeout: float = 60.0
    response_limit: int = MAX_BODY
    _idle: list[tuple[HTTP11Connection, IDelayedCall]] = attrs.field(
        factory=list, init=False
    )
    _closed: bool = attrs.field(default=False, init=False)

    def request(self, data: bytes) -> Deferred[Response]:
        """
        Send one complete request (head and body) and read its response.

        A kept-alive connection may be closed by the receiver just as the
        request goes out (Node.js, for one, closes idle connections after
        five seconds); when it ends before any byte of the response, and
        only then, the request goes again on a new connection.  A receiver
        that did read it sees it twice, with the same C{webhook-id}, which
        at-least-once delivery allows.
        """
        if self._idle:
            connection, timer = self._idle.pop()
            timer.cancel()
            return connection.request(data).addErrback(self._on_a_new_one, data)
        return self._connect(data)

    def _on_a_new_one(self, failure: Failure, data: bytes) -> Deferred[Response]:
        failure.trap(StaleConnection)
        return self._connect(data)

    def _connect(self, data: bytes) -> Deferred[Response]:
        connection = HTTP11Connection(self.response_limit, self._release, self._forget)
        connecting = self.endpoint.connect(_Connecting(connection))
        return connecting.addCallback(lambda _: connection.request(data))

    def close(self) -> Deferred[Any]:
        """Close the idle connections; fires when they are closed."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection, timer in idle:
            timer.cancel()
            connection.transport.loseConnection()
        if not idle:
            return succeed(None)
        return DeferredList([connection.lost for connection, _ in idle])

    def _release(self, connection: HTTP11Connection) -> None:
        if self._closed or len(self._idle) >= self.max_idle:
            connection.transport.loseConnection()
            return
        timer = self.clock.callLater(self.idle_timeout, self._expire, connection)
        self._idle.append((connection, timer))

    def _expire(self, connection: HTTP11Connection) -> None:
        self._forget(connection)
        connection.transport.loseConnection()

    def _forget(self, connection: HTTP11Connection) -> None:
        for index, (idle, timer) in enumerate(self._idle):
            if idle is connection:
                del self._idle[index]
                if timer.active():
                    timer.cancel()
                return


__all__ = [
    "BadResponse",
    "ConnectionClosed",
    "ConnectionPool",
    "HTTP11Connection",
    "Response",
    "ResponseParser",
    "StaleConnection",
]
