"""
The health endpoint: only ``/health`` and ``/metrics`` exist, exactly there,
for GET and HEAD; ``/health`` says why it is not ready; ``/metrics`` waits
for the delivery worker's part within a deadline and never longer.

Over a real HTTP connection on loopback for paths and methods; with
C{treq.testing.StubTreq} and a L{Clock} for timing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import treq
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from maillaser.health import (
    METRICS_TIMEOUT,
    FrontMetrics,
    Health,
    QuietSite,
    make_site,
)

URL = "http://health.test"
WORKER_TEXT = (
    b"# HELP maillaser_deliveries_total Delivery rounds.\n"
    b"# TYPE maillaser_deliveries_total counter\n"
    b'maillaser_deliveries_total{outcome="delivered"} 4.0\n'
)


def ready() -> Health:
    return Health((), {"breaker": "closed", "spool_depth": 0})


def page(worker: bytes | None) -> bytes:
    """Stands in for C{FrontMetrics.page}: says what it was given."""
    return b"front and " + (b"no worker" if worker is None else worker)


class PathAndMethodTests(TestCase):
    """Over a real connection, as a probe or Prometheus would come."""

    async def url(self) -> str:
        site = make_site(
            ready,
            FrontMetrics(smtp_connections=lambda: 0).page,
            lambda: succeed(WORKER_TEXT),
            clock=reactor,
        )
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    async def status(self, method: str, url: str) -> tuple[int, list[str] | None]:
        response = await treq.request(method, url, persistent=False)
        await response.content()
        return response.code, response.headers.getRawHeaders("allow")

    async def test_only_the_exact_paths(self) -> None:
        url = await self.url()
        self.assertEqual(await self.status("GET", url + "/health"), (200, None))
        self.assertEqual(await self.status("GET", url + "/metrics"), (200, None))
        for path in ("/health/x", "/health/", "/metrics/x", "/healthcheck", "/"):
            self.assertEqual(await self.status("GET", url + path), (404, None), path)
            self.assertEqual(await self.status("HEAD", url + path), (404, None), path)

    async def test_methods_other_than_get_and_head(self) -> None:
        """
        Upstream answers any method with 200; these resources are read-only,
        so other methods are told which ones they allow.
        """
        url = await self.url()
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            for path in ("/health", "/metrics"):
                self.assertEqual(
                    await self.status(method, url + path), (405, ["GET, HEAD"])
                )
        self.assertEqual(await self.status("POST", url + "/wrong"), (404, None))

    async def test_metrics_page(self) -> None:
        """The front's metrics and the worker's, in one page."""
        url = await self.url()
        response = await treq.get(url + "/metrics", persistent=False)
        text = (await response.content()).decode("utf-8")
        names = [family.name for family in text_string_to_metric_families(text)]
        self.assertEqual(
            (
                response.headers.getRawHeaders("content-type"),
                "maillaser_smtp_replies" in names,
                "maillaser_deliveries" in names,
                names[-1],
            ),
            ([CONTENT_TYPE_LATEST], True, True, "maillaser_worker_up"),
        )


class _Site:
    """A site on a L{Clock}, driven in memory."""

    def __init__(
        self,
        health: Callable[[], Health] = ready,
        page: Callable[[bytes | None], bytes] = page,
        worker: Callable[[], Deferred[bytes]] = lambda: succeed(b"worker"),
    ) -> None:
        self.clock = Clock()
        self.site = make_site(health, page, worker, clock=self.clock)
        # Any: StubTreq makes its methods at run time.
        self.treq: Any = StubTreq(self.site.resource)

    def get(self, path: str, method: str = "GET") -> Any:
        """A Deferred firing with treq's response."""
        return self.treq.request(method, URL + path)


class HealthTests(SynchronousTestCase):
    def response(
        self, health: Health, method: str = "GET"
    ) -> tuple[int, dict[str, list[str]], bytes]:
        site = _Site(health=lambda: health)
        response = self.successResultOf(site.get("/health", method))
        body = self.successResultOf(site.treq.content(response))
        headers = {
            name: response.headers.getRawHeaders(name)
            for name in ("content-type", "cache-control")
        }
        return response.code, headers, body

    def test_ready(self) -> None:
        code, headers, body = self.response(ready())
        self.assertEqual(
            (code, headers, json.loads(body)),
            (
                200,
                {"content-type": ["application/json"], "cache-control": ["no-store"]},
                {"status": "ok", "breaker": "closed", "spool_depth": 0},
            ),
        )

    def test_not_ready(self) -> None:
        """503, and every reason, before the details."""
        health = Health(
            ("delivery worker not answering for 3s", "shutting down"),
            {"breaker": "open"},
        )
        code, _, body = self.response(health)
        self.assertEqual(
            (code, list(json.loads(body).items())),
            (
                503,
                [
                    ("status", "unavailable"),
                    (
                        "reasons",
                        ["delivery worker not answering for 3s", "shutting down"],
                    ),
                    ("breaker", "open"),
                ],
            ),
        )

    def test_head(self) -> None:
        for health, code in [(ready(), 200), (Health(("down",), {}), 503)]:
            self.assertEqual(self.response(health, "HEAD")[::2], (code, b""))


class MetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def scrape(self, site: _Site) -> Deferred[tuple[int, bytes]]:
        async def scraped() -> tuple[int, bytes]:
            response = await site.get("/metrics")
            return response.code, await site.treq.content(response)

        return Deferred.fromCoroutine(scraped())

    def warnings(self) -> list[str]:
        return [
            event["log_format"]
            for event in self.events
            if event["log_namespace"].startswith("maillaser.")
        ]

    def test_with_the_worker(self) -> None:
        scraped = self.scrape(_Site())
        self.assertEqual(
            (self.successResultOf(scraped), self.warnings()),
            ((200, b"front and worker"), []),
        )

    def test_worker_failed(self) -> None:
        site = _Site(worker=lambda: fail(ConnectionError("worker gone")))
        self.assertEqual(
            (self.successResultOf(self.scrape(site)), self.warnings()),
            (
                (200, b"front and no worker"),
                ["no metrics from the delivery worker: {reason}"],
            ),
        )

    def test_worker_raised(self) -> None:
        def broken() -> Deferred[bytes]:
            raise RuntimeError("not started")

        scraped = self.scrape(_Site(worker=broken))
        self.assertEqual(self.successResultOf(scraped), (200, b"front and no worker"))

    def test_worker_late(self) -> None:
        """
        At the deadline, the front's metrics alone; the worker's request is
        not cancelled, and its late answer is dropped.
        """
        late: Deferred[bytes] = Deferred()
        site = _Site(worker=lambda: late)
        scraped = self.scrape(site)
        site.clock.advance(METRICS_TIMEOUT - 0.001)
        site.treq.flush()
        self.assertNoResult(scraped)
        site.clock.advance(0.001)
        site.treq.flush()
        self.assertEqual(self.successResultOf(scraped), (200, b"front and no worker"))
        self.assertEqual(
            self.warnings(), ["no metrics from the delivery worker within {timeout}s"]
        )
        self.assertFalse(late.called)
        late.callback(b"worker")
        site.treq.flush()
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_late_failure_is_consumed(self) -> None:
        late: Deferred[bytes] = Deferred()
        site = _Site(worker=lambda: late)
        scraped = self.scrape(site)
        site.clock.advance(METRICS_TIMEOUT)
        site.treq.flush()
        self.successResultOf(scraped)
        late.errback(ConnectionError("too late"))
        self.assertIsNone(self.successResultOf(late))  # handled: nothing to log

    def test_answer_cancels_the_deadline(self) -> None:
        answer: Deferred[bytes] = Deferred()
        site = _Site(worker=lambda: answer)
        scraped = self.scrape(site)
        self.assertEqual(len(site.clock.getDelayedCalls()), 1)
        answer.callback(b"worker")
        site.treq.flush()
        self.assertEqual(
            (self.successResultOf(scraped), site.clock.getDelayedCalls()),
            ((200, b"front and worker"), []),
        )

    def test_page_failed(self) -> None:
        """A bug of ours is a 500 and a logged failure, never a hung scrape."""

        def broken(worker: bytes | None) -> bytes:
            raise ZeroDivisionError("bug")

        scraped = self.scrape(_Site(page=broken))
        self.assertEqual(self.successResultOf(scraped), (500, b"Internal Server Error"))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_headers(self) -> None:
        """HEAD says what GET would, without the body."""
        for method, body in [("GET", b"front and worker"), ("HEAD", b"")]:
            site = _Site()
            response = self.successResultOf(site.get("/metrics", method))
            self.assertEqual(
                (
                    response.headers.getRawHeaders("content-type"),
                    response.headers.getRawHeaders("cache-control"),
                    self.successResultOf(site.treq.content(response)),
                ),
                ([CONTENT_TYPE_LATEST], ["no-store"], body),
                method,
            )
        self.assertEqual(response.length, 0)

    def test_content_length(self) -> None:
        site = _Site()
        response = self.successResultOf(site.get("/metrics"))
        self.assertEqual(response.length, len(b"front and worker"))

    def test_client_gone(self) -> None:
        """A scraper that gave up before the worker answered gets nothing."""
        answer: Deferred[bytes] = Deferred()
        site = _Site(worker=lambda: answer)
        channel = site.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
        assert channel is not None
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: health.test\r\n\r\n")
        channel.connectionLost(Failure(ConnectionDone()))
        answer.callback(b"worker")
        self.assertEqual((transport.value(), self.flushLoggedErrors()), (b"", []))


class QuietSiteTests(TestCase):
    async def requested(self, site: Site) -> bytes:
        """What C{site} writes to its access log for one request."""
        path = self.mktemp()
        site.logPath = path
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        url = f"http://127.0.0.1:{port.getHost().port}/health"
        await (await treq.get(url, persistent=False)).content()
        await port.stopListening()
        with open(path, "rb") as log:
            return log.read()

    async def test_no_access_log(self) -> None:
        """Probes every few seconds would flood it."""
        resource = make_site(
            ready,
            FrontMetrics(smtp_connections=lambda: 0).page,
            lambda: succeed(b""),
            clock=Clock(),
        ).resource
        written = [await self.requested(kind(resource)) for kind in (Site, QuietSite)]
        self.assertEqual(
            [b'"GET /health HTTP/1.1" 200' in each for each in written], [True, False]
        )
