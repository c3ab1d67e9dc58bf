"""
DATA in bulk: one message's content taken a received chunk at a time
rather than a Python call per line.

The end marker is found with C{bytes.find} and dot-stuffing is undone with
C{bytes.replace}.  The result is what Twisted's line-at-a-time DATA path
(with L{maillaser.smtp.MailLaserESMTP}'s limits) gives, byte for byte and
reply for reply: only CRLF.CRLF ends the message (no smuggling with a bare
LF), a line is too long past the same length, the size counts the content
as RFC 1870 does (CRLFs in, dot-stuffing out), the first limit a line
crosses is the one reported, and a message that starts with a line that
is neither a header nor empty gets the blank line Twisted inserts after
the trace header.

A bare CR or LF inside a line (RFC 5321 2.3.8 forbids both) is made a CRLF
after dot-unstuffing, or refuses the message, as C{bare_newline} says: a
bare LF in the header block could start a header that other parsers see
and we do not.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

_CRLF = b"\r\n"
_END = b"\r\n.\r\n"

TOO_BIG = (552, b"5.3.4 Message size exceeds fixed maximum")
LINE_TOO_LONG = (500, b"5.5.2 Line too long")
BARE_NEWLINE = (550, b"5.5.2 Bare CR or LF in message, use CRLF")

_LINE_END = re.compile(rb"\r\n|\r|\n")


def has_bare_newline(content: bytes) -> bool:
    """Whether C{content} holds a CR or an LF that is not part of a CRLF."""
    pairs = content.count(_CRLF)
    return content.count(b"\r") != pairs or content.count(b"\n") != pairs


def normalize_newlines(content: bytes) -> bytes:
    """Every bare CR and bare LF of C{content} made a CRLF."""
    return _LINE_END.sub(_CRLF, content)


class BulkData:
    """
    Reads one message's DATA, writing the content to C{write} as it goes.

    Held in memory at any time: the last, incomplete line (at most
    C{max_line} bytes, else the message is refused and it is dropped) and
    nothing else; after an error, only the few bytes the end marker needs.
    """

    def __init__(
        self,
        write: Callable[[bytes], object],
        *,
        max_size: int,
        max_line: int,
        bare_newline: Literal["normalize", "reject"] = "normalize",
    ) -> None:
        self._write = write
        self._reject_bare = bare_newline == "reject"
        self._max_size = max_size
        self._max_line = max_line
        self.size = 0
        """Content bytes so far, as the size limit counts them."""
        self.error: tuple[int, bytes] | None = None
        """The reply refusing this message, once a limit is crossed."""
        self._pending = _CRLF
        """Input not taken yet, from the CRLF that ended the last whole line
        (at first, a CRLF standing for the start of the content)."""
        self._first = True

    @property
    def held(self) -> int:
        """Input bytes held back, waiting for the rest of their line."""
        return len(self._pending)

    def feed(self, data: bytes) -> bytes | None:
        """
        Take C{data}; once the end marker has come, return what followed it
        (pipelined commands), else C{None}.
        """
        searched = max(0, len(self._pending) - len(_END) + 1)
        pending = self._pending + data
        end = pending.find(_END, searched)
        if end >= 0:
            self._take(pending[:end])
            if not self._first and self.error is None:
                self._write(_CRLF)  # the last line's own
            self._pending = b""
            return pending[end + len(_END) :]
        if self.error is None:
            cut = pending.rfind(_CRLF)
            self._take(pending[:cut])
            pending = pending[cut:]
            if len(pending) >= self._max_line + 2 * len(_CRLF):
                self._fail(LINE_TOO_LONG)  # a line this long can only grow
        # After an error, keep only what the end marker may start with.
        self._pending = pending if self.error is None else pending[1 - len(_END) :]
        return None

    def _take(self, lines: bytes) -> None:
        """
        C{lines}: a CRLF, then whole lines joined by CRLF (the last one's
        CRLF starts what is still pending).
        """
        if not lines or self.error is not None:
            return
        content = lines.replace(b"\r\n.", _CRLF)
        long_line = len(lines) > self._max_line + len(_CRLF) and any(
            len(line) > self._max_line for line in lines[2:].split(_CRLF)
        )
        bare = has_bare_newline(content)
        too_big = self.size + len(content) > self._max_size
        if long_line or too_big or (bare and self._reject_bare):
            self._fail(self._first_limit_crossed(lines))
            return
        self.size += len(content)  # counts a CRLF per line, in place of the first
        if self._first:
            self._first = False
            content = content[len(_CRLF) :]
            end = content.find(_CRLF)
            first = content if end < 0 else content[:end]
            if first and b":" not in first:
                self._write(_CRLF)
        self._write(normalize_newlines(content) if bare else content)

    def _first_limit_crossed(self, lines: bytes) -> tuple[int, bytes]:
        """Which limit a line-at-a-time reader would have met first."""
        size = self.size
        for line in lines[2:].split(_CRLF):
            if len(line) > self._max_line:
                return LINE_TOO_LONG
            size += len(line) + len(_CRLF) - line.startswith(b".")
            if size > self._max_size:
                break
            if self._reject_bare and has_bare_newline(line):
                return BARE_NEWLINE
        return TOO_BIG

    def _fail(self, error: tuple[int, bytes]) -> None:
        if self.error is None:
            self.error = error
