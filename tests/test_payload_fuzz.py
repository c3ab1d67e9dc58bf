"""
Property tests for the payload: whatever the bytes, a well-formed payload
(and no step failing); for generated MIME trees, the body and HTML an
oracle predicts, and the same text/plain part the stdlib parser picks.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import email
import json
import re
import textwrap
from email import policy
from email.header import Header
from email.message import Message as StdlibMessage
from email.utils import format_datetime, formataddr

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from maillaser.message import Envelope, Message
from maillaser.webhook import _payload, build_payload, encode_payload, fallback_payload
from tests.helpers import PAYLOAD_KEYS

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ENVELOPE = Envelope(sender="s@example.com", recipients=("a@example.com", "b@x"))

ADDRESS_LIST_KEYS = ["to", "cc", "reply_to"]
RFC3339_UTC = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
TEXT_KEYS = ["sender", "recipient", "subject", "body"]
OPTIONAL_TEXT_KEYS = ["sender_name", "html_body", "message_id"]

FRAGMENTS = [
    b"\r\n",
    b"\n",
    b"\r\n\r\n",
    b" ",
    b"\t",
    b"Subject: ",
    b"From: ",
    b"X-Test: v",
    b"Message-ID: <x@y>",
    b"Content-Type: multipart/mixed; boundary=b",
    b'Content-Type: multipart/alternative; boundary="b"',
    b"Content-Type: multipart/digest; boundary=b",
    b"Content-Type: text/plain; charset=",
    b"Content-Type: text/html",
    b"Content-Type: message/rfc822",
    b"Content-Transfer-Encoding: base64",
    b"Content-Transfer-Encoding: quoted-printable",
    b"Content-Disposition: attachment",
    b"--b",
    b"--b--",
    b"=?utf-8?b?",
    b"=?iso-8859-1?q?",
    b"=?utf-7?q?",
    b"?=",
    b"utf-8",
    b"utf-7",
    b"x-unknown",
    b"punycode",
    b"\xff\xfe",
    b"\xc3\xa9",
    b"\xe9",
    b"=C3",
    b"+2AA-",
    b"<p>",
    b"<blockquote>",
    b"<a href=x>",
    b"(",
    b'"',
    b"<",
    b">",
    b"@",
    b",",
    b":",
    b";",
    b")",
    b"\\",
    b"To: ",
    b"Cc: ",
    b"Reply-To: ",
    b"Date: ",
    b"In-Reply-To: ",
    b"References: ",
    b"Mon, 2 Dec 2026 14:02:49 +0000",
    b"-0000",
    b"Feb 31",
    b"99999",
    b"=?utf-8?q?a,b?=",
    b"group:",
]

soup = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=8)), max_size=80
).map(b"".join)
prefixes = st.lists(
    st.sampled_from(["x-", "X-Test", "", "subject", "content-", "MESSAGE"]), max_size=3
)


def assert_well_formed(case: SynchronousTestCase, result: dict[str, object]) -> None:
    """The properties every payload has, whatever the input: no step failed."""
    case.assertNotIn("parse_error", result)
    assert_keys(case, result)
    case.assertEqual(case.flushLoggedErrors(), [])


def assert_keys(case: SynchronousTestCase, result: dict[str, object]) -> None:
    """Keys in order, of the right types, optional ones omitted when empty."""
    case.assertEqual(list(result), [key for key in PAYLOAD_KEYS if key in result])
    for key in TEXT_KEYS:
        case.assertIsInstance(result[key], str)
    case.assertEqual(result["sender"], ENVELOPE.sender)
    case.assertEqual(result["recipient"], ENVELOPE.recipients[0])
    case.assertEqual(result["recipients"], list(ENVELOPE.recipients))
    for key in OPTIONAL_TEXT_KEYS:
        if key in result:
            case.assertIsInstance(result[key], str)
    for key in ("sender_name", "message_id"):
        case.assertNotEqual(result.get(key), "")
    if "headers" in result:
        headers = result["headers"]
        assert isinstance(headers, dict)
        case.assertTrue(headers)
        for name, value in headers.items():
            case.assertIsInstance(name, str)
            case.assertIsInstance(value, str)
    assert_newer_keys(case, result)
    case.assertEqual(json.loads(encode_payload(result)), result)


def assert_address(case: SynchronousTestCase, entry: object) -> None:
    """C{{"address": non-empty text, "name": non-empty text}}, name optional."""
    assert isinstance(entry, dict)
    case.assertIn(set(entry), ({"address"}, {"address", "name"}))
    for value in entry.values():
        case.assertIsInstance(value, str)
        case.assertTrue(value)


def assert_newer_keys(case: SynchronousTestCase, result: dict[str, object]) -> None:
    """The keys of issue 13: their types, and never present but empty."""
    if "from" in result:
        assert_address(case, result["from"])
    for key in ADDRESS_LIST_KEYS:
        if key in result:
            entries = result[key]
            assert isinstance(entries, list)
            case.assertTrue(entries)
            for entry in entries:
                assert_address(case, entry)
    if "date" in result:
        date = result["date"]
        assert isinstance(date, str)
        case.assertRegex(date, RFC3339_UTC)
    if "in_reply_to" in result:
        case.assertIsInstance(result["in_reply_to"], str)
        case.assertTrue(result["in_reply_to"])
    if "references" in result:
        references = result["references"]
        assert isinstance(references, list)
        case.assertTrue(references)
        case.assertTrue(all(isinstance(r, str) and r for r in references))
    for key in ("body", "html_body"):
        case.assertNotIn("\r", result.get(key, ""))
    envelope = result["envelope"]
    assert isinstance(envelope, dict)
    case.assertEqual(
        list(envelope),
        ["mail_from", "rcpt_to", "helo", "client_ip", "received_at", "size"],
    )
    case.assertEqual(envelope["mail_from"], ENVELOPE.sender)
    case.assertEqual(envelope["rcpt_to"], list(ENVELOPE.recipients))
    case.assertRegex(envelope["received_at"], RFC3339_UTC)
    if "header_list" in result:
        for field in result["header_list"]:  # type: ignore[attr-defined]
            case.assertEqual([type(part) for part in field], [str, str])


def parse(
    raw: bytes, header_prefixes: list[str] | None = None, header_list: bool = True
) -> dict[str, object]:
    return build_payload(
        Message("msg_fuzz", ENVELOPE, raw),
        header_prefixes or [],
        header_list=header_list,
    )


class ArbitraryBytesTests(SynchronousTestCase):
    @FUZZ
    @given(raw=st.binary(max_size=4096), header_prefixes=prefixes)
    def test_random_bytes(self, raw: bytes, header_prefixes: list[str]) -> None:
        assert_well_formed(self, parse(raw, header_prefixes))

    @FUZZ
    @given(raw=soup, header_prefixes=prefixes)
    def test_mail_shaped_bytes(self, raw: bytes, header_prefixes: list[str]) -> None:
        assert_well_formed(self, parse(raw, header_prefixes))

    @FUZZ
    @given(raw=st.one_of(soup, st.binary(max_size=4096)), header_prefixes=prefixes)
    def test_fallback(self, raw: bytes, header_prefixes: list[str]) -> None:
        """The fallback reads what the full payload reads of the header."""
        message = Message("msg_fuzz", ENVELOPE, raw)
        result = json.loads(
            fallback_payload(message, header_prefixes, "late", header_list=True)
        )
        assert_keys(self, result)
        self.assertEqual(self.flushLoggedErrors(), [])
        full = parse(raw, header_prefixes)
        expected = {key: full[key] for key in PAYLOAD_KEYS if key in full}
        expected.update(body="", parse_error="late")
        expected.pop("html_body", None)
        self.assertEqual(result, expected)


# Generated MIME trees.  Text never contains "-", so no line in a body can
# look like a delimiter, and never "\r", so the line break before a delimiter
# is always the delimiter's.
TEXT = st.text(
    alphabet=st.sampled_from(list("abcXYZ09 .,;:!?'\"()<>&/\n\té€üßЖあ=_")),
    max_size=60,
)
VALID_CHARSETS = ["utf-8", "UTF-8", "iso-8859-1", "windows-1252", "koi8-r", "shift_jis"]
FALLBACK_CHARSETS = [None, "x-unknown", "utf-9", "punycode", "us-ascii", ""]
ENCODINGS = [
    None,
    "7bit",
    "8bit",
    "binary",
    "base64",
    "BASE64",
    "quoted-printable",
    "base64+junk",
    "quoted-printable+lowercase",
    "quoted-printable+invalid",
]
DISPOSITIONS = [
    None,
    "inline",
    "attachment",
    'Attachment; filename="a.txt"',
    "inline; filename=b.txt",
    "form-data",
]
LEAF_TYPES = [
    None,
    "text/plain",
    "TEXT/Plain",
    "text/html",
    "text/calendar",
    "application/octet-stream",
    "image/png",
    "message/rfc822",
]
MULTIPART_TYPES = ["mixed", "alternative", "related", "digest", "signed"]
SOUP_HEADERS = st.lists(
    st.tuples(
        st.sampled_from(["X-Soup", "x-soup-2", "Comments", "X-Long"]),
        st.text(alphabet=st.sampled_from(list("abc XYZ;=\"'")), max_size=30),
    ),
    max_size=3,
)


@attrs.frozen
class Leaf:
    content_type: str | None
    charset: str | None
    encoding: str | None
    disposition: str | None
    text: str
    junk: tuple[int, ...]
    soup: list[tuple[str, str]]

    @property
    def data(self) -> bytes:
        """The text in the charset a reader would use, before transfer encoding."""
        if self.content_type is not None and self.charset in VALID_CHARSETS:
            return self.text.encode(self.charset)
        return self.text.encode("utf-8")

    @property
    def expected(self) -> str:
        """What any reader should get back: junk and padding cannot hide it."""
        suffix = "=ZZ" if self.encoding == "quoted-printable+invalid" else ""
        return self.text + suffix

    @property
    def clean(self) -> bool:
        return self.encoding not in {"base64+junk", "quoted-printable+invalid"}

    def effective_type(self, parent: str) -> str:
        if self.content_type is None:
            return "message/rfc822" if parent == "multipart/digest" else "text/plain"
        return self.content_type.lower()

    @property
    def attachment(self) -> bool:
        disposition = (self.disposition or "").partition(";")[0]
        return disposition.strip().lower() == "attachment"


@attrs.frozen
class Multipart:
    subtype: str
    children: list[Leaf | Multipart]
    quoted: bool
    folded: bool
    preamble: str
    soup: list[tuple[str, str]]


@st.composite
def leaves(draw: st.DrawFn) -> Leaf:
    charset = draw(st.sampled_from(VALID_CHARSETS + FALLBACK_CHARSETS))
    text = draw(TEXT)
    if charset in VALID_CHARSETS:
        text = text.encode(charset, "ignore").decode(charset)
    return Leaf(
        content_type=draw(st.sampled_from(LEAF_TYPES)),
        charset=charset,
        encoding=draw(st.sampled_from(ENCODINGS)),
        disposition=draw(st.sampled_from(DISPOSITIONS)),
        text=text,
        junk=tuple(draw(st.lists(st.integers(0, 200), max_size=5))),
        soup=draw(SOUP_HEADERS),
    )


def multiparts(
    children: st.SearchStrategy[Leaf | Multipart],
) -> st.SearchStrategy[Multipart]:
    return st.builds(
        Multipart,
        subtype=st.sampled_from(MULTIPART_TYPES),
        children=st.lists(children, max_size=4),
        quoted=st.booleans(),
        folded=st.booleans(),
        preamble=TEXT,
        soup=SOUP_HEADERS,
    )


trees = st.recursive(leaves(), multiparts, max_leaves=10)


@attrs.define
class Renderer:
    """Turns a tree into bytes; C{newline} is the structure's line break."""

    newline: bytes
    boundaries: int = 0

    def entity(self, node: Leaf | Multipart) -> bytes:
        nl = self.newline
        fields = [f"{name}: {value}".encode() for name, value in node.soup]
        if isinstance(node, Leaf):
            fields += self.leaf_fields(node)
            return nl.join([*fields, b""]) + nl + self.leaf_body(node)
        self.boundaries += 1
        boundary = f"bnd{self.boundaries}"
        param = f'"{boundary}"' if node.quoted else boundary
        separator = ";" + nl.decode() + " " if node.folded else "; "
        content_type = f"multipart/{node.subtype}{separator}boundary={param}"
        fields.append(b"Content-Type: " + content_type.encode())
        parts = b"".join(
            b"--" + boundary.encode() + nl + self.entity(child) + nl
            for child in node.children
        )
        head = nl.join([*fields, b""]) + nl
        preamble = node.preamble.encode() + nl if node.preamble else b""
        return head + preamble + parts + b"--" + boundary.encode() + b"--" + nl

    def leaf_fields(self, leaf: Leaf) -> list[bytes]:
        fields = []
        if leaf.content_type is not None:
            value = leaf.content_type
            if leaf.charset is not None:
                value += f'; format=flowed; charset="{leaf.charset}"'
            fields.append(b"content-TYPE: " + value.encode())
        if leaf.encoding is not None:
            name = leaf.encoding.partition("+")[0]
            fields.append(b"Content-Transfer-Encoding: " + name.encode())
        if leaf.disposition is not None:
            fields.append(b"Content-Disposition: " + leaf.disposition.encode())
        return fields

    def leaf_body(self, leaf: Leaf) -> bytes:
        data = leaf.data
        encoding = (leaf.encoding or "").lower()
        if encoding.startswith("base64"):
            lines = textwrap.wrap(base64.b64encode(data).decode(), 76)
            encoded = self.newline.join(line.encode() for line in lines)
            if encoding == "base64+junk":
                junked = bytearray(encoded.rstrip(b"="))
                for position in leaf.junk:
                    junked.insert(position % (len(junked) + 1), b"*! \t#"[position % 5])
                encoded = bytes(junked)
            return encoded
        if encoding.startswith("quoted-printable"):
            encoded = binascii.b2a_qp(data).replace(b"=\n", b"=" + self.newline)
            if encoding == "quoted-printable+lowercase":
                encoded = re.sub(rb"=[0-9A-F]{2}", lambda m: m.group().lower(), encoded)
            if encoding == "quoted-printable+invalid":
                encoded += b"=ZZ"
            return encoded
        return data


def walk(node: Leaf | Multipart, parent: str = "") -> list[tuple[str, Leaf]]:
    """The oracle's depth-first list of (effective type, leaf)."""
    if isinstance(node, Leaf):
        return [(node.effective_type(parent), node)]
    found = []
    for child in node.children:
        found += walk(child, f"multipart/{node.subtype}")
    return found


def first(node: Leaf | Multipart, content_type: str) -> Leaf | None:
    return next(
        (
            leaf
            for found_type, leaf in walk(node)
            if found_type == content_type and not leaf.attachment
        ),
        None,
    )


def stdlib_first_plain(message: StdlibMessage) -> StdlibMessage | None:
    """The first non-attachment text/plain leaf as compat32 parses it."""
    if message.get_content_maintype() == "multipart":
        parts = message.get_payload()
        if isinstance(parts, str):  # no delimiter: the stdlib keeps the text
            return None
        for part in parts:
            assert isinstance(part, StdlibMessage)  # a multipart's parts
            found = stdlib_first_plain(part)
            if found is not None:
                return found
        return None
    if (
        message.get_content_type() == "text/plain"
        and message.get_content_disposition() != "attachment"
    ):
        return message
    return None


class GeneratedMimeTests(SynchronousTestCase):
    @FUZZ
    @given(
        tree=trees,
        crlf=st.booleans(),
        subject=st.text(
            alphabet=st.characters(
                codec="utf-8", exclude_categories=["Cc", "Cs", "Zl", "Zp"]
            ),
            max_size=40,
        ),
        name=st.lists(st.sampled_from(["Ann", "Jörg", "Li", "Zoë", "O"]), max_size=3),
    )
    def test_oracle(
        self, tree: Leaf | Multipart, crlf: bool, subject: str, name: list[str]
    ) -> None:
        renderer = Renderer(b"\r\n" if crlf else b"\n")
        display_name = " ".join(name)
        top = [
            b"Subject: " + Header(subject, "utf-8").encode().encode(),
            b"From: "
            + formataddr((display_name, "from@example.com"), "utf-8").encode(),
            b"MIME-Version: 1.0",
        ]
        raw = renderer.newline.join(top) + renderer.newline + renderer.entity(tree)
        result = parse(raw, ["x-soup"])
        assert_well_formed(self, result)
        self.assertEqual(result["subject"], subject)
        self.assertEqual(result.get("sender_name"), display_name or None)
        named = {"name": display_name} if display_name else {}
        self.assertEqual(result["from"], {"address": "from@example.com", **named})

        plain, html = first(tree, "text/plain"), first(tree, "text/html")
        if html is None:
            self.assertNotIn("html_body", result)
        else:
            self.assertEqual(result["html_body"], html.expected)
        if plain is not None:
            self.assertEqual(result["body"], plain.expected)
        elif html is not None:
            self.assertEqual(result["body"], _payload._html_to_text(html.expected))
        else:
            self.assertEqual(result["body"], "")

        stdlib = stdlib_first_plain(
            email.message_from_bytes(raw, policy=policy.compat32)
        )
        self.assertEqual(stdlib is None, plain is None)
        if stdlib is not None and plain is not None and plain.clean:
            self.assertEqual(stdlib.get_payload(decode=True), plain.data)

    @FUZZ
    @given(
        tree=trees,
        edits=st.lists(
            st.tuples(st.integers(0, 10_000), st.binary(max_size=3)), max_size=8
        ),
    )
    def test_mutated(
        self, tree: Leaf | Multipart, edits: list[tuple[int, bytes]]
    ) -> None:
        """Damaged MIME: bytes replaced, dropped or inserted anywhere."""
        raw = bytearray(Renderer(b"\r\n").entity(tree))
        for position, replacement in edits:
            at = position % (len(raw) + 1)
            raw[at : at + position % 3] = replacement
        assert_well_formed(self, parse(bytes(raw), ["x-", "content"]))


field_names = st.text(
    alphabet=st.sampled_from(list("XYZabc-_09!~;")), min_size=1, max_size=12
)
field_values = st.lists(
    st.text(alphabet=st.sampled_from(list("abc XYZ:;=<>@\t")), max_size=20),
    min_size=1,
    max_size=3,
)


class HeaderTests(SynchronousTestCase):
    """Whatever the fields, the body starts after the blank line."""

    @FUZZ
    @given(
        fields=st.lists(st.tuples(field_names, field_values), min_size=1, max_size=12),
        newline=st.sampled_from([b"\r\n", b"\n"]),
    )
    def test_fields_then_body(
        self, fields: list[tuple[str, list[str]]], newline: bytes
    ) -> None:
        fold = newline + b" "
        header = b"".join(
            name.encode() + b": " + fold.join(v.encode() for v in lines) + newline
            for name, lines in fields
        )
        result = parse(header + newline + b"the body", ["x", "a", "Y", "z", "b", "c"])
        assert_well_formed(self, result)
        self.assertEqual(result["body"], "the body")
        expected: dict[str, str] = {}
        for name, lines in fields:
            if name[0].lower() in "xyzabc":
                expected[name] = " ".join(lines).strip()  # the last field wins
        self.assertEqual(result.get("headers", {}), expected)
        self.assertEqual(
            result["header_list"],
            [[name, " ".join(lines).strip()] for name, lines in fields],
        )


display_names = st.text(
    alphabet=st.sampled_from(list("abcXYZ09 .,;:!?'\"()<>@\\éüßЖあ")),
    max_size=20,
)
local_parts = st.text(alphabet=st.sampled_from(list("abcxyz09._+-")), min_size=1)
zones = st.integers(-14 * 60, 14 * 60).map(
    lambda minutes: datetime.timezone(datetime.timedelta(minutes=minutes))
)


class AddressTests(SynchronousTestCase):
    """The address keys give back what a mailer wrote, whatever the names."""

    @FUZZ
    @given(
        people=st.lists(st.tuples(display_names, local_parts), min_size=1, max_size=6),
        field=st.sampled_from(["To", "Cc", "Reply-To"]),
        newline=st.sampled_from([b"\r\n", b"\n"]),
    )
    def test_address_lists(
        self, people: list[tuple[str, str]], field: str, newline: bytes
    ) -> None:
        written = [
            formataddr((name, f"{local}@example.org"), "utf-8")
            for name, local in people
        ]
        raw = (
            field.encode()
            + b": "
            + ("," + newline.decode() + " ").join(written).encode()
            + newline * 2
            + b"body"
        )
        result = parse(raw)
        assert_well_formed(self, result)
        key = field.lower().replace("-", "_")
        self.assertEqual(
            result[key],
            [
                {"address": f"{local}@example.org", **({"name": n} if n else {})}
                for name, local in people
                for n in [name.strip()]
            ],
        )

    @FUZZ
    @given(
        when=st.datetimes(
            min_value=datetime.datetime(1900, 1, 1),
            max_value=datetime.datetime(9998, 12, 31),
            timezones=zones,
        ),
    )
    def test_date_in_utc(self, when: datetime.datetime) -> None:
        when = when.replace(microsecond=0)
        result = parse(b"Date: " + format_datetime(when).encode() + b"\r\n\r\nx")
        assert_well_formed(self, result)
        utc = when.astimezone(datetime.UTC)
        self.assertEqual(result["date"], utc.strftime("%Y-%m-%dT%H:%M:%SZ"))

    @FUZZ
    @given(
        field=st.sampled_from(
            ["From", "To", "Cc", "Reply-To", "Date", "In-Reply-To", "References"]
        ),
        value=st.one_of(
            st.text(max_size=200),
            st.text(alphabet=st.sampled_from(list('()<>@,;:\\".[] =?q')), max_size=300),
        ),
    )
    def test_any_value(self, field: str, value: str) -> None:
        """Whatever the field holds, the payload is well formed."""
        raw = field.encode() + b": " + value.encode("utf-8", "surrogatepass")
        assert_well_formed(self, parse(raw + b"\r\n\r\nbody"))
