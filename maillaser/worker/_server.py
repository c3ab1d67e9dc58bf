"""
The delivery worker's end: the AMP responder, and the delivery stack it
builds from the configuration the front sends in L{Hello}.

The worker's reactor does delivery work only: spool commits (grouped per
turn), the dispatcher's rounds, the webhook's requests, and the payloads
that are cheap to build.  Each answer it owes the front is bounded by the
front's deadline, so nothing here may block: what could (a message that
takes long to parse) goes to a payload process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

import maillaser
from maillaser.config import Config
from maillaser.health import DeliveryMetrics
from maillaser.interfaces import IBreakerStore, ISpool, IWebhookPoster
from maillaser.logs import observer
from maillaser.message import Message
from maillaser.spool import (
    Dispatcher,
    RetentionSweep,
    open_shared_spool,
    open_spool,
)
from maillaser.timers import cancel_timer
from maillaser.webhook import (
    CircuitBreaker,
    Deliverer,
    Failed,
    LinkSigner,
    Outcome,
    PartOptions,
    SharedBreaker,
    WebhookPoster,
    settlement,
    webhook_key,
)
from maillaser.worker._child import ChildError
from maillaser.worker._commands import (
    PROTOCOL_VERSION,
    Deliver,
    FetchPart,
    Hello,
    Metrics,
    PartNotFound,
    PartUnavailable,
    Reply,
    StartFailed,
    Status,
    Stop,
    Store,
    VersionMismatch,
)
from maillaser.worker._main import payload_program
from maillaser.worker._payloads import PayloadBuilder
from maillaser.worker._stdio import ChildProtocol

Answer = dict[str, Any]


_OK = Reply(250, "2.0.0", "Ok")
_SHUTTING_DOWN = Reply(451, "4.3.0", "Shutting down, try again later")
_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
_NOT_STORED = Reply(451, "4.3.0", "Could not store the message, try again later")


def _reply_for(outcome: Outcome) -> Reply:
    """What a sync-mode round earns the SMTP client (SPEC section 5)."""
    if not isinstance(outcome, Failed):
        return _OK
    if outcome.permanent:
        status = outcome.attempts[-1].status
        reason = outcome.reason or f"Rejected by the webhook (HTTP {status})"
        return Reply(550, "5.6.0", reason)
    return Reply(451, "4.4.1", "Webhook temporarily unavailable, try again later")


@attrs.define(eq=False)
class DeliveryStack:
    """
    What the worker runs: the spool and its dispatcher (queue mode only),
    the deliverer with its poster, breaker and payload builder, and the
    metrics that watch them.  L{build_stack} makes one from a L{Config};
    tests L{assemble} one around doubles.
    """

    config: Config
    clock: IReactorTime
    breaker: CircuitBreaker
    metrics: DeliveryMetrics
    deliverer: Deliverer
    payloads: PayloadBuilder
    spool: ISpool | None = None
    dispatcher: Dispatcher | None = None
    sweep: RetentionSweep | None = None
    closing: Sequence[Callable[[], Deferred[None]]] = ()
    _rounds: set[Deferred[Outcome]] = attrs.field(factory=set)
    """Sync-mode rounds in flight."""
    _stopped: Deferred[int] | None = None
    _log = Logger(observer=observer)

    @classmethod
    def assemble(
        cls,
        config: Config,
        clock: IReactorTime,
        *,
        spool: ISpool | None,
        poster: IWebhookPoster,
        payloads: PayloadBuilder,
        closing: Sequence[Callable[[], Deferred[None]]] = (),
    ) -> DeliveryStack:
        """
        The breaker, metrics, deliverer and dispatcher (if there is a
        spool) around the parts given, wired as C{config} says.

        @param closing: what to close once delivery is over (the poster's
            connections).
        """
        breaker = CircuitBreaker(
            config.circuit_breaker_threshold, config.circuit_breaker_reset, clock
        )
        if IBreakerStore.providedBy(spool):
            # Bridges sharing the spool share the webhook's breaker too.
            breaker.shared = SharedBreaker(spool, webhook_key(config.webhook_url))
        metrics = DeliveryMetrics(
            clock=clock,
            breaker_state=lambda: breaker.state,
            spool_stats=lambda: None if spool is None else spool.stats(),
        )
        deliverer = Deliverer(
            poster=metrics.timed(poster),
            payloads=payloads,
            clock=clock,
            breaker=breaker,
            max_retries=config.webhook_max_retries,
            secrets=config.webhook_secrets,
            maillaser3_signature=config.webhook_maillaser3_signature,
        )
        dispatcher = sweep = None
        if spool is not None:
            sweep = RetentionSweep(spool, clock)
            dispatcher = Dispatcher(
                spool=spool,
                deliverer=deliverer,
                breaker=breaker,
                clock=clock,
                concurrency=config.delivery_concurrency,
                schedule=config.retry_schedule,
                grace=config.shutdown_grace,
                on_settled=metrics.settled,
            )
        return cls(
            config=config,
            clock=clock,
            breaker=breaker,
            metrics=metrics,
            deliverer=deliverer,
            payloads=payloads,
            spool=spool,
            dispatcher=dispatcher,
            sweep=sweep,
            closing=closing,
        )

    def start(self) -> None:
        shared = self.breaker.shared
        if self.dispatcher is not None:
            self.dispatcher.startService()
            if self.spool is not None:
                self.spool.watch(self.dispatcher.wake)
            if shared is not None:
                shared.wake = self.dispatcher.wake
        if shared is not None:
            shared.start(self.breaker)
        if self.sweep is not None:
            self.sweep.start()

    async def fetch_part(self, message_id: str, index: str) -> Answer:
        """
        A part for a link the front checked: from a message kept for its
        links, or still spooled; L{PartNotFound} if neither (or no spool).
        """
        if self.spool is None or self._stopped is not None:
            raise PartNotFound(message_id)
        raw = await self.spool.retained_raw(message_id, self.clock.seconds())
        if raw is None:
            raise PartNotFound(message_id)
        try:
            answer: Answer = await self.payloads.part(raw, index)
        except ChildError as error:
            raise PartUnavailable(str(error)) from error
        return answer

    async def store(self, messages: Sequence[Message]) -> Answer:
        """
        Queue mode: commit (the messages of one request share a commit),
        then let the dispatcher deliver them.
        """
        spool, dispatcher = self.spool, self.dispatcher
        if spool is None or dispatcher is None:  # a front in sync mode: a bug
            raise amp.RemoteAmpError(b"NOT_QUEUE_MODE", "Store in sync mode")
        stored = [self._store(spool, message) for message in messages]
        replies = await gatherResults(stored)
        for message, reply in zip(messages, replies, strict=True):
            if reply is _OK:
                dispatcher.offer(message)
        stats = spool.stats()
        return {"replies": replies, "spool": (stats.pending, stats.bytes)}

    def _store(self, spool: ISpool, message: Message) -> Deferred[Reply]:
        if self._stopped is not None:
            return succeed(_SHUTTING_DOWN)
        stats, config = spool.stats(), self.config
        if stats.pending >= config.spool_max_messages or (
            stats.bytes >= config.spool_max_bytes
        ):
            return succeed(_FULL)
        return spool.add(message).addCallbacks(
            lambda _: _OK, self._not_stored, errbackArgs=(message,)
        )

    def _not_stored(self, failure: Failure, message: Message) -> Reply:
        self._log.error(
            "could not store {message_id}: {error}",
            message_id=message.id,
            error=failure.getErrorMessage(),
        )
        return _NOT_STORED

    async def deliver(self, message: Message) -> Answer:
        """Sync mode: one round now, answered with the reply it earns."""
        if self._stopped is not None:
            reply = _SHUTTING_DOWN
        elif not self.breaker.acquire():
            reply = Reply(451, "4.4.1", "Webhook unavailable, try again later")
        else:
            round_ = self.deliverer.deliver(message)
            self._rounds.add(round_)
            try:
                outcome = await round_
            except CancelledError:  # stopped past the grace period
                reply = _SHUTTING_DOWN
            else:
                self.metrics.settled(settlement(outcome))
                reply = _reply_for(outcome)
            finally:
                self._rounds.discard(round_)
        return {"reply": reply, "breaker": self.breaker.state.value}

    def status(self) -> Answer:
        spool = self.spool
        stats = None if spool is None else spool.stats()
        writable = spool is None or spool.writable()
        return {
            "breaker": self.breaker.state.value,
            "pending": 0 if stats is None else stats.pending,
            "dead": 0 if stats is None else stats.dead,
            "bytes": 0 if stats is None else stats.bytes,
            "writable": writable,
            "problems": [] if spool is None or writable else [_problem(spool)],
        }

    def stop(self, grace: float) -> Deferred[int]:
        """
        Rounds in flight get C{grace} seconds, then are cancelled (their
        messages stay spooled); then everything is closed.  Fires with the
        messages left spooled.
        """
        if self._stopped is None:
            self._stopped = Deferred.fromCoroutine(self._stop(grace))
        return self._stopped

    async def _stop(self, grace: float) -> int:
        if self.breaker.shared is not None:
            self.breaker.shared.stop()
        if self.sweep is not None:
            self.sweep.stop()
        if self.dispatcher is not None:
            self.dispatcher.grace = grace
            await self.dispatcher.stopService()
        if self._rounds:
            rounds = list(self._rounds)
            timer = self.clock.callLater(grace, _cancel_all, rounds)
            await DeferredList(rounds, consumeErrors=True).addBoth(cancel_timer, timer)
        await self.payloads.stop(self.config.payload_timeout)
        for close in self.closing:
            await close()
        if self.spool is None:
            return 0
        await self.spool.close()
        return self.spool.stats().pending


def _problem(spool: ISpool) -> str:
    return spool.problem() or "spool is not writable"


def _cancel_all(pending: list[Deferred[Outcome]]) -> None:
    for d in pending:
        d.cancel()


def build_stack(config: Config, reactor: Any) -> DeliveryStack:
    """
    The worker's parts, as C{config} says.  The spool is opened (and
    checked) here, so a spool that cannot be used fails L{Hello}.
    """
    spool: ISpool | None = None
    if config.delivery_mode == "queue" and config.spool_url:
        spool = open_shared_spool(config.spool_url, reactor, config.spool_lease)
    elif config.delivery_mode == "queue":
        spool = open_spool(config.spool_dir, reactor)
    poster = WebhookPoster(
        config.webhook_url,
        reactor=reactor,
        concurrency=config.delivery_concurrency,
        timeout=config.webhook_timeout,
        ca_file=config.webhook_ca_file,
    )
    payloads = PayloadBuilder(
        reactor,
        config.header_prefixes,
        config.payload_timeout,
        payload_program(config.log_level),
        header_list=config.payload_headers == "all",
        parts=part_options(config),
        link_ttl=config.attachment_link_ttl,
    )
    return DeliveryStack.assemble(
        config,
        reactor,
        spool=spool,
        poster=poster,
        payloads=payloads,
        closing=[poster.close],
    )


def part_options(config: Config) -> PartOptions:
    """What attachments carry, as C{config} says."""
    return PartOptions(
        mode=config.attachments,
        inline_max=config.attachment_inline_max,
        include_raw=config.include_raw,
        max_body=config.webhook_max_body,
        links=LinkSigner.for_config(config),
    )


class WorkerProtocol(ChildProtocol):
    """
    The worker's answers to the front.  Nothing but L{Hello} is answered
    before L{Hello}, which builds the L{DeliveryStack}.
    """

    _log = Logger(observer=observer)

    def __init__(
        self,
        reactor: Any,
        *,
        version: str = maillaser.__version__,
        build: Callable[[Config, Any], DeliveryStack] = build_stack,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._version = version
        self._build = build
        self.stack: DeliveryStack | None = None

    @Hello.responder
    def hello(self, version: str, protocol: int, config: bytes) -> Answer:
        if (version, protocol) != (self._version, PROTOCOL_VERSION):
            raise VersionMismatch(
                f"the front runs MailLaser {version} (protocol {protocol}),"
                f" this worker {self._version} (protocol {PROTOCOL_VERSION})"
            )
        if self.stack is None:
            settings = Config.from_json(config)
            try:
                self.stack = self._build(settings, self._reactor)
            except Exception as error:
                self._log.failure("could not start the delivery worker")
                raise StartFailed(str(error)) from error
            self.stack.start()
            self._log.info(
                "delivery worker started in {mode} mode",
                mode=settings.delivery_mode,
            )
        return {"version": self._version, "pid": os.getpid()}

    def _started(self) -> DeliveryStack:
        if self.stack is None:
            raise amp.RemoteAmpError(b"NOT_STARTED", "Hello comes first")
        return self.stack

    @Store.responder
    def store(self, messages: list[Message]) -> Deferred[Answer]:
        return Deferred.fromCoroutine(self._started().store(messages))

    @Deliver.responder
    def deliver(self, message: Message) -> Deferred[Answer]:
        return Deferred.fromCoroutine(self._started().deliver(message))

    @Status.responder
    def status(self) -> Answer:
        return self._started().status()

    @Metrics.responder
    def metrics(self) -> Answer:
        return {"text": self._started().metrics.text()}

    @FetchPart.responder
    def fetch_part(self, message_id: str, index: str) -> Deferred[Answer]:
        return Deferred.fromCoroutine(self._started().fetch_part(message_id, index))

    @Stop.responder
    def stop(self, grace: float) -> Deferred[Answer]:
        stopped = self._started().stop(grace)
        return stopped.addCallback(lambda pending: {"pending": pending})

    def closed(self) -> Deferred[int] | None:
        """
        The front is gone or done: close the spool now, not after a grace
        period, since a new worker may already be opening it.
        """
        return None if self.stack is None else maybeDeferred(self.stack.stop, 0.0)


__all__ = ["DeliveryStack", "WorkerProtocol", "build_stack", "part_options"]
