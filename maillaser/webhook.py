"""
The HTTP request to the webhook, and nothing else.

One persistent connection pool and one agent for the process; redirects are
never followed (a webhook that redirects a POST is misconfigured, and a
redirect would resend a signed body to a URL we were not given); the timeout
covers the whole exchange, from connecting to the last byte of the response.
"""

from __future__ import annotations

from email.utils import parsedate_to_datetime
from typing import Any, NoReturn

import attrs
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from maillaser import __version__
from maillaser.interfaces import IWebhookClient

USER_AGENT = f"MailLaser/{__version__}".encode("ascii")

MAX_RESPONSE_BODY = 64 * 1024
"""Read at most this much of a response; the rest is discarded unread."""

REASON_LENGTH = 200


@attrs.frozen
class WebhookResponse:
    """What we keep of a response: enough to decide, log and reply."""

    status: int
    retry_after: float | None = None
    reason: str = ""
    """A short C{text/plain} explanation from the receiver, if it gave one."""


@implementer(IBodyProducer)
@attrs.define
class BytesProducer:
    """
    A request body written in one call.

    treq's default producer for C{bytes} goes through a cooperator, costing
    reactor iterations per request; the body is already in memory.
    """

    body: bytes

    @property
    def length(self) -> int:
        return len(self.body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def _body_producer(data: Any) -> IBodyProducer:
    return BytesProducer(data) if isinstance(data, bytes) else IBodyProducer(data)


@implementer(IWebhookClient)
@attrs.define
class WebhookClient:
    """POSTs to one URL through an injected treq C{HTTPClient}."""

    url: str
    http: HTTPClient
    clock: IReactorTime
    timeout: float

    def post(
        self, body: bytes, headers: dict[bytes, bytes]
    ) -> Deferred[WebhookResponse]:
        request_headers = Headers({name: [value] for name, value in headers.items()})
        request_headers.setRawHeaders(b"user-agent", [USER_AGENT])
        request_headers.setRawHeaders(b"content-type", [b"application/json"])
        d = self.http.post(
            self.url, data=body, headers=request_headers, allow_redirects=False
        )
        d.addCallback(_read_response, self.clock)
        return d.addTimeout(self.timeout, self.clock, onTimeoutCancel=_timed_out)


def _timed_out(result: object, timeout: float) -> NoReturn:
    """
    Our timer fired.  The Agent reports the cancellation as
    C{ResponseNeverReceived([CancelledError])} or similar, depending on how
    far the request got; whatever it says, what happened is a timeout.
    """
    raise DeferredTimeoutError(f"no complete response within {timeout:g}s")


def make_http_client(
    reactor: Any, concurrency: int, timeout: float
) -> tuple[HTTPClient, HTTPConnectionPool]:
    """
    The process-wide client: persistent connections, one per concurrent
    delivery, and no automatic retries (POST is not idempotent; our own
    retry logic decides).
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = concurrency
    pool.cachedConnectionTimeout = 60
    pool.retryAutomatically = False
    endpoints = CachedEndpoints(
        reactor, BrowserLikePolicyForHTTPS(), min(timeout, 30.0)
    )
    agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
    return HTTPClient(agent, data_to_body_producer=_body_producer), pool


@implementer(IAgentEndpointFactory)
@attrs.define
class CachedEndpoints:
    """
    One endpoint per origin, made once.

    The Agent otherwise builds a C{HostnameEndpoint} (and, for https, a TLS
    connection creator) for every request, even when the pool already holds
    a connection to reuse; at a thousand messages a second that showed up
    in the profile.  Endpoints are reusable: each C{connect} is a new attempt.
    """

    reactor: Any
    tls_policy: Any
    connect_timeout: float
    _endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = attrs.field(
        factory=dict
    )

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = self._endpoint(uri)
        return endpoint

    def _endpoint(self, uri: URI) -> IStreamClientEndpoint:
        tcp = HostnameEndpoint(
            self.reactor,
            uri.host.decode("ascii"),
            uri.port,
            timeout=self.connect_timeout,
        )
        if uri.scheme == b"https":
            creator = self.tls_policy.creatorForNetloc(uri.host, uri.port)
            return wrapClientTLS(creator, tcp)
        return tcp


def _read_response(
    response: IResponse, clock: IReactorTime
) -> Deferred[WebhookResponse]:
    collector = _CappedBody(MAX_RESPONSE_BODY)
    response.deliverBody(collector)
    return collector.done.addCallback(_summarise, response, clock)


def _summarise(
    body: bytes, response: IResponse, clock: IReactorTime
) -> WebhookResponse:
    headers = response.headers
    return WebhookResponse(
        status=response.code,
        retry_after=parse_retry_after(
            _header(headers, b"retry-after"), clock.seconds()
        ),
        reason=_reason(_header(headers, b"content-type"), body),
    )


def _header(headers: Headers, name: bytes) -> bytes | None:
    values = headers.getRawHeaders(name)
    return values[0] if values else None


def parse_retry_after(value: bytes | None, now: float) -> float | None:
    """Seconds to wait, from delta-seconds or an HTTP date; C{None} if absent or bad."""
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def _reason(content_type: bytes | None, body: bytes) -> str:
    """The receiver's short explanation, made safe to put in an SMTP reply."""
    if content_type is None or not content_type.lower().startswith(b"text/plain"):
        return ""
    text = body[: REASON_LENGTH * 4].decode("utf-8", "replace")
    printable = "".join(c if c.isprintable() else " " for c in text)
    return " ".join(printable.split())[:REASON_LENGTH]


class _CappedBody(Protocol):
    """Collects up to C{limit} bytes of a response body and ignores the rest."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        room = self._limit - self._size
        if room > 0:
            self._chunks.append(data[:room])
        self._size += len(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(b"".join(self._chunks))

    def _cancel(self, d: Deferred[bytes]) -> None:
        producer: Any = self.transport
        if producer is not None:
            producer.stopProducing()


__all__ = [
    "BytesProducer",
    "CachedEndpoints",
    "WebhookClient",
    "WebhookResponse",
    "make_http_client",
    "parse_retry_after",
]
