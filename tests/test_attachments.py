"""
Attachments, raw MIME and the body cap (issue 13, items 5 to 7): end to
end with the real bridge, smtplib and a real receiver, every link fetched
over HTTP; then the link resource on a C{Clock}, the cap, and a property
over generated messages.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import quote

import treq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from maillaser.config import Config
from maillaser.health import AttachmentResource, Health, disposition, make_site
from maillaser.health._attachments import SEND_DEADLINE
from maillaser.message import Envelope, Message
from maillaser.spool import open_spool
from maillaser.testing import Reply
from maillaser.webhook import (
    LinkRefused,
    LinkSigner,
    PartOptions,
    attachment_parts,
    build_payload,
    built_payload,
    find_part,
    leaf_parts,
)
from maillaser.webhook._payload import _PARSER
from maillaser.worker import ChildError, PartNotFound
from tests.bridge import Bridge, settled, spool_empty, start_bridge
from tests.helpers import wait
from tests.test_payload_fuzz import FUZZ, soup

CORPUS = Path(__file__).parent / "corpus"
SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()
ENVELOPE = Envelope("a@example.net", ("alerts@example.com",))


def corpus(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def linked_bridge(test: TestCase, **overrides: Any) -> Bridge:
    """
    A bridge that can make links: a secret, and a health endpoint on a
    known port, from which the links' base is built (no public URL set).
    """
    endpoint = f"tcp:{free_port()}:interface=127.0.0.1"
    return await start_bridge(
        test, webhook_secrets=(SECRET,), health_endpoint=endpoint, **overrides
    )


def expected(raw: bytes) -> list[dict[str, Any]]:
    """
    Each attachment as the standard library's own modern API reads it:
    another parser (C{policy.default}), to check ours against.
    """
    found = []
    parts = list(message_from_bytes(raw, policy=policy.default).walk())
    inside_messages = {
        id(inner)
        for part in parts
        if part.get_content_maintype() == "message"
        for inner in list(part.walk())[1:]
    }
    for part in parts:
        filename = part.get_filename()
        if filename is None or id(part) in inside_messages:
            continue
        if part.get_content_type() == "message/rfc822":
            continue  # its bytes are checked against the fetched link
        data = part.get_payload(decode=True)
        assert isinstance(data, bytes)
        item: dict[str, Any] = {
            "filename": str(filename),
            "content_type": part.get_content_type(),
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "disposition": part.get_content_disposition(),
        }
        if part["Content-ID"]:
            item["content_id"] = str(part["Content-ID"]).strip("<>")
        item["data"] = data
        found.append(item)
    return found


async def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    response = await treq.get(url, persistent=False)
    body = await treq.content(response)
    headers = {
        name.decode().lower(): values[-1].decode()
        for name, values in response.headers.getAllRawHeaders()
    }
    return response.code, headers, body


def twenty_attachments() -> bytes:
    message = EmailMessage()
    message["From"] = "Many <many@example.org>"
    message["To"] = "alerts@example.com"
    message["Subject"] = "twenty"
    message.set_content("twenty files\n")
    for number in range(20):
        message.add_attachment(
            os.urandom(100 + number * 37),
            maintype="application",
            subtype="octet-stream",
            filename=f"file-{number:02}.bin",
        )
    return message.as_bytes(policy=policy.SMTP)


class InlineTests(TestCase):
    async def test_inline_images_and_attachments(self) -> None:
        """Outlook style: an inline image by Content-ID, and a text file."""
        raw = corpus("attach-related.eml")
        bridge = await linked_bridge(self)
        await bridge.send(raw)
        [request] = await settled(bridge, 1)
        payload = request.json()
        want = expected(raw)
        for item in want:
            item["content"] = base64.b64encode(item.pop("data")).decode()
        self.assertEqual(payload["attachments"], want)
        self.assertEqual(
            [item["disposition"] for item in want], ["inline", "attachment"]
        )
        self.assertEqual(want[0]["content_id"], "image001.png@01DA0000.12345670")
        self.assertEqual(payload["body"], "See the logo.\n")
        self.assertNotIn("raw", payload)
        status = await spool_empty(bridge)
        self.assertEqual(status["pending"], 0)

    async def test_unchanged_without_attachments(self) -> None:
        """A message without any keeps today's keys exactly."""
        bridge = await linked_bridge(self)
        await bridge.send(corpus("small-plain.eml"))
        [request] = await settled(bridge, 1)
        self.assertNotIn("attachments", request.json())
        self.assertNotIn("raw", request.json())

    async def test_raw_inline(self) -> None:
        raw = corpus("attach-rfc2231.eml")
        bridge = await linked_bridge(self, include_raw=True)
        await bridge.send(raw)
        [request] = await settled(bridge, 1)
        received = base64.b64decode(request.json()["raw"])
        self.assertTrue(received.startswith(b"Received: from client.test"))
        self.assertTrue(received.endswith(raw))

    async def test_large_message_under_the_max_body(self) -> None:
        """
        12 MB of attachments, each under the inline limit: the POST stays
        under the cap, the largest went to links, and every one is
        reachable, by its content or its link.
        """
        message = EmailMessage()
        message["From"] = "big@example.org"
        message["To"] = "alerts@example.com"
        message["Subject"] = "big"
        message.set_content("see attached\n")
        files = [os.urandom(1_000_000 - number * 1000) for number in range(12)]
        for number, data in enumerate(files):
            message.add_attachment(
                data, maintype="image", subtype="jpeg", filename=f"{number}.jpg"
            )
        raw = message.as_bytes(policy=policy.SMTP)
        max_body = 8 * 1024 * 1024
        bridge = await linked_bridge(
            self,
            max_message_size=32 * 1024 * 1024,
            webhook_max_body=max_body,
            payload_timeout=60.0,
        )
        result = await bridge.send(raw)
        self.assertEqual(result["code"], 250)
        [request] = await settled(bridge, 1, timeout=60)
        self.assertLessEqual(len(request.body), max_body)
        attachments = request.json()["attachments"]
        self.assertEqual(len(attachments), 12)
        linked = [item for item in attachments if "url" in item]
        inline = [item for item in attachments if "content" in item]
        self.assertEqual(len(linked) + len(inline), 12)
        self.assertTrue(linked and inline)
        # The largest went first.
        self.assertGreater(
            min(item["size"] for item in linked), max(item["size"] for item in inline)
        )
        for item, data in zip(attachments, files, strict=True):
            if "content" in item:
                self.assertEqual(base64.b64decode(item["content"]), data)
            else:
                code, _, body = await fetch(item["url"])
                self.assertEqual((code, body), (200, data))
            self.assertEqual(item["sha256"], hashlib.sha256(data).hexdigest())


class LinkTests(TestCase):
    async def test_every_link_serves_its_bytes(self) -> None:
        """
        Link mode on Gmail-, Outlook-, RFC 2231-, forwarded- and
        20-attachment messages: every url answers 200 with the exact bytes.
        """
        bridge = await linked_bridge(self, attachments="link", include_raw=True)
        messages = [
            corpus("multipart-attachment.eml"),
            corpus("attach-related.eml"),
            corpus("attach-rfc2231.eml"),
            corpus("attach-forwarded.eml"),
            twenty_attachments(),
        ]
        for raw in messages:
            await bridge.send(raw)
        requests = await settled(bridge, len(messages))
        by_subject = {request.json()["subject"]: request.json() for request in requests}
        self.assertEqual(len(by_subject), len(messages))
        for raw in messages:
            subject = str(message_from_bytes(raw, policy=policy.default)["subject"])
            payload = by_subject[subject]
            want = expected(raw)
            described = [
                item
                for item in payload["attachments"]
                if item["content_type"] != "message/rfc822"
            ]
            for item, wanted in zip(described, want, strict=True):
                data = wanted.pop("data")
                self.assertEqual({k: v for k, v in item.items() if k != "url"}, wanted)
                code, headers, body = await fetch(item["url"])
                self.assertEqual((code, body), (200, data))
                self.assertEqual(hashlib.sha256(body).hexdigest(), item["sha256"])
                self.assertEqual(headers["content-type"], item["content_type"])
                self.assertEqual(headers["cache-control"], "private, no-store")
                self.assertEqual(
                    headers["content-disposition"],
                    disposition(item["filename"]).decode(),
                )
            code, _, body = await fetch(payload["raw_url"])
            self.assertEqual(code, 200)
            self.assertTrue(body.endswith(raw))
        # Each was kept for its links, and the spool says so.
        spool = open_spool(bridge.service.config.spool_dir, Clock())
        self.addCleanup(spool.close)
        self.assertEqual(spool.stats().retained, len(messages))

    async def test_encoded_names(self) -> None:
        raw = corpus("attach-rfc2231.eml")
        bridge = await linked_bridge(self, attachments="link")
        await bridge.send(raw)
        [request] = await settled(bridge, 1)
        names = [item["filename"] for item in request.json()["attachments"]]
        self.assertEqual(names, ["Bericht für März €.xlsx", "日本語.bin"])
        _, headers, _ = await fetch(request.json()["attachments"][1]["url"])
        self.assertEqual(
            headers["content-disposition"],
            "attachment; filename=\"___.bin\"; filename*=UTF-8''"
            + quote("日本語.bin", safe=""),
        )

    async def test_forwarded_message_is_one_attachment(self) -> None:
        """Its parts stay inside it: one message/rfc822 attachment, its text."""
        raw = corpus("attach-forwarded.eml")
        bridge = await linked_bridge(self, attachments="link")
        await bridge.send(raw)
        [request] = await settled(bridge, 1)
        [item] = request.json()["attachments"]
        self.assertEqual(
            (item["filename"], item["content_type"], item["disposition"]),
            ("original.eml", "message/rfc822", "attachment"),
        )
        code, headers, body = await fetch(item["url"])
        self.assertEqual((code, headers["content-type"]), (200, "message/rfc822"))
        self.assertEqual(len(body), item["size"])
        self.assertEqual(hashlib.sha256(body).hexdigest(), item["sha256"])
        inner = message_from_bytes(body, policy=policy.default)
        self.assertEqual(inner["subject"], "original")
        [pdf] = inner.iter_attachments()
        self.assertEqual(pdf.get_content(), b"%PDF-1.4\n%\xc7\xec\x8f\xa2\n")

    async def test_refused_and_unknown(self) -> None:
        raw = corpus("multipart-attachment.eml")
        bridge = await linked_bridge(self, attachments="link")
        await bridge.send(raw)
        [request] = await settled(bridge, 1)
        url = request.json()["attachments"][0]["url"]
        code, _, _ = await fetch(url)
        self.assertEqual(code, 200)
        flipped = url[:-1] + ("0" if url[-1] != "0" else "1")
        self.assertEqual((await fetch(flipped))[0], 403)
        self.assertEqual((await fetch(url.replace("/0?", "/1?")))[0], 403)
        self.assertEqual((await fetch(url.partition("&")[0]))[0], 403)
        signer = LinkSigner.for_config(bridge.service.config)
        assert signer is not None
        message_id = url.split("/")[4]
        expires = int(url.split("expires=")[1].split("&")[0])
        self.assertEqual((await fetch(signer.url(message_id, "1", expires)))[0], 404)
        unknown = signer.url("msg_" + "0" * 28, "0", expires)
        self.assertEqual((await fetch(unknown))[0], 404)
        self.assertEqual((await fetch(bridge.health_url + "/attachments/x"))[0], 404)

    async def test_served_while_pending(self) -> None:
        """The receiver failed the first round: its links work meanwhile."""
        receiver_reply = Reply(500)
        bridge = await linked_bridge(
            self, attachments="link", retry_schedule=(3600.0,), webhook_max_retries=0
        )
        bridge.receiver.script(receiver_reply)
        await bridge.send(corpus("multipart-attachment.eml"))
        [request] = await wait(bridge.receiver.wait_for(1))
        item = request.json()["attachments"][0]
        code, _, body = await fetch(item["url"])
        self.assertEqual(code, 200)
        self.assertEqual(hashlib.sha256(body).hexdigest(), item["sha256"])

    async def test_worker_not_ready(self) -> None:
        bridge = await linked_bridge(self, attachments="link")
        await bridge.send(corpus("multipart-attachment.eml"))
        [request] = await settled(bridge, 1)
        await bridge.service.worker.stop(0.0)
        code, headers, _ = await fetch(request.json()["attachments"][0]["url"])
        self.assertEqual((code, headers["retry-after"]), (503, "5"))

    async def test_metadata_and_no_secret(self) -> None:
        """Metadata mode: neither; inline without a secret: no link for a large one."""
        bridge = await linked_bridge(self, attachments="metadata")
        await bridge.send(corpus("multipart-attachment.eml"))
        [request] = await settled(bridge, 1)
        [item] = request.json()["attachments"]
        self.assertEqual(set(item) & {"content", "url"}, set())
        bare = await start_bridge(self, attachment_inline_max=1000)
        await bare.send(corpus("attach-related.eml"))
        [request] = await settled(bare, 1)
        image, notes = request.json()["attachments"]
        self.assertEqual(set(image) & {"content", "url"}, set())
        self.assertIn("content", notes)


def signer(base: str = "http://bridge.test:8080") -> LinkSigner:
    made = LinkSigner.from_secrets([SECRET], base)
    assert made is not None
    return made


class LinkSignerTests(SynchronousTestCase):
    def test_round_trip_and_tampering(self) -> None:
        links = signer()
        url = links.url("msg_1", "3", 1000)
        self.assertEqual(
            url,
            "http://bridge.test:8080/attachments/msg_1/3?expires=1000&signature="
            + links.signature("msg_1", "3", 1000),
        )
        good = links.signature("msg_1", "3", 1000)
        links.check("msg_1", "3", "1000", good, 999.0)
        for args in [
            ("msg_2", "3", "1000", good),
            ("msg_1", "4", "1000", good),
            ("msg_1", "3", "1001", good),
            ("msg_1", "3", "1000", good[:-1] + ("0" if good[-1] != "0" else "1")),
            ("msg_1", "3", "1000", good.upper()),
            ("msg_1", "03", "1000", good),
            ("msg/1", "3", "1000", good),
        ]:
            with self.subTest(args=args):
                self.assertRaises(LinkRefused, links.check, *args, 999.0)
        self.assertRaises(LinkRefused, links.check, "msg_1", "3", "1000", good, 1000.0)

    def test_another_secret_another_signature(self) -> None:
        other = LinkSigner.from_secrets(
            ["whsec_" + base64.b64encode(b"t" * 32).decode()], "http://x"
        )
        assert other is not None
        self.assertNotEqual(
            other.signature("m", "0", 1), signer().signature("m", "0", 1)
        )

    def test_none_without_a_secret_or_a_spool(self) -> None:
        self.assertIsNone(LinkSigner.from_secrets([], "http://x"))
        config = Config(target_emails=("a@b.c",), webhook_url="http://h/")
        secret = config.__class__(
            target_emails=("a@b.c",), webhook_url="http://h/", webhook_secrets=(SECRET,)
        )
        self.assertIsNone(LinkSigner.for_config(config))
        made = LinkSigner.for_config(secret)
        assert made is not None
        self.assertEqual(made.base, "http://localhost:8080")
        sync = Config(
            target_emails=("a@b.c",),
            webhook_url="http://h/",
            webhook_secrets=(SECRET,),
            delivery_mode="sync",
        )
        self.assertIsNone(LinkSigner.for_config(sync))


class AttachmentResourceTests(SynchronousTestCase):
    """The resource on a C{Clock}: expiry, busy, and the worker's answers."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.links = signer()
        self.asked: list[tuple[str, str]] = []
        self.answer: Deferred[dict[str, Any]] = succeed(
            {"content_type": "image/png", "filename": "a b.png", "data": b"PNG"}
        )
        self.resource = AttachmentResource(
            self.links,
            self.fetch,
            clock=self.clock,
            not_found=(PartNotFound,),
            unavailable=(ChildError,),
            limit=1,
        )

    def fetch(self, message_id: str, index: str) -> Deferred[dict[str, Any]]:
        self.asked.append((message_id, index))
        return self.answer

    def get(self, message_id: str, index: str, expires: int) -> DummyRequest:
        request = DummyRequest([message_id.encode(), index.encode()])
        request.args = {
            b"expires": [b"%d" % expires],
            b"signature": [self.links.signature(message_id, index, expires).encode()],
        }
        result = self.resource.render(request)
        if result != NOT_DONE_YET:
            assert isinstance(result, bytes)
            request.write(result)
            request.finish()
        return request

    def test_served(self) -> None:
        self.assertTrue(verifyObject(IResource, self.resource))
        request = self.get("msg_1", "0", 1060)
        self.assertEqual(
            (request.responseCode or 200, b"".join(request.written)), (200, b"PNG")
        )
        headers = request.responseHeaders
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"image/png"])
        self.assertEqual(
            headers.getRawHeaders(b"content-disposition"),
            [b"attachment; filename=\"a b.png\"; filename*=UTF-8''a%20b.png"],
        )
        self.assertEqual(
            headers.getRawHeaders(b"cache-control"), [b"private, no-store"]
        )
        self.assertEqual(headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"])
        self.assertEqual(self.asked, [("msg_1", "0")])

    def test_expired(self) -> None:
        self.assertEqual(self.get("msg_1", "0", 1001).responseCode or 200, 200)
        self.clock.advance(1)
        self.assertEqual(self.get("msg_1", "0", 1001).responseCode, 403)
        self.assertEqual(len(self.asked), 1)  # the worker is never asked

    def test_not_found_and_unavailable(self) -> None:
        self.answer = fail(PartNotFound("msg_1"))
        self.assertEqual(self.get("msg_1", "0", 2000).responseCode, 404)
        self.answer = fail(ChildError("delivery worker is not ready"))
        request = self.get("msg_1", "0", 2000)
        self.assertEqual(request.responseCode, 503)

    def test_busy(self) -> None:
        """One fetch at a time here: the next waits its turn with a 503."""
        self.answer = Deferred()
        waiting = self.get("msg_1", "0", 2000)
        self.assertEqual(self.get("msg_1", "1", 2000).responseCode, 503)
        self.answer.callback({"content_type": "a/b", "filename": "", "data": b"x"})
        self.assertEqual(b"".join(waiting.written), b"x")
        self.answer = succeed({"content_type": "a/b", "filename": "", "data": b"y"})
        self.assertEqual(b"".join(self.get("msg_1", "1", 2000).written), b"y")

    def test_a_reader_that_stalls(self) -> None:
        """
        It holds its place until it has read the part, and no longer than
        the deadline: then its connection is aborted and the place freed.
        """
        site = make_site(
            lambda: Health((), {}),
            lambda worker: b"",
            lambda: succeed(b""),
            clock=self.clock,
            attachments=self.resource,
        )
        protocol = site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.answer = succeed(
            {"content_type": "a/b", "filename": "", "data": b"z" * 200_000}
        )
        url = self.links.url("msg_1", "0", 2000).partition("8080")[2]
        protocol.dataReceived(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % url.encode())
        # The client reads nothing: a TCP transport pauses its producer.
        producer = transport.producer
        assert producer is not None
        producer.pauseProducing()
        self.assertEqual(self.resource.fetching, 1)
        self.assertLess(len(transport.value()), 200_000)  # not all in the buffer
        self.clock.advance(SEND_DEADLINE - 1)
        self.assertEqual(self.resource.fetching, 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        # Then, as a TCP transport does once the connection is gone:
        producer.stopProducing()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.resource.fetching, 0)

    def test_off_without_a_signer(self) -> None:
        resource = AttachmentResource(
            None, self.fetch, clock=self.clock, not_found=(), unavailable=()
        )
        request = DummyRequest([b"msg_1", b"0"])
        self.assertEqual(resource.render(request), b"Not Found")
        self.assertEqual(request.responseCode, 404)

    def test_disposition_never_unquoted(self) -> None:
        self.assertEqual(disposition(""), b"attachment")
        self.assertEqual(
            disposition('a";\r\nx: y.txt'),
            b'attachment; filename="a____x_ y.txt";'
            b" filename*=UTF-8''a%22%3B%0D%0Ax%3A%20y.txt",
        )


class FitTests(SynchronousTestCase):
    """The cap on the request body, with and without links."""

    def payload(self, raw: bytes, parts: PartOptions) -> dict[str, Any]:
        body = built_payload(Message("msg_1", ENVELOPE, raw), (), parts).body
        self.assertLessEqual(len(body), parts.max_body)
        result: dict[str, Any] = json.loads(body)
        return result

    def message(self, *sizes: int, text: str = "hi\n") -> bytes:
        message = EmailMessage()
        message["Subject"] = "fit"
        message.set_content(text)
        for number, size in enumerate(sizes):
            message.add_attachment(
                b"x" * size, maintype="application", subtype="x", filename=f"{number}"
            )
        return message.as_bytes()

    def test_largest_to_links_first(self) -> None:
        raw = self.message(60_000, 40_000, 20_000)
        parts = PartOptions(max_body=100_000, links=signer(), expires=5)
        result = built_payload(Message("msg_1", ENVELOPE, raw), (), parts)
        self.assertEqual(result.keep_until, 5.0)
        items = json.loads(result.body)["attachments"]
        self.assertEqual(["url" in item for item in items], [True, False, False])

    def test_dropped_without_links(self) -> None:
        raw = self.message(60_000, 40_000, 20_000)
        items = self.payload(raw, PartOptions(max_body=70_000))["attachments"]
        self.assertEqual(
            [set(item) & {"url", "content"} for item in items],
            [set(), set(), {"content"}],
        )
        self.assertEqual([item["size"] for item in items], [60_000, 40_000, 20_000])

    def test_bodies_cut_last(self) -> None:
        raw = self.message(text="é\n" * 60_000)
        result = self.payload(raw, PartOptions(max_body=65_536))
        self.assertLess(len(result["body"]), 120_000)
        self.assertEqual(
            result["parse_error"], "body truncated to fit MAIL_LASER_WEBHOOK_MAX_BODY"
        )

    def test_envelope_only_for_a_header_too_large(self) -> None:
        """Thousands of recipients and a huge prefixed header: what fits."""
        raw = b"Subject: s\r\n" + b"X-Big: " + b"y" * 70_000 + b"\r\n\r\nhi\r\n"
        recipients = tuple(f"user{n:05}@example.com" for n in range(5000))
        envelope = Envelope("a@example.net", recipients)
        parts = PartOptions(max_body=65_536)
        body = built_payload(Message("msg_1", envelope, raw), ("X-",), parts).body
        self.assertLessEqual(len(body), 65_536)
        payload = json.loads(body)
        self.assertEqual(payload["parse_error"], "payload too large for the webhook")
        self.assertEqual(payload["subject"], "s")
        self.assertGreater(len(payload["recipients"]), 2000)
        self.assertEqual(
            payload["recipients"], list(recipients[: len(payload["recipients"])])
        )
        self.assertGreater(len(body), 65_536 - 30)

    def test_no_links_no_retention(self) -> None:
        raw = self.message(10)
        result = built_payload(
            Message("msg_1", ENVELOPE, raw), (), PartOptions(links=signer(), expires=5)
        )
        self.assertIsNone(result.keep_until)

    def test_filenames(self) -> None:
        """RFC 2231, RFC 2047, raw 8-bit (UTF-8 or windows-1252) and folded."""
        cases = [
            (b"Content-Type: a/b; name*=iso-8859-1''caf%E9.txt", "café.txt"),
            (b'Content-Type: a/b; name="=?utf-8?b?w6l0w6k=?=.txt"', "été.txt"),
            (b'Content-Type: a/b; name="caf\xc3\xa9.txt"', "café.txt"),
            (b'Content-Type: a/b; name="caf\xe9.txt"', "café.txt"),
            (b'Content-Disposition: attachment;\r\n filename="a\r\n b.txt"', "a b.txt"),
            (b"Content-Type: a/b", None),
        ]
        for header, name in cases:
            with self.subTest(header=header):
                [part] = attachment_parts(_PARSER.parsebytes(header + b"\r\n\r\nx"))
                self.assertEqual(part.filename, name)

    def test_options_cross_to_a_payload_process(self) -> None:
        parts = PartOptions("link", 7, True, 70_000, signer(), 123)
        self.assertEqual(PartOptions.from_json(parts.to_json()), parts)
        self.assertEqual(PartOptions.from_json(PartOptions().to_json()), PartOptions())


# --- the property ------------------------------------------------------------

_leaf_types = st.sampled_from(
    ["text/plain", "text/html", "application/octet-stream", "image/png", "text/csv"]
)
_dispositions = st.sampled_from([None, "inline", "attachment"])


@st.composite
def _trees(draw: st.DrawFn, depth: int = 0) -> EmailMessage:
    if depth < 3 and draw(st.booleans()):
        subtype = draw(st.sampled_from(["mixed", "alternative", "related"]))
        part = EmailMessage()
        part.make_mixed() if subtype == "mixed" else None
        part.set_type(f"multipart/{subtype}")
        for child in draw(st.lists(_trees(depth + 1), min_size=1, max_size=4)):
            part.attach(child)
        return part
    if depth and draw(st.integers(0, 9)) == 0:
        inner = EmailMessage()
        inner["Subject"] = "inner"
        inner.set_content(draw(st.text(max_size=40)))
        part = EmailMessage()
        part.set_content(inner)
        return part
    part = EmailMessage()
    maintype, subtype = draw(_leaf_types).split("/")
    data = draw(st.binary(max_size=300))
    if maintype == "text":
        part.set_content(
            data.decode("latin-1"), subtype=subtype, charset="utf-8", cte="base64"
        )
    else:
        part.set_content(data, maintype=maintype, subtype=subtype)
    if (chosen := draw(_dispositions)) is not None:
        part["Content-Disposition"] = chosen
    return part


class PropertyTests(SynchronousTestCase):
    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        derandomize=True,
    )
    @given(tree=_trees())
    def test_every_leaf_accounted_for(self, tree: EmailMessage) -> None:
        """
        Attachments and the chosen bodies together are every leaf part,
        their sizes included, and nothing raises.
        """
        raw = tree.as_bytes()
        message = Message("msg_p", ENVELOPE, raw)
        payload = build_payload(message, (), PartOptions(mode="metadata"))
        self.assertNotIn("parse_error", payload)
        root = _PARSER.parsebytes(raw)
        leaves = list(leaf_parts(root))
        attachments = payload.get("attachments", [])
        assert isinstance(attachments, list)
        unclaimed = list(leaves)
        for item in attachments:
            [claimed] = [
                leaf
                for leaf in unclaimed
                if (_sha(leaf), leaf.get_content_type())
                == (item["sha256"], item["content_type"])
            ][:1]
            unclaimed.remove(claimed)
        bodies = unclaimed
        self.assertEqual(len(attachments) + len(bodies), len(leaves))
        self.assertLessEqual(len(bodies), 2)
        body_types = sorted(leaf.get_content_type() for leaf in bodies)
        self.assertEqual(len(set(body_types)), len(body_types))
        for leaf in bodies:
            self.assertIn(leaf.get_content_type(), ("text/plain", "text/html"))
            self.assertNotEqual(leaf.get_content_disposition(), "attachment")
        self.assertEqual(
            sum(item["size"] for item in attachments) + sum(_size(b) for b in bodies),
            sum(_size(leaf) for leaf in leaves),
        )
        self.assertEqual(
            sorted(part.data for part in attachment_parts(root)),
            sorted(_data(leaf) for leaf in leaves if leaf not in bodies),
        )
        if any(leaf.get_content_type() == "text/plain" for leaf in bodies):
            self.assertIn("body", payload)


def _data(leaf: Any) -> bytes:
    if leaf.is_multipart():
        [inner] = leaf.get_payload()
        return bytes(inner.as_bytes(policy=policy.compat32.clone(linesep="\r\n")))
    data = leaf.get_payload(decode=True)
    return data if isinstance(data, bytes) else b""


def _size(leaf: Any) -> int:
    return len(_data(leaf))


def _sha(leaf: Any) -> str:
    return hashlib.sha256(_data(leaf)).hexdigest()


class FuzzTests(SynchronousTestCase):
    @FUZZ
    @given(
        raw=st.one_of(soup, st.binary(max_size=4096)),
        inline_max=st.integers(0, 300),
    )
    def test_never_raises_never_over_the_cap(self, raw: bytes, inline_max: int) -> None:
        """
        Whatever the bytes, the body is JSON within the cap, every link
        names a part that L{find_part} finds, and nothing raises.
        """
        parts = PartOptions(
            inline_max=inline_max,
            include_raw=True,
            max_body=64 * 1024,
            links=signer(),
            expires=5,
        )
        raw *= 20
        built = built_payload(Message("msg_f", ENVELOPE, raw), (), parts)
        self.assertLessEqual(len(built.body), parts.max_body)
        payload = json.loads(built.body)
        for item in payload.get("attachments", []):
            if "url" in item:
                index = item["url"].split("/")[-1].partition("?")[0]
                found = find_part(raw, index)
                assert found is not None
                self.assertEqual(hashlib.sha256(found.data).hexdigest(), item["sha256"])
