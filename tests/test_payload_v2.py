"""
Tests for the payload keys of issue 13: addresses from the header, the
date, the thread ids, the envelope, bodies with LF line ends, which field
C{headers} keeps, and C{header_list}.

L{tests.test_payload} keeps asserting the keys of SPEC §4; these tests see
the whole payload.
"""

from __future__ import annotations

import json
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from maillaser.message import Envelope, Message, TLSInfo
from maillaser.webhook import build_payload, fallback_payload
from tests.helpers import PAYLOAD_KEYS

CORPUS = Path(__file__).parent / "corpus"

ENVELOPE = Envelope(
    sender="bounces+u123@esp.example",
    recipients=("alerts@example.com", "Ops@Example.com"),
    helo="mail.esp.example",
    peer="192.0.2.25",
)
RECEIVED_AT = 1764734706.75
"""2025-12-03T04:05:06.75Z"""

TLS = TLSInfo(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384")


def payload(
    raw: bytes,
    prefixes: tuple[str, ...] = (),
    *,
    envelope: Envelope = ENVELOPE,
    header_list: bool = False,
) -> dict[str, object]:
    message = Message("msg_v2", envelope, raw, RECEIVED_AT)
    return build_payload(message, prefixes, header_list=header_list)


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


def corpus(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


class KeyOrderTests(SynchronousTestCase):
    def test_newer_keys_follow_spec_keys(self) -> None:
        """
        SPEC §4's keys come first, in their order, so a receiver written for
        MailLaser 3 reads what it always read; the newer keys follow.
        """
        result = payload(
            corpus("outlook-inline-images.eml"), ("X-MS-Has",), header_list=True
        )
        self.assertEqual(
            list(result), list(PAYLOAD_KEYS[: PAYLOAD_KEYS.index("attachments")])
        )

    def test_bounce_address_and_author(self) -> None:
        """The issue's case: the author's address is no longer lost."""
        result = payload(crlf("From: Alice Example <alice@corp.example>\n\nhi"))
        self.assertEqual(
            (result["sender"], result["sender_name"], result["from"]),
            (
                "bounces+u123@esp.example",
                "Alice Example",
                {"address": "alice@corp.example", "name": "Alice Example"},
            ),
        )


class CorpusAddressTests(SynchronousTestCase):
    """The header keys of the corpus messages, exactly."""

    def header_keys(self, name: str) -> dict[str, object]:
        result = payload(corpus(name))
        keys = ("from", "to", "cc", "reply_to", "date", "in_reply_to", "references")
        return {key: result[key] for key in keys if key in result}

    def test_gmail_attachment(self) -> None:
        self.assertEqual(
            self.header_keys("gmail-attachment.eml"),
            {
                "from": {"address": "sam.oneil@gmail.com", "name": "Sam O'Neil"},
                "to": [{"address": "invoices@billing.example.com", "name": "Billing"}],
                "cc": [
                    {"address": "accounts@sam-oneil.example"},
                    {"address": "pat.lee@sam-oneil.example", "name": "Pat Lee"},
                ],
                "date": "2026-12-01T17:14:15Z",
            },
        )

    def test_outlook_reply(self) -> None:
        """Folded lists, RFC 2047 names in two charsets, a thread."""
        self.assertEqual(
            self.header_keys("outlook-inline-images.eml"),
            {
                "from": {
                    "address": "renee.dupre@contoso.example",
                    "name": "Renée Dupré",
                },
                "to": [
                    {"address": "support@helpdesk.example.com", "name": "Support Desk"},
                    {"address": "ops@helpdesk.example.com", "name": "Ops Team"},
                ],
                "cc": [
                    {"address": "joerg.mueller@contoso.example", "name": "Jörg Müller"}
                ],
                "reply_to": [
                    {"address": "tickets@contoso.example", "name": "Contoso Tickets"}
                ],
                "date": "2026-12-02T14:02:49Z",
                "in_reply_to": "<AM9PR07MB7211F0E1D2C3B4A5968778695A4B3C2D1E0F"
                "@AM9PR07MB7211.eurprd07.prod.outlook.com>",
                "references": [
                    "<DB9PR07MB80321A2B3C4D5E6F7A8B9C0D1E2F3A4B5C6D7"
                    "@DB9PR07MB8032.eurprd07.prod.outlook.com>",
                    "<AM9PR07MB7211F0E1D2C3B4A5968778695A4B3C2D1E0F"
                    "@AM9PR07MB7211.eurprd07.prod.outlook.com>",
                ],
            },
        )

    def test_internationalised_addresses(self) -> None:
        """
        Addresses as written, UTF-8 included; an empty group (the
        undisclosed recipients) gives no C{cc}.
        """
        self.assertEqual(
            self.header_keys("rfc2231-filename.eml"),
            {
                "from": {"address": "zoë@bücher.example", "name": "Zoë Bücher"},
                "to": [{"address": "taro@example.jp", "name": "山田太郎"}],
                "date": "2026-12-03T08:30:00Z",
            },
        )

    def test_forwarded_message(self) -> None:
        """Only the top-level header counts, not the forwarded message's."""
        self.assertEqual(
            self.header_keys("forwarded-rfc822.eml"),
            {
                "from": {
                    "address": "postmaster@partner.example",
                    "name": "Mallory Admin",
                },
                "to": [{"address": "abuse@example.com"}],
                "date": "2026-11-30T18:22:01Z",
                "in_reply_to": "<phish-7731@suspicious.example>",
                "references": ["<phish-7731@suspicious.example>"],
            },
        )

    def test_twenty_attachments(self) -> None:
        self.assertEqual(
            self.header_keys("twenty-attachments.eml"),
            {
                "from": {"address": "scanner@office.example", "name": "Office Scanner"},
                "to": [{"address": "archive@example.com"}],
                "date": "2026-12-03T08:00:00Z",
            },
        )


class AddressTests(SynchronousTestCase):
    def test_none(self) -> None:
        result = payload(crlf("Subject: s\n\nbody"))
        for key in ("from", "to", "cc", "reply_to", "date"):
            self.assertNotIn(key, result)

    def test_first_from_only(self) -> None:
        result = payload(crlf("From: a@x.example, B <b@x.example>\nFrom: c@x\n\nx"))
        self.assertEqual(result["from"], {"address": "a@x.example"})

    def test_every_field_of_a_list(self) -> None:
        """Two To fields (against RFC 5322, but seen) give one list, in order."""
        result = payload(crlf("To: a@x.example\nCc: c@x.example\nTo: b@x.example\n\nx"))
        self.assertEqual(
            result["to"], [{"address": "a@x.example"}, {"address": "b@x.example"}]
        )

    def test_encoded_name_with_a_comma(self) -> None:
        """Decoded after parsing: an encoded comma does not split the address."""
        result = payload(crlf("To: =?utf-8?q?Doe=2C_J=C3=B6rg?= <j@x.example>\n\nx"))
        self.assertEqual(
            result["to"], [{"address": "j@x.example", "name": "Doe, Jörg"}]
        )

    def test_groups_and_comments(self) -> None:
        result = payload(
            crlf("Cc: team: a@x.example, B <b@x.example>;, c@x.example (Carol)\n\nx")
        )
        self.assertEqual(
            result["cc"],
            [
                {"address": "a@x.example"},
                {"address": "b@x.example", "name": "B"},
                {"address": "c@x.example", "name": "Carol"},
            ],
        )

    def test_raw_utf8_name(self) -> None:
        result = payload("From: Jörg <j@x.example>\r\n\r\nx".encode())
        self.assertEqual(result["from"], {"address": "j@x.example", "name": "Jörg"})

    def test_hostile_nesting_gives_nothing_and_does_not_fail(self) -> None:
        """getaddresses recurses per group or comment level: it would raise."""
        for value in (":" * 3000, "(" * 3000):
            result = payload(crlf(f"To: {value}\nFrom: a@x.example\n\nx"))
            self.assertNotIn("to", result)
            self.assertNotIn("parse_error", result)
            self.assertEqual(result["from"], {"address": "a@x.example"})

    def test_empty_values(self) -> None:
        result = payload(crlf("From:\nTo: <>\nIn-Reply-To:\nReferences:\n\nx"))
        for key in ("from", "to", "in_reply_to", "references"):
            self.assertNotIn(key, result)


class DateTests(SynchronousTestCase):
    def date(self, value: str) -> object:
        return payload(crlf(f"Date: {value}\n\nx")).get("date")

    def test_to_utc(self) -> None:
        self.assertEqual(
            self.date("Thu, 3 Dec 2026 05:05:06 +0100"), "2026-12-03T04:05:06Z"
        )
        self.assertEqual(
            self.date("Wed, 2 Dec 2026 23:35:06 -0430"), "2026-12-03T04:05:06Z"
        )

    def test_unknown_zone_is_utc(self) -> None:
        """RFC 5322 3.3: C{-0000} means the time is UTC, the zone unknown."""
        self.assertEqual(self.date("3 Dec 2026 04:05:06 -0000"), "2026-12-03T04:05:06Z")

    def test_obsolete_forms(self) -> None:
        self.assertEqual(
            self.date("Thu, 3 Dec 26 04:05:06 GMT"), "2026-12-03T04:05:06Z"
        )
        self.assertEqual(self.date("Thu, 3 Dec 2026 04:05 EST"), "2026-12-03T09:05:00Z")

    def test_unparsable_is_omitted(self) -> None:
        for value in ("yesterday", "", "Thu, 31 Feb 2026 04:05:06 +0000", "99999"):
            self.assertIsNone(self.date(value), value)

    def test_out_of_range_is_omitted(self) -> None:
        for value in ("31 Dec 9999 23:59:59 -1400", "31 Dec 9999 23:00:00 -0100"):
            self.assertIsNone(self.date(value), value)

    def test_first_date_field(self) -> None:
        result = payload(
            crlf("Date: 3 Dec 2026 04:05:06 +0000\nDate: 1 Jan 2020 00:00 +0000\n\nx")
        )
        self.assertEqual(result["date"], "2026-12-03T04:05:06Z")


class ThreadTests(SynchronousTestCase):
    def test_in_reply_to_as_written(self) -> None:
        result = payload(crlf("In-Reply-To:\n <a@x.example> (a comment)\n\nx"))
        self.assertEqual(result["in_reply_to"], "<a@x.example> (a comment)")

    def test_references_folded(self) -> None:
        result = payload(crlf("References: <a@x>\n\t<b@x>,<c@x>\n\nx"))
        self.assertEqual(result["references"], ["<a@x>", "<b@x>", "<c@x>"])

    def test_references_without_brackets(self) -> None:
        result = payload(crlf("References: a@x b@x\n\nx"))
        self.assertEqual(result["references"], ["a@x", "b@x"])


class EnvelopeTests(SynchronousTestCase):
    def test_cleartext(self) -> None:
        raw = crlf("Subject: s\n\nbody")
        self.assertEqual(
            payload(raw)["envelope"],
            {
                "mail_from": "bounces+u123@esp.example",
                "rcpt_to": ["alerts@example.com", "Ops@Example.com"],
                "helo": "mail.esp.example",
                "client_ip": "192.0.2.25",
                "received_at": "2025-12-03T04:05:06Z",
                "size": len(raw),
            },
        )

    def test_tls(self) -> None:
        envelope = Envelope("", ("a@example.com",), "h", "2001:db8::25", TLS)
        result = payload(b"x", envelope=envelope)["envelope"]
        assert isinstance(result, dict)
        self.assertEqual(
            (result["mail_from"], result["client_ip"], result["tls"]),
            (
                "",
                "2001:db8::25",
                {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"},
            ),
        )
        self.assertEqual(list(result)[-1], "tls")

    def test_client_ip_is_bare(self) -> None:
        """An IPv4 client of a dual-stack listener is shown as IPv4."""
        for peer, shown in [
            ("::ffff:192.0.2.7", "192.0.2.7"),
            ("2001:DB8::1", "2001:db8::1"),
            ("", ""),
            ("/run/maillaser.sock", ""),
        ]:
            envelope = Envelope("", ("a@example.com",), peer=peer)
            result = payload(b"x", envelope=envelope)["envelope"]
            assert isinstance(result, dict)
            self.assertEqual((peer, result["client_ip"]), (peer, shown))

    def test_in_the_fallback(self) -> None:
        """The fallback payload carries the envelope and the header keys too."""
        raw = crlf("From: A <a@x.example>\nDate: 3 Dec 2026 04:05:06 +0000\n\nx")
        message = Message("msg_v2", ENVELOPE, raw, RECEIVED_AT)
        result = json.loads(fallback_payload(message, (), "late", header_list=True))
        self.assertEqual(
            {key: result[key] for key in ("from", "date", "header_list")},
            {
                "from": {"address": "a@x.example", "name": "A"},
                "date": "2026-12-03T04:05:06Z",
                "header_list": [
                    ["From", "A <a@x.example>"],
                    ["Date", "3 Dec 2026 04:05:06 +0000"],
                ],
            },
        )
        self.assertEqual(result["envelope"]["size"], len(raw))
        self.assertEqual(result["parse_error"], "late")


class BodyLineEndTests(SynchronousTestCase):
    def test_lf(self) -> None:
        """SMTP's CRLF is the wire's; the text has LF, as README shows."""
        raw = crlf(
            "Content-Type: multipart/alternative; boundary=b\n\n"
            "--b\nContent-Type: text/plain\n\none\ntwo\n\n"
            "--b\nContent-Type: text/html\n\n<p>one</p>\n<p>two</p>\n"
            "--b--\n"
        )
        result = payload(raw)
        self.assertEqual(
            (result["body"], result["html_body"]),
            ("one\ntwo\n", "<p>one</p>\n<p>two</p>"),
        )

    def test_lone_cr_and_encoded_crlf(self) -> None:
        """Line ends inside base64 are text's too: every CR and CRLF is LF."""
        raw = (
            b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            b"b25lDQp0d28NdGhyZWUKZm91cg==\r\n"
        )
        self.assertEqual(payload(raw)["body"], "one\ntwo\nthree\nfour")


class HeaderChoiceTests(SynchronousTestCase):
    RAW = crlf(
        "X-Spam-Status: No, score=-0.1\n"
        "Subject: s\n"
        "X-Tag: one\n"
        "X-Spam-Status: Yes, forged by the sender\n"
        "X-Tag: =?utf-8?q?tw=C3=B6?=\n"
        "X-Folded: a\n b\n"
        "\nbody"
    )

    def test_headers_keeps_the_last(self) -> None:
        """
        The last field of a name, as before header_list existed: receivers
        written for the old map keep what they read.
        """
        self.assertEqual(
            payload(self.RAW, ("X-",))["headers"],
            {
                "X-Spam-Status": "Yes, forged by the sender",
                "X-Tag": "twö",
                "X-Folded": "a b",
            },
        )

    def test_header_list_off_by_default(self) -> None:
        self.assertNotIn("header_list", payload(self.RAW, ("X-",)))

    def test_header_list(self) -> None:
        """Every top-level field, in order, repeats included, decoded."""
        self.assertEqual(
            payload(self.RAW, header_list=True)["header_list"],
            [
                ["X-Spam-Status", "No, score=-0.1"],
                ["Subject", "s"],
                ["X-Tag", "one"],
                ["X-Spam-Status", "Yes, forged by the sender"],
                ["X-Tag", "twö"],
                ["X-Folded", "a b"],
            ],
        )

    def test_header_list_of_a_headerless_message(self) -> None:
        self.assertEqual(payload(b"\r\nbody", header_list=True)["header_list"], [])
