"""
Assembly: one L{Config} in, one running bridge out.

C{makeService} is the public way to run MailLaser inside another Twisted
program or a C{.tac} file; C{twistd maillaser} calls it too.  It builds each
stage with its collaborators injected and owns the order of shutdown, which
C{MultiService}'s fan-out cannot express: stop accepting, let transactions
in DATA and deliveries in flight finish (bounded by the grace period), then
stop the payload process and close the HTTP pool and the spool.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import (
    Deferred,
    fail,
    gatherResults,
    maybeDeferred,
)
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from maillaser.breaker import CircuitBreaker
from maillaser.child import ChildError, ChildProcess
from maillaser.config import Config, describe
from maillaser.delivery import INLINE_SIZE, Deliverer
from maillaser.dispatch import Dispatcher
from maillaser.interfaces import IMessageSink, ISpool
from maillaser.message import Refusal
from maillaser.metrics import Metrics
from maillaser.sinks import QueueSink, SyncSink
from maillaser.smtp import SMTPServerFactory
from maillaser.spool import open_spool
from maillaser.tls import tls_context
from maillaser.web import Health, make_site
from maillaser.webhook import make_webhook_client


def makeService(
    config: Config, reactor: Any = None, *, spool: ISpool | None = None
) -> MailLaserService:
    """
    Build the bridge described by C{config}.

    @param reactor: defaults to the global reactor, imported only here so
        that a caller (or a test) can supply its own.
    @param spool: an already open spool; by default the SQLite spool in
        C{config.spool_dir} is opened when the service starts.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return MailLaserService(config, reactor, spool)


class Listener(Service):
    """
    Listens on one endpoint; a bind failure at start-up is raised, not just
    logged, so C{twistd} exits non-zero instead of running deaf.
    """

    _log = Logger()

    def __init__(
        self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, label: str
    ) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self._label = label
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failures: list[Failure] = []
        self._endpoint.listen(self._factory).addCallbacks(
            self._listening, failures.append
        )
        if failures:
            failures[0].raiseException()

    def startService(self) -> None:
        if self.port is None and not self.running:
            self.privilegedStartService()
        super().startService()

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        self._log.info(
            "{label} listening on {host}:{port}",
            label=self._label,
            host=getattr(address, "host", address),
            port=getattr(address, "port", ""),
        )

    def stopService(self) -> Deferred[object] | None:
        super().stopService()
        port, self.port = self.port, None
        return None if port is None else maybeDeferred(port.stopListening)


class MailLaserService(MultiService):
    """The running bridge: SMTP listeners, spool, dispatcher, and ``/health``."""

    _log = Logger()

    def __init__(
        self, config: Config, reactor: Any, spool: ISpool | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self._reactor = reactor
        self.spool = spool
        self.metrics = Metrics(reactor, self)
        self.breaker = CircuitBreaker(
            config.circuit_breaker_threshold, config.circuit_breaker_reset, reactor
        )
        self._webhook = make_webhook_client(
            config.webhook_url,
            reactor,
            concurrency=config.delivery_concurrency,
            timeout=config.webhook_timeout,
        )
        self._payloads = ChildProcess(
            reactor, reactor, ["payload"], on_exit=self._payload_process_ended
        )
        self.deliverer = Deliverer(
            client=self.metrics.timed(self._webhook),
            clock=reactor,
            breaker=self.breaker,
            max_retries=config.webhook_max_retries,
            secrets=config.webhook_secrets,
            header_prefixes=config.header_prefixes,
            offload=self._payloads.run,
            inline_size=INLINE_SIZE if config.delivery_mode == "sync" else 0,
        )
        self.dispatcher: Dispatcher | None = None
        self.smtp_factory = SMTPServerFactory(
            sink=_NotReady(),
            clock=reactor,
            hostname=config.hostname,
            targets=config.target_emails,
            max_message_size=config.max_message_size,
            max_recipients=config.max_recipients,
            timeout=config.smtp_timeout,
            tls_context=tls_context(config.tls_cert, config.tls_key, config.hostname),
            max_connections=config.max_connections,
            max_connections_per_ip=config.max_connections_per_ip,
            on_reply=self.metrics.smtp_reply,
        )
        self.smtp_listeners = [
            Listener(serverFromString(reactor, description), self.smtp_factory, "SMTP")
            for description in config.smtp_endpoints
        ]
        self.health_listener = Listener(
            serverFromString(reactor, config.health_endpoint),
            make_site(self.health, self.metrics.registry),
            "health",
        )
        for listener in [*self.smtp_listeners, self.health_listener]:
            listener.setServiceParent(self)
        self._started_at = reactor.seconds()
        self._stopping = False

    def privilegedStartService(self) -> None:
        """Open the spool before binding, so a broken spool stops start-up."""
        self._prepare()
        super().privilegedStartService()

    def startService(self) -> None:
        self._prepare()  # when composed, a parent may only call startService
        self._started_at = self._reactor.seconds()
        super().startService()

    def _prepare(self) -> None:
        if isinstance(self.smtp_factory.sink, _NotReady):
            self._log.info(
                "starting MailLaser with {config}", config=describe(self.config)
            )
            self.smtp_factory.sink = self._make_sink()

    def _make_sink(self) -> IMessageSink:
        if self.config.delivery_mode == "sync":
            return SyncSink(
                self.deliverer,
                self.breaker,
                self.config.delivery_concurrency,
                self.metrics.settled,
            )
        if self.spool is None:
            self.spool = open_spool(self.config.spool_dir, self._reactor)
        self.dispatcher = Dispatcher(
            spool=self.spool,
            deliverer=self.deliverer,
            breaker=self.breaker,
            clock=self._reactor,
            concurrency=self.config.delivery_concurrency,
            schedule=self.config.retry_schedule,
            grace=self.config.shutdown_grace,
            on_settled=self.metrics.settled,
        )
        self.dispatcher.setServiceParent(self)
        return QueueSink(
            self.spool,
            self.dispatcher,
            self.config.spool_max_messages,
            self.config.spool_max_bytes,
        )

    def _payload_process_ended(self, error: ChildError) -> None:
        """Its rounds fail and go again later; a later payload starts a new one."""
        self._log.failure("payload process ended", Failure(error), LogLevel.error)

    def health(self) -> Health:
        problems: list[str] = []
        if self._stopping:
            problems.append("shutting down")
        if not all(listener.port is not None for listener in self.smtp_listeners):
            problems.append("SMTP listener is not listening")
        details: dict[str, object] = {"breaker": self.breaker.state.value}
        if self.spool is not None:
            if not self.spool.writable():
                problems.append("spool is not writable")
            stats = self.spool.stats()
            details.update(spool_depth=stats.pending, dead_letters=stats.dead)
        details["uptime"] = round(self._reactor.seconds() - self._started_at, 3)
        return Health(tuple(problems), details)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self._stopping = True
        return Deferred.fromCoroutine(self._shut_down())

    async def _shut_down(self) -> None:
        """Stop accepting; drain SMTP and deliveries together; then close."""
        grace = self.config.shutdown_grace
        self._log.info("shutting down; grace period {grace}s", grace=grace)
        await gatherResults(
            [maybeDeferred(listener.stopService) for listener in self.smtp_listeners],
            consumeErrors=True,
        )
        draining: list[Deferred[Any]] = [self.smtp_factory.drain(grace)]
        if self.dispatcher is not None:
            draining.append(self.dispatcher.stopService())
        await gatherResults(draining, consumeErrors=True)
        await self._payloads.stop()
        await self._webhook.pool.close()
        left = 0
        if self.spool is not None:
            await self.spool.close()  # after the outcomes still being written
            left = self.spool.stats().pending
        await maybeDeferred(self.health_listener.stopService)
        self._log.info(
            "clean shutdown; {pending} message(s) stay spooled for the next start",
            pending=left,
        )


@implementer(IMessageSink)
class _NotReady:
    """The sink until the service starts: nothing can be accepted yet."""

    def check_capacity(self) -> None:
        raise Refusal(451, "4.3.0", "Not ready, try again later")

    def receive(self, message: object) -> Deferred[None]:
        return fail(Refusal(451, "4.3.0", "Not ready, try again later"))


__all__ = ["MailLaserService", "makeService"]
