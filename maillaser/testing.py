"""
Test doubles for MailLaser and for the programs that talk to it.

Like C{treq.testing}, these ship with the package because users need them
too: a real HTTP webhook receiver on loopback that records every request
and answers from a script, and an in-memory spool driven by whatever clock
the test uses.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from maillaser.health import QuietSite
from maillaser.interfaces import ISpool
from maillaser.message import Attempt, Message, QueuedMessage, SpoolStats


@attrs.frozen
class Reply:
    """One scripted response of a L{WebhookReceiver}."""

    status: int = 200
    headers: dict[str, str] = attrs.field(factory=dict)
    body: bytes = b""


HANG = Reply(status=0)
"""A scripted response that never comes (until the receiver stops)."""


@attrs.frozen
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    """Lower-cased names; the last value of each."""
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver(Resource):
    """
    A webhook on loopback that records requests and answers from a script.

    Answers are taken from the script in order; when it runs out, every
    request gets C{default}.  C{on_request}, if given, is told of each
    request as it arrives (C{maillaser-receive} prints them); with
    C{record=False} requests are not kept in L{requests} (a receiver that
    runs for days must not hold every body it saw), and L{wait_for} is not
    for use.
    """

    isLeaf = True

    def __init__(
        self,
        default: Reply = Reply(200),
        *,
        on_request: Callable[[ReceivedRequest], object] | None = None,
        record: bool = True,
    ) -> None:
        super().__init__()
        self.default = default
        self._on_request = on_request
        self._record = record
        self.requests: list[ReceivedRequest] = []
        self._script: list[Reply] = []
        self._waiters: list[tuple[int, Deferred[list[ReceivedRequest]]]] = []
        self._hanging: list[Request] = []
        self._port: IListeningPort | None = None

    def script(self, *replies: Reply | int) -> None:
        self._script.extend(r if isinstance(r, Reply) else Reply(r) for r in replies)

    def wait_for(self, count: int) -> Deferred[list[ReceivedRequest]]:
        """Fires once C{count} requests have arrived."""
        if len(self.requests) >= count:
            return succeed(list(self.requests))
        d: Deferred[list[ReceivedRequest]] = Deferred()
        self._waiters.append((count, d))
        return d

    def render(self, request: IRequest) -> bytes | int:
        assert request.method is not None and request.uri is not None
        received = ReceivedRequest(
            method=request.method.decode("ascii"),
            path=request.uri.decode("utf-8", "replace"),
            headers={
                name.decode("latin-1").lower(): values[-1].decode("latin-1")
                for name, values in request.requestHeaders.getAllRawHeaders()
            },
            body=request.content.read(),
        )
        if self._record:
            self.requests.append(received)
        if self._on_request is not None:
            self._on_request(received)
        reply = self._script.pop(0) if self._script else self.default
        self._notify()
        if reply is HANG:
            assert isinstance(request, Request)
            self._hanging.append(request)
            return NOT_DONE_YET
        request.setResponseCode(reply.status)
        for name, value in reply.headers.items():
            request.setHeader(name, value)
        return reply.body

    def _notify(self) -> None:
        ready = [(n, d) for n, d in self._waiters if len(self.requests) >= n]
        for waiter in ready:
            self._waiters.remove(waiter)
            waiter[1].callback(list(self.requests))

    def listen(
        self, reactor: Any, description: str = "tcp:0:interface=127.0.0.1"
    ) -> Deferred[str]:
        """Start serving; fires with the URL to configure as the webhook."""
        self._connections = _Connections(QuietSite(self))
        d: Deferred[IListeningPort] = serverFromString(reactor, description).listen(
            self._connections
        )
        return d.addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> str:
        self._port = port
        return self.url

    @property
    def url(self) -> str:
        assert self._port is not None
        address: Any = self._port.getHost()
        host = f"[{address.host}]" if ":" in address.host else address.host
        return f"http://{host}:{address.port}/hook"

    def stop(self) -> Deferred[None]:
        """
        Stop listening and close every connection, kept-alive ones too: a
        client's pool would otherwise keep one open past the end of a test.
        """
        self._hanging = []
        if self._port is None:
            return succeed(None)
        return Deferred.fromCoroutine(self._stop(self._port))

    async def _stop(self, port: IListeningPort) -> None:
        await maybeDeferred(port.stopListening)
        await self._connections.close()


class _Connections(WrappingFactory):
    """A factory that knows its open connections and can close them all."""

    noisy = False

    def __init__(self, wrapped: IProtocolFactory) -> None:
        super().__init__(wrapped)
        self._closed: list[Deferred[None]] = []

    def unregisterProtocol(self, protocol: ProtocolWrapper) -> None:
        super().unregisterProtocol(protocol)
        if not self.protocols:
            waiters, self._closed = self._closed, []
            for waiter in waiters:
                waiter.callback(None)

    def close(self) -> Deferred[None]:
        """Fires once every connection is closed."""
        if not self.protocols:
            return succeed(None)
        closed: Deferred[None] = Deferred()
        self._closed.append(closed)
        for protocol in list(self.protocols):
            protocol.transport.loseConnection()
        return closed


class SpoolFailure(Exception):
    """Raised by a L{MemorySpool} told to fail, as a full disk would."""


@implementer(ISpool)
@attrs.define
class MemorySpool:
    """
    An L{ISpool} in memory: everything committed at once, nothing durable.

    Time comes from the C{now} its callers pass, so a test's C{Clock} drives
    it.  Set C{broken} to make every write fail.
    """

    pending: dict[str, QueuedMessage] = attrs.field(factory=dict)
    due_at: dict[str, float] = attrs.field(factory=dict)
    dead: dict[str, QueuedMessage] = attrs.field(factory=dict)
    attempts: dict[str, list[Attempt]] = attrs.field(factory=dict)
    claimed: set[str] = attrs.field(factory=set)
    retained: dict[str, tuple[float, bytes]] = attrs.field(factory=dict)
    """Delivered messages kept for their links: expiry and bytes."""
    broken: bool = False

    def add(self, message: Message) -> Deferred[None]:
        if self.broken:
            return fail(SpoolFailure("spool is broken"))
        self.pending[message.id] = QueuedMessage(message)
        self.due_at[message.id] = message.received_at
        return succeed(None)

    def due(self, now: float, limit: int) -> Deferred[list[QueuedMessage]]:
        ready = sorted(
            (at, queued.message.received_at, key)
            for key, queued in self.pending.items()
            if key not in self.claimed and (at := self.due_at[key]) <= now
        )[:limit]
        self.claimed.update(key for _, _, key in ready)
        return succeed([self.pending[key] for _, _, key in ready])

    def next_due(self) -> Deferred[float | None]:
        times = [at for key, at in self.due_at.items() if key not in self.claimed]
        return succeed(min(times, default=None))

    def claim(self, message_id: str) -> bool:
        if message_id in self.claimed or message_id not in self.pending:
            return False
        self.claimed.add(message_id)
        return True

    def release(self, message_id: str) -> None:
        self.claimed.discard(message_id)

    def refresh(self) -> Deferred[SpoolStats]:
        return succeed(self.stats())

    def delivered(
        self,
        message_id: str,
        attempts: Sequence[Attempt],
        keep_until: float | None = None,
    ) -> Deferred[None]:
        self._settle(message_id, attempts)
        queued = self.pending.pop(message_id)
        del self.due_at[message_id]
        if keep_until is not None:
            self.retained[message_id] = (keep_until, queued.message.raw)
        return succeed(None)

    def retained_raw(self, message_id: str, now: float) -> Deferred[bytes | None]:
        until, raw = self.retained.get(message_id, (0.0, b""))
        if until > now:
            return succeed(raw)
        queued = self.pending.get(message_id) or self.dead.get(message_id)
        return succeed(None if queued is None else queued.message.raw)

    def expire_retained(self, now: float) -> Deferred[int]:
        expired = [key for key, (until, _) in self.retained.items() if until <= now]
        for key in expired:
            del self.retained[key]
        return succeed(len(expired))

    def reschedule(
        self, message_id: str, at: float, attempts: Sequence[Attempt]
    ) -> Deferred[None]:
        self._settle(message_id, attempts)
        queued = self.pending[message_id]
        self.pending[message_id] = attrs.evolve(queued, rounds=queued.rounds + 1)
        self.due_at[message_id] = at
        return succeed(None)

    def bury(self, message_id: str, attempts: Sequence[Attempt]) -> Deferred[None]:
        self._settle(message_id, attempts)
        self.dead[message_id] = self.pending.pop(message_id)
        del self.due_at[message_id]
        return succeed(None)

    def _settle(self, message_id: str, attempts: Iterable[Attempt]) -> None:
        if self.broken:
            raise SpoolFailure("spool is broken")
        self.claimed.discard(message_id)
        self.attempts.setdefault(message_id, []).extend(attempts)

    def stats(self) -> SpoolStats:
        return SpoolStats(
            pending=len(self.pending),
            dead=len(self.dead),
            bytes=sum(len(q.message.raw) for q in self.pending.values()),
            retained=len(self.retained),
            retained_bytes=sum(len(raw) for _, raw in self.retained.values()),
        )

    def writable(self) -> bool:
        return not self.broken

    def problem(self) -> str | None:
        return "spool is not writable" if self.broken else None

    def watch(self, wake: Callable[[], object]) -> None:
        """Nothing else writes here."""

    def close(self) -> Deferred[None]:
        return succeed(None)
