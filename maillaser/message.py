"""
The values that travel from the SMTP session to the webhook.

An accepted message is immutable from the moment the SMTP session hands it
over: envelope plus the exact bytes received, never a parsed form, so the
spool can store it and a retry or replay next week delivers exactly what was
accepted.  The same id names the SMTP transaction in logs, the spool entry
and the ``webhook-id`` header.

These values cross the process boundary between the SMTP front and the
delivery worker (L{maillaser.worker}) field by field, so they hold only
plain data.
"""

from __future__ import annotations

import os
import string
import time

import attrs


@attrs.frozen
class TLSInfo:
    """
    The TLS a session ran under, as OpenSSL names it, so a receiver can
    tell mail that crossed the network encrypted from mail that did not.
    """

    version: str
    """The protocol, e.g. C{"TLSv1.3"}."""
    cipher: str
    """The cipher suite, e.g. C{"TLS_AES_256_GCM_SHA384"}."""


_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def ascii_lower(text: str) -> str:
    """
    C{text} with its ASCII letters lower-cased and nothing else folded: how
    addresses and domains compare, in the configuration and in SMTP alike
    (C{str.lower} maps the Kelvin sign, U+212A, to C{k}, and C{casefold} the
    long s, U+017F, to C{s}).
    """
    return text.translate(_ASCII_LOWER)


@attrs.frozen
class Envelope:
    """
    What the SMTP client told us outside the message itself.

    Addresses are kept exactly as the client wrote them (case included): the
    receiver sees what the sender sent, and matching against targets is
    the SMTP session's job, done case-insensitively there.
    """

    sender: str
    """The reverse-path; ``""`` for the null sender ``MAIL FROM:<>``."""

    recipients: tuple[str, ...]
    """Every accepted forward-path, in the order the client gave them."""

    helo: str = ""
    peer: str = ""
    """The client's address as the transport gave it: a bare IP for TCP."""
    tls: TLSInfo | None = None
    """The session's TLS; C{None} for a cleartext session."""


@attrs.frozen
class Message:
    """A message we have accepted responsibility for."""

    id: str
    envelope: Envelope
    raw: bytes = attrs.field(repr=lambda raw: f"<{len(raw)} bytes>")
    received_at: float = 0.0


@attrs.frozen
class Attempt:
    """One HTTP request to the webhook and how it ended."""

    at: float
    status: int | None
    """The HTTP status, or ``None`` when no response arrived."""

    error: str = ""
    """Empty on success; otherwise a short, log-safe reason."""


@attrs.frozen
class QueuedMessage:
    """A message as the spool hands it to the dispatcher."""

    message: Message
    rounds: int = 0
    """Delivery rounds already made (a round is one attempt plus quick retries)."""


@attrs.frozen
class SpoolStats:
    """A snapshot of the spool, cheap enough for every health probe."""

    pending: int = 0
    dead: int = 0
    bytes: int = 0
    retained: int = 0
    """Delivered messages kept for their attachment links until these expire."""
    retained_bytes: int = 0


@attrs.frozen
class Payload:
    """A webhook request body, as built for one delivery round."""

    body: bytes = attrs.field(repr=lambda body: f"<{len(body)} bytes>")
    keep_until: float | None = None
    """
    When the links in it expire: once delivered, the spool keeps the
    message until then, to serve them.  C{None}: it has no link.
    """


@attrs.frozen
class WebhookResponse:
    """What we keep of a webhook's response: enough to decide, log and reply."""

    status: int
    retry_after: float | None = None
    """Seconds the receiver asked us to wait (C{Retry-After}), if it did."""

    reason: str = ""
    """A short C{text/plain} explanation from the receiver, if it gave one."""


class Refusal(Exception):
    """
    The reply an SMTP session should give instead of accepting.

    Raised (or failed with) by message sinks, so that policy such as "the
    spool is full" or "the webhook said 422" is decided where it is known and
    rendered by the SMTP layer, which owns the wire format.
    """

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(code, status, text)
        self.code = code
        self.status = status
        self.text = text

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"


def new_message_id(now: float | None = None) -> str:
    """
    A Standard Webhooks style id, ``msg_`` + 28 hex digits.

    The first 12 digits are the millisecond timestamp, so ids sort by arrival
    in the spool and in logs; the rest is random, so two bridges sharing one
    receiver never collide.
    """
    millis = int((time.time() if now is None else now) * 1000)
    return f"msg_{millis:012x}{os.urandom(8).hex()}"


__all__ = [
    "Attempt",
    "Envelope",
    "Message",
    "Payload",
    "QueuedMessage",
    "Refusal",
    "SpoolStats",
    "TLSInfo",
    "WebhookResponse",
    "ascii_lower",
    "new_message_id",
]
