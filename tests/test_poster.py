"""
The webhook poster: treq over Agent, in memory with C{StubTreq} and a
C{Clock} for the request and its timing, then against real receivers on
loopback, over http and over https with a private certificate authority.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL.SSL import Error as TLSError
from service_identity import VerificationError as HostnameMismatch
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import (
    BrowserLikePolicyForHTTPS,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface.verify import verifyObject

from maillaser import __version__
from maillaser.interfaces import IWebhookPoster
from maillaser.testing import HANG, Reply, WebhookReceiver
from maillaser.webhook import (
    WebhookPoster,
    WebhookResponse,
    describe_error,
    trust_root,
)
from maillaser.webhook._poster import BODY_LIMIT, parse_retry_after
from tests.helpers import failure_of, wait

HEADERS = {b"webhook-id": b"msg_1", b"webhook-timestamp": b"5"}
NOW = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT


@attrs.define
class Seen:
    """One request as a resource saw it."""

    method: bytes
    uri: bytes
    headers: dict[bytes, Sequence[bytes]]
    body: bytes


class Scripted(Resource):
    """
    Answers from a function of the request: (status, headers, body), or
    C{None} to keep the request open (C{held} has its C{notifyFinish()}).
    """

    isLeaf = True

    def __init__(self, answer: Callable[[Request], Any] | None = None) -> None:
        super().__init__()
        self.answer: Callable[[Request], Any] = answer or (
            lambda request: (204, {}, b"")
        )
        self.seen: list[Seen] = []
        self.held: list[Deferred[None]] = []

    def render(self, request: IRequest) -> bytes | int:
        assert isinstance(request, Request)
        assert request.method is not None and request.uri is not None
        self.seen.append(
            Seen(
                request.method,
                request.uri,
                dict(request.requestHeaders.getAllRawHeaders()),
                request.content.read() if request.content else b"",
            )
        )
        answer = self.answer(request)
        if answer is None:
            self.held.append(request.notifyFinish())
            return NOT_DONE_YET
        status, headers, body = answer
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name, value)
        result: bytes = body
        return result


def answering(
    status: int, headers: dict[str, str] | None = None, body: bytes = b""
) -> Scripted:
    return Scripted(lambda request: (status, headers or {}, body))


class StubbedTests(SynchronousTestCase):
    """The request and its response, in memory."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)

    def poster(
        self, resource: Resource, url: str = "http://hook.test/in", timeout: float = 30
    ) -> tuple[WebhookPoster, Any]:
        stub: Any = StubTreq(resource)
        poster = WebhookPoster.using_client(
            url, stub, clock=self.clock, timeout=timeout
        )
        return poster, stub

    def post(self, resource: Resource, url: str = "http://hook.test/in") -> Any:
        poster, _ = self.poster(resource, url)
        return self.successResultOf(poster.post(b'{"a":1}', HEADERS))

    def test_request(self) -> None:
        resource = Scripted()
        self.assertEqual(
            self.post(resource, "http://hook.test/in?x=1#frag"), WebhookResponse(204)
        )
        [seen] = resource.seen
        self.assertEqual(
            (seen.method, seen.uri, seen.body), (b"POST", b"/in?x=1", b'{"a":1}')
        )
        del seen.headers[b"Connection"]  # StubTreq's agent keeps none open
        self.assertEqual(
            seen.headers,
            {
                b"Host": [b"hook.test"],
                b"User-Agent": [f"MailLaser/{__version__}".encode()],
                b"Content-Type": [b"application/json"],
                b"Content-Length": [b"7"],
                b"Webhook-Id": [b"msg_1"],
                b"Webhook-Timestamp": [b"5"],
                b"Accept-Encoding": [b"gzip"],
            },
        )

    def test_statuses(self) -> None:
        for status in (200, 204, 301, 400, 422, 429, 500, 503):
            self.assertEqual(self.post(answering(status)), WebhookResponse(status))

    def test_redirect_is_not_followed(self) -> None:
        resource = answering(302, {"location": "http://hook.test/elsewhere"})
        self.assertEqual(self.post(resource), WebhookResponse(302))
        self.assertEqual(len(resource.seen), 1)

    def test_retry_after(self) -> None:
        for value, expected in [
            ("120", 120.0),
            ("Sun, 06 Nov 1994 08:50:37 GMT", 60.0),
            ("soon", None),
        ]:
            response = self.post(answering(503, {"retry-after": value}))
            self.assertEqual(response.retry_after, expected, value)

    def test_text_reason_is_kept_short_and_printable(self) -> None:
        body = b"Unknown\r\nqueue \x1b[31m" + b"x" * 1000
        response = self.post(
            answering(422, {"content-type": "text/plain; charset=utf-8"}, body)
        )
        self.assertEqual(response.status, 422)
        self.assertTrue(response.reason.startswith("Unknown queue [31mxxx"))
        self.assertEqual(len(response.reason), 200)

    def test_no_reason_from_other_content_types(self) -> None:
        response = self.post(
            answering(400, {"content-type": "application/json"}, b"{}")
        )
        self.assertEqual(response.reason, "")

    def test_body_over_the_cap(self) -> None:
        """The start is kept and the connection closed: the rest is not awaited."""
        resource = Scripted(lambda request: self.endless(request, b"full\n" * 99))
        poster, stub = self.poster(resource)
        d = poster.post(b"{}", HEADERS)
        stub.flush()
        self.assertEqual(
            self.successResultOf(d), WebhookResponse(500, reason="full " * 40)
        )
        [finished] = resource.held
        self.failureResultOf(finished)

    def endless(self, request: Request, text: bytes) -> None:
        """Declares more than the cap and sends the cap."""
        request.setResponseCode(500)
        request.setHeader("content-type", "text/plain")
        request.setHeader("content-length", str(BODY_LIMIT + 1))
        request.write((text * BODY_LIMIT)[:BODY_LIMIT])

    def test_credentials_are_basic_authentication(self) -> None:
        resource = Scripted()
        self.post(resource, "http://hook%40user:s3cr%3At@hook.test/in")
        [seen] = resource.seen
        # base64 of "hook@user:s3cr:t"
        self.assertEqual(
            seen.headers[b"Authorization"], [b"Basic aG9va0B1c2VyOnMzY3I6dA=="]
        )
        self.assertEqual(seen.headers[b"Host"], [b"hook.test"])

    def test_international_host_and_path_are_encoded(self) -> None:
        resource = Scripted()
        self.post(resource, "https://bücher.example:8443/straße")
        [seen] = resource.seen
        self.assertEqual(seen.uri, b"/stra%C3%9Fe")
        self.assertEqual(seen.headers[b"Host"], [b"xn--bcher-kva.example:8443"])

    def test_ipv6_literal(self) -> None:
        """hyperlink cannot make a URI of an IPv6 literal URL by itself."""
        resource = Scripted()
        self.post(resource, "http://[::1]:8080/a b")
        [seen] = resource.seen
        self.assertEqual(
            (seen.uri, seen.headers[b"Host"]), (b"/a%20b", [b"[::1]:8080"])
        )

    def test_timeout_before_the_response(self) -> None:
        poster, _ = self.poster(Scripted(lambda request: None), timeout=30)
        d = poster.post(b"{}", HEADERS)
        self.clock.advance(29.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, DeferredTimeoutError)
        self.assertEqual(describe_error(failure.value), "timed out")

    def test_timeout_covers_the_body(self) -> None:
        """A body that stops coming times out, and its connection is closed."""

        def stall(request: Request) -> None:
            request.setHeader("content-length", "100")
            request.write(b"the start")

        resource = Scripted(stall)
        poster, stub = self.poster(resource, timeout=30)
        d = poster.post(b"{}", HEADERS)
        stub.flush()
        self.assertNoResult(d)
        self.clock.advance(30)
        self.failureResultOf(d, DeferredTimeoutError)
        stub.flush()
        [finished] = resource.held
        self.failureResultOf(finished)


class AssemblyTests(SynchronousTestCase):
    """The poster the bridge builds, on a memory reactor."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def poster(self, url: str = "http://127.0.0.1:8080/hook") -> WebhookPoster:
        return WebhookPoster(url, reactor=self.reactor, concurrency=2, timeout=5)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IWebhookPoster, self.poster()))

    def test_body_written_with_the_head(self) -> None:
        """
        Once connected, the request goes out whole, in this turn of the
        reactor: nothing waits for a cooperator task.
        """
        self.poster().post(b'{"a":1}', HEADERS)
        [(host, port, factory, timeout, _)] = self.reactor.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 8080, 5))
        transport = StringTransport()
        protocol = factory.buildProtocol(None)
        assert protocol is not None
        protocol.makeConnection(transport)
        self.assertTrue(
            transport.value().endswith(b'\r\n\r\n{"a":1}'), transport.value()
        )

    def test_one_endpoint_per_origin(self) -> None:
        """One TLS connection creator for any number of requests."""
        made: list[bytes] = []
        creator_for = BrowserLikePolicyForHTTPS.creatorForNetloc

        def counting(policy: BrowserLikePolicyForHTTPS, host: bytes, port: int) -> Any:
            made.append(host)
            return creator_for(policy, host, port)

        self.patch(BrowserLikePolicyForHTTPS, "creatorForNetloc", counting)
        poster = self.poster("https://hook.test/in")
        for _ in range(3):
            poster.post(b"{}", HEADERS)
        self.assertEqual(len(self.reactor.tcpClients), 3)
        self.assertEqual(made, [b"hook.test"])

    def test_close(self) -> None:
        self.successResultOf(self.poster().close())
        stub: Any = StubTreq(Scripted())
        poster = WebhookPoster.using_client(
            "http://hook.test/", stub, clock=Clock(), timeout=1
        )
        self.successResultOf(poster.close())


class RetryAfterTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(parse_retry_after(b"30", NOW), 30.0)
        self.assertEqual(parse_retry_after(b"Sun, 06 Nov 1994 08:50:37 GMT", NOW), 60.0)
        self.assertEqual(parse_retry_after(b"Sun, 06 Nov 1994 08:40:37 GMT", NOW), 0.0)
        self.assertIsNone(parse_retry_after(b"Sun, 06 Nov 1994 08:50:37", NOW))
        self.assertIsNone(parse_retry_after(b"soon", NOW))
        self.assertIsNone(parse_retry_after(b"-5", NOW))
        self.assertIsNone(parse_retry_after(None, NOW))


class PeerRecorder(Resource):
    """A receiver that also notes which connection each request came on."""

    isLeaf = True

    def __init__(self, receiver: WebhookReceiver) -> None:
        super().__init__()
        self.receiver = receiver
        self.ports: list[int] = []

    def render(self, request: IRequest) -> bytes | int:
        address: Any = request.getClientAddress()
        self.ports.append(address.port)
        return self.receiver.render(request)


class LoopbackTests(TestCase):
    """Against a real receiver on loopback."""

    async def receiver(self, *script: Reply | int) -> WebhookReceiver:
        receiver = WebhookReceiver()
        receiver.script(*script)
        await receiver.listen(reactor)
        self.addCleanup(receiver.stop)
        return receiver

    def poster(self, url: str, timeout: float = 10.0, **options: Any) -> WebhookPoster:
        poster = WebhookPoster(
            url, reactor=reactor, concurrency=4, timeout=timeout, **options
        )
        self.addCleanup(poster.close)
        return poster

    async def test_request(self) -> None:
        receiver = await self.receiver(
            Reply(422, {"content-type": "text/plain"}, b"no")
        )
        response = await wait(
            self.poster(receiver.url + "?x=1").post(b'{"a":1}', HEADERS)
        )
        self.assertEqual(response, WebhookResponse(422, reason="no"))
        [request] = receiver.requests
        self.assertEqual((request.method, request.path), ("POST", "/hook?x=1"))
        self.assertEqual(request.body, b'{"a":1}')
        self.assertEqual(
            {
                name: request.headers[name]
                for name in ("user-agent", "content-type", "webhook-id")
            },
            {
                "user-agent": f"MailLaser/{__version__}",
                "content-type": "application/json",
                "webhook-id": "msg_1",
            },
        )

    async def test_one_connection_carries_many_requests(self) -> None:
        receiver = WebhookReceiver()
        recorder = PeerRecorder(receiver)
        port: IListeningPort = await serverFromString(
            reactor, "tcp:0:interface=127.0.0.1"
        ).listen(Site(recorder))
        self.addCleanup(port.stopListening)
        poster = self.poster(f"http://127.0.0.1:{port.getHost().port}/hook")  # type: ignore[attr-defined]
        for _ in range(3):
            self.assertEqual((await wait(poster.post(b"{}", HEADERS))).status, 200)
        self.assertEqual(len(recorder.ports), 3)
        self.assertEqual(len(set(recorder.ports)), 1)

    async def test_cookies_are_not_kept(self) -> None:
        """A receiver's cookie is not sent back: every request stands alone."""
        receiver = await self.receiver(Reply(200, {"set-cookie": "session=abc"}))
        poster = self.poster(receiver.url)
        for _ in range(2):
            await wait(poster.post(b"{}", HEADERS))
        self.assertEqual(
            [request.headers.get("cookie") for request in receiver.requests],
            [None, None],
        )

    async def test_redirect_is_not_followed(self) -> None:
        receiver = await self.receiver(Reply(307, {"location": "http://127.0.0.1:1/x"}))
        response = await wait(self.poster(receiver.url).post(b"{}", HEADERS))
        self.assertEqual(response.status, 307)
        self.assertEqual(len(receiver.requests), 1)

    async def test_timeout(self) -> None:
        receiver = await self.receiver(HANG)
        d = self.poster(receiver.url, timeout=0.2).post(b"{}", HEADERS)
        await failure_of(self, d, DeferredTimeoutError)

    async def test_credentials(self) -> None:
        receiver = await self.receiver()
        url = receiver.url.replace("http://", "http://user:pass@")
        await wait(self.poster(url).post(b"{}", HEADERS))
        self.assertEqual(
            receiver.requests[0].headers["authorization"], "Basic dXNlcjpwYXNz"
        )

    async def test_connection_refused(self) -> None:
        receiver = await self.receiver()
        url = receiver.url
        await receiver.stop()
        error = await failure_of(self, self.poster(url).post(b"{}", HEADERS), Exception)
        self.assertEqual(describe_error(error), "connection refused")


@attrs.frozen
class Authority:
    """A private certificate authority, as a receiver's operator runs one."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def create(cls, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        certificate = (
            _builder(subject, subject, key.public_key())
            .add_extension(
                x509.BasicConstraints(ca=True, path_length=None), critical=True
            )
            .add_extension(_key_usage(certificate_sign=True), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, host: str) -> tuple[bytes, bytes]:
        """A server certificate for C{host}, and its key, in PEM."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
        certificate = (
            _builder(subject, self.certificate.subject, key.public_key())
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False
            )
            .add_extension(
                x509.BasicConstraints(ca=False, path_length=None), critical=True
            )
            .add_extension(_key_usage(certificate_sign=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _key_usage(certificate_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not certificate_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=certificate_sign,
        crl_sign=certificate_sign,
        encipher_only=False,
        decipher_only=False,
    )


class HTTPSTests(TestCase):
    """https: the system's authorities, or those of a bundle, and the host name."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.directory.mkdir()
        self.authority = Authority.create("MailLaser test CA")

    def file(self, name: str, content: bytes) -> str:
        path = self.directory / name
        path.write_bytes(content)
        return str(path)

    async def receiver(self, certificate_for: str) -> tuple[WebhookReceiver, str]:
        """A receiver with a certificate for C{certificate_for}, and its URL."""
        cert_pem, key_pem = self.authority.issue(certificate_for)
        receiver = WebhookReceiver()
        await receiver.listen(
            reactor,
            f"ssl:0:interface=127.0.0.1:privateKey={self.file('key.pem', key_pem)}"
            f":certKey={self.file('cert.pem', cert_pem)}",
        )
        self.addCleanup(receiver.stop)
        return receiver, receiver.url.replace("http://127.0.0.1", "https://localhost")

    def poster(self, url: str, ca_file: str | None) -> WebhookPoster:
        poster = WebhookPoster(
            url, reactor=reactor, concurrency=2, timeout=10, ca_file=ca_file
        )
        self.addCleanup(poster.close)
        return poster

    def bundle(self) -> str:
        """A bundle of another authority, then ours."""
        other = Authority.create("Another CA")
        return self.file("bundle.pem", other.pem + b"\n" + self.authority.pem)

    async def refused(self, url: str, ca_file: str | None) -> BaseException:
        """Why the TLS connection failed, as Agent wraps it."""
        d = self.poster(url, ca_file).post(b"{}", HEADERS)
        error = await failure_of(self, d, Exception)
        self.assertIsInstance(error, (ResponseNeverReceived, RequestTransmissionFailed))
        assert isinstance(error, ResponseNeverReceived | RequestTransmissionFailed)
        [reason] = error.reasons
        value: BaseException = reason.value
        return value

    async def test_private_authority(self) -> None:
        receiver, url = await self.receiver("localhost")
        response = await wait(self.poster(url, self.bundle()).post(b"{}", HEADERS))
        self.assertEqual(response.status, 200)
        self.assertEqual(receiver.requests[0].headers["host"], url.split("/")[2])

    async def test_untrusted_certificate(self) -> None:
        receiver, url = await self.receiver("localhost")
        error = await self.refused(url, None)
        self.assertIsInstance(error, TLSError)
        self.assertEqual(
            describe_error(error),
            "TLS failed: [('SSL routines', '', 'certificate verify failed')]",
        )
        self.assertEqual(receiver.requests, [])

    async def test_trusted_certificate_for_another_host(self) -> None:
        receiver, url = await self.receiver("other.example")
        error = await self.refused(url, self.bundle())
        self.assertIsInstance(error, HostnameMismatch)
        self.assertEqual(
            describe_error(error),
            "TLS failed: the certificate is not for the webhook's host",
        )
        self.assertEqual(receiver.requests, [])


class TrustRootTests(SynchronousTestCase):
    def write(self, content: bytes) -> str:
        path = Path(self.mktemp())
        path.write_bytes(content)
        return str(path)

    def test_no_certificate(self) -> None:
        path = self.write(b"not a certificate\n")
        with self.assertRaises(ValueError) as caught:
            trust_root(path)
        self.assertEqual(str(caught.exception), f"{path}: no PEM certificate in it")

    def test_broken_certificate(self) -> None:
        path = self.write(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        )
        self.assertRaises(ValueError, trust_root, path)

    def test_missing_file(self) -> None:
        self.assertRaises(OSError, trust_root, self.mktemp())
