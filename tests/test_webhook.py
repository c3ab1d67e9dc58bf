"""The HTTP request: headers, no redirects, whole-request timeout, reasons."""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from maillaser import __version__
from maillaser.webhook import (
    CachedEndpoints,
    WebhookClient,
    WebhookResponse,
    parse_retry_after,
)


class Hook(Resource):
    isLeaf = True

    def __init__(
        self, code: int = 200, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> None:
        super().__init__()
        self.code, self.headers, self.body = code, headers or {}, body
        self.seen: list[Any] = []

    def render_POST(self, request: Any) -> bytes | int:
        self.seen.append((request.uri, request.requestHeaders, request.content.read()))
        if self.code == 0:
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return self.body


class WebhookClientTests(SynchronousTestCase):
    def post(self, hook: Hook, clock: Clock | None = None) -> Any:
        client = WebhookClient(
            url="http://hook.test/in?x=1",
            http=StubTreq(hook),  # type: ignore[arg-type]
            clock=clock or Clock(),
            timeout=30.0,
        )
        return client.post(
            b'{"a":1}', {b"webhook-id": b"msg_1", b"webhook-timestamp": b"5"}
        )

    def test_request(self) -> None:
        hook = Hook(204)
        self.assertEqual(self.successResultOf(self.post(hook)), WebhookResponse(204))
        [(uri, headers, body)] = hook.seen
        self.assertEqual(uri, b"/in?x=1")
        self.assertEqual(body, b'{"a":1}')
        self.assertEqual(
            headers.getRawHeaders("user-agent"), [f"MailLaser/{__version__}"]
        )
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(headers.getRawHeaders("webhook-id"), ["msg_1"])
        self.assertEqual(headers.getRawHeaders("webhook-timestamp"), ["5"])

    def test_redirect_is_not_followed(self) -> None:
        hook = Hook(302, {"location": "http://elsewhere.test/"})
        self.assertEqual(self.successResultOf(self.post(hook)).status, 302)
        self.assertEqual(len(hook.seen), 1)

    def test_timeout_covers_the_whole_request(self) -> None:
        clock = Clock()
        d = self.post(Hook(0), clock)
        clock.advance(29.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.failureResultOf(d, DeferredTimeoutError)

    def test_text_reason_is_kept_short_and_printable(self) -> None:
        body = b"Unknown\r\nqueue \x1b[31m" + b"x" * 1000
        response = self.successResultOf(
            self.post(Hook(422, {"content-type": "text/plain; charset=utf-8"}, body))
        )
        self.assertEqual(response.status, 422)
        self.assertTrue(response.reason.startswith("Unknown queue [31mxxx"))
        self.assertEqual(len(response.reason), 200)

    def test_no_reason_from_other_content_types(self) -> None:
        response = self.successResultOf(
            self.post(Hook(400, {"content-type": "application/json"}, b'{"e":1}'))
        )
        self.assertEqual(response.reason, "")

    def test_retry_after_header(self) -> None:
        response = self.successResultOf(self.post(Hook(429, {"retry-after": "120"})))
        self.assertEqual(response.retry_after, 120.0)


class RetryAfterTests(SynchronousTestCase):
    def test_forms(self) -> None:
        now = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT
        self.assertEqual(parse_retry_after(b"30", now), 30.0)
        self.assertEqual(parse_retry_after(b"Sun, 06 Nov 1994 08:50:37 GMT", now), 60.0)
        self.assertEqual(parse_retry_after(b"Sun, 06 Nov 1994 08:40:37 GMT", now), 0.0)
        self.assertIsNone(parse_retry_after(b"soon", now))
        self.assertIsNone(parse_retry_after(b"-5", now))
        self.assertIsNone(parse_retry_after(None, now))


class CachedEndpointsTests(SynchronousTestCase):
    def test_one_endpoint_per_origin(self) -> None:
        endpoints = CachedEndpoints(
            MemoryReactorClock(), BrowserLikePolicyForHTTPS(), 5.0
        )
        first = endpoints.endpointForURI(URI.fromBytes(b"http://hook.test:8080/a"))
        again = endpoints.endpointForURI(URI.fromBytes(b"http://hook.test:8080/b"))
        other = endpoints.endpointForURI(URI.fromBytes(b"https://hook.test/a"))
        self.assertIs(first, again)
        self.assertIsNot(first, other)

    def test_connects_where_the_uri_says(self) -> None:
        reactor = MemoryReactorClock()
        endpoints = CachedEndpoints(reactor, BrowserLikePolicyForHTTPS(), 5.0)
        endpoint = endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8080/a"))
        endpoint.connect(Factory.forProtocol(Protocol))
        [(host, port, _factory, timeout, _bind)] = reactor.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 8080, 5.0))
