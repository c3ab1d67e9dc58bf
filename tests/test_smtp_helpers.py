"""
Doubles and helpers shared by the SMTP front's tests (no tests here): a
recording L{IMessageSink}, sessions in memory over a StringTransport, and
the factory listening on loopback for smtplib and the raw client.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, ITLSTransport
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from maillaser.interfaces import IMessageSink
from maillaser.message import Message, Refusal
from maillaser.smtp import (
    MailLaserDeliveryFactory,
    MailLaserESMTP,
    MailLaserSMTPFactory,
)
from tests.helpers import LOOPBACK, poll

TARGETS = ("target@example.com", "Second@Example.com", "third@example.com")


@implementer(IMessageSink)
class RecordingSink:
    """
    Records every message; answers C{result} (a Deferred the test fires),
    or at once; refuses at MAIL FROM while C{capacity} holds a L{Refusal}.
    """

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.result: Deferred[None] | None = None
        self.capacity: Refusal | None = None

    def check_capacity(self) -> None:
        if self.capacity is not None:
            raise self.capacity

    def receive(self, message: Message) -> Deferred[None]:
        self.messages.append(message)
        return self.result if self.result is not None else succeed(None)


def make_factory(
    sink: IMessageSink,
    clock: Any,
    *,
    targets: tuple[str, ...] = TARGETS,
    max_recipients: int = 2,
    **overrides: Any,
) -> MailLaserSMTPFactory:
    """The factory as the bridge builds it, with small limits for tests."""
    settings: dict[str, Any] = dict(
        delivery_factory=MailLaserDeliveryFactory(
            sink=sink,
            targets=targets,
            max_recipients=max_recipients,
            hostname="mx.test",
            clock=clock,
        ),
        clock=clock,
        hostname="mx.test",
        max_message_size=10_000,
        timeout=300,
        max_connections=3,
        max_connections_per_ip=2,
    )
    settings.update(overrides)
    return MailLaserSMTPFactory(**settings)


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):  # type: ignore[misc]  # no TCP options
    """A StringTransport that can start TLS, recording when it was asked to."""

    tls_started_with: object = None

    def startTLS(self, context: object) -> None:
        self.tls_started_with = context


class Session:
    """A session of C{factory} over a StringTransport, from C{host}."""

    def __init__(
        self,
        factory: MailLaserSMTPFactory,
        host: str = "192.0.2.1",
        *,
        bulk: bool = True,
        transport: StringTransport | None = None,
    ) -> None:
        protocol = factory.buildProtocol(IPv4Address("TCP", host, 40000))
        assert isinstance(protocol, MailLaserESMTP)
        protocol.bulk_data = bulk
        self.protocol = protocol
        self.transport = transport or StringTransport(
            peerAddress=IPv4Address("TCP", host, 40000),
            hostAddress=IPv4Address("TCP", "127.0.0.1", 2525),
        )
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> list[bytes]:
        """
        Feed C{data} as a client that waits for C{354} after each C{DATA}
        (RFC 2920: the content never follows DATA in the same group);
        return the reply lines it brought.
        """
        self.transport.clear()
        for piece in after_data(data):
            self.protocol.dataReceived(piece)
        return self.output()

    def send_at_once(self, data: bytes) -> list[bytes]:
        """Feed C{data} in one piece, whatever it holds."""
        self.transport.clear()
        self.protocol.dataReceived(data)
        return self.output()

    def output(self) -> list[bytes]:
        written: bytes = self.transport.value()
        return written.splitlines()

    def buffered(self) -> int:
        """
        Input bytes the session holds waiting for a line's end, read through
        LineReceiver's public C{clearLineBuffer} and handed straight back.
        """
        held = self.protocol.clearLineBuffer()
        self.protocol.dataReceived(held)
        return len(held)


def after_data(data: bytes) -> list[bytes]:
    """C{data} cut after every C{DATA} line, where a client waits for C{354}."""
    pieces = re.split(rb"(?<=^DATA\r\n)", data, flags=re.MULTILINE | re.IGNORECASE)
    return [piece for piece in pieces if piece]


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


class Listening:
    """The factory on loopback, with the sink it hands messages to."""

    def __init__(
        self, factory: MailLaserSMTPFactory, sink: RecordingSink, port: IListeningPort
    ) -> None:
        self.factory = factory
        self.sink = sink
        self.listening_port = port
        self.port: int = port.getHost().port  # type: ignore[attr-defined]

    async def sessions_gone(self) -> None:
        await poll(lambda: not self.factory.sessions)


async def listen(test: TestCase, **overrides: Any) -> Listening:
    """
    C{make_factory(**overrides)} serving 127.0.0.1 on a free port with a
    L{RecordingSink} and the real reactor; stopped when the test ends, once
    its sessions are gone.
    """
    sink = RecordingSink()
    overrides.setdefault("max_recipients", 100)
    overrides.setdefault("max_message_size", 10 * 1024 * 1024)
    overrides.setdefault("max_connections", 1000)
    overrides.setdefault("max_connections_per_ip", 50)
    factory = make_factory(sink, reactor, **overrides)
    port = await serverFromString(reactor, LOOPBACK).listen(factory)
    server = Listening(factory, sink, port)

    async def stop() -> None:
        await port.stopListening()
        await server.sessions_gone()

    test.addCleanup(stop)
    return server
