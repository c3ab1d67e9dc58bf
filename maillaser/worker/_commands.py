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

Changing a command, its arguments or their meaning is a change of protocol:
bump L{PROTOCOL_VERSION}.  The front checks it, and the package version, in
L{Hello} before it sends anything else, so a worker started from different
code (an upgrade installed while the front runs) is refused, not trusted.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.protocols import amp

from maillaser.message import Envelope, Message

PROTOCOL_VERSION = 1


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


class JSONValue(BigBytes):
    """Any JSON value, of any size."""

    def toBox(
        self,
        name: bytes,
        strings: dict[bytes, bytes],
        objects: dict[str, Any],
        proto: amp.AMP,
    ) -> None:
        key = _identifier(name)
        objects[key] = json.dumps(objects[key], separators=(",", ":")).encode()
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
        objects[key] = json.loads(objects[key])


# A message, as Store, Deliver and BuildPayload carry it.  The envelope
# goes as JSON: a list of 10,000 recipients would not fit one AMP value.

MESSAGE_ARGUMENTS: list[tuple[bytes, amp.Argument]] = [
    (b"id", amp.Unicode()),
    (b"envelope", JSONValue()),
    (b"received_at", amp.Float()),
    (b"raw", BigBytes()),
]


def message_arguments(message: Message) -> dict[str, object]:
    """C{message} as the keyword arguments of L{MESSAGE_ARGUMENTS}."""
    envelope = message.envelope
    return {
        "id": message.id,
        "envelope": [
            envelope.sender,
            list(envelope.recipients),
            envelope.helo,
            envelope.peer,
        ],
        "received_at": message.received_at,
        "raw": message.raw,
    }


def message_from_arguments(
    id: str, envelope: list[Any], received_at: float, raw: bytes
) -> Message:
    """The inverse of L{message_arguments}."""
    sender, recipients, helo, peer = envelope
    return Message(
        id, Envelope(sender, tuple(recipients), helo, peer), raw, received_at
    )


# What the SMTP client is to be told, in Store's and Deliver's answers.

REPLY_RESPONSE: list[tuple[bytes, amp.Argument]] = [
    (b"code", amp.Integer()),
    (b"status", amp.Unicode()),
    (b"text", amp.Unicode()),
]


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
    Queue mode: commit the message to the spool, then deliver it when it
    can.  Answered once the commit is durable, with the reply for the SMTP
    client (C{250}, or C{452} when the spool is full, C{451} when it cannot
    commit) and the spool's size after it, for back-pressure at the front.
    """

    arguments = MESSAGE_ARGUMENTS
    response = [
        *REPLY_RESPONSE,
        (b"pending", amp.Integer()),
        (b"bytes", amp.Integer()),
    ]


class Deliver(amp.Command):
    """
    Sync mode: run one delivery round now and answer with the reply it
    earns: C{250} when the webhook took it, C{451} for anything temporary,
    C{550} with the receiver's reason when it refused the message for good.
    """

    arguments = MESSAGE_ARGUMENTS
    response = [*REPLY_RESPONSE, (b"breaker", amp.Unicode())]


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


class BuildPayload(amp.Command):
    """
    Worker to one of its payload processes: the request body for a message.
    The worker's deadline on it bounds what one message can cost.
    """

    arguments = [*MESSAGE_ARGUMENTS, (b"header_prefixes", amp.ListOf(amp.Unicode()))]
    response = [(b"body", BigBytes())]


__all__ = [
    "MESSAGE_ARGUMENTS",
    "PROTOCOL_VERSION",
    "REPLY_RESPONSE",
    "BigBytes",
    "BuildPayload",
    "Deliver",
    "Hello",
    "JSONValue",
    "Metrics",
    "StartFailed",
    "Status",
    "Stop",
    "Store",
    "VersionMismatch",
    "message_arguments",
    "message_from_arguments",
]
