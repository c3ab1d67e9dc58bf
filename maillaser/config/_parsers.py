"""
Value parsers: each turns one setting's text into its value, or raises
L{Invalid} with the reason.

The reason never names the setting (the loader adds its label) and quotes
the value only where that is safe: a webhook URL is shown masked, a secret
not at all.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from cryptography import x509

from maillaser.config._config import (
    AttachmentMode,
    BareNewline,
    DeliveryMode,
    LogLevel,
    PayloadHeaders,
)
from maillaser.message import ascii_lower

_T = TypeVar("_T")


class Invalid(Exception):
    """A parser's reason for rejecting a value; the loader adds the label."""


_INTEGER = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)", re.IGNORECASE)
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_ADDRESS = re.compile(r"[^@\s<>\x00-\x1f\x7f]+@[^@\s<>\x00-\x1f\x7f]+")
_HEADER_PREFIX = re.compile(r"[!-9;-~]+")
_ADDRESS_FORBIDDEN = re.compile(r"[@\s<>,\x00-\x1f\x7f]")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")
_SECRET_PREFIX = "whsec_"
_MAX_DIGITS = 18
_MAX_SHOWN = 200
_MAX_BUNDLE = 16 * 1024 * 1024
"""Bytes read of a CA bundle: the system's whole store is a few hundred KiB."""

DELIVERY_MODES: dict[str, DeliveryMode] = {"queue": "queue", "sync": "sync"}
PAYLOAD_HEADERS: dict[str, PayloadHeaders] = {"prefix": "prefix", "all": "all"}
ATTACHMENT_MODES: dict[str, AttachmentMode] = {
    "inline": "inline",
    "link": "link",
    "metadata": "metadata",
}
BOOLEANS: dict[str, bool] = {
    "true": True,
    "false": False,
    "1": True,
    "0": False,
    "yes": True,
    "no": False,
}
BARE_NEWLINES: dict[str, BareNewline] = {
    "normalize": "normalize",
    "normalise": "normalize",
    "reject": "reject",
}
LOG_LEVELS: dict[str, LogLevel] = {
    "debug": "debug",
    "info": "info",
    "warn": "warn",
    "warning": "warn",
    "error": "error",
}


def show(text: str) -> str:
    """A value quoted for an error line, cut short if it is long."""
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 3] + "..."
    return repr(text)


def one_line(err: Exception) -> str:
    """An exception's text, on one line."""
    return " ".join(str(getattr(err, "strerror", None) or err).split())


def _split(text: str) -> list[str]:
    return [piece.strip() for piece in text.split(",") if piece.strip()]


def _whole_number(text: str) -> int | None:
    """C{text} as an int, C{None} if too long to be any sane setting."""
    if not _INTEGER.fullmatch(text):
        raise Invalid(f"{show(text)} is not a whole number")
    return int(text) if len(text.lstrip("0")) <= _MAX_DIGITS else None


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        number = _whole_number(text)
        if number is None or number < low or (high is not None and number > high):
            limits = f"at least {low}" if high is None else f"between {low} and {high}"
            raise Invalid(f"must be {limits}, got {show(text)}")
        return number

    return parse


def seconds(*, allow_zero: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        if not _DECIMAL.fullmatch(text):
            raise Invalid(f"{show(text)} is not a number of seconds")
        value = float(text)
        if not math.isfinite(value):
            raise Invalid(f"{show(text)} is too large")
        if value == 0 and not allow_zero:
            raise Invalid(f"must be greater than 0, got {show(text)}")
        return value

    return parse


def choice(choices: Mapping[str, _T]) -> Callable[[str], _T]:
    def parse(text: str) -> _T:
        try:
            return choices[text.lower()]
        except KeyError:
            names = ", ".join(dict.fromkeys(map(str, choices.values())))
            raise Invalid(f"{show(text)} is not one of {names}") from None

    return parse


def non_empty(text: str) -> str:
    if not text:
        raise Invalid("must not be empty")
    return text


def targets(text: str) -> tuple[str, ...]:
    if not text.strip():
        raise Invalid("cannot be empty")
    addresses = _split(text)
    if not addresses:
        raise Invalid("must contain at least one address after trimming and splitting")
    unique: dict[str, str] = {}
    for address in addresses:
        if not _ADDRESS.fullmatch(address):
            raise Invalid(f"{show(address)} is not an email address")
        unique.setdefault(ascii_lower(address), address)
    return tuple(unique.values())


def target_domains(text: str) -> tuple[str, ...]:
    """
    Domains, each kept as written (the SMTP side compares them with ASCII
    letters lower-cased); a leading C{@} is forgiven.
    """
    unique: dict[str, str] = {}
    for domain in _split(text):
        name = domain.removeprefix("@")
        valid = _is_hostname(name) or _is_address_literal(name)
        if not (valid or _is_utf8_domain(name)):
            raise Invalid(f"{show(domain)} is not a domain")
        unique.setdefault(ascii_lower(name), name)
    return tuple(unique.values())


def _is_utf8_domain(text: str) -> bool:
    """An internationalised domain as SMTPUTF8 clients write it (RFC 6531)."""
    return not text.isascii() and not _ADDRESS_FORBIDDEN.search(text) and "." in text


def maillaser3_secret(text: str) -> str:
    """
    MailLaser 3's signing secret, any text whose UTF-8 bytes are the HMAC
    key, as the equivalent Standard Webhooks secret (C{whsec_} + base64 of
    the same bytes): both signatures then use the same key.
    """
    if not text:
        raise Invalid("cannot be empty")
    return _SECRET_PREFIX + base64.b64encode(text.encode("utf-8")).decode("ascii")


def webhook_url(text: str) -> str:
    """
    Accept an absolute http(s) URL, never echoing its secrets back.

    Webhook URLs often carry a token in the userinfo or the query, so a
    rejected value is shown only through L{mask_url}, and not at all unless
    it has a scheme and a C{//} authority: C{user:password@host} would
    otherwise pass its user name off as a scheme.
    """
    if not text:
        raise Invalid("must not be empty")
    if _SPACE_OR_CONTROL.search(text):
        raise Invalid("must not contain whitespace or control characters")
    try:
        parts = urlsplit(text)
        _ = parts.port  # urlsplit checks the port only when asked
    except ValueError:
        raise Invalid("is not a valid URL (check the host and port)") from None
    if not (parts.scheme and text[len(parts.scheme) + 1 :].startswith("//")):
        raise Invalid("must be an absolute http:// or https:// URL")
    if parts.scheme not in ("http", "https"):
        raise Invalid(f"scheme {show(parts.scheme)} is not http or https")
    if not parts.hostname:
        raise Invalid(f"{show(mask_url(text))} has no host")
    return text


def spool_url(text: str) -> str:
    """A libpq URL; psycopg reads the rest (host, sslmode...) when it connects."""
    if urlsplit(text).scheme not in ("postgresql", "postgres"):
        # Masked: the text may hold a password even when it is mistyped.
        raise Invalid(f"{show(mask_url(text))} is not a postgresql:// URL")
    return text


def mask_url(url: str) -> str:
    """
    C{url} with its userinfo, query values and fragment replaced by C{***}.

    Scheme, host, port and path stay readable so that an operator can still
    tell which receiver is meant; query parameter names stay for the same
    reason.
    """
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"***@{host}" if "@" in parts.netloc else host
    query = "&".join(_mask_parameter(p) for p in parts.query.split("&"))
    fragment = "***" if parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def _mask_parameter(parameter: str) -> str:
    name, equals, value = parameter.partition("=")
    if equals:
        return f"{name}=***" if value else parameter
    return "***" if parameter else ""


def header_prefixes(text: str) -> tuple[str, ...]:
    prefixes = _split(text)
    for prefix in prefixes:
        if not _HEADER_PREFIX.fullmatch(prefix):
            raise Invalid(f"{show(prefix)} cannot start a header name")
    return tuple(prefixes)


def webhook_secrets(text: str) -> tuple[str, ...]:
    secrets = text.split()
    for position, secret in enumerate(secrets, start=1):
        if not _is_webhook_secret(secret):
            raise Invalid(
                f"secret {position} of {len(secrets)} is not a Standard Webhooks"
                f" secret ({_SECRET_PREFIX} followed by base64)"
            )
    return tuple(secrets)


def _is_webhook_secret(secret: str) -> bool:
    if not secret.startswith(_SECRET_PREFIX):
        return False
    try:
        key = base64.b64decode(secret.removeprefix(_SECRET_PREFIX), validate=True)
    except binascii.Error:
        return False
    return bool(key)


def readable_file(text: str) -> str | None:
    """A path that can be opened now; empty means "none", like other lists."""
    if not text:
        return None
    _read_start(text, 0)
    return text


def certificate_bundle(text: str) -> str | None:
    """
    A readable PEM file with at least one certificate, read now: a wrong
    path or file stops start-up, rather than fail every https delivery.
    Empty means "none": the system's trust store.
    """
    if not text:
        return None
    try:
        x509.load_pem_x509_certificates(_read_start(text, _MAX_BUNDLE))
    except ValueError:
        raise Invalid(f"{show(text)} holds no PEM certificate") from None
    return text


def _read_start(path: str, size: int) -> bytes:
    """The first C{size} bytes of C{path}; opening it is the check."""
    try:
        with open(path, "rb") as opened:
            return opened.read(size)
    except OSError as err:
        raise Invalid(f"cannot read {show(path)}: {one_line(err)}") from None


def _duration_of(text: str) -> float:
    match = _DURATION.fullmatch(text)
    if match is None:
        raise Invalid(f"{show(text)} is not a duration like 30s, 5m, 2h or 1d")
    return float(match[1]) * _UNIT_SECONDS[match[2].lower()]


def duration(text: str) -> float:
    """A duration like C{30s}, C{5m}, C{2h} or C{7d} (bare: seconds), above 0."""
    delay = _duration_of(text.strip())
    if not 0 < delay < math.inf:
        raise Invalid(f"must be greater than 0, got {show(text)}")
    return delay


def public_url(text: str) -> str:
    """
    The base of attachment links: an absolute http(s) URL without query or
    fragment (the link's own path and query follow it); no trailing slash.
    """
    url = webhook_url(text)
    parts = urlsplit(url)
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise Invalid("must have no user, query or fragment")
    return url.rstrip("/")


def retry_schedule(text: str) -> tuple[float, ...]:
    delays = []
    for piece in _split(text):
        delay = _duration_of(piece)
        if not 0 < delay < math.inf:
            raise Invalid(f"delays must be greater than 0, got {show(piece)}")
        delays.append(delay)
    if not delays:
        raise Invalid("must list at least one delay")
    return tuple(delays)


def port(text: str) -> int:
    if _INTEGER.fullmatch(text) and len(text.lstrip("0")) <= 5 and int(text) <= 65535:
        return int(text)
    raise Invalid(f"{show(text)} is not a valid port number (0-65535)")


def interface(text: str) -> str:
    """An IP literal (IPv6 bare or in brackets, as upstream wanted) or a host name."""
    address = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if _is_ip(address) or _is_hostname(address):
        return address
    raise Invalid(f"{show(text)} is not an IP address or host name")


def hostname(text: str) -> str:
    if not text:
        raise Invalid("must not be empty")
    if _is_hostname(text) or _is_address_literal(text):
        return text
    raise Invalid(
        f"{show(text)} is not a host name or an address literal"
        " like [192.0.2.1] or [IPv6:2001:db8::1]"
    )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_hostname(text: str) -> bool:
    """RFC 1123 syntax; an all-numeric last label would be a mistyped address."""
    labels = text.split(".")
    return (
        len(text) <= 253
        and all(_HOST_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


def _is_address_literal(text: str) -> bool:
    """RFC 5321 section 4.1.3: C{[IPv4]} or C{[IPv6:...]}."""
    if not (text.startswith("[") and text.endswith("]")):
        return False
    inner = text[1:-1]
    parse: Callable[[str], object] = ipaddress.IPv4Address
    if inner[:5].lower() == "ipv6:":
        inner, parse = inner[5:], ipaddress.IPv6Address
    try:
        parse(inner)
    except ValueError:
        return False
    return True


__all__ = [
    "BARE_NEWLINES",
    "BOOLEANS",
    "DELIVERY_MODES",
    "LOG_LEVELS",
    "PAYLOAD_HEADERS",
    "Invalid",
    "certificate_bundle",
    "choice",
    "header_prefixes",
    "hostname",
    "integer",
    "interface",
    "maillaser3_secret",
    "mask_url",
    "non_empty",
    "one_line",
    "port",
    "readable_file",
    "retry_schedule",
    "seconds",
    "show",
    "target_domains",
    "targets",
    "webhook_secrets",
    "webhook_url",
]
