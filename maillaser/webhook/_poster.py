"""
The webhook request: one URL, its request head built once, signed headers
and the JSON body added per attempt, and the response reduced to what the
deliverer decides on.

Redirects are never followed (a webhook that redirects a POST is
misconfigured, and a redirect would resend a signed body to a URL we were
not given); the timeout covers the whole exchange, from connecting to the
last byte of the response.
"""

from __future__ import annotations

from base64 import b64encode
from email.utils import parsedate_to_datetime
from ipaddress import ip_address
from typing import Any, NoReturn
from urllib.parse import quote, unquote_to_bytes, urlsplit

import attrs
import idna
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from maillaser import __version__
from maillaser.http import ConnectionPool, Response
from maillaser.interfaces import IWebhookClient

USER_AGENT = f"MailLaser/{__version__}".encode("ascii")

REASON_LENGTH = 200


@attrs.frozen
class WebhookResponse:
    """What we keep of a response: enough to decide, log and reply."""

    status: int
    retry_after: float | None = None
    reason: str = ""
    """A short C{text/plain} explanation from the receiver, if it gave one."""


@attrs.frozen
class Target:
    """Where requests go, taken apart once from the configured URL."""

    scheme: str
    host: str
    """IDNA-encoded, without brackets around an IPv6 address."""
    port: int
    head: bytes
    """Request line and the fixed headers, each ending in CRLF."""

    @classmethod
    def from_url(cls, url: str) -> Target:
        """
        Percent-encode the path and IDNA-encode the host, as a browser
        would; credentials in the URL become basic authentication, as curl
        and requests make them.
        """
        parts = urlsplit(url)
        host = _ascii_host(parts.hostname or "")
        default_port = 443 if parts.scheme == "https" else 80
        port = parts.port or default_port
        authority = f"[{host}]" if ":" in host else host
        if port != default_port:
            authority += f":{port}"
        target = quote(parts.path or "/", safe=_URL_SAFE)
        if parts.query:
            target += "?" + quote(parts.query, safe=_URL_SAFE + "?")
        lines = [
            b"POST " + target.encode("ascii") + b" HTTP/1.1",
            b"Host: " + authority.encode("ascii"),
            b"User-Agent: " + USER_AGENT,
            b"Content-Type: application/json",
        ]
        if parts.username is not None:
            credentials = unquote_to_bytes(parts.username) + b":"
            credentials += unquote_to_bytes(parts.password or "")
            lines.append(b"Authorization: Basic " + b64encode(credentials))
        return cls(parts.scheme, host, port, b"".join(line + b"\r\n" for line in lines))

    def endpoint(
        self, reactor: Any, tls_policy: IPolicyForHTTPS, connect_timeout: float
    ) -> IStreamClientEndpoint:
        tcp = HostnameEndpoint(reactor, self.host, self.port, timeout=connect_timeout)
        if self.scheme == "https":
            creator = tls_policy.creatorForNetloc(self.host.encode("ascii"), self.port)
            return wrapClientTLS(creator, tcp)
        return tcp


@implementer(IWebhookClient)
@attrs.define
class WebhookClient:
    """POSTs to one L{Target} through a L{ConnectionPool} to its origin."""

    target: Target
    pool: ConnectionPool
    clock: IReactorTime
    timeout: float

    def post(
        self, body: bytes, headers: dict[bytes, bytes]
    ) -> Deferred[WebhookResponse]:
        request = b"".join(
            [
                self.target.head,
                *[name + b": " + value + b"\r\n" for name, value in headers.items()],
                b"Content-Length: %d\r\n\r\n" % len(body),
                body,
            ]
        )
        d = self.pool.request(request).addCallback(_summarise, self.clock)
        return d.addTimeout(self.timeout, self.clock, onTimeoutCancel=_timed_out)


_URL_SAFE = "/%:@!$&'()*+,;=-._~"
"""What stays as written in a path or query; anything else is percent-encoded."""


def _ascii_host(host: str) -> str:
    try:
        return str(ip_address(host))
    except ValueError:
        return idna.encode(host, uts46=True).decode("ascii")


def _timed_out(result: object, timeout: float) -> NoReturn:
    raise DeferredTimeoutError(f"no complete response within {timeout:g}s")


def make_webhook_client(
    url: str,
    reactor: Any,
    *,
    concurrency: int,
    timeout: float,
    tls_policy: IPolicyForHTTPS | None = None,
) -> WebhookClient:
    """
    The process-wide client: as many persistent connections as deliveries
    run at once, a connection timeout within the request timeout, and the
    system's trusted certificate authorities for https.
    """
    target = Target.from_url(url)
    endpoint = target.endpoint(
        reactor, tls_policy or BrowserLikePolicyForHTTPS(), min(timeout, 30.0)
    )
    pool = ConnectionPool(endpoint, reactor, max_idle=concurrency)
    return WebhookClient(target, pool, reactor, timeout)


def _summarise(response: Response, clock: IReactorTime) -> WebhookResponse:
    return WebhookResponse(
        status=response.status,
        retry_after=parse_retry_after(response.header(b"retry-after"), clock.seconds()),
        reason=_reason(response.header(b"content-type"), response.body),
    )


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


__all__ = [
    "Target",
    "WebhookClient",
    "WebhookResponse",
    "make_webhook_client",
    "parse_retry_after",
]
