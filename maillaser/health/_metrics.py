"""
Prometheus metrics for one bridge (SPEC section 6), served at ``/metrics``.

Each service has its own C{CollectorRegistry}, never the global one:
C{makeService} keeps no global state, so two bridges in one process (or a
test suite's many) cannot collide.  Counters are moved by plain callables
that the stages are handed, so nothing but this module imports
C{prometheus_client}.  Gauges are read from the live objects when scraped,
so they cannot drift from what C{/health} reports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from maillaser.breaker import BreakerState, CircuitBreaker
from maillaser.interfaces import ISpool, IWebhookClient
from maillaser.smtp import SMTPServerFactory
from maillaser.webhook import WebhookResponse

NAMESPACE = "maillaser"

_Labelled = TypeVar("_Labelled", bound=MetricWrapperBase)

OUTCOMES = ("delivered", "retry", "dead", "rejected")
"""How a delivery round ends, as counted by C{maillaser_deliveries_total}."""

BREAKER_STATES = {
    BreakerState.closed: 0,
    BreakerState.half_open: 1,
    BreakerState.open: 2,
}

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
"""Seconds; up to the longest sane webhook timeout."""


class Observed(Protocol):
    """The parts of a running service that the gauges read at scrape time."""

    @property
    def spool(self) -> ISpool | None: ...

    @property
    def breaker(self) -> CircuitBreaker: ...

    @property
    def smtp_factory(self) -> SMTPServerFactory: ...


class Metrics:
    """One bridge's metrics and the hooks that move them."""

    def __init__(self, clock: IReactorTime, observed: Observed) -> None:
        self.registry = CollectorRegistry()
        self._clock = clock
        self._replies = _ByLabel(
            Counter(
                "smtp_replies",
                "SMTP replies that accept a message (250 at the end of DATA) or"
                " refuse (every 4xx and 5xx), by reply code.",
                ["code"],
                namespace=NAMESPACE,
                registry=self.registry,
            )
        )
        self._accepted = Counter(
            "messages_accepted",
            "Messages the SMTP client was told 250 for at the end of DATA.",
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self._deliveries = _ByLabel(
            Counter(
                "deliveries",
                "Delivery rounds by how they were settled: delivered; retry (a"
                " later round, or in sync mode the client's own retry after 451);"
                " dead (retry schedule over); rejected (a permanent HTTP 4xx).",
                ["outcome"],
                namespace=NAMESPACE,
                registry=self.registry,
            )
        )
        for outcome in OUTCOMES:
            self._deliveries(outcome)
        self._requests = _ByLabel(
            Counter(
                "webhook_requests",
                "Webhook HTTP requests by response status, or 'error' when no"
                " response arrived.",
                ["status"],
                namespace=NAMESPACE,
                registry=self.registry,
            )
        )
        self._latency = Histogram(
            "webhook_latency_seconds",
            "Duration of each webhook HTTP request, answered or not.",
            buckets=LATENCY_BUCKETS,
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.registry.register(_Gauges(observed))
        ProcessCollector(namespace=NAMESPACE, registry=self.registry)

    def smtp_reply(self, code: int) -> None:
        """Hook for the SMTP factory: a final reply was sent."""
        self._replies(str(code)).inc()
        if code == 250:
            self._accepted.inc()

    def settled(self, settlement: str) -> None:
        """Hook for the dispatcher and the sync sink: how a round was settled."""
        self._deliveries(settlement).inc()

    def timed(self, client: IWebhookClient) -> IWebhookClient:
        """C{client}, with each request counted and timed on the injected clock."""
        return _TimedClient(client, self._clock, self._requested)

    def _requested(self, status: str, seconds: float) -> None:
        self._requests(status).inc()
        self._latency.observe(seconds)


class _ByLabel(Generic[_Labelled]):
    """
    A metric with one label, each child looked up once: C{labels()}
    validates and takes a lock on every call, which was most of the cost of
    counting a message.  The values (reply codes, outcomes, HTTP statuses)
    are few, so the cache stays small.
    """

    def __init__(self, metric: _Labelled) -> None:
        self._metric = metric
        self._children: dict[str, _Labelled] = {}

    def __call__(self, value: str) -> _Labelled:
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = self._metric.labels(value)
        return child


class _Gauges:
    """A collector reading the service's state, on the reactor thread."""

    def __init__(self, observed: Observed) -> None:
        self._observed = observed

    def collect(self) -> Iterable[Metric]:
        observed = self._observed
        yield _gauge(
            "smtp_connections",
            "Open SMTP sessions.",
            len(observed.smtp_factory.sessions),
        )
        yield _gauge(
            "circuit_breaker_state",
            "Circuit breaker in front of the webhook: 0 closed, 1 half-open, 2 open.",
            BREAKER_STATES[observed.breaker.state],
        )
        if observed.spool is not None:  # none in sync mode
            stats = observed.spool.stats()
            messages = GaugeMetricFamily(
                f"{NAMESPACE}_spool_messages",
                "Messages in the spool: pending delivery, or dead letters.",
                labels=["state"],
            )
            messages.add_metric(["pending"], stats.pending)
            messages.add_metric(["dead"], stats.dead)
            yield messages
            yield _gauge(
                "spool_bytes", "Size of the pending messages, in bytes.", stats.bytes
            )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{NAMESPACE}_{name}", documentation, value=value)


@implementer(IWebhookClient)
class _TimedClient:
    def __init__(
        self,
        client: IWebhookClient,
        clock: IReactorTime,
        record: Callable[[str, float], None],
    ) -> None:
        self._client = client
        self._clock = clock
        self._record = record

    def post(
        self, body: bytes, headers: dict[bytes, bytes]
    ) -> Deferred[WebhookResponse]:
        started = self._clock.seconds()
        return self._client.post(body, headers).addCallbacks(
            self._answered,
            self._failed,
            callbackArgs=(started,),
            errbackArgs=(started,),
        )

    def _answered(self, response: WebhookResponse, started: float) -> WebhookResponse:
        self._record(str(response.status), self._clock.seconds() - started)
        return response

    def _failed(self, failure: Failure, started: float) -> Failure:
        self._record("error", self._clock.seconds() - started)
        return failure


__all__ = ["Metrics", "Observed"]
