"""
Standard Webhooks signatures (https://www.standardwebhooks.com/).

The receiver proves a request came from us, unchanged and recently: the
signature is HMAC-SHA256 over ``<webhook-id>.<webhook-timestamp>.<body>``.
Several secrets sign at once (one ``v1,`` entry each), so a secret can be
rotated without a moment when the receiver rejects us.

Secrets are ``whsec_`` plus base64, as the reference ``standardwebhooks``
package reads them; we are stricter than it about the base64 (it silently
drops characters outside the alphabet, which would sign with a different
key than the operator meant), so a typo stops start-up instead.

L{verify} is for receivers, and for our own tests.
"""

from __future__ import annotations

import base64
import hmac
import re
import time
from collections.abc import Mapping, Sequence

SECRET_PREFIX = "whsec_"

DEFAULT_TOLERANCE = 300
"""Seconds a timestamp may be off, either way, as in the reference libraries."""

_HEADER_NAMES = ("webhook-id", "webhook-timestamp", "webhook-signature")
_TIMESTAMP = re.compile("[0-9]{1,20}")


class VerificationError(Exception):
    """A request is not signed by any of the secrets, or not recently."""


def parse_secret(secret: str) -> bytes:
    """
    The HMAC key in a C{whsec_<base64>} secret (the prefix is optional;
    missing base64 padding is tolerated).

    @raise ValueError: if the secret is empty or not base64; the message
        never repeats the secret.
    """
    encoded = secret.removeprefix(SECRET_PREFIX)
    if not encoded:
        raise ValueError("webhook secret is empty (expected whsec_<base64>)")
    try:
        return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        raise ValueError(
            "webhook secret is not valid base64 (expected whsec_<base64>)"
        ) from None


def sign(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The C{webhook-signature} value: one C{v1,<base64>} per secret, in order."""
    content = _signed_content(msg_id, str(timestamp), body)
    return " ".join(
        "v1," + base64.b64encode(_digest(parse_secret(secret), content)).decode()
        for secret in secrets
    )


def request_headers(
    secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes
) -> dict[bytes, bytes]:
    """
    The Standard Webhooks headers for one attempt; C{webhook-signature} only
    when there is a secret.
    """
    headers = {
        b"webhook-id": msg_id.encode(),
        b"webhook-timestamp": str(timestamp).encode(),
    }
    if secrets:
        headers[b"webhook-signature"] = sign(secrets, msg_id, timestamp, body).encode()
    return headers


def maillaser3_headers(secret: str, timestamp: int, body: bytes) -> dict[bytes, bytes]:
    """
    MailLaser 3's signature (Govcraft/mail-laser, C{src/webhook/mod.rs}),
    for receivers written for it: C{X-MailLaser-Timestamp} (Unix seconds)
    and C{X-MailLaser-Signature-256: sha256=<hex>}, the lowercase hex
    HMAC-SHA256 of C{<timestamp>.<body>}, keyed with the first secret's
    bytes (its C{MAIL_LASER_WEBHOOK_SIGNING_SECRET} text, as UTF-8, when
    set by that name).  It does not cover the C{webhook-id}.
    """
    content = f"{timestamp}.".encode() + body
    digest = hmac.new(parse_secret(secret), content, "sha256").hexdigest()
    return {
        b"X-MailLaser-Timestamp": str(timestamp).encode(),
        b"X-MailLaser-Signature-256": f"sha256={digest}".encode(),
    }


def verify(
    secret_or_secrets: str | Sequence[str],
    headers: Mapping[str, str] | Mapping[bytes, bytes],
    body: bytes,
    *,
    tolerance: int = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> None:
    """
    Check a request's Standard Webhooks headers against C{body}.

    @param secret_or_secrets: the receiver's secret, or several during a
        rotation; any one matching signature is enough.
    @param headers: the request headers, names in any case, as text or
        bytes (Twisted's C{getAllHeaders()} works as is).
    @param now: the current time, for tests; defaults to C{time.time()}.

    @raise VerificationError: a header is missing or malformed, the
        timestamp is more than C{tolerance} seconds away from C{now}, or no
        signature matches.
    @raise ValueError: a secret is malformed (a receiver bug, not a bad
        request).
    """
    secrets = (
        [secret_or_secrets] if isinstance(secret_or_secrets, str) else secret_or_secrets
    )
    keys = [parse_secret(secret) for secret in secrets]
    if not keys:
        raise ValueError("no webhook secret to verify with")
    found = {_text(name).lower(): _text(value) for name, value in headers.items()}
    missing = [name for name in _HEADER_NAMES if not found.get(name)]
    if missing:
        raise VerificationError("missing header: " + ", ".join(missing))
    msg_id, timestamp, signatures = (found[name] for name in _HEADER_NAMES)
    if not _TIMESTAMP.fullmatch(timestamp):
        raise VerificationError("webhook-timestamp is not a Unix time in seconds")
    age = (time.time() if now is None else now) - int(timestamp)
    if age > tolerance:
        raise VerificationError(f"webhook-timestamp is too old ({age:.0f} s)")
    if age < -tolerance:
        raise VerificationError(f"webhook-timestamp is in the future ({-age:.0f} s)")
    content = _signed_content(msg_id, timestamp, body)
    expected = [_digest(key, content) for key in keys]
    for entry in signatures.split():
        version, _, encoded = entry.partition(",")
        if version != "v1":
            continue
        try:
            candidate = base64.b64decode(encoded, validate=True)
        except ValueError:
            continue
        if any(hmac.compare_digest(candidate, digest) for digest in expected):
            return
    raise VerificationError("no matching signature")


def _signed_content(msg_id: str, timestamp: str, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode() + body


def _digest(key: bytes, content: bytes) -> bytes:
    return hmac.digest(key, content, "sha256")


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value
