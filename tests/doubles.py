"""A scripted IWebhookClient for Clock-driven delivery tests."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from maillaser.interfaces import IWebhookClient
from maillaser.message import Envelope, Message
from maillaser.webhook import WebhookResponse


@implementer(IWebhookClient)
class ScriptedClient:
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
