"""
The protocol between the SMTP front and the delivery worker: AMP
(L{twisted.protocols.amp}) over the worker's standard input and output.

The front (C{maillaser.worker._front}) asks, the worker
(C{maillaser.worker._server}) answers; the worker asks its payload
processes (C{maillaser.worker._payloads}) the same way.  Every request has
a deadline on the asking side, and a child that misses one is killed and
started again, so nothing here may block for long on the answering side.

AMP caps a value at 64 KiB; message bytes and the configuration are
longer, so they travel as L{BigBytes}, split over numbered keys of one box.
A list of messages or of replies, and one of either, are each one such
value (L{MessageList}, L{ReplyList}, L{One}),
and L{Store} carries every message that ended in one turn of the front's
reactor: AMP handles a box key by key in Python, so the fewer boxes and
keys per message, the less both reactors spend on the pipe.

Changing a command, its arguments or their meaning is a change of protocol:
bump L{PROTOCOL_VERSION}.  The front checks it, and the package version, in
L{Hello} before it sends anything else, so a worker started from different
code (an upgrade installed while the front runs) is refused, not trusted.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.protocols import amp

from maillaser.message import Envelope, Message, TLSInfo

PROTOCOL_VERSION = 3


def _identifier(name: bytes) -> str:
    """The keyword an argument's wire name becomes (our names need no more)."""
    return name.decode("ascii").replace("-", "_")


class BigBytes(amp.Argument):
    """
    Bytes of any length: the first 64 KiB under the argument's own key, the
    rest under C{<key>.1}, C{<key>.2}... in the same box.
    """

    def toBox(
        self,
        name: bytes,
        strings: dict[bytes, bytes],
        objects: dict[str, Any],
        proto: amp.AMP,
    ) -> None:
        value: bytes = objects.pop(_identifier(name))
        size = amp.MAX_VALUE_LENGTH
        strings[name] = value[:size]
        for number, start in enumerate(range(size, len(value), size), start=1):
            strings[b"%s.%d" % (name, number)] = value[start : start + size]

    def fromBox(
        self,
        name: bytes,
        strings: dict[bytes, bytes],
        objects: dict[str, Any],
        proto: amp.AMP,
    ) -> None:
        pieces = [strings.pop(name)]
        key = b"%s.%d" % (name, len(pieces))
        while key in strings:
            pieces.append(strings.pop(key))
            key = b"%s.%d" % (name, len(pieces))
        objects[_identifier(name)] = b"".join(pieces)


class _Value(BigBytes):
    """
    A value of any length, encoded as one L{BigBytes}: each kind of value
    below is one AMP value, not one per field, because AMP parses a
    box one key and one value at a time, in Python, and a request that is
    a few keys rather than a dozen costs both processes a third as much.
    """

    def toBox(
        self,
        name: bytes,
        strings: dict[bytes, bytes],
        objects: dict[str, Any],
        proto: amp.AMP,
    ) -> None:
        key = _identifier(name)
        objects[key] = self.encode(objects[key])
        super().toBox(name, strings, objects, proto)

    def fromBox(
        self,
        name: bytes,
        strings: dict[bytes, bytes],
        objects: dict[str, Any],
        proto: amp.AMP,
    ) -> None:
        super().fromBox(name, strings, objects, proto)
        key = _identifier(name)
        objects[key] = self.decode(objects[key])

    def encode(self, value: Any) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes) -> Any:
        raise NotImplementedError


class MessageList(_Value):
    """
    L{Message}s: for each, a line of JSON (id, sender, recipients, HELO,
    peer, time received, size, TLS as C{[version, cipher]} or C{null}),
    then its bytes as received.  JSON never
    holds a raw line break, so the line ends where the bytes start.
    """

    def encode(self, value: list[Message]) -> bytes:
        pieces: list[bytes] = []
        for message in value:
            envelope = message.envelope
            head = [
                message.id,
                envelope.sender,
                envelope.recipients,
                envelope.helo,
                envelope.peer,
                message.received_at,
                len(message.raw),
                None if envelope.tls is None else attrs.astuple(envelope.tls),
            ]
            pieces += (_JSON.encode(head).encode("utf-8"), b"\n", message.raw)
        return b"".join(pieces)

    def decode(self, data: bytes) -> list[Message]:
        messages = []
        start = 0
        while start < len(data):
            end = data.index(b"\n", start)
            id, sender, recipients, helo, peer, received_at, size, tls = json.loads(
                data[start:end]
            )
            start = end + 1 + size
            tls_info = None if tls is None else TLSInfo(*tls)
            envelope = Envelope(sender, tuple(recipients), helo, peer, tls_info)
            messages.append(Message(id, envelope, data[end + 1 : start], received_at))
        return messages


@attrs.frozen
class Reply:
    """What the SMTP client is to be told at the end of DATA."""

    code: int
    status: str
    text: str


class ReplyList(_Value):
    """L{Reply}s, as a JSON array of C{[code, status, text]}."""

    def encode(self, value: list[Reply]) -> bytes:
        return _JSON.encode([attrs.astuple(reply) for reply in value]).encode()

    def decode(self, data: bytes) -> list[Reply]:
        return [Reply(*reply) for reply in json.loads(data)]


class One(_Value):
    """
    One value of a list argument, encoded as a list of one:
    C{One(MessageList())} is one L{Message}, C{One(ReplyList())} one
    L{Reply}.
    """

    def __init__(self, of: _Value) -> None:
        super().__init__()
        self._of = of

    def encode(self, value: Any) -> bytes:
        return self._of.encode([value])

    def decode(self, data: bytes) -> Any:
        [value] = self._of.decode(data)
        return value


class SpoolCounts(_Value):
    """The spool's pending messages and their bytes: two numbers."""

    def encode(self, value: tuple[int, int]) -> bytes:
        return b"%d %d" % value

    def decode(self, data: bytes) -> tuple[int, int]:
        pending, size = data.split()
        return int(pending), int(size)


_JSON = json.JSONEncoder(separators=(",", ":"))


class VersionMismatch(Exception):
    """The worker runs other code than the front: it must not be used."""


class StartFailed(Exception):
    """The worker could not build what it needs (its spool, say); why, in words."""


class Hello(amp.Command):
    """
    Front to worker, before anything else: check that both run the same
    code, and hand over the configuration, from which the worker builds
    its spool, dispatcher and webhook poster.  Answered once the spool is
    open (a spool that cannot be opened fails this command).
    """

    arguments = [
        (b"version", amp.Unicode()),
        (b"protocol", amp.Integer()),
        (b"config", BigBytes()),
    ]
    response = [(b"version", amp.Unicode()), (b"pid", amp.Integer())]
    errors = {VersionMismatch: b"VERSION_MISMATCH", StartFailed: b"START_FAILED"}


class Store(amp.Command):
    """
    Queue mode: commit the messages to the spool, then deliver them when
    they can be.  The front sends, in one request, every message whose
    DATA ended in one turn of its reactor (they share the worker's commit
    too).  Answered once the commit is durable, with one reply per message
    for its SMTP client (C{250}, or C{452} when the spool is full, C{451}
    when it cannot commit), in order, and the spool's counts after it, for
    back-pressure at the front.
    """

    arguments = [(b"messages", MessageList())]
    response = [(b"replies", ReplyList()), (b"spool", SpoolCounts())]


class Deliver(amp.Command):
    """
    Sync mode: run one delivery round now and answer with the reply it
    earns: C{250} when the webhook took it, C{451} for anything temporary,
    C{550} with the receiver's reason when it refused the message for good.
    """

    arguments = [(b"message", One(MessageList()))]
    response = [(b"reply", One(ReplyList())), (b"breaker", amp.Unicode())]


class Status(amp.Command):
    """
    The front's heartbeat and the state that C{/health} and back-pressure
    read: the breaker, the spool's counts, whether it can commit, and what
    the worker itself finds wrong.
    """

    arguments = []
    response = [
        (b"breaker", amp.Unicode()),
        (b"pending", amp.Integer()),
        (b"dead", amp.Integer()),
        (b"bytes", amp.Integer()),
        (b"writable", amp.Boolean()),
        (b"problems", amp.ListOf(amp.Unicode())),
    ]


class Metrics(amp.Command):
    """The worker's Prometheus metrics, in the text format, for C{/metrics}."""

    arguments = []
    response = [(b"text", BigBytes())]


class Stop(amp.Command):
    """
    Shutting down: let delivery rounds in flight finish within C{grace}
    seconds, close the spool, and answer with what stays spooled.  The
    worker exits once the front then closes its input.
    """

    arguments = [(b"grace", amp.Float())]
    response = [(b"pending", amp.Integer())]


class PartNotFound(Exception):
    """No such message (or it expired), or no part at that index."""


class PartUnavailable(Exception):
    """The part could not be extracted now (its payload process failed)."""


class FetchPart(amp.Command):
    """
    Front to worker, for an attachment link the front has checked (its
    signature and expiry): the part's bytes, from the spool (a delivered
    message kept for its links, or one still pending), extracted as the
    payload was built, so indexes agree.  A large message is parsed in a
    payload process, as for its payload.
    """

    arguments = [(b"message_id", amp.Unicode()), (b"index", amp.Unicode())]
    response = [
        (b"content_type", amp.Unicode()),
        (b"filename", amp.Unicode()),
        (b"data", BigBytes()),
    ]
    errors = {PartNotFound: b"PART_NOT_FOUND", PartUnavailable: b"PART_UNAVAILABLE"}


class BuildPayload(amp.Command):
    """
    Worker to one of its payload processes: the request body for a message,
    and until when it links to the message's parts (C{keep_until}, absent
    if it does not).  The worker's deadline on it bounds what one message
    can cost.  C{parts} is the round's
    L{maillaser.webhook.PartOptions}, as JSON.
    """

    arguments = [
        (b"message", One(MessageList())),
        (b"header_prefixes", amp.ListOf(amp.Unicode())),
        (b"header_list", amp.Boolean()),
        (b"parts", BigBytes()),
    ]
    response = [(b"body", BigBytes()), (b"keep_until", amp.Float(optional=True))]


class ExtractPart(amp.Command):
    """
    Worker to one of its payload processes: one part of a message, for
    L{FetchPart}, when the message is too large to parse on the worker's
    reactor.
    """

    arguments = [(b"raw", BigBytes()), (b"index", amp.Unicode())]
    response = FetchPart.response
    errors = FetchPart.errors


__all__ = [
    "PROTOCOL_VERSION",
    "BigBytes",
    "BuildPayload",
    "Deliver",
    "ExtractPart",
    "FetchPart",
    "Hello",
    "MessageList",
    "Metrics",
    "One",
    "PartNotFound",
    "PartUnavailable",
    "Reply",
    "ReplyList",
    "SpoolCounts",
    "StartFailed",
    "Status",
    "Stop",
    "Store",
    "VersionMismatch",
]
