"""
Tests for the payload: L{maillaser.webhook.build_payload} and
L{maillaser.webhook.fallback_payload}.

The first group ports upstream's C{email_parser::tests} (reference §7.4)
where SPEC §4 still agrees with them; the rest cover what SPEC §4 adds:
RFC 2047 and RFC 2231, charsets, attachments, broken encodings, hostile
structure, and C{parse_error} when a step fails.
"""

from __future__ import annotations

import json
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from maillaser.message import Envelope, Message
from maillaser.webhook import (
    _payload,
    build_payload,
    encode_payload,
    encoded_payload,
    fallback_payload,
)
from tests.helpers import spec_keys

CORPUS = Path(__file__).parent / "corpus"

ENVELOPE = Envelope(sender="sender@example.com", recipients=("alerts@example.com",))


def parse(raw: bytes, prefixes: tuple[str, ...] = ()) -> dict[str, object]:
    return spec_keys(build_payload(Message("msg_test", ENVELOPE, raw), prefixes))


def crlf(text: str) -> bytes:
    """Mail text with CRLF line ends, as it comes out of the SMTP session."""
    return text.replace("\n", "\r\n").encode()


def corpus(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def body_of(raw_body: bytes, headers: str = "") -> object:
    """The payload body of a single-part message with these headers."""
    return parse(crlf("Subject: t\n" + headers + "\n") + raw_body)["body"]


def multipart(*parts: str, kind: str = "mixed", boundary: str = "b") -> str:
    """A multipart body whose parts are given as header + blank line + body."""
    delimited = "".join(f"--{boundary}\n{part}\n" for part in parts)
    return (
        f"Content-Type: multipart/{kind}; boundary={boundary}\n\n"
        f"{delimited}--{boundary}--\n"
    )


class UpstreamCasesTests(SynchronousTestCase):
    """Upstream's parser tests, with SPEC §4's answers."""

    def test_simple(self) -> None:
        raw = crlf(
            "From: sender@example.com\n"
            "To: recipient@example.com\n"
            "Subject: Test Email\n"
            "\n"
            "This is a test email.\n"
            "It has multiple lines.\n"
        )
        self.assertEqual(
            list(parse(raw).items()),
            [
                ("sender", "sender@example.com"),
                ("recipient", "alerts@example.com"),
                ("recipients", ["alerts@example.com"]),
                ("subject", "Test Email"),
                ("body", "This is a test email.\nIt has multiple lines.\n"),
            ],
        )

    def test_html_content_type(self) -> None:
        """A text/html message: body is html2text of it, html_body the markup."""
        html = (
            "Plain text part that might be ignored by html2text if not in tags.\r\n"
            "<html><body>\r\n"
            "<p>HTML content that should be ignored.</p>\r\n"
            "</body></html>\r\n"
            "Another plain line.\r\n"
        )
        raw = (
            crlf(
                "From: sender@example.com\n"
                "Subject: HTML Email\n"
                "Content-Type: text/html; charset=utf-8\n\n"
            )
            + html.encode()
        )
        result = parse(raw)
        self.assertEqual(result["subject"], "HTML Email")
        self.assertNotIn("sender_name", result)
        self.assertEqual(
            result["body"],
            "Plain text part that might be ignored by html2text if not in tags.\n\n"
            "HTML content that should be ignored.\n\n"
            "Another plain line.",
        )
        self.assertEqual(result["html_body"], html.replace("\r\n", "\n"))

    def test_no_content_type_html_looking(self) -> None:
        """Without Content-Type a body is text/plain, whatever it looks like."""
        markup = (
            "<html><body><h1>Title</h1><p>This is <strong>bold</strong> text and a "
            '<a href="http://example.com">link</a>.</p>'
            "<div>Another section</div></body></html>"
        )
        result = parse(crlf("Subject: Complex HTML Heuristic\n\n" + markup))
        self.assertEqual(result["body"], markup)
        self.assertEqual(result["subject"], "Complex HTML Heuristic")
        self.assertNotIn("html_body", result)
        self.assertNotIn("sender_name", result)

    def test_no_subject(self) -> None:
        result = parse(
            crlf("From: sender@example.com\nTo: r@example.com\n\nBody only.\n")
        )
        self.assertEqual((result["subject"], result["body"]), ("", "Body only.\n"))

    def test_empty_body(self) -> None:
        result = parse(crlf("From: sender@example.com\nSubject: Empty Body Test\n\n"))
        self.assertEqual(result["subject"], "Empty Body Test")
        self.assertEqual(result["body"], "")
        self.assertNotIn("html_body", result)

    def test_from_name(self) -> None:
        """Upstream's four cases, plus forms upstream did not test."""
        cases = [
            ("From: Kangaroo Roo <roo@example.com>\n", "Kangaroo Roo"),
            ("From: <just_email@example.com>\n", None),
            ("From: plain_email@example.com\n", None),
            ("", None),
            (
                'From: "Smith, John" <john@example.com>, other@example.com\n',
                "Smith, John",
            ),
            ("From: roo@example.com (Kangaroo Roo)\n", "Kangaroo Roo"),
            (
                "From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <j@example.com>\n",
                "Jörg Müller",
            ),
            ('From: "=?iso-8859-1?q?Ren=E9?=" <r@example.com>\n', "René"),
            ("From: =?utf-8?b?TGksIFdlaQ==?= <li@example.com>\n", "Li, Wei"),
            ('From: "" <empty@example.com>\n', None),
            ("From: Undisclosed recipients:;\n", None),
            ("From: Kangaroo\n  Roo <roo@example.com>\n", "Kangaroo Roo"),
        ]
        for header, expected in cases:
            result = parse(crlf(header + "Subject: s\n\nBody."))
            self.assertEqual(result.get("sender_name"), expected, header)

    def test_gmail_multipart_alternative(self) -> None:
        """
        Upstream's Gmail sample.  Unlike upstream, body is the text/plain
        part (SPEC §4); the name comes from From, never Reply-To.
        """
        html = (
            '<div dir="ltr">trying to make sure all email is stripped from this '
            "message. Thanks!<br><br><b>Yours truly,</b><div><i>ME</i></div><div>"
            '<i><a href="https://govcraft.ai">https://govcraft.ai</a></i></div>'
            "<div><i><br></i></div></div>\n"
        )
        self.assertEqual(
            list(parse(corpus("gmail-alternative.eml")).items()),
            [
                ("sender", "sender@example.com"),
                ("sender_name", "Roland Rodriguez"),
                ("recipient", "alerts@example.com"),
                ("recipients", ["alerts@example.com"]),
                ("subject", "hopefully no html"),
                (
                    "body",
                    "trying to make sure all email is stripped from this message. "
                    "Thanks!\n\n*Yours truly,*\n*ME*\n"
                    "*https://govcraft.ai <https://govcraft.ai>*\n",
                ),
                ("html_body", html),
                (
                    "message_id",
                    "<CALGz_fUk-EJ9wi-VSkZMuAgcHa9bK+kFKnsKdSLrxX62LU1inA@mail.gmail.com>",
                ),
            ],
        )

    def test_gmail_html_only(self) -> None:
        """
        The same message without its text/plain part: body is html2text of the
        HTML.  Upstream expects (after trimming)
        C{"...Thanks!\\n\\nYours truly,\\nME\\n[https://govcraft.ai][1]\\n\\n\\n[1]:
        https://govcraft.ai"}; Python's html2text makes each div a paragraph
        and indents reference lines, otherwise the same text and links.
        """
        raw = corpus("gmail-alternative.eml")
        start = raw.index(b"--0000000000005e994006321734d8\r\nContent-Type: text/plain")
        end = raw.index(b"--0000000000005e994006321734d8\r\nContent-Type: text/html")
        result = parse(raw[:start] + raw[end:])
        self.assertEqual(
            result["body"],
            "trying to make sure all email is stripped from this message. Thanks!\n\n"
            "Yours truly,\n\nME\n\n[https://govcraft.ai][1]\n\n"
            "   [1]: https://govcraft.ai",
        )
        self.assertIn('<a href="https://govcraft.ai">', result["html_body"])

    def test_header_prefixes(self) -> None:
        raw = crlf(
            "From: sender@example.com\n"
            "Subject: Header Test\n"
            "X-Custom-Foo: value1\n"
            "X-Custom-Bar: value2\n"
            "X-Other: should-not-match\n"
            "\n"
            "Body.\n"
        )
        self.assertEqual(
            parse(raw, ("X-Custom",))["headers"],
            {"X-Custom-Foo": "value1", "X-Custom-Bar": "value2"},
        )

    def test_header_prefixes_case_insensitive(self) -> None:
        raw = crlf(
            "Subject: Case Test\n"
            "X-MY-HEADER: upper-value\n"
            "x-my-other: lower-value\n"
            "\n"
            "Body.\n"
        )
        self.assertEqual(
            parse(raw, ("x-my",))["headers"],
            {"X-MY-HEADER": "upper-value", "x-my-other": "lower-value"},
        )

    def test_header_prefixes_no_match(self) -> None:
        raw = crlf("Subject: No Match Test\nX-Something: value\n\nBody.\n")
        self.assertNotIn("headers", parse(raw, ("X-Nonexistent",)))

    def test_header_prefixes_empty(self) -> None:
        """No prefixes, or only blank ones, pass nothing through."""
        raw = crlf("Subject: Empty Prefixes Test\nX-Custom: value\n\nBody.\n")
        self.assertNotIn("headers", parse(raw))
        self.assertNotIn("headers", parse(raw, ("", "  ")))

    def test_malformed_bytes(self) -> None:
        """Upstream's FF FE 00 01 80 90: one line that is not a header is the body."""
        result = parse(b"\xff\xfe\x00\x01\x80\x90")
        self.assertEqual(result["subject"], "")
        self.assertEqual(result["body"], "\xff\xfe\x00\x01\u20ac\ufffd")

    def test_empty_input(self) -> None:
        self.assertEqual(
            parse(b""),
            {
                "sender": "sender@example.com",
                "recipient": "alerts@example.com",
                "recipients": ["alerts@example.com"],
                "subject": "",
                "body": "",
            },
        )


class HeaderTests(SynchronousTestCase):
    """Header decoding and pass-through."""

    def subject(self, header: bytes) -> object:
        return parse(b"Subject: " + header + b"\r\n\r\nx")["subject"]

    def test_rfc2047(self) -> None:
        cases = [
            (b"=?UTF-8?B?SMOpbMOobmU=?=", "Hélène"),
            (b"=?utf-8?Q?caf=C3=A9_cr=C3=A8me?=", "café crème"),
            (b"=?ISO-8859-1?Q?Fran=E7ois?=", "François"),
            (b"=?iso-8859-1?b?RnJhbudvaXM=?=", "François"),
            (b"Re: =?utf-8?q?J=C3=B6rg?= and more", "Re: Jörg and more"),
            (b"=?utf-8?q?a?= =?utf-8?q?b?=\t=?utf-8?q?c?=", "abc"),
            (b"=?utf-8?q?a?=\r\n =?utf-8?q?b?=", "ab"),
            (b"=?utf-8?b?4oKs?==?iso-8859-1?q?=E9?=", "€é"),
            (b"=?utf-8?b?4g==?= =?utf-8?b?gqw=?=", "€"),
            (b"=?utf-8*en?q?hi?=", "hi"),
            (b"=?x-unknown?q?caf=C3=A9?=", "café"),
            (b"=?x-unknown?q?caf=E9?=", "café"),
            (b"=?utf-8?b?QUJDR?= x", "=?utf-8?b?QUJDR?= x"),
            ("=?utf-8?q?é?=".encode(), "=?utf-8?q?é?="),
            (b"=?utf-8?q?a?= =?utf-8?b?A?= =?utf-8?q?c?=", "a =?utf-8?b?A?= c"),
            (b"no =? words ?= here", "no =? words ?= here"),
        ]
        for header, expected in cases:
            self.assertEqual(self.subject(header), expected, header)

    def test_unfolding(self) -> None:
        """CRLF before whitespace goes; the whitespace stays (RFC 5322 §2.2.3)."""
        self.assertEqual(
            self.subject(b"a long\r\n subject\r\n\tfolded  "), "a long subject\tfolded"
        )

    def test_raw_8bit(self) -> None:
        """Unlabelled 8-bit header bytes: UTF-8 when valid, else windows-1252."""
        self.assertEqual(self.subject("Grüße €".encode()), "Grüße €")
        self.assertEqual(self.subject("Grüße €".encode("cp1252")), "Grüße €")

    def test_first_subject_wins(self) -> None:
        result = parse(crlf("Subject: one\nsubject: two\n\nx"))
        self.assertEqual(result["subject"], "one")

    def test_message_id(self) -> None:
        present = parse(crlf("Message-ID:  <abc@example.com> \n\nx"))
        self.assertEqual(present["message_id"], "<abc@example.com>")
        self.assertNotIn("message_id", parse(crlf("Subject: x\n\nx")))
        self.assertNotIn("message_id", parse(crlf("Message-ID:\n\nx")))

    def test_passthrough_values(self) -> None:
        """
        Values are decoded and unfolded; the last field of an identical name
        wins, while names that differ in case stay apart, in first-seen order.
        """
        raw = crlf(
            "X-Tag: first\n"
            "X-Note: =?utf-8?q?gr=C3=BC=C3=9Fe?=\n"
            "x-tag: other case\n"
            "X-Tag: last\n"
            "X-Long: one\n two\n"
            "Subject: s\n\nx"
        )
        self.assertEqual(
            parse(raw, (" X-",))["headers"],
            {
                "X-Tag": "last",
                "X-Note": "grüße",
                "x-tag": "other case",
                "X-Long": "one two",
            },
        )

    def test_passthrough_top_level_only(self) -> None:
        raw = crlf(
            "X-Top: yes\n" + multipart("X-Part: no\nContent-Type: text/plain\n\nhello")
        )
        self.assertEqual(parse(raw, ("x-",))["headers"], {"X-Top": "yes"})

    def test_huge_header(self) -> None:
        """Hundreds of kilobytes of fields: every one is read, then the body."""
        filler = b"".join(b"X-Filler-%06d: v\r\n" % n for n in range(20_000))
        result = parse(b"Subject: early\r\n" + filler + b"\r\nthe body", ("x-",))
        self.assertEqual((result["subject"], result["body"]), ("early", "the body"))
        headers = result["headers"]
        assert isinstance(headers, dict)
        self.assertEqual(len(headers), 20_000)

    def test_raw_8bit_next_to_encoded_words(self) -> None:
        """
        Only the encoded words go to the stdlib's decoder: the text around
        them keeps its spaces and its characters, escapes included.
        """
        raw = "Ärger \\u00e9 =?utf-8?q?gel=C3=B6st?=  =?utf-8?q?!?= Åsa"
        self.assertEqual(self.subject(raw.encode()), "Ärger \\u00e9 gelöst! Åsa")


class EnvelopeTests(SynchronousTestCase):
    def test_several_recipients(self) -> None:
        envelope = Envelope(
            "s@example.com", ("First@Example.com", "b@example.com", "c@x")
        )
        result = build_payload(Message("m", envelope, b"\r\nhi"), ())
        self.assertEqual(result["recipient"], "First@Example.com")
        self.assertEqual(
            result["recipients"], ["First@Example.com", "b@example.com", "c@x"]
        )

    def test_null_sender(self) -> None:
        result = build_payload(Message("m", Envelope("", ("a@x",)), b""), ())
        self.assertEqual(result["sender"], "")


class BodySelectionTests(SynchronousTestCase):
    def test_attachment_is_not_body(self) -> None:
        raw = crlf(
            multipart(
                "Content-Type: text/plain\nContent-Disposition: attachment; "
                "filename=log.txt\n\nattached log",
                "Content-Type: text/html\nContent-Disposition: ATTACHMENT\n\n<p>a</p>",
                "Content-Type: text/plain\nContent-Disposition: inline\n\nthe body",
                "Content-Type: text/html\n\n<p>the html</p>",
            )
        )
        result = parse(raw)
        self.assertEqual(result["body"], "the body")
        self.assertEqual(result["html_body"], "<p>the html</p>")

    def test_only_attachments(self) -> None:
        raw = crlf(
            multipart(
                "Content-Type: text/plain\nContent-Disposition: attachment\n\nlog",
                "Content-Type: text/html\n\n<p>only <b>html</b></p>",
            )
        )
        result = parse(raw)
        self.assertEqual(result["body"], "only html")
        self.assertEqual(result["html_body"], "<p>only <b>html</b></p>")

    def test_nothing_textual(self) -> None:
        raw = crlf(
            multipart(
                "Content-Type: image/png\nContent-Transfer-Encoding: base64\n\niVBO",
                "Content-Type: text/calendar\n\nBEGIN:VCALENDAR",
            )
        )
        result = parse(raw)
        self.assertEqual(result["body"], "")
        self.assertNotIn("html_body", result)

    def test_depth_first(self) -> None:
        """The first text/plain in document order wins, however deep."""
        inner = multipart(
            "Content-Type: text/plain\n\ninner text",
            "Content-Type: text/html\n\n<p>inner</p>",
            kind="alternative",
            boundary="c",
        )
        raw = crlf(multipart(inner, "Content-Type: text/plain\n\nouter text"))
        result = parse(raw)
        self.assertEqual(
            (result["body"], result["html_body"]), ("inner text", "<p>inner</p>")
        )

    def test_part_without_content_type(self) -> None:
        """A part without Content-Type is text/plain, except in a digest."""
        self.assertEqual(
            parse(crlf(multipart("\nplain by default")))["body"], "plain by default"
        )
        digest = multipart("\nSubject: inner\n\nforwarded", kind="digest")
        self.assertEqual(parse(crlf(digest))["body"], "")

    def test_forwarded_message_is_not_body(self) -> None:
        raw = crlf(
            multipart(
                "Content-Type: message/rfc822\n\nSubject: inner\n\nforwarded text"
            )
        )
        self.assertEqual(parse(raw)["body"], "")

    def test_invalid_content_type(self) -> None:
        """RFC 2045 §5.2: a Content-Type that does not parse means text/plain."""
        self.assertEqual(body_of(b"text", "Content-Type: nonsense\n"), "text")
        self.assertEqual(
            body_of(b"text", "Content-Type: a/b/c; charset=utf-8\n"), "text"
        )

    def test_multipart_without_boundary(self) -> None:
        raw = crlf(
            "Content-Type: multipart/mixed\n\n--b\nContent-Type: text/plain\n\nx\n--b--"
        )
        self.assertEqual(parse(raw)["body"], "")

    def test_delimiters(self) -> None:
        """
        Preamble and epilogue are dropped, transport padding after a delimiter
        is allowed, and a boundary that prefixes another does not split it.
        """
        raw = (
            b'Content-Type: multipart/mixed; boundary="b"\n\n'
            b"preamble\n--bx not a delimiter\n"
            b"--b \t\n"
            b'Content-Type: multipart/alternative; boundary="b1"\n\n'
            b"--b1\nContent-Type: text/plain\n\nfirst\n--b1--\n"
            b"--b--\nepilogue\n--b\nContent-Type: text/html\n\n<p>late</p>\n"
        )
        result = parse(raw)
        self.assertEqual(result["body"], "first")
        self.assertNotIn("html_body", result)

    def test_unclosed_multipart(self) -> None:
        """
        A last part without a close delimiter runs to the end, less its
        last line break, as if the delimiter were there.
        """
        raw = crlf("Content-Type: multipart/mixed; boundary=b\n\n--b\n\nto the end\n")
        self.assertEqual(parse(raw)["body"], "to the end")

    def test_rfc2231_boundary(self) -> None:
        """The boundary given in RFC 2231 continuations, as the issue found."""
        raw = crlf(
            'Content-Type: multipart/mixed; boundary*0="ab"; boundary*1="cd"\n\n'
            "--abcd\nContent-Type: text/plain\n\nthe text\n--abcd--\n"
        )
        self.assertEqual(parse(raw)["body"], "the text")

    def test_message_without_parts_is_not_a_multipart(self) -> None:
        """A multipart whose boundary never appears has no part to read."""
        raw = crlf("Content-Type: multipart/mixed; boundary=b\n\n--c\n\nnot a part\n")
        self.assertEqual(parse(raw)["body"], "")

    def test_boundary_at_start_and_lf_lines(self) -> None:
        raw = b"Content-Type: multipart/mixed; boundary=z\n\n--z\n\nlf only\n--z--\n"
        self.assertEqual(parse(raw)["body"], "lf only")

    def test_missing_separator(self) -> None:
        """As in compat32: the first line that is not a field starts the body."""
        result = parse(crlf("Subject: s\nnot a header\nmore\n"))
        self.assertEqual(
            (result["subject"], result["body"]), ("s", "not a header\nmore\n")
        )


class CharsetTests(SynchronousTestCase):
    """SPEC §4's charset rule."""

    def test_declared(self) -> None:
        self.assertEqual(
            body_of(
                "Grüße".encode("iso-8859-1"),
                "Content-Type: text/plain; charset=iso-8859-1\n",
            ),
            "Grüße",
        )
        self.assertEqual(
            body_of(
                "Грек".encode("koi8-r"), 'Content-Type: text/plain; charset="KOI8-R"\n'
            ),
            "Грек",
        )
        self.assertEqual(
            body_of("Grüße".encode(), "Content-Type: text/plain; charset=iso-8859-1\n"),
            "GrÃ¼Ã\x9fe",
        )

    def test_missing(self) -> None:
        self.assertEqual(body_of("Grüße €".encode()), "Grüße €")
        self.assertEqual(body_of("Grüße €".encode("cp1252")), "Grüße €")
        self.assertEqual(
            body_of("é".encode("latin-1"), "Content-Type: text/plain\n"), "é"
        )

    def test_unknown(self) -> None:
        header = "Content-Type: text/plain; charset=x-no-such-charset\n"
        self.assertEqual(body_of("Grüße".encode(), header), "Grüße")
        self.assertEqual(body_of("Grüße".encode("cp1252"), header), "Grüße")

    def test_not_a_mail_charset(self) -> None:
        """
        Python codecs that are not charsets, and labels Python cannot look up,
        count as unknown.
        """
        for label in [
            "punycode",
            "idna",
            "unicode_escape",
            "raw-unicode-escape",
            "undefined",
            "base64",
            "rot13",
            "utf-8\x00",
            "x" * 100,
        ]:
            header = f"Content-Type: text/plain; charset={label}\n"
            self.assertEqual(
                body_of(b"caf\xc3\xa9 \\u00e9", header), "café \\u00e9", label
            )

    def test_declared_wrong(self) -> None:
        """A declared charset is trusted; bytes it cannot decode become U+FFFD."""
        header = "Content-Type: text/plain; charset=utf-8\n"
        self.assertEqual(body_of(b"caf\xe9 ok", header), "caf\ufffd ok")

    def test_us_ascii_with_8bit(self) -> None:
        """
        us-ascii on 8-bit bytes is a mailer that never labelled its text:
        treated as no charset, so UTF-8 when valid, else windows-1252.
        """
        header = "Content-Type: text/plain; charset=us-ascii\n"
        self.assertEqual(body_of("naïve".encode(), header), "naïve")
        self.assertEqual(body_of("naïve €".encode("cp1252"), header), "naïve €")

    def test_utf7_surrogates(self) -> None:
        """UTF-7 can encode a lone surrogate; it must not reach the JSON."""
        result = parse(crlf("Content-Type: text/plain; charset=utf-7\n\na+2AA-b"))
        self.assertEqual(result["body"], "a\ufffdb")
        self.assertIn('"body":"a\ufffdb"'.encode(), encode_payload(result))

    def test_rfc2231_charset(self) -> None:
        """A charset given in RFC 2231 form, continued or with a language."""
        for header in [
            'Content-Type: text/plain; charset*0="iso-8859"; charset*1="-1"\n',
            "Content-Type: text/plain; charset*=iso-8859-1'de'\n",
        ]:
            self.assertEqual(body_of(b"caf\xe9", header), "café", header)


class TransferEncodingTests(SynchronousTestCase):
    def test_base64(self) -> None:
        header = "Content-Transfer-Encoding: base64\nContent-Type: text/plain\n"
        self.assertEqual(body_of(b"R3LDvMOfZQ==\r\n", header), "Grüße")

    def test_broken_base64(self) -> None:
        """
        What the valid characters say is kept.  A lone last character holds
        no whole byte, and then the stdlib gives the text back as it came
        (bpo-27397).
        """
        header = "Content-Transfer-Encoding: BASE64\n"
        cases = [
            (b"R3LDvMOfZQ", "Grüße"),
            (b"R3LD\r\nvMO*fZQ", "Grüße"),
            (b"R3LDvMOfZQ=!", "Grüße"),
            (b"R3LDvMOfZQQ", "Grüße\x04"),
            (b"QUJD=RA", "ABCD"),
            (b"!!!", ""),
            (b"R3LDvMOfZ", "R3LDvMOfZ"),
        ]
        for data, expected in cases:
            self.assertEqual(body_of(data, header), expected, data)

    def test_quoted_printable(self) -> None:
        header = (
            "Content-Transfer-Encoding: quoted-printable\n"
            "Content-Type: text/plain; charset=utf-8\n"
        )
        self.assertEqual(
            body_of(b"Gr=C3=BC=C3=9Fe, soft=\r\nbreak", header), "Grüße, softbreak"
        )

    def test_broken_quoted_printable(self) -> None:
        """Invalid escapes stay as written; lowercase hex is accepted."""
        header = "Content-Transfer-Encoding: quoted-printable\n"
        self.assertEqual(body_of(b"a=ZZb =c3=a9 =\r\nc=", header), "a=ZZb é c")

    def test_unknown_encoding(self) -> None:
        """An encoding we do not know leaves the bytes alone (7bit, 8bit, ...)."""
        self.assertEqual(
            body_of(b"R3LDvMOfZQ==", "Content-Transfer-Encoding: x-unknown\n"),
            "R3LDvMOfZQ==",
        )

    def test_uuencode(self) -> None:
        """uuencoded text is decoded; a broken one is left as it came."""
        header = "Content-Transfer-Encoding: x-uuencode\n"
        uuencoded = b"begin 644 a.txt\r\n$1W+#O```\r\n`\r\nend\r\n"
        self.assertEqual(body_of(uuencoded, header), "Grü")
        self.assertEqual(body_of(b"R3LDvMOfZQ==", header), "R3LDvMOfZQ==")


def nested(depth: int, leaf: bytes) -> bytes:
    """C{leaf} inside C{depth} multiparts, each with its own boundary."""
    opening = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
        for i in range(depth)
    )
    closing = b"".join(b"\r\n--b%d--" % i for i in reversed(range(depth)))
    return b"Subject: deep\r\n" + opening + leaf + closing


class LimitsTests(SynchronousTestCase):
    """Hostile structure still gives a payload; html2text's work is capped."""

    def test_depth(self) -> None:
        """Nesting is followed as deep as the parser goes."""
        leaf = b"Content-Type: text/plain\r\n\r\nfound"
        self.assertEqual(parse(nested(100, leaf))["body"], "found")

    def test_many_parts(self) -> None:
        filler = "Content-Type: image/gif\n\nGIF89a"
        text = "Content-Type: text/plain\n\nlate text"
        self.assertEqual(
            parse(crlf(multipart(*[filler] * 2000, text)))["body"], "late text"
        )

    def test_long_parameters(self) -> None:
        """Parameter soup around the charset does not hide it."""
        for soup in [b"a" * 20_000, b"; a=" * 5_000, b'; a="\\"' * 2_500]:
            raw = (
                b"Content-Type: text/plain; "
                + soup
                + b"; charset=iso-8859-1\r\n\r\ncaf\xe9"
            )
            self.assertEqual(parse(raw)["body"], "café", soup[:8])

    def test_html2text_input_limit(self) -> None:
        """Only the first L{_payload.HTML2TEXT_INPUT_LIMIT} characters are converted."""
        head = "<p>kept</p>" + " " * (_payload.HTML2TEXT_INPUT_LIMIT - 11)
        html = head + "<p>beyond</p>"
        result = parse(crlf("Content-Type: text/html\n\n") + html.encode())
        self.assertEqual(result["body"], "kept")
        self.assertEqual(result["html_body"], html)

    def test_html2text_output_limit(self) -> None:
        """Nesting cannot make html2text write more than the output limit."""
        html = "<blockquote>" * 2000 + "<p>x</p>" * 2000
        body = parse(crlf("Content-Type: text/html\n\n" + html))["body"]
        assert isinstance(body, str)
        self.assertLessEqual(len(body), _payload.HTML2TEXT_OUTPUT_LIMIT)
        self.assertTrue(body.startswith("> > > "), body[:20])
        self.assertGreater(len(body), _payload.HTML2TEXT_OUTPUT_LIMIT // 2)


class BrokenParser:
    """Parses top-level headers only, as the fallback does; anything else fails."""

    parser = _payload._PARSER

    def parsebytes(self, raw: bytes, headersonly: bool = False) -> object:
        if not headersonly:
            raise RecursionError("injected")
        return self.parser.parsebytes(raw, headersonly)


class DegradationTests(SynchronousTestCase):
    """A failing step is logged, costs only its own fields, and is named."""

    def failing_step(self, *args: object, **kwargs: object) -> object:
        raise ZeroDivisionError("injected")

    def test_nothing_fails(self) -> None:
        result = parse(corpus("gmail-alternative.eml"))
        self.assertNotIn("parse_error", result)

    def test_structure_step(self) -> None:
        """Without a MIME structure, the top-level header is still read."""
        self.patch(_payload, "_PARSER", BrokenParser())
        result = parse(corpus("multipart-attachment.eml"), ("x-",))
        self.assertEqual(len(self.flushLoggedErrors(RecursionError)), 1)
        self.assertEqual(
            (result["subject"], result["sender_name"], result["headers"]),
            (
                "Report für März",
                "Jörg Müller",
                {"X-Mailer": "CorpusGen 1.0", "X-Priority": "3"},
            ),
        )
        self.assertEqual(result["body"], "")
        self.assertNotIn("html_body", result)
        self.assertEqual(
            result["parse_error"], "could not read the MIME structure (RecursionError)"
        )

    def test_header_step(self) -> None:
        self.patch(_payload, "_display_name", self.failing_step)
        result = parse(corpus("gmail-alternative.eml"))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertNotIn("sender_name", result)
        body = result["body"]
        assert isinstance(body, str)
        self.assertTrue(body.startswith("trying to make sure"))
        self.assertEqual(
            result["parse_error"], "could not read the header (ZeroDivisionError)"
        )

    def test_body_step(self) -> None:
        self.patch(_payload, "_decode_text", self.failing_step)
        result = parse(crlf("Subject: kept\n\nbody"))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual((result["subject"], result["body"]), ("kept", ""))
        self.assertEqual(
            result["parse_error"], "could not read the body (ZeroDivisionError)"
        )

    def test_html_step(self) -> None:
        self.patch(_payload, "_html_to_text", self.failing_step)
        result = parse(crlf("Content-Type: text/html\n\n<p>x</p>"))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual((result["body"], result["html_body"]), ("", "<p>x</p>"))
        self.assertEqual(
            result["parse_error"], "could not read the HTML (ZeroDivisionError)"
        )

    def test_several_steps(self) -> None:
        self.patch(_payload, "_header_text", self.failing_step)
        self.patch(_payload, "_html_to_text", self.failing_step)
        result = parse(crlf("Subject: lost\nContent-Type: text/html\n\n<p>x</p>"))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)
        self.assertEqual(result["subject"], "")
        self.assertEqual(
            result["parse_error"],
            "could not read the header (ZeroDivisionError);"
            " could not read the HTML (ZeroDivisionError)",
        )


class FallbackTests(SynchronousTestCase):
    """The payload for a message whose full payload failed or came too late."""

    def fallback(self, raw: bytes, prefixes: tuple[str, ...] = ()) -> object:
        message = Message("msg_test", ENVELOPE, raw)
        return spec_keys(
            json.loads(fallback_payload(message, prefixes, "took too long"))
        )

    def test_header_only(self) -> None:
        self.assertEqual(
            self.fallback(corpus("multipart-attachment.eml"), ("X-Mailer",)),
            {
                "sender": "sender@example.com",
                "sender_name": "Jörg Müller",
                "recipient": "alerts@example.com",
                "recipients": ["alerts@example.com"],
                "subject": "Report für März",
                "body": "",
                "headers": {"X-Mailer": "CorpusGen 1.0"},
                "message_id": "<multipart-attachment@example.net>",
                "parse_error": "took too long",
            },
        )

    def test_reads_only_the_start(self) -> None:
        """Fields past L{_payload.FALLBACK_HEADER_LIMIT} bytes are not read."""
        filler = b"X-Filler: " + b"y" * 70 + b"\r\n"
        head = filler * (_payload.FALLBACK_HEADER_LIMIT // len(filler))
        raw = b"Subject: early\r\n" + head + b"Message-ID: <late@x>\r\n\r\nbody"
        result = self.fallback(raw)
        assert isinstance(result, dict)
        self.assertEqual(result["subject"], "early")
        self.assertNotIn("message_id", result)

    def test_deep_nesting(self) -> None:
        """Structure costs nothing here: the body is not looked for."""
        leaf = b"Content-Type: text/plain\r\n\r\n" + b"x\r\n" * 200_000
        result = self.fallback(nested(1000, leaf))
        self.assertEqual(
            result,
            {
                "sender": "sender@example.com",
                "recipient": "alerts@example.com",
                "recipients": ["alerts@example.com"],
                "subject": "deep",
                "body": "",
                "parse_error": "took too long",
            },
        )

    def test_header_failure(self) -> None:
        """Even a failure here gives a payload, naming both reasons."""

        def failing_step(*args: object) -> object:
            raise ZeroDivisionError("injected")

        self.patch(_payload, "_header_text", failing_step)
        result = self.fallback(b"Subject: s\r\n\r\nbody")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        assert isinstance(result, dict)
        self.assertEqual(
            result["parse_error"],
            "took too long; could not read the header (ZeroDivisionError)",
        )


class CorpusTests(SynchronousTestCase):
    """The benchmark's corpus parses to what its messages say."""

    def test_small_plain(self) -> None:
        self.assertEqual(
            list(parse(corpus("small-plain.eml")).items()),
            [
                ("sender", "sender@example.com"),
                ("sender_name", "Monitor"),
                ("recipient", "alerts@example.com"),
                ("recipients", ["alerts@example.com"]),
                ("subject", "Disk usage on db-1 at 91%"),
                ("body", "Disk usage on db-1 is 91%.\n"),
                ("message_id", "<small-plain@example.net>"),
            ],
        )

    def test_multipart_attachment(self) -> None:
        result = parse(corpus("multipart-attachment.eml"), ("X-",))
        self.assertEqual(result["sender_name"], "Jörg Müller")
        self.assertEqual(result["subject"], "Report für März")
        self.assertEqual(
            result["body"],
            "Hallo,\n\nanbei der Bericht für März. Die Zahlen sind vorläufig."
            "\n\nGrüße\nJörg\n",
        )
        self.assertEqual(
            result["html_body"],
            "<html><body><p>Hallo,</p><p>anbei der <b>Bericht</b> für März. Die "
            "Zahlen sind vorläufig.</p><p>Grüße<br>Jörg</p></body></html>\n",
        )
        self.assertEqual(
            result["headers"], {"X-Mailer": "CorpusGen 1.0", "X-Priority": "3"}
        )

    def test_html_only(self) -> None:
        result = parse(corpus("html-only.eml"))
        body = result["body"]
        assert isinstance(body, str)
        self.assertIn("\n# Weekly operations report\n", body)
        self.assertIn("\n  * [#1042][1] — storage latency on db-1 (37 minutes)\n", body)
        self.assertIn("Next steps: replace the failing disk on db-1", body)
        self.assertTrue(
            body.endswith("   [4]: https://lists.example.com/unsubscribe?u=8c1f")
        )
        self.assertNotIn("<", body)
        self.assertNotIn("color: #222", body)
        html_body = result["html_body"]
        assert isinstance(html_body, str)
        self.assertTrue(html_body.startswith("<!DOCTYPE html>\n"))

    def test_large_attachment(self) -> None:
        result = parse(corpus("large-attachment.eml"))
        self.assertEqual(
            result["body"], "Nightly backup finished; the archive is attached.\n"
        )
        self.assertNotIn("html_body", result)


class EncodePayloadTests(SynchronousTestCase):
    def test_exact_bytes(self) -> None:
        raw = crlf(
            "From: =?utf-8?q?Z=C3=B6e?= <zoe@example.com>\n"
            "Subject: Caf\u00e9 \u2615\n"
            "Message-ID: <1@example.com>\n"
            "X-Ticket: 42\n"
            + multipart(
                'Content-Type: text/plain; charset="utf-8"\n\nline "one"\nline\ttwo',
                "Content-Type: text/html\n\n<p>\u00e9</p>",
                kind="alternative",
            )
        )
        message = Message("m", Envelope("", ("a@example.com", "B@example.com")), raw)
        self.assertEqual(
            encode_payload(build_payload(message, ("x-ticket",))),
            b'{"sender":"","sender_name":"Z\xc3\xb6e","recipient":"a@example.com",'
            b'"recipients":["a@example.com","B@example.com"],'
            b'"subject":"Caf\xc3\xa9 \xe2\x98\x95",'
            b'"body":"line \\"one\\"\\nline\\ttwo",'
            b'"html_body":"<p>\xc3\xa9</p>","headers":{"X-Ticket":"42"},'
            b'"message_id":"<1@example.com>",'
            b'"from":{"address":"zoe@example.com","name":"Z\xc3\xb6e"},'
            b'"envelope":{"mail_from":"","rcpt_to":["a@example.com","B@example.com"],'
            b'"helo":"","client_ip":"","received_at":"1970-01-01T00:00:00Z",'
            b'"size":%d}}' % len(raw),
        )

    def test_encoded_payload(self) -> None:
        message = Message("msg_test", ENVELOPE, corpus("small-plain.eml"))
        self.assertEqual(
            encoded_payload(message, ()), encode_payload(build_payload(message, ()))
        )

    def test_round_trip(self) -> None:
        result = parse(corpus("multipart-attachment.eml"), ("x-",))
        self.assertEqual(json.loads(encode_payload(result)), result)

    def test_lone_surrogates(self) -> None:
        """Whatever str a codec produced, encoding does not raise."""
        self.assertEqual(
            encode_payload({"body": "a\ud800b\udcff", "ok": "\U0001f600"}),
            '{"body":"a\ufffdb\ufffd","ok":"\U0001f600"}'.encode(),
        )

    def test_controls_escaped(self) -> None:
        self.assertEqual(
            encode_payload({"body": "\x00\x1f\u2028"}),
            b'{"body":"\\u0000\\u001f\xe2\x80\xa8"}',
        )
