"""
A message's attachments, raw MIME, and the cap on the request body.

Every leaf part that is not one of the two chosen bodies is an
attachment, in depth-first order; that order is a part's index, in the
payload's C{attachments} and in its link, and L{attachment_parts} is the
one function that numbers them, for the payload and for the link alike,
so the two always agree.  A C{message/*} part (a forwarded message, a
delivery report) is one attachment holding its whole text, never opened:
what is inside belongs to another message, and a receiver that wants it
parses those bytes.

What an attachment carries follows C{MAIL_LASER_ATTACHMENTS}: its bytes
(C{content}, base64), a signed link (C{url}, L{LinkSigner}) or only its
description.  Then the request body is held under
C{MAIL_LASER_WEBHOOK_MAX_BODY}: the largest contents become links (or are
dropped, where links cannot be made) until it fits.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from collections.abc import Iterator, Sequence
from email.generator import BytesGenerator
from email.message import Message as MIMEMessage
from email.policy import compat32
from typing import Any, cast

import attrs

from maillaser.config import AttachmentMode
from maillaser.message import Message, Payload
from maillaser.webhook._links import RAW, LinkSigner
from maillaser.webhook._payload import (
    _PARSER,
    Leaf,
    _decode_words,
    _header_text,
    _unfolded_text,
    build_payload,
    encode_payload,
    leaves,
)

_CONTENT_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")
_CRLF = compat32.clone(linesep="\r\n")
_SUBJECT_LIMIT = 998
"""Characters of the subject kept when only the envelope can be sent."""
_TRUNCATED = "body truncated to fit MAIL_LASER_WEBHOOK_MAX_BODY"


@attrs.frozen
class Part:
    """One attachment: what the payload says of it, and its decoded bytes."""

    content_type: str
    disposition: str
    """C{attachment} or C{inline}."""
    data: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")
    filename: str | None = None
    content_id: str | None = None


def leaf_parts(root: MIMEMessage) -> Iterator[MIMEMessage]:
    """
    Every part with no parts of its own, depth first, as the bodies are
    looked for; a C{message/*} part counts as one.
    """
    return (leaf.part for leaf in leaves(root))


def attachment_parts(
    root: MIMEMessage, walked: Sequence[Leaf] | None = None
) -> list[Part]:
    """
    The attachments, in index order: every leaf but the first C{text/plain}
    and the first C{text/html} that are not attachments (the bodies, as
    L{maillaser.webhook.build_payload} chooses them).

    @param walked: C{leaves(root)}, when the bodies' step has it.
    """
    found = leaves(root) if walked is None else walked
    return [_part(leaf.part, leaf.content_type) for leaf in found if not leaf.body]


def _part(leaf: MIMEMessage, content_type: str) -> Part:
    content_id = _optional_header(leaf, "content-id")
    disposition = leaf.get_content_disposition()
    if disposition not in ("attachment", "inline"):
        disposition = "inline" if content_id else "attachment"
    return Part(
        content_type=(
            content_type
            if _CONTENT_TYPE.fullmatch(content_type)
            else "application/octet-stream"
        ),
        disposition=disposition,
        data=_data(leaf),
        filename=_filename(leaf),
        content_id=content_id
        and content_id.strip().removeprefix("<").removesuffix(">"),
    )


def _data(leaf: MIMEMessage) -> bytes:
    """
    The decoded bytes; for a C{message/*} part, its body written out again
    with CRLF line ends (the parser keeps no part's bytes as they came).
    """
    if not leaf.is_multipart():
        data = leaf.get_payload(decode=True)
        return data if isinstance(data, bytes) else b""
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_CRLF).flatten(leaf)
    written = out.getvalue()
    if written.startswith(b"\r\n"):
        return written[2:]
    return written.partition(b"\r\n\r\n")[2]


def _filename(leaf: MIMEMessage) -> str | None:
    """
    RFC 2231 parameters (by C{get_filename}), then RFC 2047 words; raw
    8-bit text as SPEC section 4 decodes it (C{get_filename} on the part
    itself would see such a header as opaque and replace every byte).
    """
    fields = MIMEMessage()
    for field, value in leaf.raw_items():
        if field.lower() in ("content-disposition", "content-type"):
            fields[field] = _unfolded_text(value)
    try:
        name = fields.get_filename()
    except Exception:  # a parameter the standard library cannot take apart
        return None
    return _decode_words(name) or None if name else None


def _optional_header(leaf: MIMEMessage, name: str) -> str | None:
    for field, value in leaf.raw_items():
        if field.lower() == name:
            return _header_text(value) or None
    return None


def find_part(raw: bytes, index: str) -> Part | None:
    """The part a link names: C{raw} for the message as received."""
    if index == RAW:
        return Part("message/rfc822", "attachment", raw, "message.eml")
    parts = attachment_parts(_PARSER.parsebytes(raw))
    number = int(index) if index.isdigit() else len(parts)
    return parts[number] if number < len(parts) else None


@attrs.frozen
class PartOptions:
    """
    What attachments and the raw message carry, and the body's cap; one
    per delivery round, since links carry their expiry.
    """

    mode: AttachmentMode = "inline"
    inline_max: int = 1024 * 1024
    include_raw: bool = False
    max_body: int = 25 * 1024 * 1024
    links: LinkSigner | None = None
    """C{None}: no link can be made (no secret, or no spool to serve from)."""
    expires: int = 0
    """When this round's links expire (Unix time)."""

    def to_json(self) -> bytes:
        """For a payload process: the whole value, the signing key included."""
        fields = attrs.asdict(self, recurse=False)
        links = self.links
        fields["links"] = None if links is None else [links.key.hex(), links.base]
        return json.dumps(fields).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> PartOptions:
        fields: dict[str, Any] = json.loads(data)
        links = fields.pop("links")
        signer = (
            None if links is None else LinkSigner(bytes.fromhex(links[0]), links[1])
        )
        return cls(links=signer, **fields)

    def keys(
        self, message: Message, root: MIMEMessage, walked: Sequence[Leaf] | None = None
    ) -> dict[str, object]:
        """
        C{attachments} (when there are any) and C{raw} or C{raw_url}.

        @param walked: C{leaves(root)}, when the bodies' step has it.
        """
        keys: dict[str, object] = {}
        described = [
            self._describe(message.id, str(index), part)
            for index, part in enumerate(attachment_parts(root, walked))
        ]
        if described:
            keys["attachments"] = described
        if self.include_raw:
            if self.mode != "link" and len(message.raw) <= self.inline_max:
                keys["raw"] = _base64(message.raw)
            elif self.links is not None:
                keys["raw_url"] = self._url(message.id, RAW)
        return keys

    def _describe(self, message_id: str, index: str, part: Part) -> dict[str, object]:
        item: dict[str, object] = {}
        if part.filename is not None:
            item["filename"] = part.filename
        item["content_type"] = part.content_type
        item["size"] = len(part.data)
        item["sha256"] = hashlib.sha256(part.data).hexdigest()
        item["disposition"] = part.disposition
        if part.content_id is not None:
            item["content_id"] = part.content_id
        if self.mode == "inline" and len(part.data) <= self.inline_max:
            item["content"] = _base64(part.data)
        elif self.mode != "metadata" and self.links is not None:
            item["url"] = self._url(message_id, index)
        return item

    def _url(self, message_id: str, index: str) -> str:
        assert self.links is not None
        return self.links.url(message_id, index, self.expires)

    def fit(self, message_id: str, payload: dict[str, Any]) -> bytes:
        """
        The request body, at most L{max_body} bytes: past it the largest
        contents (attachments' and the raw message's) become links, or go,
        largest first, until it fits; then the bodies are cut; and if the
        header alone is too large, only the envelope is sent.
        """
        body = encode_payload(payload)
        excess = len(body) - self.max_body
        if excess <= 0:
            return body
        for holder, key, index in _contents(payload):
            value = holder.pop(key)
            excess -= len(value) + len(key) + 6  # "key":"value",
            if self.links is not None:
                url = self._url(message_id, index)
                holder["url" if key == "content" else "raw_url"] = url
                excess += len(url) + 10
            if excess <= 0:
                break
        body = encode_payload(payload)
        for key in ("html_body", "body"):
            excess = len(body) - self.max_body
            if excess <= 0:
                return body
            text = cast(str, payload.get(key, ""))
            # Every character takes a byte or more: cutting as many as the
            # excess is enough.
            payload[key] = text[: max(0, len(text) - excess)]
            _note(payload, _TRUNCATED)
            body = encode_payload(payload)
        if len(body) <= self.max_body:
            return body
        return self._envelope_only(payload)

    def _envelope_only(self, payload: dict[str, Any]) -> bytes:
        """
        The last resort, for a header too large to send: the envelope, with
        as many recipients as fit (thousands of long addresses can outgrow
        a small cap too).
        """
        subject = cast(str, payload.get("subject", ""))[:_SUBJECT_LIMIT]
        envelope: dict[str, Any] = {
            "sender": payload["sender"],
            "recipient": payload["recipient"],
            "recipients": [],
            "subject": subject,
            "body": "",
            "parse_error": "payload too large for the webhook",
        }
        room = self.max_body - len(encode_payload(envelope))
        for recipient in cast(list[str], payload["recipients"]):
            room -= len(json.dumps(recipient, ensure_ascii=False).encode()) + 1
            if room < 0:
                break
            envelope["recipients"].append(recipient)
        return encode_payload(envelope)


def _contents(payload: dict[str, Any]) -> list[tuple[dict[str, Any], str, str]]:
    """Where each content is (its dict, its key, its link's index), largest first."""
    found = [
        (item, "content", str(index))
        for index, item in enumerate(payload.get("attachments", ()))
        if "content" in item
    ]
    if "raw" in payload:
        found.append((payload, "raw", RAW))
    return sorted(found, key=lambda place: len(place[0][place[1]]), reverse=True)


def _note(payload: dict[str, Any], problem: str) -> None:
    errors = payload.get("parse_error")
    if errors is None:
        payload["parse_error"] = problem
    elif problem not in errors:
        payload["parse_error"] = f"{errors}; {problem}"


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def built_payload(
    message: Message,
    header_prefixes: Sequence[str],
    parts: PartOptions | None = None,
    *,
    header_list: bool = False,
) -> Payload:
    """
    The request body, and until when the spool must keep the message for
    its links (C{None}: it has none).  Without C{parts}, no attachments,
    no raw message and no cap: the payload as it was before them.
    """
    payload = build_payload(message, header_prefixes, parts, header_list=header_list)
    if parts is None:
        return Payload(encode_payload(payload))
    body = parts.fit(message.id, payload)
    attachments = cast(list[dict[str, object]], payload.get("attachments", []))
    linked = "raw_url" in payload or any("url" in item for item in attachments)
    return Payload(body, float(parts.expires) if linked else None)


__all__ = [
    "Part",
    "PartOptions",
    "attachment_parts",
    "built_payload",
    "find_part",
    "leaf_parts",
]
