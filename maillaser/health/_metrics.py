"""
Prometheus metrics (SPEC section 6): one registry in each process.

The SMTP front counts replies and connections (L{FrontMetrics}); the
delivery worker counts deliveries and webhook requests and reads the spool
and the breaker (L{DeliveryMetrics}).  ``/metrics`` is the front's page
with the worker's text in it, fetched at scrape time.

Each bridge has its own C{CollectorRegistry}s, never the global one:
C{makeService} keeps no global state, so two bridges in one process (or a
test suite's many) cannot collide.  Counters are moved by plain callables
that the stages are handed, so nothing but this module imports
C{prometheus_client}.  Gauges are read from the live objects when scraped,
so they cannot drift from what C{/health} reports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from maillaser.interfaces import IWebhookPoster
from maillaser.message import SpoolStats, WebhookResponse

if TYPE_CHECKING:
    from maillaser.webhook import BreakerState

NAMESPACE = "maillaser"
WORKER_PROCESS_NAMESPACE = f"{NAMESPACE}_worker"
"""The worker's C{process_*} metrics are C{maillaser_worker_process_*}."""

OUTCOMES = ("delivered", "retry", "dead", "rejected")
"""How a delivery round ends, as counted by C{maillaser_deliveries_total}."""

BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}
"""C{BreakerState} values, as C{maillaser_circuit_breaker_state} shows them."""

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
"""Seconds; up to the longest sane webhook timeout."""

_WORKER_UP = (
    b"# HELP maillaser_worker_up Whether this scrape read the delivery worker's"
    b" metrics: 1 yes, 0 no (not answering, or not started).\n"
    b"# TYPE maillaser_worker_up gauge\n"
    b"maillaser_worker_up %d\n"
)

_Labelled = TypeVar("_Labelled", bound=MetricWrapperBase)


class FrontMetrics:
    """The SMTP front's metrics, and the hook that moves them."""

    def __init__(self, *, smtp_connections: Callable[[], int]) -> None:
        """
        @param smtp_connections: the number of open SMTP sessions, read at
            each scrape.
        """
        self.registry = CollectorRegistry()
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
        self.registry.register(_Gauges(lambda: _front_gauges(smtp_connections())))
        ProcessCollector(namespace=NAMESPACE, registry=self.registry)

    def smtp_reply(self, code: int) -> None:
        """Hook for the SMTP factory: a final reply was sent."""
        self._replies(str(code)).inc()
        if code == 250:
            self._accepted.inc()

    def text(self) -> bytes:
        """The front's own metrics, in the Prometheus text format."""
        return bytes(generate_latest(self.registry))

    def page(self, worker: bytes | None) -> bytes:
        """
        The whole ``/metrics`` page: the front's metrics, the worker's
        C{worker} text if there is one, and C{maillaser_worker_up}.
        """
        up = worker is not None
        return b"".join([self.text(), worker or b"", _WORKER_UP % up])


class DeliveryMetrics:
    """The delivery worker's metrics, and the hooks that move them."""

    def __init__(
        self,
        *,
        clock: IReactorTime,
        breaker_state: Callable[[], BreakerState | str],
        spool_stats: Callable[[], SpoolStats | None],
    ) -> None:
        """
        @param clock: what webhook requests are timed on.
        @param breaker_state: the circuit breaker's state, read at each
            scrape: a C{BreakerState} or its value.
        @param spool_stats: the spool's counts, read at each scrape; C{None}
            when there is no spool (sync mode).
        """
        self.registry = CollectorRegistry()
        self._clock = clock
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
        self.registry.register(
            _Gauges(lambda: _delivery_gauges(breaker_state(), spool_stats()))
        )
        ProcessCollector(namespace=WORKER_PROCESS_NAMESPACE, registry=self.registry)

    def settled(self, outcome: str) -> None:
        """Hook for the dispatcher and sync deliveries: how a round was settled."""
        self._deliveries(outcome).inc()

    def timed(self, poster: IWebhookPoster) -> IWebhookPoster:
        """C{poster}, with each request counted and timed on the clock."""
        return _TimedPoster(poster, self._clock, self._requested)

    def text(self) -> bytes:
        """The worker's metrics, in the Prometheus text format."""
        return bytes(generate_latest(self.registry))

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
    """A collector of gauges read at scrape time, on the reactor thread."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        return self._read()


def _front_gauges(connections: int) -> list[Metric]:
    return [_gauge("smtp_connections", "Open SMTP sessions.", connections)]


def _delivery_gauges(
    breaker: BreakerState | str, stats: SpoolStats | None
) -> list[Metric]:
    state = breaker if isinstance(breaker, str) else breaker.value
    gauges: list[Metric] = [
        _gauge(
            "circuit_breaker_state",
            "Circuit breaker in front of the webhook: 0 closed, 1 half-open, 2 open.",
            BREAKER_STATES[state],
        )
    ]
    if stats is not None:
        messages = GaugeMetricFamily(
            f"{NAMESPACE}_spool_messages",
            "Messages in the spool: pending delivery, or dead letters.",
            labels=["state"],
        )
        messages.add_metric(["pending"], stats.pending)
        messages.add_metric(["dead"], stats.dead)
        gauges += [
            messages,
            _gauge(
                "spool_bytes", "Size of the pending messages, in bytes.", stats.bytes
            ),
            _gauge(
                "spool_retained_messages",
                "Delivered messages kept until their attachment links expire.",
                stats.retained,
            ),
            _gauge(
                "spool_retained_bytes",
                "Size of the messages kept for their links, in bytes.",
                stats.retained_bytes,
            ),
        ]
    return gauges


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{NAMESPACE}_{name}", documentation, value=value)


@implementer(IWebhookPoster)
class _TimedPoster:
    def __init__(
        self,
        poster: IWebhookPoster,
        clock: IReactorTime,
        record: Callable[[str, float], None],
    ) -> None:
        self._poster = poster
        self._clock = clock
        self._record = record

    def post(
        self, body: bytes, headers: dict[bytes, bytes]
    ) -> Deferred[WebhookResponse]:
        started = self._clock.seconds()
        return self._poster.post(body, headers).addCallbacks(
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


__all__ = [
    "BREAKER_STATES",
    "LATENCY_BUCKETS",
    "NAMESPACE",
    "OUTCOMES",
    "DeliveryMetrics",
    "FrontMetrics",
]
