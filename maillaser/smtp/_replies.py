"""
Reply texts: enhanced status codes (RFC 2034, advertised as
C{ENHANCEDSTATUSCODES}) on the replies Twisted's L{smtp.SMTP} writes itself.
"""

from __future__ import annotations

import re

_TWISTED_REPLIES: dict[tuple[int, bytes], tuple[int, bytes]] = {
    (250, b"Sender address accepted"): (250, b"2.1.0 Sender OK"),
    (250, b"Recipient address accepted"): (250, b"2.1.5 Recipient OK"),
    (250, b"I remember nothing."): (250, b"2.0.0 OK"),
    (354, b"Continue"): (354, b"End data with <CR><LF>.<CR><LF>"),
    (500, b"Error: bad syntax"): (500, b"5.5.2 Command not recognized"),
    (500, b"Command not implemented"): (500, b"5.5.2 Command not recognized"),
    (220, b"Begin TLS negotiation now"): (220, b"2.0.0 Ready to start TLS"),
    (503, b"TLS already negotiated"): (503, b"5.5.1 TLS already active"),
    (454, b"TLS not available"): (454, b"4.7.0 TLS not available"),
    # twisted: SMTP.do_DATA answers 550 when a message factory fails, but a
    # local error is temporary: the sender must keep the mail and retry.
    (550, b"Internal server error"): (451, b"4.3.0 Internal server error"),
}

_STATUS = re.compile(rb"[245]\.[0-9]{1,3}\.[0-9]{1,3} ")


def with_status(code: int, text: bytes) -> tuple[int, bytes]:
    """
    The reply to send for C{code} and C{text}: Twisted's own texts get ours,
    any other text without an enhanced status code gets its class's
    C{x.0.0} (RFC 3463: "other or undefined"), but the greeting, which RFC
    2034 exempts.
    """
    code, text = _TWISTED_REPLIES.get((code, text), (code, text))
    if code // 100 in (2, 4, 5) and code != 220 and not _STATUS.match(text):
        text = b"%d.0.0 %s" % (code // 100, text)
    return code, text


def printable(text: str) -> str:
    """
    C{text} fit for one reply line: printable ASCII, anything else as C{?}.

    Reply text can come from elsewhere (a webhook's reason in sync mode);
    a CR or LF in it would start a reply line of its own, and Twisted's
    validator error path encodes it as ASCII.
    """
    return "".join(c if " " <= c <= "~" else "?" for c in text)
