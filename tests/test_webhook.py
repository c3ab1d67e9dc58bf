"""
The webhook request, against a real receiver on loopback: the exact request,
no redirects, a whole-request timeout, reasons, keep-alive, and https.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import BrowserLikePolicyForHTTPS

from maillaser import __version__
from maillaser.http import ConnectionClosed
from maillaser.testing import HANG, Reply, WebhookReceiver
from maillaser.tls import self_signed
from maillaser.webhook import (
    Target,
    WebhookClient,
    WebhookResponse,
    make_webhook_client,
    parse_retry_after,
)
from tests.helpers import wait

HEADERS = {b"webhook-id": b"msg_1", b"webhook-timestamp": b"5"}


class WebhookClientTests(TestCase):
    async def receiver(self, *script: Reply | int) -> WebhookReceiver:
        receiver = WebhookReceiver()
        receiver.script(*script)
        await receiver.listen(reactor)
        self.addCleanup(receiver.stop)
        return receiver

    def client(self, url: str, **options: Any) -> WebhookClient:
        options.setdefault("timeout", 10.0)
        client = make_webhook_client(url, reactor, concurrency=4, **options)
        self.addCleanup(client.pool.close)
        return client

    async def test_request(self) -> None:
        receiver = await self.receiver(204)
        client = self.client(receiver.url + "?x=1")
        response = await wait(client.post(b'{"a":1}', HEADERS))
        self.assertEqual(response, WebhookResponse(204))
        [request] = receiver.requests
        self.assertEqual((request.method, request.path), ("POST", "/hook?x=1"))
        self.assertEqual(request.body, b'{"a":1}')
        port = receiver.url.split(":")[2].split("/")[0]
        self.assertEqual(
            request.headers,
            {
                "host": f"127.0.0.1:{port}",
                "user-agent": f"MailLaser/{__version__}",
                "content-type": "application/json",
                "content-length": "7",
                "webhook-id": "msg_1",
                "webhook-timestamp": "5",
            },
        )

    async def test_one_connection_carries_many_requests(self) -> None:
        receiver = await self.receiver()
        client = self.client(receiver.url)
        for _ in range(3):
            self.assertEqual((await wait(client.post(b"{}", HEADERS))).status, 200)
        self.assertEqual(len(receiver.requests), 3)
        self.assertEqual(len(client.pool._idle), 1)

    async def test_redirect_is_not_followed(self) -> None:
        receiver = await self.receiver(
            Reply(302, {"location": "http://127.0.0.1:1/elsewhere"})
        )
        response = await wait(self.client(receiver.url).post(b"{}", HEADERS))
        self.assertEqual(response.status, 302)
        self.assertEqual(len(receiver.requests), 1)

    async def test_timeout_covers_the_whole_request(self) -> None:
        receiver = await self.receiver(HANG)
        clock = Clock()
        client = self.client(receiver.url, timeout=30.0)
        client.clock = clock
        d = client.post(b"{}", HEADERS)
        await wait(receiver.wait_for(1))
        clock.advance(29.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.failureResultOf(d, DeferredTimeoutError)
        self.assertEqual(client.pool._idle, [])  # the connection was aborted

    async def test_text_reason_is_kept_short_and_printable(self) -> None:
        body = b"Unknown\r\nqueue \x1b[31m" + b"x" * 1000
        receiver = await self.receiver(
            Reply(422, {"content-type": "text/plain; charset=utf-8"}, body)
        )
        response = await wait(self.client(receiver.url).post(b"{}", HEADERS))
        self.assertEqual(response.status, 422)
        self.assertTrue(response.reason.startswith("Unknown queue [31mxxx"))
        self.assertEqual(len(response.reason), 200)

    async def test_no_reason_from_other_content_types(self) -> None:
        receiver = await self.receiver(
            Reply(400, {"content-type": "application/json"}, b'{"e":1}')
        )
        response = await wait(self.client(receiver.url).post(b"{}", HEADERS))
        self.assertEqual(response.reason, "")

    async def test_retry_after_header(self) -> None:
        receiver = await self.receiver(Reply(429, {"retry-after": "120"}))
        response = await wait(self.client(receiver.url).post(b"{}", HEADERS))
        self.assertEqual(response.retry_after, 120.0)

    async def test_credentials_in_the_url_are_basic_authentication(self) -> None:
        receiver = await self.receiver()
        url = receiver.url.replace("http://", "http://hook%40user:s3cr%3At@")
        await wait(self.client(url).post(b"{}", HEADERS))
        [request] = receiver.requests
        # base64 of "hook@user:s3cr:t"
        self.assertEqual(
            request.headers["authorization"], "Basic aG9va0B1c2VyOnMzY3I6dA=="
        )

    async def tls_receiver(self) -> tuple[WebhookReceiver, bytes, str]:
        """A receiver on https, its certificate, and its URL by name."""
        cert_pem, key_pem = self_signed("localhost")
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "cert.pem").write_bytes(cert_pem)
        (directory / "key.pem").write_bytes(key_pem)
        receiver = WebhookReceiver()
        await receiver.listen(
            reactor,
            f"ssl:0:interface=127.0.0.1:privateKey={directory / 'key.pem'}"
            f":certKey={directory / 'cert.pem'}",
        )
        self.addCleanup(receiver.stop)
        return (
            receiver,
            cert_pem,
            receiver.url.replace("http://127.0.0.1", "https://localhost"),
        )

    async def test_https_with_a_trusted_certificate(self) -> None:
        receiver, cert_pem, url = await self.tls_receiver()
        policy = BrowserLikePolicyForHTTPS(Certificate.loadPEM(cert_pem))
        client = self.client(url, tls_policy=policy)
        response = await wait(client.post(b"{}", HEADERS))
        self.assertEqual(response.status, 200)
        self.assertEqual(receiver.requests[0].headers["host"], url.split("/")[2])

    async def test_https_refuses_an_untrusted_certificate(self) -> None:
        receiver, _, url = await self.tls_receiver()
        client = self.client(url)
        with self.assertRaises(ConnectionClosed) as caught:
            await wait(client.post(b"{}", HEADERS))
        self.assertIn("certificate verify failed", str(caught.exception))
        self.assertEqual(receiver.requests, [])


class TargetTests(SynchronousTestCase):
    def test_head(self) -> None:
        target = Target.from_url("http://hook.test/in?x=1#frag")
        self.assertEqual(
            (target.scheme, target.host, target.port), ("http", "hook.test", 80)
        )
        self.assertEqual(
            target.head,
            b"POST /in?x=1 HTTP/1.1\r\nHost: hook.test\r\n"
            + f"User-Agent: MailLaser/{__version__}\r\n".encode()
            + b"Content-Type: application/json\r\n",
        )

    def test_international_host_and_path_are_encoded(self) -> None:
        target = Target.from_url("https://bücher.example:8443/straße")
        self.assertEqual(target.host, "xn--bcher-kva.example")
        self.assertEqual(target.port, 8443)
        self.assertTrue(
            target.head.startswith(
                b"POST /stra%C3%9Fe HTTP/1.1\r\nHost: xn--bcher-kva.example:8443\r\n"
            ),
            target.head,
        )

    def test_ipv6_literal(self) -> None:
        target = Target.from_url("http://[::1]:8080")
        self.assertEqual((target.host, target.port), ("::1", 8080))
        self.assertIn(b"POST / HTTP/1.1\r\nHost: [::1]:8080\r\n", target.head)

    def test_default_https_port_is_not_in_the_host_header(self) -> None:
        target = Target.from_url("https://hook.test:443/")
        self.assertIn(b"\r\nHost: hook.test\r\n", target.head)

    def test_connects_where_the_url_says(self) -> None:
        memory = MemoryReactorClock()
        endpoint = Target.from_url("http://127.0.0.1:8080/a").endpoint(
            memory, BrowserLikePolicyForHTTPS(), 5.0
        )
        self.assertIsInstance(endpoint, HostnameEndpoint)
        endpoint.connect(Factory.forProtocol(Protocol))
        [(host, port, _factory, timeout, _bind)] = memory.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 8080, 5.0))


class RetryAfterTests(SynchronousTestCase):
    def test_forms(self) -> None:
        now = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT
        self.assertEqual(parse_retry_after(b"30", now), 30.0)
        self.assertEqual(parse_retry_after(b"Sun, 06 Nov 1994 08:50:37 GMT", now), 60.0)
        self.assertEqual(parse_retry_after(b"Sun, 06 Nov 1994 08:40:37 GMT", now), 0.0)
        self.assertIsNone(parse_retry_after(b"soon", now))
        self.assertIsNone(parse_retry_after(b"-5", now))
        self.assertIsNone(parse_retry_after(None, now))
