"""
From the bytes we accepted to the JSON body the webhook receives.

The standard library's C{email} package parses the message
(C{BytesParser} with the C{compat32} policy: the fastest, and the one that
keeps every byte); what the payload shows is then decoded here, explicitly,
by SPEC §4's rules rather than by the policy's: a charset label we cannot
trust falls back to UTF-8 or windows-1252, and raw 8-bit header bytes are
text, not an error.

It never raises: we already said ``250``, so even garbage becomes a
payload.  Each step (the MIME structure, the header fields, the bodies,
the HTML rendering) runs on its own; one that fails is logged, leaves its
fields empty, and names itself in the optional C{parse_error} key.  The
parser's cost follows the structure of the message, not only its size,
so whoever calls L{build_payload} on untrusted mail bounds its time
(L{maillaser.worker} runs it in a payload process with a deadline) and
falls back to L{fallback_payload}, whose cost is bounded by construction.
"""

from __future__ import annotations

import codecs
import datetime
import functools
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from email.errors import HeaderParseError
from email.header import decode_header
from email.message import Message as MIMEMessage
from email.parser import BytesParser
from email.policy import compat32
from email.utils import getaddresses, parsedate_to_datetime
from typing import TYPE_CHECKING, TypeVar, cast

import attrs
import html2text
from twisted.logger import Logger, LogLevel

from maillaser.logs import observer
from maillaser.message import Envelope, Message

if TYPE_CHECKING:
    from maillaser.webhook._attachments import PartOptions

FALLBACK_HEADER_LIMIT = 64 * 1024
"""Bytes of a message L{fallback_payload} reads its header from."""

HTML2TEXT_INPUT_LIMIT = 256 * 1024
"""
Characters of HTML given to html2text.  It is pure Python (about 1 µs per
character of tag-dense markup), so a longer HTML body is converted only this
far; ``html_body`` still carries all of it.
"""

HTML2TEXT_OUTPUT_LIMIT = 1024 * 1024
"""
Characters html2text may write.  Nested blockquotes and lists repeat their
prefix on every line, so 140 KB of HTML can ask for 100 MB of text; the
conversion stops here and keeps what it has.
"""

_ADDRESS_LIMIT = 2048
"""Characters of From given to getaddresses, whose cost grows with them."""

_ADDRESS_LIST_LIMIT = 16 * 1024
"""
Characters of each address field (every To, say, together) read for the
address keys: getaddresses takes about 20 ms for that many.
"""

_ADDRESS_FIELDS = (("to", "to"), ("cc", "cc"), ("reply_to", "reply-to"))
"""Payload key and field name of the address lists."""

_MESSAGE_ID = re.compile(r"<[^<>\s]*>")
_LINE_END = re.compile(r"\r\n?")

_CHARSET_LABEL_LIMIT = 64

_UNSAFE_CODECS = frozenset(
    {"idna", "punycode", "raw-unicode-escape", "undefined", "unicode-escape"}
)
"""
Python codecs that are not mail charsets: punycode decodes in quadratic
time, the escape codecs turn backslashes into characters, and the others
refuse to decode.  A label naming one counts as unknown.
"""

_PARSER = BytesParser(policy=compat32)

_LINE_BREAK = re.compile(rb"\r\n?|\n")
"""The parser ends lines at any of these; inside a field value, all are folds."""

_WORD = r"=\?[!->@-~]*\?[bBqQ]\?[!->@-~]*\?="
"""An RFC 2047 encoded word: printable ASCII, no "?" in the charset or text."""
_ENCODED_WORD = re.compile(_WORD)
_ENCODED_WORDS = re.compile(rf"{_WORD}(?:[ \t]*{_WORD})*")
"""Encoded words separated by nothing but blanks, which decoding drops."""

_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_FREE_CODECS = frozenset({"utf-8", "cp1252", "iso8859-1", "iso8859-15"})
"""Common codecs that never decode to a surrogate (UTF-7 can); others get scrubbed."""
_BLANK_LINES = re.compile(r"\n{3,}")

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

_T = TypeVar("_T")


def build_payload(
    message: Message,
    header_prefixes: Sequence[str],
    parts: PartOptions | None = None,
    *,
    header_list: bool = False,
) -> dict[str, object]:
    """
    The webhook payload for C{message}: SPEC §4 keys, in order, then the
    keys of issue 13, optional keys omitted, and C{parse_error} when a
    step failed.  Never raises.

    @param parts: what attachments and the raw message carry; C{None}
        for neither key.
    @param header_list: add C{header_list}, every top-level field in order
        (C{MAIL_LASER_PAYLOAD_HEADERS=all}).
    """
    reading = _Reading(message.id, header_list=header_list)
    root = reading.attempt("MIME structure", _PARSER.parsebytes, message.raw)
    if root is None:
        reading.attempt("header", reading.top_header, message.raw, header_prefixes)
        return reading.payload(message)
    reading.attempt("header", reading.header, root, header_prefixes)
    leaves = reading.attempt("body", reading.bodies, root)
    if reading.text is None and reading.html is not None:
        reading.rendered = reading.attempt("HTML", _html_to_text, reading.html)
    more = parts and reading.attempt("attachments", parts.keys, message, root, leaves)
    return reading.payload(message, more or {})


def encoded_payload(
    message: Message, header_prefixes: Sequence[str], *, header_list: bool = False
) -> bytes:
    """The request body for C{message}: what a payload process makes."""
    return encode_payload(
        build_payload(message, header_prefixes, header_list=header_list)
    )


def fallback_payload(
    message: Message,
    header_prefixes: Sequence[str],
    error: str,
    *,
    header_list: bool = False,
) -> bytes:
    """
    The request body for C{message} when L{encoded_payload} failed or took
    too long: what the top-level header says (read from at most the first
    L{FALLBACK_HEADER_LIMIT} bytes), an empty body, and C{error} as
    C{parse_error}.  Its cost is bounded whatever the message holds.
    """
    reading = _Reading(message.id, [error], header_list=header_list)
    reading.attempt("header", reading.top_header, message.raw, header_prefixes)
    return encode_payload(reading.payload(message))


def encode_payload(payload: Mapping[str, object]) -> bytes:
    """Compact UTF-8 JSON, non-ASCII kept as is, as upstream sends it."""
    text = _ENCODER.encode(payload)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Only a codec we do not know to be clean can leave a surrogate.
        return _SURROGATE.sub("\ufffd", text).encode("utf-8")


@attrs.define
class _Reading:
    """What the steps found so far; kept when a later step fails."""

    for_message: str
    """The id of the message being read, for the log."""
    errors: list[str] = attrs.Factory(list)
    header_list: bool = False
    """Whether the payload lists every top-level field."""
    fields: list[tuple[str, str]] = attrs.Factory(list)
    """The top-level fields, raw, in order."""
    subject: str = ""
    sender_name: str = ""
    headers: dict[str, str] = attrs.Factory(dict)
    message_id: str = ""
    text: str | None = None
    html: str | None = None
    rendered: str | None = None
    """html2text's rendering of L{html}, for a body when there is no text."""
    _log = Logger(observer=observer)

    def attempt(
        self, what: str, step: Callable[..., _T], *arguments: object
    ) -> _T | None:
        try:
            return step(*arguments)
        except Exception as error:
            self._log.failure(
                "Could not read the {what} of message {message_id}; payload degraded",
                level=LogLevel.warn,
                what=what,
                message_id=self.for_message,
            )
            self.errors.append(f"could not read the {what} ({type(error).__name__})")
            return None

    def top_header(self, raw: bytes, header_prefixes: Sequence[str]) -> None:
        head = _PARSER.parsebytes(raw[:FALLBACK_HEADER_LIMIT], headersonly=True)
        self.header(head, header_prefixes)

    def header(self, root: MIMEMessage, header_prefixes: Sequence[str]) -> None:
        """
        The top-level fields.  Raw values are read rather than
        C{root.get()}, which hands raw 8-bit text back as an opaque
        C{Header}.  For subject, sender and message id the first field of
        a name wins, as C{get} has it; in C{headers} the last one does, as
        it always has (receivers depend on it), and C{header_list} has them
        all.
        """
        first: dict[str, str] = {}
        prefixes = tuple(p.strip().lower() for p in header_prefixes if p.strip())
        self.fields = list(root.raw_items())
        for name, value in self.fields:
            lower = name.lower()
            first.setdefault(lower, value)
            if prefixes and lower.startswith(prefixes):
                self.headers[name] = _header_text(value)
        if "subject" in first:
            self.subject = _header_text(first["subject"])
        if "from" in first:
            self.sender_name = _display_name(first["from"])
        if "message-id" in first:
            self.message_id = _header_text(first["message-id"])

    def bodies(self, root: MIMEMessage) -> list[Leaf]:
        """
        The first text/plain and text/html parts that are not attachments,
        as L{leaves} chooses them; the leaves, for the attachments.
        """
        found = leaves(root)
        for leaf in found:
            if leaf.body:
                if leaf.content_type == "text/plain":
                    self.text = _part_text(leaf.part)
                else:
                    self.html = _part_text(leaf.part)
        return found

    def payload(
        self, message: Message, more: Mapping[str, object] | None = None
    ) -> dict[str, object]:
        """
        Each step adds its keys, in the order receivers see them, C{more}
        (attachments, raw message) after them; C{parse_error} comes last,
        so that it names every step that failed.
        """
        payload = self.summary(message.envelope)
        self.attempt("addresses", self.add_addresses, payload)
        payload["envelope"] = _envelope(message)
        if self.header_list:
            self.attempt("header list", self.add_header_list, payload)
        payload.update(more or {})
        if self.errors:
            payload["parse_error"] = "; ".join(self.errors)
        return payload

    def summary(self, envelope: Envelope) -> dict[str, object]:
        """The keys of SPEC §4, which MailLaser 3's receivers read."""
        payload: dict[str, object] = {"sender": envelope.sender}
        if self.sender_name:
            payload["sender_name"] = self.sender_name
        payload["recipient"] = envelope.recipients[0] if envelope.recipients else ""
        payload["recipients"] = list(envelope.recipients)
        payload["subject"] = self.subject
        body = self.text if self.text is not None else self.rendered
        payload["body"] = _lf(body or "")
        if self.html is not None:
            payload["html_body"] = _lf(self.html)
        if self.headers:
            payload["headers"] = self.headers
        if self.message_id:
            payload["message_id"] = self.message_id
        return payload

    def add_addresses(self, payload: dict[str, object]) -> None:
        """
        C{from} (the first From address), the C{to}, C{cc} and C{reply_to}
        lists (every field of the name, in order), C{date}, C{in_reply_to}
        and C{references}: each only when the message has one.
        """
        values: dict[str, list[str]] = {}
        for name, value in self.fields:
            values.setdefault(name.lower(), []).append(value)
        sender = _addresses(values.get("from", [])[:1])[:1]
        if sender:
            payload["from"] = sender[0]
        for key, name in _ADDRESS_FIELDS:
            addresses = _addresses(values.get(name, []))
            if addresses:
                payload[key] = addresses
        date = _rfc3339_date(values.get("date", [])[:1])
        if date:
            payload["date"] = date
        first_reply_to = values.get("in-reply-to", [])[:1]
        in_reply_to = " ".join(_header_text(v) for v in first_reply_to)
        if in_reply_to:
            payload["in_reply_to"] = in_reply_to
        references = _message_ids(values.get("references", [])[:1])
        if references:
            payload["references"] = references

    def add_header_list(self, payload: dict[str, object]) -> None:
        """Every top-level field as C{[name, decoded value]}, repeats included."""
        payload["header_list"] = [
            [_unfolded_text(name), _header_text(value)] for name, value in self.fields
        ]


@attrs.frozen
class Leaf:
    """A part with no parts of its own, and what L{leaves} read of it."""

    part: MIMEMessage
    content_type: str
    body: bool
    """Whether it is the text or the HTML body; if not, an attachment."""


def leaves(root: MIMEMessage) -> list[Leaf]:
    """
    Every leaf part, depth first, like upstream; a C{message/*} part (a
    message of its own, not a body of this one) counts as one.  The bodies
    are the first C{text/plain} and the first C{text/html} that are not
    attachments.  One walk, with each part's type read once, serves the
    bodies and the attachments, so that the two always agree.
    """
    found: list[Leaf] = []
    bodies: set[str] = set()
    stack = [root]
    while stack:
        part = stack.pop()
        content_type = part.get_content_type()
        if content_type.startswith("multipart/") and part.is_multipart():
            stack.extend(reversed(cast(list[MIMEMessage], part.get_payload())))
            continue
        body = (
            content_type in ("text/plain", "text/html")
            and content_type not in bodies
            and part.get_content_disposition() != "attachment"
        )
        if body:
            bodies.add(content_type)
        found.append(Leaf(part, content_type, body))
    return found


def _lf(text: str) -> str:
    """Line ends as LF: the CRLF of SMTP is the wire's, not the text's."""
    return _LINE_END.sub("\n", text) if "\r" in text else text


def _addresses(values: Iterable[str]) -> list[dict[str, str]]:
    """
    C{{"address", "name"}} for each address in raw field C{values}, the
    name RFC 2047 decoded after parsing (see L{_display_name}) and left out
    when empty; the address as written.  Groups give their members; what
    parses to no address is skipped.
    """
    text = ", ".join(_unfolded_text(value) for value in values)
    if not text:
        return []
    try:
        pairs = _address_pairs(text[:_ADDRESS_LIST_LIMIT])
    except RecursionError:  # deeply nested comments or groups
        return []
    found: list[dict[str, str]] = []
    for name, address in pairs:
        if not address:
            continue
        entry = {"address": address}
        decoded = _decoded_name(name)
        if decoded:
            entry["name"] = decoded
        found.append(entry)
    return found


def _rfc3339_date(values: Sequence[str]) -> str:
    """
    The Date field in UTC as RFC 3339 (C{2026-12-03T04:05:06Z}), or C{""}
    when there is none or it does not parse; C{-0000} (no zone known)
    counts as UTC, as RFC 5322 says it means.
    """
    if not values:
        return ""
    try:
        when = parsedate_to_datetime(_unfolded_text(values[0])[:_ADDRESS_LIMIT])
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        return _utc(when.astimezone(datetime.UTC))
    except (ValueError, TypeError, OverflowError, IndexError):
        return ""


def _utc(when: datetime.datetime) -> str:
    return (
        f"{when.year:04d}-{when.month:02d}-{when.day:02d}"
        f"T{when.hour:02d}:{when.minute:02d}:{when.second:02d}Z"
    )


def _message_ids(values: Sequence[str]) -> list[str]:
    """
    The C{<id>}s of a References field, in order; a field written without
    angle brackets gives its words.
    """
    text = " ".join(_header_text(value) for value in values)
    return _MESSAGE_ID.findall(text) or text.split()


def _envelope(message: Message) -> dict[str, object]:
    """What the SMTP session told us, as the C{envelope} key."""
    envelope = message.envelope
    fields: dict[str, object] = {
        "mail_from": envelope.sender,
        "rcpt_to": list(envelope.recipients),
        "helo": envelope.helo,
        "client_ip": _client_ip(envelope.peer),
        "received_at": _utc(
            datetime.datetime.fromtimestamp(int(message.received_at), datetime.UTC)
        ),
        "size": len(message.raw),
    }
    if envelope.tls is not None:
        fields["tls"] = {"version": envelope.tls.version, "cipher": envelope.tls.cipher}
    return fields


@functools.lru_cache(maxsize=64)
def _client_ip(peer: str) -> str:
    """
    The client's IP address, bare: an IPv4 client of a dual-stack listener
    is shown as IPv4, not as C{::ffff:192.0.2.7}; C{""} when the peer is
    not an IP address (a UNIX socket, say).  Kept for the next message:
    a client sends many.
    """
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return ""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


def _part_text(part: MIMEMessage) -> str:
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)  # a leaf's payload decodes to bytes
    return _decode_text(data, part.get_content_charset())


@functools.lru_cache(maxsize=128)
def _codec(label: str) -> str | None:
    """Python's name for a charset label, or None if we do not trust it."""
    if len(label) > _CHARSET_LABEL_LIMIT:
        return None
    try:
        name = codecs.lookup(label.strip().strip("\"'")).name
    except (LookupError, ValueError):
        return None
    return None if name in _UNSAFE_CODECS else name


def _decode_text(data: bytes, label: str | None) -> str:
    """
    SPEC §4: the declared charset; if missing or unknown, UTF-8 when the
    bytes are valid UTF-8, else windows-1252; bad bytes become U+FFFD.

    A declared us-ascii counts as missing: it is what mailers put on 8-bit
    text they never labelled, and decoding such text as ASCII would lose
    every accented letter.
    """
    codec = None if label is None else _codec(label)
    if codec is not None and codec != "ascii":
        try:
            text = data.decode(codec, "replace")
        except (LookupError, UnicodeError):
            pass  # not a text codec, or one that refuses "replace"
        else:
            if codec in _SURROGATE_FREE_CODECS:
                return text
            return _SURROGATE.sub("\ufffd", text)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


def _unfolded_text(value: str) -> str:
    """
    A raw field value (raw bytes as the parser's surrogate escapes) as one
    line of text, RFC 2047 words still encoded.
    """
    data = _LINE_BREAK.sub(b"", value.encode("ascii", "surrogateescape")).strip()
    return data.decode("ascii") if data.isascii() else _decode_text(data, None)


def _header_text(value: str) -> str:
    return _decode_words(_unfolded_text(value))


def _display_name(value: str) -> str:
    """
    The display name of the first From address, decoded after the address is
    parsed (decoding first would let an encoded comma split the name).
    """
    addresses = _address_pairs(_unfolded_text(value)[:_ADDRESS_LIMIT])
    return _decoded_name(addresses[0][0]) if addresses else ""


@functools.lru_cache(maxsize=16)
def _decoded_name(name: str) -> str:
    """
    A display name, decoded and kept for the next caller: the From field's
    is decoded for C{sender_name} and again for C{from}.
    """
    return _decode_words(name).strip()


@functools.lru_cache(maxsize=16)
def _address_pairs(text: str) -> tuple[tuple[str, str], ...]:
    """
    C{getaddresses} of C{text}, kept for the next caller: the From field
    is read for C{sender_name} and again for C{from}.
    """
    return tuple(getaddresses([text]))


def _decode_words(text: str) -> str:
    """
    Decode RFC 2047 encoded words with C{email.header.decode_header}, one
    run of adjacent words at a time, so that text around them is never
    handed to it: it strips and re-spaces plain text, and round-trips it
    through C{raw-unicode-escape}, which turns a written C{\\u00e9} into
    C{é}.  Within a run, blanks between words go and the bytes of words in
    one charset are decoded together (a character may be split across two).
    """
    if "=?" not in text:
        return text
    return _ENCODED_WORDS.sub(_decoded_words, text)


def _decoded_words(run: re.Match[str]) -> str:
    """
    One run of encoded words, decoded; a word that cannot be (bad base64
    fails C{decode_header} for the whole run) stays as written, and its
    neighbours are decoded on their own.
    """
    try:
        chunks = decode_header(run.group())
    except HeaderParseError:
        if _ENCODED_WORD.fullmatch(run.group()):
            return run.group()
        return _ENCODED_WORD.sub(_decoded_words, run.group())
    return "".join(
        _decode_text(data, None if label is None else label.partition("*")[0])
        for data, label in chunks
    )


class _OutputLimit(Exception):
    pass


class _BoundedHTML2Text(html2text.HTML2Text):
    """
    html2text set up as close to upstream's C{from_read(html, 80)} as the
    Python package goes (no emphasis markers, reference links, image alt
    text), stopping once it has written L{HTML2TEXT_OUTPUT_LIMIT} characters.
    """

    def __init__(self) -> None:
        super().__init__(bodywidth=80)
        self.ignore_emphasis = True
        self.inline_links = False
        self.use_automatic_links = False
        self.unicode_snob = True
        self.images_to_alt = True
        self.written = 0

    def outtextf(self, s: str) -> None:
        super().outtextf(s)
        self.written += len(s)
        if self.written > HTML2TEXT_OUTPUT_LIMIT:
            raise _OutputLimit()


def _html_to_text(html: str) -> str:
    converter = _BoundedHTML2Text()
    try:
        text: str = converter.handle(html[:HTML2TEXT_INPUT_LIMIT])
    except _OutputLimit:
        partial = "".join(converter.outtextlist)[:HTML2TEXT_OUTPUT_LIMIT]
        text = partial.replace(html2text.config.UNIFIABLE["nbsp"], "\xa0")
    # Markdown's hard-break spaces and runs of blank lines are noise in JSON.
    lines = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", lines).strip("\n")
