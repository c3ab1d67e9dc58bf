"""
Envelope addresses: the path and ESMTP parameters of C{MAIL FROM} and
C{RCPT TO}, as L{twisted.mail.smtp.Address} and L{twisted.mail.smtp.User}
objects that can hold UTF-8 (RFC 6531).

Twisted's L{smtp.Address} tokenizes ASCII only and its C{str()} decodes
ASCII, so with C{SMTPUTF8} an internationalised address would be refused
with C{553}; the client-side twin of that limit is twisted#9250.  These
subclasses keep the attributes an L{IMessageDelivery} reads (C{local},
C{domain}, C{addrstr}; C{dest}, C{orig}, C{helo}, C{protocol}).
"""

from __future__ import annotations

import re
from typing import Any

from twisted.mail import smtp

_PATH = re.compile(
    r"""\s*(?:<(?P<bracketed>[^<>]*)>|(?P<bare>[^\s<>]+))(?P<params>(?:\s.*)?)$""",
    re.DOTALL,
)
_ATOM = r"[^\s@<>()\[\],;:\\\".]+"
# Dots only separate atoms, so matching is linear: an atom class that also
# admitted dots would try every split of "a.a.a...a" (2**n steps).
_ADDRESS = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@[^\s@<>]+")
_QUOTED_LOCAL_ADDRESS = re.compile(r'"(?:[^"\\]|\\.)*"@[^\s@<>]+')
_PARAM = re.compile(r"(?P<key>[A-Za-z0-9][A-Za-z0-9-]*)(?:=(?P<value>[^\s=]+))?$")


class Mailbox(smtp.Address):
    """
    An address exactly as the client wrote it (UTF-8 allowed), but for the
    angle brackets and a source route; C{""} is the null reverse-path.
    """

    def __init__(self, address: str) -> None:
        local, _, domain = address.rpartition("@")
        self.addrstr = address.encode("utf-8")
        self.local = local.encode("utf-8")
        self.domain = domain.encode("utf-8")

    def __str__(self) -> str:
        return bytes(self).decode("utf-8")


class Recipient(smtp.User):
    """A forward-path for L{IMessageDelivery.validateTo}, UTF-8 allowed."""

    def __init__(
        self, dest: Mailbox, helo: tuple[Any, Any], protocol: Any, orig: smtp.Address
    ) -> None:
        self.dest = dest
        self.helo = helo
        self.protocol = protocol
        self.orig = orig

    def __str__(self) -> str:
        return str(self.dest)


def parse_path(argument: bytes, keyword: str) -> tuple[str, dict[str, str | None]]:
    """
    Split C{FROM:<path> params} into the address and its ESMTP parameters
    (keys upper-cased).

    Liberal where it costs nothing (case, spaces after the colon, a missing
    pair of angle brackets, source routes), strict where an error would
    route mail wrongly (the address syntax itself, checked by the caller).

    @raise smtp.SMTPServerError: the reply for a malformed argument.
    """
    text = argument.decode("utf-8", "replace")
    head, colon, rest = text.partition(":")
    match = _PATH.match(rest)
    if not colon or head.strip().upper() != keyword or match is None:
        raise smtp.SMTPServerError(501, f"5.5.4 Syntax: {keyword}:<address>".encode())
    address = match["bracketed"] if match["bracketed"] is not None else match["bare"]
    if address.startswith("@") and ":" in address:
        address = address.split(":", 1)[1]  # RFC 5321 4.1.2 source route
    params: dict[str, str | None] = {}
    for token in match["params"].split():
        param = _PARAM.match(token)
        if param is None:
            raise smtp.SMTPServerError(501, b"5.5.4 Malformed parameter")
        params[param["key"].upper()] = param["value"]
    return address, params


def valid_address(address: str) -> bool:
    """A mailbox with a local part and a domain, as RFC 5321 (and 6531) allow."""
    return bool(_ADDRESS.fullmatch(address) or _QUOTED_LOCAL_ADDRESS.fullmatch(address))
