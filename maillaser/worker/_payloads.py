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

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from maillaser.interfaces import IPayloadBuilder
from maillaser.logs import observer
from maillaser.message import Message
from maillaser.webhook import encoded_payload, fallback_payload
from maillaser.worker._child import ChildError, ChildProcess, ChildProgram, ChildTimeout
from maillaser.worker._commands import BuildPayload
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
payload process costs both.
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
    ) -> None:
        """
        @param timeout: seconds a payload process has for one message.
        @param program: the payload process's program
            (L{maillaser.worker._main.payload_program}).
        @param header_list: payloads list every top-level field.
        """
        self.header_prefixes = tuple(header_prefixes)
        self.header_list = header_list
        self.timeout = timeout
        self.process = ChildProcess(reactor, program, name="payload process")

    def build(self, message: Message) -> Deferred[bytes]:
        if is_cheap(message.raw):
            return succeed(
                encoded_payload(
                    message, self.header_prefixes, header_list=self.header_list
                )
            )
        return Deferred.fromCoroutine(self._elsewhere(message))

    async def _elsewhere(self, message: Message) -> bytes:
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
                body: bytes = answer["body"]
                return body
        self._log.warn(
            "{message_id}: {reason}; delivered with its header only",
            message_id=message.id,
            reason=reason,
        )
        return fallback_payload(
            message, self.header_prefixes, reason, header_list=self.header_list
        )

    def stop(self, timeout: float) -> Deferred[None]:
        """End the payload process, if one runs."""
        return self.process.stop(timeout)


class PayloadProtocol(ChildProtocol):
    """The payload process's end: one payload at a time, as asked."""

    @BuildPayload.responder
    def build(
        self, message: Message, header_prefixes: list[str], header_list: bool
    ) -> dict[str, bytes]:
        body = encoded_payload(message, header_prefixes, header_list=header_list)
        return {"body": body}


__all__ = [
    "ATTEMPTS",
    "INLINE_SIZE",
    "PayloadBuilder",
    "PayloadProtocol",
    "is_cheap",
    "payload_deadline",
]
