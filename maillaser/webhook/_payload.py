"""
From the bytes we accepted to the JSON body the webhook receives.

This runs for every message, on bytes anyone on the Internet can write, in
the bridge's payload process (see L{maillaser.child}).  Two rules follow.
It never raises: we already said ``250``, so even garbage becomes a
payload, with empty strings where nothing could be read.  And the parse
costs what the size of the message says, never what its structure says
(html2text aside, whose input and output are capped).

The bound on the parse is why the MIME tree is walked here and not by
``email.feedparser``: the feedparser tests every line against every
enclosing boundary and handles each line in Python, so 10 MB of empty lines
costs it about two seconds, and the same lines nested a few hundred
multiparts deep cost minutes.  Here headers are matched with one regular
expression per field, boundaries are found with ``bytes.find``, bodies are
decoded with ``binascii``, all on offsets into the one ``raw`` object, so
skipped attachments are never copied; depth, parts and header bytes are
capped.  The semantics are compat32's (first field of a name wins, a part
without Content-Type is text/plain, RFC 2046 delimiters), and
``email.utils.getaddresses`` still reads the From address.
"""

from __future__ import annotations

import binascii
import codecs
import functools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from email.utils import getaddresses

import attrs
import html2text
from twisted.logger import Logger, LogLevel

from maillaser.message import Message

MAX_DEPTH = 32
"""Multipart nesting we follow; parts nested deeper are ignored."""

MAX_PARTS = 1000
"""
Boundary lines examined per message.  Each part starts with one, and a line
that only looks like one counts too, so no message makes the walk loop over
millions of near misses; parts past the limit are ignored.
"""

MAX_HEADER_BYTES = 256 * 1024
"""
Header bytes parsed per message, all parts together.  Each field costs a
Python step, so this bounds the work a message made of headers can cause.
Top-level fields past the limit are ignored, and the walk stops at the first
part whose headers do not fit.
"""

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
"""Characters of From given to getaddresses (linear, but about 2 µs each)."""

_CHARSET_LABEL_LIMIT = 64

_UNSAFE_CODECS = frozenset(
    {"idna", "punycode", "raw-unicode-escape", "undefined", "unicode-escape"}
)
"""
Python codecs that are not mail charsets: punycode decodes in quadratic
time, the escape codecs turn backslashes into characters, and the others
refuse to decode.  A label naming one counts as unknown.
"""

_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)(?:\n|\Z)")
_FIELD_START = re.compile(rb"[!-9;-~]*[ \t]*")
"""What a line cut off before its colon may hold and still be a field."""
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
# Anchored on ";" so that a search never rescans a long run of name characters.
_PARAM = re.compile(rb';\s*([^\s=;"]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;]*))')
_QUOTED_PAIR = re.compile(rb"\\(.)")
_DELIMITER_TAIL = re.compile(rb"(--)?[ \t]*(?:\r?\n|\r?\Z)")
_BASE64_JUNK = re.compile(rb"[^A-Za-z0-9+/]")
_ENCODED_WORD = re.compile(r"=\?([^?\s]*)\?([bBqQ])\?([^?]*)\?=")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_FREE_CODECS = frozenset({"utf-8", "cp1252", "iso8859-1", "iso8859-15"})
"""Common codecs that never decode to a surrogate (UTF-7 can); others get scrubbed."""
_SIMPLE_FROM = re.compile(
    r'[ \t]*(?:"(?P<quoted>[^"\\\r\n]*)"|(?P<atoms>[^\s"<>(),;:\\@.\[\]]+'
    r'(?: [^\s"<>(),;:\\@.\[\]]+)*))?[ \t]*<[^\s<>()",;:\\@]+@[^\s<>()",;:\\@]+>[ \t]*'
)
_BLANK_LINES = re.compile(r"\n{3,}")

_TEXT_TYPES = ("text/plain", "text/html")

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

_log = Logger()


def build_payload(
    message: Message, header_prefixes: Sequence[str]
) -> dict[str, object]:
    """
    The webhook payload for C{message}: SPEC §4 keys, in order, optional
    keys omitted.  Never raises: each step runs on its own, so a failure in
    one (logged) leaves its fields empty and keeps what the others found.
    """
    parsed = _Parsed(message.raw)
    with _degraded("header", message.id):
        parsed.read_header(header_prefixes)
    with _degraded("MIME structure", message.id):
        parsed.read_bodies()
    body = parsed.text
    if body is None:
        body = ""
        if parsed.html is not None:
            with _degraded("HTML", message.id):
                body = _html_to_text(parsed.html)
    envelope = message.envelope
    payload: dict[str, object] = {"sender": envelope.sender}
    if parsed.sender_name:
        payload["sender_name"] = parsed.sender_name
    payload["recipient"] = envelope.recipients[0] if envelope.recipients else ""
    payload["recipients"] = list(envelope.recipients)
    payload["subject"] = parsed.subject
    payload["body"] = body
    if parsed.html is not None:
        payload["html_body"] = parsed.html
    if parsed.headers:
        payload["headers"] = parsed.headers
    if parsed.message_id:
        payload["message_id"] = parsed.message_id
    return payload


def encoded_payload(message: Message, header_prefixes: Sequence[str]) -> bytes:
    """The request body for C{message}: what the payload process makes."""
    return encode_payload(build_payload(message, header_prefixes))


def encode_payload(payload: Mapping[str, object]) -> bytes:
    """Compact UTF-8 JSON, non-ASCII kept as is, as upstream sends it."""
    text = _ENCODER.encode(payload)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Only a codec we do not know to be clean can leave a surrogate.
        return _SURROGATE.sub("\ufffd", text).encode("utf-8")


@contextmanager
def _degraded(what: str, message_id: str) -> Iterator[None]:
    try:
        yield
    except Exception:
        _log.failure(
            "Could not parse the {what} of message {message_id}; payload degraded",
            level=LogLevel.warn,
            what=what,
            message_id=message_id,
        )


@attrs.frozen
class _Head:
    """The header fields of one MIME entity and where its body starts."""

    fields: list[tuple[bytes, bytes]]
    """(name as written, raw value with folding), in order."""

    first: dict[bytes, bytes]
    """Lower-case name to the value of its first field, as compat32's C{get}."""

    body_start: int
    complete: bool
    """False when the header budget ran out inside this header."""


@attrs.define
class _Parsed:
    """What one parse found so far; kept if a later step fails."""

    raw: bytes = attrs.field(repr=False)
    parts_left: int = MAX_PARTS
    header_bytes_left: int = MAX_HEADER_BYTES
    subject: str = ""
    sender_name: str = ""
    headers: dict[str, str] = attrs.Factory(dict)
    message_id: str = ""
    text: str | None = None
    html: str | None = None
    top: _Head | None = None
    """The top-level header, parsed once for both reading steps."""

    def read_header(self, header_prefixes: Sequence[str]) -> None:
        head = self._top_head()
        subject = head.first.get(b"subject")
        if subject is not None:
            self.subject = _header_text(subject)
        sender = head.first.get(b"from")
        if sender is not None:
            self.sender_name = _display_name(sender)
        message_id = head.first.get(b"message-id")
        if message_id is not None:
            self.message_id = _header_text(message_id)
        prefixes = tuple(p.strip().lower() for p in header_prefixes if p.strip())
        if prefixes:
            for raw_name, value in head.fields:
                name = raw_name.decode("ascii")
                if name.lower().startswith(prefixes):
                    self.headers[name] = _header_text(value)

    def read_bodies(self) -> None:
        self._walk(self._top_head(), len(self.raw), "text/plain", 0)

    def _top_head(self) -> _Head:
        if self.top is None:
            self.top = self._head(0, len(self.raw))
        return self.top

    def _head(self, start: int, end: int) -> _Head:
        """
        Split an entity into fields and body as the compat32 parser does:
        fields up to an empty line, or up to the first line that is not a
        field, which then starts the body.
        """
        limit = min(end, start + self.header_bytes_left)
        fields = []
        first: dict[bytes, bytes] = {}
        pos = start
        while match := _FIELD.match(self.raw, pos, limit):
            name, value = match.groups()
            fields.append((name, value))
            first.setdefault(name.lower(), value)
            pos = match.end()
        self.header_bytes_left -= pos - start
        if limit < end and _FIELD_START.fullmatch(self.raw, pos, limit):
            # Out of budget at or inside what may be a field: skip the rest of
            # the header rather than take it for the body.  The search starts
            # at pos - 1 so that an empty line right at pos counts too.
            body_start = self._after_blank_line(max(pos - 1, start), end)
            return _Head(fields, first, body_start, False)
        if self.raw.startswith(b"\r\n", pos, end):
            pos += 2
        elif self.raw.startswith(b"\n", pos, end):
            pos += 1
        return _Head(fields, first, pos, True)

    def _after_blank_line(self, pos: int, end: int) -> int:
        """Past the first empty line after a line break at C{pos} or later."""
        found = [
            i + len(blank)
            for blank in (b"\n\r\n", b"\n\n")
            if (i := self.raw.find(blank, pos, end)) >= 0
        ]
        return min(found, default=end)

    def _walk(self, head: _Head, end: int, default_type: str, depth: int) -> None:
        """Depth first, like upstream: the first text/plain and text/html win."""
        content_type, params = _content_type(
            head.first.get(b"content-type"), default_type
        )
        if content_type.startswith("multipart/"):
            boundary = params.get(b"boundary", b"").rstrip()
            if not boundary or depth >= MAX_DEPTH:
                return
            child_type = (
                "message/rfc822" if content_type == "multipart/digest" else "text/plain"
            )
            for start, part_end in self._parts(head.body_start, end, boundary):
                part = self._head(start, part_end)
                if not part.complete:
                    return
                self._walk(part, part_end, child_type, depth + 1)
                if self.text is not None and self.html is not None:
                    return
            return
        if content_type not in _TEXT_TYPES or _is_attachment(head):
            return
        if content_type == "text/plain":
            if self.text is None:
                self.text = self._leaf_text(head, end, params)
        elif self.html is None:
            self.html = self._leaf_text(head, end, params)

    def _parts(
        self, start: int, end: int, boundary: bytes
    ) -> Iterator[tuple[int, int]]:
        """
        The (start, end) of each body part of a multipart body (RFC 2046
        §5.1.1): the line break before a delimiter belongs to it, preamble
        and epilogue are dropped, and a last part without a close delimiter
        runs to the end, as in the stdlib.
        """
        marker = b"--" + boundary
        needle = b"\n" + marker
        if self.raw.startswith(marker, start, end):
            line, tail = start, start + len(marker)
        else:
            line = self.raw.find(needle, start, end)
            tail = line + len(needle)
        part_start = -1
        while line >= 0:
            if self.parts_left <= 0:
                return
            self.parts_left -= 1
            delimiter = _DELIMITER_TAIL.match(self.raw, tail, end)
            if delimiter:
                if line > start and self.raw[line - 1] == 0x0D:
                    line -= 1
                if part_start >= 0:
                    yield part_start, line
                if delimiter.group(1):
                    return
                part_start = delimiter.end()
            line = self.raw.find(needle, tail, end)
            tail = line + len(needle)
        if part_start >= 0:
            yield part_start, end

    def _leaf_text(self, head: _Head, end: int, params: dict[bytes, bytes]) -> str:
        data = self.raw[head.body_start : end]
        encoding = (head.first.get(b"content-transfer-encoding") or b"").strip().lower()
        if encoding == b"base64":
            data = _decode_base64(data)
        elif encoding == b"quoted-printable":
            data = binascii.a2b_qp(data)
        charset = params.get(b"charset")
        return _decode_text(
            data, None if charset is None else charset.decode("latin-1")
        )


def _content_type(
    value: bytes | None, default_type: str
) -> tuple[str, dict[bytes, bytes]]:
    """Media type (lower case) and parameters; invalid types are text/plain."""
    if value is None:
        return default_type, {}
    media_type, semicolon, rest = value.partition(b";")
    content_type = media_type.strip().lower().decode("latin-1")
    if content_type.count("/") != 1:
        content_type = "text/plain"
    params: dict[bytes, bytes] = {}
    for match in _PARAM.finditer(semicolon + rest):
        quoted, token = match.group(2), match.group(3)
        params.setdefault(
            match.group(1).lower(),
            _QUOTED_PAIR.sub(rb"\1", quoted)
            if quoted is not None
            else token.strip(b'"'),
        )
    return content_type, params


def _is_attachment(head: _Head) -> bool:
    disposition = head.first.get(b"content-disposition") or b""
    return disposition.partition(b";")[0].strip().lower() == b"attachment"


def _decode_base64(data: bytes) -> bytes:
    """Decode base64, and when that fails salvage what the valid characters say."""
    try:
        return binascii.a2b_base64(data)
    except binascii.Error:
        clean = _BASE64_JUNK.sub(b"", data)
        if len(clean) % 4 == 1:
            clean = clean[:-1]  # a lone last character holds no whole byte
        return binascii.a2b_base64(clean + b"=" * (-len(clean) % 4))


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


def _unfolded_text(value: bytes) -> str:
    """A raw field value as one line of text, RFC 2047 words still encoded."""
    if b"\n" in value:
        value = _FOLD.sub(b"", value)
    value = value.strip()
    return value.decode("ascii") if value.isascii() else _decode_text(value, None)


def _header_text(value: bytes) -> str:
    return _decode_words(_unfolded_text(value))


def _display_name(value: bytes) -> str:
    """
    The display name of the first From address, decoded after the address is
    parsed (decoding first would let an encoded comma split the name).
    """
    text = _unfolded_text(value)[:_ADDRESS_LIMIT]
    if "<" not in text and "(" not in text:
        return ""  # a bare address has no name
    simple = _SIMPLE_FROM.fullmatch(text)
    if simple is not None:  # what getaddresses would find, 10x faster
        name = simple["quoted"] if simple["quoted"] is not None else simple["atoms"]
        return _decode_words(name or "").strip()
    addresses = getaddresses([text])
    return _decode_words(addresses[0][0]).strip() if addresses else ""


def _decode_words(text: str) -> str:
    """
    Decode RFC 2047 encoded words.  Whitespace between adjacent words goes,
    and the bytes of adjacent words in one charset are decoded together, so a
    character split across two words survives.  A word that cannot be decoded
    stays as written.
    """
    if "=?" not in text:
        return text
    out: list[str] = []
    run_label: str | None = None
    run = bytearray()
    pos = 0
    for match in _ENCODED_WORD.finditer(text):
        gap = text[pos : match.start()]
        pos = match.end()
        label = match.group(1).partition("*")[0].lower()
        word = _word_bytes(match.group(2), match.group(3))
        adjacent = run_label is not None and (not gap or gap.isspace())
        if word is not None and adjacent and label == run_label:
            run += word
            continue
        if run_label is not None:
            out.append(_decode_text(bytes(run), run_label))
            run_label = None
        if not adjacent or word is None:
            out.append(gap)
        if word is None:
            out.append(match.group(0))
        else:
            run_label, run = label, bytearray(word)
    if run_label is not None:
        out.append(_decode_text(bytes(run), run_label))
    out.append(text[pos:])
    return "".join(out)


def _word_bytes(encoding: str, encoded: str) -> bytes | None:
    try:
        if encoding in "bB":
            return binascii.a2b_base64(encoded + "=" * (-len(encoded) % 4))
        return binascii.a2b_qp(encoded, header=True)
    except ValueError:  # binascii.Error, or non-ASCII text in the word
        return None


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
