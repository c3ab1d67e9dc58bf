"""
The webhook request: treq's C{HTTPClient} over Twisted's C{Agent}, with a
persistent connection pool, reduced to what the deliverer decides on.

Redirects are never followed (a webhook that redirects a POST is
misconfigured, and a redirect would resend a signed body to a URL we were
not given), the pool never sends a POST again by itself (the deliverer
decides about retries), and one timeout covers the whole exchange, from
connecting to the last byte of the response, of which only the start is
kept.
"""

from __future__ import annotations

import re
from email.utils import parsedate_to_datetime
from http.cookiejar import DefaultCookiePolicy
from typing import Any, NoReturn, Protocol, cast
from urllib.parse import unquote_to_bytes

import attrs
from hyperlink import EncodedURL
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet import protocol
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IConsumer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import (
    IAgentEndpointFactory,
    IBodyProducer,
    IPolicyForHTTPS,
    IResponse,
)
from zope.interface import implementer

from maillaser import __version__
from maillaser.interfaces import IWebhookPoster
from maillaser.message import WebhookResponse

USER_AGENT = f"MailLaser/{__version__}".encode("ascii")

BODY_LIMIT = 64 * 1024
"""
Bytes of a response body kept.  A receiver that sends more has its
connection closed there; the status and headers already arrived.
"""

REASON_LENGTH = 200
"""Characters of a C{text/plain} response body kept as the reason."""

CACHED_CONNECTION_TIMEOUT = 60
"""Seconds an idle pooled connection is kept."""

_Headers = dict[bytes | str, bytes | str]

_HEADERS: _Headers = {
    b"User-Agent": USER_AGENT,
    b"Content-Type": b"application/json",
}


_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


class _Client(Protocol):
    """What we use of treq's C{HTTPClient} (and of C{treq.testing.StubTreq})."""

    def post(
        self,
        url: _URI,
        /,
        *,
        data: bytes,
        headers: _Headers,
        auth: tuple[bytes, bytes] | None,
        allow_redirects: bool,
        unbuffered: bool,
    ) -> Deferred[Any]: ...


@implementer(IWebhookPoster)
class WebhookPoster:
    """POSTs to one URL, on connections kept open between requests."""

    def __init__(
        self,
        url: str,
        *,
        reactor: Any,
        concurrency: int,
        timeout: float,
        ca_file: str | None = None,
    ) -> None:
        """
        @param concurrency: how many requests may run at once: as many
            connections are kept open.
        @param timeout: seconds for each whole exchange.
        @param ca_file: a PEM bundle of the certificate authorities trusted
            for an https webhook, instead of the system's.
        """
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = concurrency
        pool.cachedConnectionTimeout = CACHED_CONNECTION_TIMEOUT
        pool.retryAutomatically = False
        trust = None if ca_file is None else trust_root(ca_file)
        endpoints = _CachedEndpoints(reactor, BrowserLikePolicyForHTTPS(trust), timeout)
        agent = Agent.usingEndpointFactory(reactor, endpoints, pool)
        # A jar that keeps no cookie (treq's own keeps them all): a receiver's
        # cookie is never sent back, every request stands alone.
        no_cookies = IndexableCookieJar(DefaultCookiePolicy(allowed_domains=()))
        client = HTTPClient(agent, cookiejar=no_cookies, data_to_body_producer=_BodyNow)
        self._setup(url, client, reactor, timeout, pool)

    @classmethod
    def using_client(
        cls, url: str, client: _Client, *, clock: IReactorTime, timeout: float
    ) -> WebhookPoster:
        """
        A poster that sends through C{client}: an C{HTTPClient} of the
        caller's, or a C{treq.testing.StubTreq}.
        """
        poster = cls.__new__(cls)
        poster._setup(url, client, clock, timeout, None)
        return poster

    def _setup(
        self,
        url: str,
        client: _Client,
        clock: IReactorTime,
        timeout: float,
        pool: HTTPConnectionPool | None,
    ) -> None:
        self._uri, self._auth = _target(url)
        self._client = client
        self._clock = clock
        self._timeout = timeout
        self._pool = pool

    def post(
        self, body: bytes, headers: dict[bytes, bytes]
    ) -> Deferred[WebhookResponse]:
        exchange = Deferred.fromCoroutine(self._exchange(body, headers))
        return exchange.addTimeout(self._timeout, self._clock, _timed_out)

    async def _exchange(
        self, body: bytes, headers: dict[bytes, bytes]
    ) -> WebhookResponse:
        all_headers = dict(_HEADERS)
        all_headers.update(headers.items())
        response: IResponse = await self._client.post(
            self._uri,
            data=body,
            headers=all_headers,
            auth=self._auth,
            allow_redirects=False,
            unbuffered=True,
        )
        content = await _read_body(response, BODY_LIMIT)
        return WebhookResponse(
            status=response.code,
            retry_after=parse_retry_after(
                _header(response, b"retry-after"), self._clock.seconds()
            ),
            reason=_reason(_header(response, b"content-type"), content),
        )

    def close(self) -> Deferred[None]:
        """Close the connections kept open."""
        if self._pool is None:
            return succeed(None)
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed


class _URI(EncodedURL):
    """
    A URL already made a URI.  treq makes one of the URL it is given on
    every request, with hyperlink's C{to_uri()}, which IDNA-encodes the
    host even when it is an IPv6 literal, and fails (hyperlink#68).
    """

    def to_uri(self) -> _URI:
        return self


def _target(url: str) -> tuple[_URI, tuple[bytes, bytes] | None]:
    """
    The URI to request, without credentials and fragment, and the
    credentials, sent as basic authentication as curl and requests do.
    """
    parsed = EncodedURL.from_text(url)
    credentials = None
    if parsed.userinfo:
        user, _, password = parsed.userinfo.partition(":")
        credentials = (unquote_to_bytes(user), unquote_to_bytes(password))
    plain = parsed.replace(userinfo="", fragment="")
    if isIPv6Address(plain.host):  # see _URI
        uri = plain.replace(host="").to_uri().replace(host=plain.host)
    else:
        uri = plain.to_uri()
    return cast(_URI, _URI.from_text(uri.to_text())), credentials


@implementer(IAgentEndpointFactory)
@attrs.define
class _CachedEndpoints:
    """
    The endpoints C{Agent} would connect with, built once per origin.
    C{Agent}'s own factory builds a new one for every request, even one that
    then reuses a pooled connection: a C{HostnameEndpoint} (which
    IDNA-encodes the host) and, for https, a TLS connection creator (a new
    OpenSSL context, with the trust store loaded into it).
    """

    reactor: Any
    policy: IPolicyForHTTPS
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
            self.reactor, uri.host, uri.port, timeout=self.connect_timeout
        )
        if uri.scheme == b"http":
            return tcp
        if uri.scheme == b"https":
            return wrapClientTLS(self.policy.creatorForNetloc(uri.host, uri.port), tcp)
        raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")


@implementer(IBodyProducer)
class _BodyNow:
    """
    Writes the request body as soon as it may.  treq's producer for bytes
    (C{FileBodyProducer}) writes it from a task of the global cooperator, on
    a later turn of the reactor.
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _CappedBody(protocol.Protocol):
    """
    Collects a response body, up to a limit.  Unlike C{treq.collect}, whose
    Deferred cannot be cancelled, this one closes the connection when it
    is: a receiver that stops sending mid-body must not hold it past the
    exchange's timeout.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        kept = data[: self.limit - self.size]
        self.chunks.append(kept)
        self.size += len(kept)
        if self.size >= self.limit and not self.done.called:
            self.done.callback(b"".join(self.chunks))
            self._close()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)

    def _cancel(self, done: Deferred[bytes]) -> None:
        self._close()

    def _close(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


def _read_body(response: IResponse, limit: int) -> Deferred[bytes]:
    """The first C{limit} bytes of C{response}'s body."""
    reader = _CappedBody(limit)
    response.deliverBody(reader)
    return reader.done


def trust_root(ca_file: str) -> object:
    """
    Every certificate in the PEM bundle C{ca_file}, as the authorities to
    trust.

    @raise OSError: if the file cannot be read.
    @raise ValueError: if it holds no certificate, or a broken one.
    """
    with open(ca_file, "rb") as bundle:
        blocks = _PEM_CERTIFICATE.findall(bundle.read())
    if not blocks:
        raise ValueError(f"{ca_file}: no PEM certificate in it")
    try:
        certificates = [Certificate.loadPEM(block) for block in blocks]
    except Exception as error:
        raise ValueError(f"{ca_file}: a certificate in it cannot be read") from error
    return trustRootFromCertificates(certificates)


def _timed_out(result: object, timeout: float) -> NoReturn:
    raise DeferredTimeoutError(f"no complete response within {timeout:g}s")


def _header(response: IResponse, name: bytes) -> bytes | None:
    values = response.headers.getRawHeaders(name)
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
