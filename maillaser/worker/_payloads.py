"""
Payloads for the delivery worker: built at once when that is cheap, else
in a payload process, under a deadline.

Parsing is pure Python and html2text's cost has no bound a message's size
would set; the standard library's parser can take minutes over a few
hundred nested multiparts.  On the worker's reactor such a message would
stall every delivery; in a payload process it costs its own deadline: the
process is killed, a new one takes the next message, and this one is
delivered with what its top-level header says and a C{parse_error}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from maillaser.interfaces import IPayloadBuilder
from maillaser.logs import observer
from maillaser.message import Message, Payload
from maillaser.webhook import PartOptions, built_payload, fallback_payload, find_part
from maillaser.worker._child import ChildError, ChildProcess, ChildProgram, ChildTimeout
from maillaser.worker._commands import BuildPayload, ExtractPart, PartNotFound
from maillaser.worker._stdio import ChildProtocol

INLINE_SIZE = 64 * 1024
INLINE_LINES = 1000
INLINE_BOUNDARIES = 4
"""
Messages within these bounds (bytes, lines, multipart boundaries) are
built on the worker's reactor, unless their body may be HTML to render.
The parser's cost is a Python step per line, times the depth of the
multiparts around it, and html2text's a Python step per character: within
these bounds, a few milliseconds at worst, less than a trip to the
payload process costs both.  Attachments add a base64 encoding and a
SHA-256 of their bytes (both in C, and bounded by the size), and the same
bounds decide where a part is extracted for its link.
"""

ATTEMPTS = 2
"""
Tries per message: a payload process killed for another message's
deadline fails what it had, and those messages deserve a process of
their own before they are called unreadable.
"""


def payload_deadline(timeout: float) -> float:
    """The longest L{PayloadBuilder.build} takes, given its C{timeout}."""
    return ATTEMPTS * timeout


def is_cheap(raw: bytes) -> bool:
    """
    Within the inline bounds, and with no HTML to render: the body is the
    first C{text/plain} part, and HTML is rendered only when there is none.
    A part is of a type only if its Content-Type says so, so where the
    words do not appear there is no such part.
    """
    if len(raw) > INLINE_SIZE or raw.count(b"\n") > INLINE_LINES:
        return False
    lowered = raw.lower()
    if lowered.count(b"boundary") > INLINE_BOUNDARIES:
        return False
    return b"text/html" not in lowered or b"text/plain" in lowered


@implementer(IPayloadBuilder)
class PayloadBuilder:
    """
    L{IPayloadBuilder} for the worker.  The payload process is started by
    the first message that needs it, and again by the next one after it
    ended.
    """

    _log = Logger(observer=observer)

    def __init__(
        self,
        reactor: Any,
        header_prefixes: Sequence[str],
        timeout: float,
        program: ChildProgram,
        *,
        header_list: bool = False,
        parts: PartOptions | None = None,
        link_ttl: float = 0.0,
    ) -> None:
        """
        @param timeout: seconds a payload process has for one message.
        @param program: the payload process's program
            (L{maillaser.worker._main.payload_program}).
        @param header_list: payloads list every top-level field.
        @param parts: what attachments carry (its C{expires} is set per
            round, C{link_ttl} seconds ahead); by default, no attachments.
        """
        self.header_prefixes = tuple(header_prefixes)
        self.header_list = header_list
        self.timeout = timeout
        self.process = ChildProcess(reactor, program, name="payload process")
        self._clock = reactor
        self.parts = parts
        self.link_ttl = link_ttl

    def build(self, message: Message) -> Deferred[Payload]:
        parts = self._round_parts()
        if is_cheap(message.raw):
            return succeed(
                built_payload(
                    message, self.header_prefixes, parts, header_list=self.header_list
                )
            )
        return Deferred.fromCoroutine(self._elsewhere(message, parts))

    def _round_parts(self) -> PartOptions | None:
        """This round's options: its links expire C{link_ttl} from now."""
        if self.parts is None or self.parts.links is None:
            return self.parts
        expires = int(self._clock.seconds() + self.link_ttl) + 1
        return attrs.evolve(self.parts, expires=expires)

    def part(self, raw: bytes, index: str) -> Deferred[dict[str, Any]]:
        """
        The part a link names, extracted as the payload was, as
        L{FetchPart} answers it; in a payload process if the message is not
        cheap to parse.
        """
        if is_cheap(raw):
            return succeed(extracted(raw, index))
        return self.process.call(
            ExtractPart, timeout=self.timeout, raw=raw, index=index
        )

    async def _elsewhere(self, message: Message, parts: PartOptions | None) -> Payload:
        reason = ""
        for _ in range(ATTEMPTS):
            try:
                answer = await self.process.call(
                    BuildPayload,
                    timeout=self.timeout,
                    slow=False,
                    header_prefixes=list(self.header_prefixes),
                    header_list=self.header_list,
                    message=message,
                    parts=b"" if parts is None else parts.to_json(),
                )
            except CancelledError:
                raise  # the round is cancelled, at shutdown
            except ChildTimeout:
                reason = f"payload not built within {self.timeout:g}s"
                break
            except ChildError as error:  # another message's process died
                reason = f"payload not built: {error}"
            except Exception as error:
                reason = f"payload not built: {error}"
                break
            else:
                return Payload(answer["body"], answer.get("keep_until"))
        self._log.warn(
            "{message_id}: {reason}; delivered with its header only",
            message_id=message.id,
            reason=reason,
        )
        return Payload(
            fallback_payload(
                message, self.header_prefixes, reason, header_list=self.header_list
            )
        )

    def stop(self, timeout: float) -> Deferred[None]:
        """End the payload process, if one runs."""
        return self.process.stop(timeout)


class PayloadProtocol(ChildProtocol):
    """The payload process's end: one payload at a time, as asked."""

    @BuildPayload.responder
    def build(
        self,
        message: Message,
        header_prefixes: list[str],
        header_list: bool,
        parts: bytes,
    ) -> dict[str, object]:
        options = PartOptions.from_json(parts) if parts else None
        payload = built_payload(
            message, header_prefixes, options, header_list=header_list
        )
        answer: dict[str, object] = {"body": payload.body}
        if payload.keep_until is not None:
            answer["keep_until"] = payload.keep_until
        return answer

    @ExtractPart.responder
    def extract(self, raw: bytes, index: str) -> dict[str, Any]:
        return extracted(raw, index)


def extracted(raw: bytes, index: str) -> dict[str, Any]:
    """One part, as L{FetchPart} and L{ExtractPart} answer it."""
    found = find_part(raw, index)
    if found is None:
        raise PartNotFound(index)
    return {
        "content_type": found.content_type,
        "filename": found.filename or "",
        "data": found.data,
    }


__all__ = [
    "ATTEMPTS",
    "INLINE_SIZE",
    "PayloadBuilder",
    "PayloadProtocol",
    "extracted",
    "is_cheap",
    "payload_deadline",
]
