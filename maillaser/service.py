"""
Assembly: one L{Config} in, one running bridge out.

C{makeService} is the public way to run MailLaser inside another Twisted
program or a C{.tac} file; C{twistd maillaser} calls it too.  The service it
returns is the SMTP front: the SMTP listeners, C{/health} and C{/metrics},
and the delivery worker, a child process it starts and supervises
(L{maillaser.worker}), which owns the spool and everything after it.

It owns the order of shutdown, which C{MultiService}'s fan-out cannot
express: stop accepting, let transactions in DATA finish, let the worker
finish its rounds in flight (both bounded by the grace period) and close
the spool, and only then stop answering C{/health}.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from maillaser.config import Config, describe
from maillaser.health import AttachmentResource, FrontMetrics, Health, make_site
from maillaser.logs import observer
from maillaser.smtp import MailLaserDeliveryFactory, MailLaserSMTPFactory, tls_context
from maillaser.spool import check_shared_spool, check_spool
from maillaser.webhook import LinkSigner
from maillaser.worker import ChildError, DeliveryWorker, PartNotFound, PartUnavailable


def makeService(config: Config, reactor: Any = None) -> MailLaserService:
    """
    Build the bridge described by C{config}.

    @param reactor: defaults to the global reactor, imported only here so
        that a caller (or a test) can supply its own.  It must be able to
        spawn processes (every POSIX reactor can): the delivery worker is a
        child process.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return MailLaserService(config, reactor)


_TAKE_A_BACKLOG = frozenset({"tcp", "tcp6", "ssl"})


def with_backlog(description: str, backlog: int) -> str:
    """
    C{description} with C{backlog=} added if it listens on a socket of its
    own and names none: Twisted's default of 50 makes a burst of connects
    wait for the client's SYN retries.  A C{systemd:} socket was set up by
    systemd (its C{Backlog=}); other endpoint types are left as they are.
    """
    kind = description.split(":", 1)[0].lower()
    if kind not in _TAKE_A_BACKLOG or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


class Listener(Service):
    """
    Listens on one endpoint; a bind failure at start-up is raised, not just
    logged, so C{twistd} exits non-zero instead of running deaf, and the
    port is kept for C{/health} (and for tests listening on port 0).
    """

    _log = Logger(observer=observer)

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
    """The running bridge: SMTP listeners, ``/health``, and the delivery worker."""

    _log = Logger(observer=observer)

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self._reactor = reactor
        self.worker = DeliveryWorker(config, reactor)
        self.metrics = FrontMetrics(
            smtp_connections=lambda: len(self.smtp_factory.sessions)
        )
        self.smtp_factory = MailLaserSMTPFactory(
            delivery_factory=MailLaserDeliveryFactory(
                sink=self.worker.sink,
                targets=config.target_emails,
                max_recipients=config.max_recipients,
                hostname=config.hostname,
                clock=reactor,
                domains=config.target_domains,
                spill_dir=_spill_dir(config),
            ),
            clock=reactor,
            hostname=config.hostname,
            max_message_size=config.max_message_size,
            timeout=config.smtp_timeout,
            tls_context=tls_context(config.tls_cert, config.tls_key, config.hostname),
            max_connections=config.max_connections,
            max_connections_per_ip=config.max_connections_per_ip,
            on_reply=self.metrics.smtp_reply,
            min_data_rate=config.min_data_rate,
            max_inflight_bytes=config.max_inflight_bytes,
            max_unknown_recipients=config.max_unknown_recipients,
            bare_newline=config.bare_newline,
        )
        self.smtp_listeners = [
            Listener(
                serverFromString(
                    reactor, with_backlog(description, config.smtp_backlog)
                ),
                self.smtp_factory,
                "SMTP",
            )
            for description in config.smtp_endpoints
        ]
        self.health_listener = Listener(
            serverFromString(reactor, config.health_endpoint),
            make_site(
                self.health,
                self.metrics.page,
                self.worker.metrics_text,
                clock=reactor,
                attachments=self._attachments(),
            ),
            "health",
        )
        self.worker.setServiceParent(self)
        for listener in [*self.smtp_listeners, self.health_listener]:
            listener.setServiceParent(self)
        self._started_at = reactor.seconds()
        self._checked = False
        self._stopping = False

    def _attachments(self) -> AttachmentResource:
        """Links are served where they are made (L{LinkSigner.for_config})."""
        return AttachmentResource(
            LinkSigner.for_config(self.config),
            self.worker.fetch_part,
            clock=self._reactor,
            not_found=(PartNotFound,),
            unavailable=(ChildError, PartUnavailable),
        )

    def privilegedStartService(self) -> None:
        """Check the spool before binding, so a broken spool stops start-up."""
        self._check()
        super().privilegedStartService()

    def startService(self) -> None:
        self._check()  # when composed, a parent may only call startService
        self._started_at = self._reactor.seconds()
        super().startService()

    def _check(self) -> None:
        """
        Once, before anything listens: log the configuration and check the
        spool here, where a failure can still stop start-up with one line.
        The worker opens it for real once it runs.
        """
        if self._checked:
            return
        self._checked = True
        self._log.info("starting MailLaser with {config}", config=describe(self.config))
        if self.config.delivery_mode == "queue" and self.config.spool_url:
            check_shared_spool(self.config.spool_url)
        elif self.config.delivery_mode == "queue":
            check_spool(self.config.spool_dir)

    def health(self) -> Health:
        problems: list[str] = []
        if self._stopping:
            problems.append("shutting down")
        if not all(listener.port is not None for listener in self.smtp_listeners):
            problems.append("SMTP listener is not listening")
        problems.extend(self.worker.problems())
        details: dict[str, object] = {}
        status = self.worker.status
        if status is not None:
            details["breaker"] = status.breaker
            if self.config.delivery_mode == "queue":
                details.update(spool_depth=status.pending, dead_letters=status.dead)
        details["uptime"] = round(self._reactor.seconds() - self._started_at, 3)
        return Health(tuple(problems), details)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self._stopping = True
        return Deferred.fromCoroutine(self._shut_down())

    async def _shut_down(self) -> None:
        """Stop accepting; drain SMTP; then the worker; then health."""
        grace = self.config.shutdown_grace
        self._log.info("shutting down; grace period {grace}s", grace=grace)
        for listener in self.smtp_listeners:
            await maybeDeferred(listener.stopService)
        await self.smtp_factory.drain(grace)
        pending = await self.worker.stopService()
        await maybeDeferred(self.health_listener.stopService)
        self._log.info(
            "clean shutdown; {pending} message(s) stay spooled for the next start",
            pending=pending,
        )


def _spill_dir(config: Config) -> str | None:
    """
    Where large messages wait during DATA: beside the SQLite spool, on the
    disk that will hold them anyway; the system's temporary directory in
    sync mode and with a shared spool, which have no spool directory.
    """
    if config.delivery_mode == "queue" and config.spool_url is None:
        return config.spool_dir
    return None


__all__ = ["Listener", "MailLaserService", "makeService", "with_backlog"]
