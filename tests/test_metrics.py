"""
The metrics of the SMTP front (L{FrontMetrics}) and of the delivery worker
(L{DeliveryMetrics}): names and labels as Prometheus scrapes them, the
hooks that move them, and one ``/metrics`` page made of both.

How the numbers move as a real bridge accepts, refuses, delivers, retries
and buries mail is tested with the whole bridge.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from maillaser.health import DeliveryMetrics, FrontMetrics
from maillaser.interfaces import IWebhookPoster
from maillaser.message import SpoolStats, WebhookResponse
from maillaser.webhook import BreakerState

Samples = dict[str, float]

COUNTERS = (
    "maillaser_smtp_replies_total",
    "maillaser_messages_accepted_total",
    "maillaser_deliveries_total",
    "maillaser_webhook_requests_total",
    "maillaser_webhook_latency_seconds_count",
    "maillaser_webhook_latency_seconds_sum",
)
GAUGES = (
    "maillaser_smtp_connections",
    "maillaser_circuit_breaker_state",
    "maillaser_spool_messages",
    "maillaser_spool_bytes",
    "maillaser_worker_up",
)


def samples(text: bytes, *names: str) -> Samples:
    """The samples named, as C{name{label="value"}} strings, for exact comparison."""
    return {
        sample.name
        + "".join(f'{{{k}="{v}"}}' for k, v in sorted(sample.labels.items())): (
            sample.value
        )
        for family in text_string_to_metric_families(text.decode("utf-8"))
        for sample in family.samples
        if sample.name in names
    }


def families(text: bytes) -> list[str]:
    return [
        family.name for family in text_string_to_metric_families(text.decode("utf-8"))
    ]


def outcomes(
    delivered: int = 0, retry: int = 0, dead: int = 0, rejected: int = 0
) -> Samples:
    return {
        'maillaser_deliveries_total{outcome="delivered"}': delivered,
        'maillaser_deliveries_total{outcome="retry"}': retry,
        'maillaser_deliveries_total{outcome="dead"}': dead,
        'maillaser_deliveries_total{outcome="rejected"}': rejected,
    }


@implementer(IWebhookPoster)
class _Poster:
    """Answers each request with the next scripted Deferred."""

    def __init__(self, *answers: Deferred[WebhookResponse]) -> None:
        self.answers = list(answers)

    def post(
        self, body: bytes, headers: dict[bytes, bytes]
    ) -> Deferred[WebhookResponse]:
        return self.answers.pop(0)


def response(status: int) -> WebhookResponse:
    return WebhookResponse(status=status, retry_after=None, reason="")


class FrontMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.connections = 0
        self.metrics = FrontMetrics(smtp_connections=lambda: self.connections)

    def test_replies(self) -> None:
        """Every reply counted by code; a 250 is an accepted message too."""
        for code in (250, 550, 250, 451, 421):
            self.metrics.smtp_reply(code)
        self.assertEqual(
            samples(self.metrics.text(), *COUNTERS),
            {
                'maillaser_smtp_replies_total{code="250"}': 2,
                'maillaser_smtp_replies_total{code="550"}': 1,
                'maillaser_smtp_replies_total{code="451"}': 1,
                'maillaser_smtp_replies_total{code="421"}': 1,
                "maillaser_messages_accepted_total": 2,
            },
        )

    def test_fresh(self) -> None:
        self.assertEqual(
            samples(self.metrics.text(), *COUNTERS, *GAUGES),
            {"maillaser_messages_accepted_total": 0, "maillaser_smtp_connections": 0},
        )

    def test_connections_read_when_scraped(self) -> None:
        self.connections = 7
        self.assertEqual(
            samples(self.metrics.text(), "maillaser_smtp_connections"),
            {"maillaser_smtp_connections": 7},
        )

    def test_process(self) -> None:
        """The front's process is C{maillaser_process_*}."""
        names = families(self.metrics.text())
        self.assertIn("maillaser_process_start_time_seconds", names)
        self.assertFalse([name for name in names if "worker" in name], names)

    def test_page_with_the_worker(self) -> None:
        worker = DeliveryMetrics(
            clock=Clock(),
            breaker_state=lambda: BreakerState.closed,
            spool_stats=lambda: None,
        )
        worker.settled("delivered")
        page = self.metrics.page(worker.text())
        self.assertEqual(
            samples(page, "maillaser_deliveries_total", "maillaser_worker_up"),
            {**outcomes(delivered=1), "maillaser_worker_up": 1},
        )
        self.assertTrue(page.startswith(self.metrics.text().split(b"\n", 1)[0]))

    def test_page_without_the_worker(self) -> None:
        self.metrics.smtp_reply(250)
        page = self.metrics.page(None)
        self.assertEqual(
            samples(page, "maillaser_messages_accepted_total", "maillaser_worker_up"),
            {"maillaser_messages_accepted_total": 1, "maillaser_worker_up": 0},
        )
        self.assertNotIn(b"maillaser_deliveries_total", page)

    def test_own_registry(self) -> None:
        """Two bridges in one process do not share (or clash over) metrics."""
        other = FrontMetrics(smtp_connections=lambda: 0)
        self.metrics.smtp_reply(250)
        accepted = "maillaser_messages_accepted_total"
        self.assertEqual(
            [samples(each.text(), accepted) for each in (self.metrics, other)],
            [{accepted: 1}, {accepted: 0}],
        )


class DeliveryMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.breaker: BreakerState | str = BreakerState.closed
        self.stats: SpoolStats | None = SpoolStats(pending=0, dead=0, bytes=0)
        self.metrics = DeliveryMetrics(
            clock=self.clock,
            breaker_state=lambda: self.breaker,
            spool_stats=lambda: self.stats,
        )

    def test_fresh(self) -> None:
        """Every outcome is there from the start, at 0."""
        self.assertEqual(
            samples(self.metrics.text(), *COUNTERS, *GAUGES),
            {
                **outcomes(),
                "maillaser_webhook_latency_seconds_count": 0,
                "maillaser_webhook_latency_seconds_sum": 0,
                "maillaser_circuit_breaker_state": 0,
                'maillaser_spool_messages{state="pending"}': 0,
                'maillaser_spool_messages{state="dead"}': 0,
                "maillaser_spool_bytes": 0,
            },
        )

    def test_settled(self) -> None:
        for outcome in ("delivered", "retry", "retry", "dead", "rejected", "retry"):
            self.metrics.settled(outcome)
        self.assertEqual(
            samples(self.metrics.text(), "maillaser_deliveries_total"),
            outcomes(delivered=1, retry=3, dead=1, rejected=1),
        )

    def test_timed(self) -> None:
        """Each request counted by status, or C{error}, and timed on the clock."""
        slow: Deferred[WebhookResponse] = Deferred()
        poster = self.metrics.timed(
            _Poster(succeed(response(200)), slow, fail(ConnectionRefusedError()))
        )
        self.assertTrue(verifyObject(IWebhookPoster, poster))
        answered = self.successResultOf(poster.post(b"{}", {}))
        pending = poster.post(b"{}", {})
        self.clock.advance(0.75)
        slow.callback(response(422))
        self.assertEqual(
            (answered, self.successResultOf(pending)), (response(200), response(422))
        )
        self.failureResultOf(poster.post(b"{}", {}), ConnectionRefusedError)
        self.assertEqual(
            samples(
                self.metrics.text(),
                "maillaser_webhook_requests_total",
                "maillaser_webhook_latency_seconds_count",
                "maillaser_webhook_latency_seconds_sum",
                "maillaser_webhook_latency_seconds_bucket",
            ),
            {
                'maillaser_webhook_requests_total{status="200"}': 1,
                'maillaser_webhook_requests_total{status="422"}': 1,
                'maillaser_webhook_requests_total{status="error"}': 1,
                "maillaser_webhook_latency_seconds_count": 3,
                "maillaser_webhook_latency_seconds_sum": 0.75,
                **{
                    f'maillaser_webhook_latency_seconds_bucket{{le="{le}"}}': count
                    for le, count in [
                        ("0.005", 2),
                        ("0.01", 2),
                        ("0.025", 2),
                        ("0.05", 2),
                        ("0.1", 2),
                        ("0.25", 2),
                        ("0.5", 2),
                        ("1.0", 3),
                        ("2.5", 3),
                        ("5.0", 3),
                        ("10.0", 3),
                        ("30.0", 3),
                        ("60.0", 3),
                        ("+Inf", 3),
                    ]
                },
            },
        )

    def test_breaker(self) -> None:
        """Read when scraped, as the enum or its value."""
        cases: list[tuple[BreakerState | str, int]] = [
            (BreakerState.closed, 0),
            (BreakerState.half_open, 1),
            (BreakerState.open, 2),
            ("closed", 0),
            ("half-open", 1),
            ("open", 2),
        ]
        for state, value in cases:
            self.breaker = state
            self.assertEqual(
                samples(self.metrics.text(), "maillaser_circuit_breaker_state"),
                {"maillaser_circuit_breaker_state": value},
            )

    def test_spool(self) -> None:
        self.stats = SpoolStats(pending=3, dead=2, bytes=4096)
        self.assertEqual(
            samples(
                self.metrics.text(), "maillaser_spool_messages", "maillaser_spool_bytes"
            ),
            {
                'maillaser_spool_messages{state="pending"}': 3,
                'maillaser_spool_messages{state="dead"}': 2,
                "maillaser_spool_bytes": 4096,
            },
        )

    def test_no_spool(self) -> None:
        """Sync mode has no spool, and no spool gauges."""
        self.stats = None
        names = families(self.metrics.text())
        self.assertEqual(
            [name for name in names if "spool" in name],
            [],
        )
        self.assertIn("maillaser_circuit_breaker_state", names)

    def test_process(self) -> None:
        """The worker's process is C{maillaser_worker_process_*}."""
        names = families(self.metrics.text())
        self.assertIn("maillaser_worker_process_start_time_seconds", names)
        self.assertNotIn("maillaser_process_start_time_seconds", names)

    def test_one_page_with_the_front(self) -> None:
        """
        The front's page with the worker's text in it: every family once,
        so that Prometheus reads it whole.
        """
        front = FrontMetrics(smtp_connections=lambda: 2)
        page = front.page(self.metrics.text())
        names = families(page)
        self.assertEqual(sorted(names), sorted(set(names)))
        for name in (
            "maillaser_smtp_replies",
            "maillaser_messages_accepted",
            "maillaser_smtp_connections",
            "maillaser_process_start_time_seconds",
            "maillaser_deliveries",
            "maillaser_webhook_requests",
            "maillaser_webhook_latency_seconds",
            "maillaser_circuit_breaker_state",
            "maillaser_spool_messages",
            "maillaser_spool_bytes",
            "maillaser_worker_process_start_time_seconds",
            "maillaser_worker_up",
        ):
            self.assertIn(name, names)
