"""
The listening side of the SMTP front: Twisted's L{smtp.SMTPFactory}, with
what it leaves to its users, connection caps, and draining at shutdown.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IOpenSSLContextFactory,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDeliveryFactory

from maillaser.config import BareNewline
from maillaser.logs import observer
from maillaser.smtp._protocol import MailLaserESMTP
from maillaser.timers import cancel_timer


class MailLaserSMTPFactory(smtp.SMTPFactory):
    """
    Shared state of all sessions: policy, limits, and the connections open.

    The connection caps are enforced here because only the factory sees
    every session; refusing with C{421} (rather than not accepting) tells a
    legitimate MTA to come back later.
    """

    protocol = MailLaserESMTP
    noisy = False
    timeout: float  # type: ignore[assignment]  # seconds, not only whole ones
    _log = Logger(observer=observer)

    def __init__(
        self,
        *,
        delivery_factory: IMessageDeliveryFactory,
        clock: IReactorTime,
        hostname: str,
        max_message_size: int,
        timeout: float,
        tls_context: IOpenSSLContextFactory | None = None,
        max_connections: int = 1000,
        max_connections_per_ip: int = 50,
        on_reply: Callable[[int], object] = lambda code: None,
        min_data_rate: int = 1000,
        max_inflight_bytes: int = 256 * 1024 * 1024,
        max_unknown_recipients: int = 20,
        bare_newline: BareNewline = "normalize",
    ) -> None:
        super().__init__()
        self.delivery_factory = delivery_factory
        self.clock = clock
        self.hostname = hostname
        self.domain = hostname.encode("idna")
        self.max_message_size = max_message_size
        self.timeout = timeout
        self.tls_context = tls_context
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.on_reply = on_reply
        """Told C{250} at the end of DATA, and every 4xx/5xx reply."""
        self.min_data_rate = min_data_rate
        """Bytes per second DATA must average after L{DATA_RATE_GRACE}; 0: any."""
        self.max_inflight_bytes = max_inflight_bytes
        self.inflight_bytes = 0
        """Message bytes held now, by sessions in DATA and messages waiting
        for their reply, as L{reserve} counted them."""
        self.max_unknown_recipients = max_unknown_recipients
        self.bare_newline: BareNewline = bare_newline
        self.draining = False
        self.sessions: set[MailLaserESMTP] = set()
        self._per_host: Counter[str] = Counter()
        self._idle_waiters: list[Deferred[None]] = []

    def buildProtocol(self, addr: IAddress | None) -> smtp.SMTP:
        session: MailLaserESMTP = super().buildProtocol(addr)
        # twisted: SMTPFactory.buildProtocol never gives the protocol its
        # timeout (SMTPFactory.timeout is unused), and ESMTP takes neither a
        # delivery factory nor (from a factory) a TLS context.
        session.timeout = self.timeout
        session.deliveryFactory = self.delivery_factory
        session.ctx = self.tls_context
        return session

    def admit(self, session: MailLaserESMTP) -> bytes | None:
        """Register a new session, or return the C{421} text that turns it away."""
        host = session.peer_host
        if self.draining:
            return b"4.3.2 " + self.domain + b" Service shutting down"
        if len(self.sessions) >= self.max_connections:
            self._log.warn("connection limit reached, refusing {peer}", peer=host)
            return b"4.7.0 " + self.domain + b" Too many connections, try later"
        if self._per_host[host] >= self.max_connections_per_ip:
            self._log.warn("per-address connection limit reached for {peer}", peer=host)
            return b"4.7.0 " + self.domain + b" Too many connections from you"
        self.sessions.add(session)
        self._per_host[host] += 1
        return None

    def reserve(self, size: int) -> bool:
        """
        Hold C{size} more message bytes, unless that would take the front
        past C{max_inflight_bytes}: every session's DATA counts against one
        budget, so memory stays bounded however many clients send at once.
        """
        if self.inflight_bytes + size > self.max_inflight_bytes:
            return False
        self.inflight_bytes += size
        return True

    def unreserve(self, size: int) -> None:
        self.inflight_bytes -= size

    def release(self, session: MailLaserESMTP) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self._per_host[session.peer_host] -= 1
            if not self._per_host[session.peer_host]:
                del self._per_host[session.peer_host]
        self._notify_if_idle()

    def drain(self, grace: float) -> Deferred[None]:
        """
        Stop taking new transactions and let those in DATA finish.

        Idle sessions are told C{421} at once; busy ones get until C{grace}
        seconds have passed, then C{421} too (they were not answered C{250},
        so the client still holds the message and will retry).
        """
        self.draining = True
        for session in list(self.sessions):
            if not session.busy:
                session.shut_down()
        if not self._busy():
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        timer: IDelayedCall = self.clock.callLater(grace, self._give_up, waiter)
        waiter.addBoth(cancel_timer, timer)
        return waiter

    def _busy(self) -> bool:
        return any(session.busy for session in self.sessions)

    def _notify_if_idle(self) -> None:
        if self._idle_waiters and not self._busy():
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _give_up(self, waiter: Deferred[None]) -> None:
        busy = [session for session in self.sessions if session.busy]
        self._log.warn(
            "grace period over, closing {count} busy session(s)", count=len(busy)
        )
        for session in busy:
            session.shut_down()
        if waiter in self._idle_waiters:
            self._idle_waiters.remove(waiter)
            waiter.callback(None)
