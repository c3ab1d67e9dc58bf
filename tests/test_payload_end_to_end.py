"""
The payload of issue 13 end to end: the real bridge on loopback, smtplib
(plain and STARTTLS), a real receiver, the corpus messages, exact JSON.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import hmac
import re
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from maillaser.webhook import verify
from tests.bridge import settled, start_bridge
from tests.helpers import TARGET

CORPUS = Path(__file__).parent / "corpus"
SENDER = "bounces+u123@esp.example"
RECEIVED = re.compile(
    r"from client\.test \(\[127\.0\.0\.1\]\)\sby mx\.test \(MailLaser\) with"
    r" (ESMTPS?) id (msg_[0-9a-f]{28})\sfor <target@example\.com>;"
    r"\s\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} [-+]\d{4}"
)
RFC3339_UTC = "%Y-%m-%dT%H:%M:%SZ"


def corpus(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def received_at(payload: dict[str, Any], before: float, after: float) -> None:
    """The envelope's time lies between C{before} and C{after}, in UTC."""
    stamp = payload["envelope"].pop("received_at")
    when = calendar.timegm(time.strptime(stamp, RFC3339_UTC))
    assert int(before) <= when <= after, (before, stamp, after)


class CorpusPayloadTests(TestCase):
    """Each new corpus message, as the receiver gets it."""

    async def deliver(
        self, name: str, *, starttls: bool = False, **settings: Any
    ) -> tuple[dict[str, Any], int]:
        """Send corpus file C{name}; the payload and its size on the wire."""
        bridge = await start_bridge(self, **settings)
        before = time.time()
        result = await bridge.send(corpus(name), sender=SENDER, starttls=starttls)
        self.assertEqual(result["code"], 250)
        [request] = await settled(bridge, 1)
        payload = request.json()
        received_at(payload, before, time.time())
        return payload, payload["envelope"].pop("size")

    async def test_gmail_attachment_exactly(self) -> None:
        """The whole payload of a Gmail message with a PDF, over cleartext."""
        payload, size = await self.deliver("gmail-attachment.eml")
        self.assertGreater(size, len(corpus("gmail-attachment.eml")))
        [attachment] = payload.pop("attachments")
        content = base64.b64decode(attachment.pop("content"), validate=True)
        self.assertEqual(
            attachment,
            {
                "filename": "invoice-2026-11.pdf",
                "content_type": "application/pdf",
                "size": 598,
                "sha256": "254124a900d2ce3161fcdb2e83d7a6ce"
                "236b76e08055d11fae0255171ace9946",
                "disposition": "attachment",
                "content_id": "f_mi3k2x7a0",
            },
        )
        self.assertEqual(
            (len(content), hashlib.sha256(content).hexdigest()),
            (attachment["size"], attachment["sha256"]),
        )
        self.assertTrue(content.startswith(b"%PDF-1.4"))
        self.assertEqual(
            payload,
            {
                "sender": SENDER,
                "sender_name": "Sam O'Neil",
                "recipient": TARGET,
                "recipients": [TARGET],
                "subject": "Invoice for November",
                "body": "Hi,\n\nPlease find attached the invoice for November"
                " (€ 1,240.00).\n\nThanks,\nSam\n",
                "html_body": '<div dir="ltr"><div>Hi,</div><div><br></div><div>'
                "Please find attached the invoice for November (€ 1,240.00).</div>"
                "<div><br></div><div>Thanks,</div><div>Sam</div></div>\n",
                "message_id": "<CAF3xq9T+Rb2=kQ8wVn1mZp0Lc7dYs4uHjE6tGa5oBiN2rX-KfA"
                "@mail.gmail.com>",
                "from": {"address": "sam.oneil@gmail.com", "name": "Sam O'Neil"},
                "to": [{"address": "invoices@billing.example.com", "name": "Billing"}],
                "cc": [
                    {"address": "accounts@sam-oneil.example"},
                    {"address": "pat.lee@sam-oneil.example", "name": "Pat Lee"},
                ],
                "date": "2026-12-01T17:14:15Z",
                "envelope": {
                    "mail_from": SENDER,
                    "rcpt_to": [TARGET],
                    "helo": "client.test",
                    "client_ip": "127.0.0.1",
                },
            },
        )

    async def test_outlook_over_starttls(self) -> None:
        """The TLS the session ran under, and the thread of a reply."""
        payload, _ = await self.deliver("outlook-inline-images.eml", starttls=True)
        tls = payload["envelope"].pop("tls")
        self.assertEqual(sorted(tls), ["cipher", "version"])
        self.assertRegex(tls["version"], r"^TLSv1\.[23]$")
        self.assertRegex(tls["cipher"], r"^[A-Z0-9_-]+$")
        self.assertEqual(
            payload["envelope"],
            {
                "mail_from": SENDER,
                "rcpt_to": [TARGET],
                "helo": "client.test",
                "client_ip": "127.0.0.1",
            },
        )
        self.assertEqual(
            {key: payload[key] for key in ("from", "cc", "in_reply_to", "date")},
            {
                "from": {
                    "address": "renee.dupre@contoso.example",
                    "name": "Renée Dupré",
                },
                "cc": [
                    {"address": "joerg.mueller@contoso.example", "name": "Jörg Müller"}
                ],
                "in_reply_to": "<AM9PR07MB7211F0E1D2C3B4A5968778695A4B3C2D1E0F"
                "@AM9PR07MB7211.eurprd07.prod.outlook.com>",
                "date": "2026-12-02T14:02:49Z",
            },
        )
        self.assertEqual(len(payload["references"]), 2)
        self.assertNotIn("\r", payload["body"] + payload["html_body"])

    async def test_internationalised_and_header_list(self) -> None:
        """
        With C{payload_headers="all"}: every field in order, our trace field
        first, repeats kept; C{headers} keeps the last X-Tag.
        """
        payload, _ = await self.deliver(
            "rfc2231-filename.eml",
            header_prefixes=("X-Tag",),
            payload_headers="all",
        )
        self.assertEqual(payload["headers"], {"X-Tag": "two"})
        [name, trace] = payload["header_list"][0]
        self.assertEqual(name, "Received")
        match = RECEIVED.fullmatch(trace)
        assert match is not None, trace
        self.assertEqual(match.group(1), "ESMTP")
        self.assertEqual(
            payload["header_list"][1:],
            [
                ["Return-Path", "<zoe@bücher.example>"],
                ["From", "Zoë Bücher <zoë@bücher.example>"],
                ["To", "山田太郎 <taro@example.jp>"],
                ["Cc", "undisclosed-recipients:;"],
                ["Subject", "Präsentation und Tabelle"],
                ["Date", "Thu, 3 Dec 2026 09:30:00 +0100"],
                ["Message-ID", "<5f2c9a1e-7b3d-4e8f-a2c1-0d9e8f7a6b5c@bücher.example>"],
                ["MIME-Version", "1.0"],
                ["User-Agent", "Mozilla Thunderbird"],
                ["Content-Language", "de-DE"],
                ["X-Tag", "one"],
                ["X-Tag", "two"],
                [
                    "Content-Type",
                    'multipart/mixed; boundary="------------Zx4Qm8Tn2Vb6Rc0Ld3Hs9Kp1"',
                ],
            ],
        )
        self.assertEqual(
            payload["from"], {"address": "zoë@bücher.example", "name": "Zoë Bücher"}
        )
        self.assertEqual(
            payload["body"],
            "Hallo Tarō,\n\nanbei die Präsentation und die Tabelle.\n\nGrüße\nZoë\n",
        )

    async def test_forwarded_and_twenty_attachments(self) -> None:
        forwarded, _ = await self.deliver("forwarded-rfc822.eml")
        self.assertEqual(
            (forwarded["from"], forwarded["to"], forwarded["references"]),
            (
                {"address": "postmaster@partner.example", "name": "Mallory Admin"},
                [{"address": "abuse@example.com"}],
                ["<phish-7731@suspicious.example>"],
            ),
        )
        self.assertNotIn("header_list", forwarded)
        many, _ = await self.deliver("twenty-attachments.eml")
        self.assertEqual(
            (many["body"], many["date"]),
            ("Twenty pages, one file each.\n", "2026-12-03T08:00:00Z"),
        )


def maillaser3_verify(
    headers: dict[str, str], raw_body: bytes, secret: str, now: float
) -> bool:
    """
    MailLaser 3's receiver recipe, as its documentation gives it
    (Govcraft/mail-laser, docs/src/app/docs/webhook-signing/page.md),
    written here independently of our signing code.
    """
    ts = headers.get("x-maillaser-timestamp")
    sig = headers.get("x-maillaser-signature-256", "")
    if not ts or not sig.startswith("sha256="):
        return False
    if abs(int(now) - int(ts)) > 300:
        return False
    expected = hmac.new(
        secret.encode(), f"{ts}.".encode() + raw_body, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(sig[len("sha256=") :], expected)


class MailLaser3Tests(TestCase):
    """A receiver written for MailLaser 3 keeps working."""

    async def test_its_signature_by_its_name_and_recipe(self) -> None:
        from maillaser.config import load_config

        config = load_config(
            {},
            {
                "MAIL_LASER_TARGET_EMAILS": TARGET,
                "MAIL_LASER_WEBHOOK_URL": "http://127.0.0.1/",
                "MAIL_LASER_WEBHOOK_SIGNING_SECRET": "correct horse",
                "MAIL_LASER_WEBHOOK_MAILLASER3_SIGNATURE": "true",
            },
            None,
            getfqdn=lambda: "mx.test",
        )
        bridge = await start_bridge(
            self,
            webhook_secrets=config.webhook_secrets,
            webhook_maillaser3_signature=config.webhook_maillaser3_signature,
        )
        await bridge.send(corpus("small-plain.eml"))
        [request] = await settled(bridge, 1)
        now = time.time()
        self.assertTrue(
            maillaser3_verify(request.headers, request.body, "correct horse", now)
        )
        self.assertEqual(
            request.headers["x-maillaser-timestamp"],
            request.headers["webhook-timestamp"],
        )
        # The Standard Webhooks signature, with the same key, is still there.
        verify(config.webhook_secrets, request.headers, request.body)
        self.assertFalse(
            maillaser3_verify(
                request.headers, request.body + b" ", "correct horse", now
            )
        )
        self.assertFalse(
            maillaser3_verify(request.headers, request.body, "wrong horse", now)
        )

    async def test_off_by_default(self) -> None:
        bridge = await start_bridge(self, webhook_secrets=("whsec_" + "a" * 32,))
        await bridge.send(corpus("small-plain.eml"))
        [request] = await settled(bridge, 1)
        self.assertIn("webhook-signature", request.headers)
        self.assertNotIn("x-maillaser-signature-256", request.headers)
        self.assertNotIn("x-maillaser-timestamp", request.headers)

    async def test_target_domains(self) -> None:
        """Every recipient at a target domain, in any ASCII case; no other."""
        bridge = await start_bridge(
            self, target_emails=(), target_domains=("Inbound.Example",)
        )
        result = await bridge.send(
            corpus("small-plain.eml"),
            recipients=(
                "anyone@inbound.example",
                "Other@INBOUND.EXAMPLE",
                "x@sub.inbound.example",
                "y@inbound.example.org",
                TARGET,
            ),
        )
        self.assertEqual(result["code"], 250)
        self.assertEqual(
            sorted(result["refused"]),
            sorted(
                [
                    "x@sub.inbound.example",
                    "y@inbound.example.org",
                    TARGET,
                ]
            ),
        )
        [request] = await settled(bridge, 1)
        self.assertEqual(
            request.json()["recipients"],
            ["anyone@inbound.example", "Other@INBOUND.EXAMPLE"],
        )
