"""Doubles for Clock-driven delivery tests, and the messages they deliver."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from maillaser.interfaces import IPayloadBuilder, IWebhookPoster
from maillaser.message import Envelope, Message, Payload, WebhookResponse
from maillaser.webhook import encoded_payload


@implementer(IWebhookPoster)
class ScriptedPoster:
    """
    Answers POSTs from a script: a status, a WebhookResponse, an exception,
    or C{None} for "never answers" (the Deferred is kept in C{hanging}).
    When the script runs out every request gets C{default}.
    """

    def __init__(
        self, *script: int | WebhookResponse | Exception | None, default: int = 200
    ) -> None:
        self.script = list(script)
        self.default = default
        self.requests: list[tuple[bytes, dict[bytes, bytes]]] = []
        self.hanging: list[Deferred[WebhookResponse]] = []

    def post(
        self, body: bytes, headers: dict[bytes, bytes]
    ) -> Deferred[WebhookResponse]:
        self.requests.append((body, headers))
        step = self.script.pop(0) if self.script else self.default
        if step is None:
            d: Deferred[WebhookResponse] = Deferred()
            self.hanging.append(d)
            return d
        if isinstance(step, Exception):
            return fail(step)
        return succeed(
            step if isinstance(step, WebhookResponse) else WebhookResponse(step)
        )


@implementer(IPayloadBuilder)
class InlinePayloads:
    """Builds each payload at once, as the worker does for small messages."""

    def __init__(self, header_prefixes: Sequence[str] = ()) -> None:
        self.header_prefixes = header_prefixes
        self.built: list[Message] = []

    def build(self, message: Message) -> Deferred[Payload]:
        self.built.append(message)
        return succeed(Payload(encoded_payload(message, self.header_prefixes)))


def message(n: int = 0, at: float = 0.0) -> Message:
    raw = b"From: Someone <someone@test.com>\r\nSubject: test %d\r\n\r\nbody\r\n" % n
    return Message(
        id=f"msg_{n:028x}",
        envelope=Envelope("someone@test.com", ("target@example.com",)),
        raw=raw,
        received_at=at,
    )


def stored(envelope: Envelope, id: str, received_at: float, raw: bytes) -> Message:
    """A message as the spool tests store it: their own envelope, id and time."""
    return Message(id=id, envelope=envelope, raw=raw, received_at=received_at)
