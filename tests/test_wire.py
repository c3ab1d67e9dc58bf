"""
write_now over real loopback TCP connections: sent before the reactor's next
turn when nothing is queued, behind Twisted's buffer when something is, and
Twisted's way for every other transport.
"""

from __future__ import annotations

import socket

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from maillaser.wire import write_now
from tests.helpers import RawClient, wait


class _Server(Protocol):
    def __init__(self, connected: Deferred[_Server]) -> None:
        self._connected = connected

    def connectionMade(self) -> None:
        self._connected.callback(self)


class WriteNowTests(TestCase):
    async def connected(self) -> tuple[Protocol, RawClient]:
        """A server-side protocol and the raw client talking to it."""
        connected: Deferred[_Server] = Deferred()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: _Server(connected))
        )
        self.addCleanup(port.stopListening)
        client = RawClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await endpoint.connect(Factory.forProtocol(lambda: client))
        server = await wait(connected)
        self.addCleanup(client.abort)
        return server, client

    async def test_sent_at_once_without_registering_for_writes(self) -> None:
        server, client = await self.connected()
        assert server.transport is not None
        # None out first: mypy takes isinstance on an Optional for never true
        assert client.transport is not None
        assert isinstance(client.transport, tcp.Client)
        write_now(server.transport, b"250 OK\r\n")
        self.assertNotIn(server.transport, reactor.getWriters())
        handle = client.transport.getHandle()
        self.assertEqual(handle.recv(100, socket.MSG_PEEK), b"250 OK\r\n")

    async def test_behind_bytes_twisted_still_holds(self) -> None:
        server, client = await self.connected()
        assert server.transport is not None
        server.transport.write(b"first ")
        write_now(server.transport, b"second\r\n")
        await client.wait_for_bytes(len(b"first second\r\n"))
        self.assertEqual(bytes(client.received), b"first second\r\n")

    async def test_what_the_socket_does_not_take_follows_in_order(self) -> None:
        server, client = await self.connected()
        data = bytes(range(256)) * 65536  # 16 MiB: more than the socket buffers
        assert server.transport is not None
        write_now(server.transport, data)
        self.assertIn(server.transport, reactor.getWriters())
        await client.wait_for_bytes(len(data))
        self.assertEqual(bytes(client.received), data)


class OtherTransportTests(SynchronousTestCase):
    def test_buffered_as_usual(self) -> None:
        transport = StringTransport()
        write_now(transport, b"220 hello\r\n")
        self.assertEqual(transport.value(), b"220 hello\r\n")
