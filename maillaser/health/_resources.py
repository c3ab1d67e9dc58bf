"""
The HTTP side: ``/health`` and ``/metrics`` on their own endpoint.

These resources only read the state of the other parts; they never drive
them.  ``/health`` renders at once from what the SMTP front already holds
(the delivery worker's last status included), so a probe is answered even
while the worker is not.  ``/metrics`` waits for the worker's own metrics,
but never longer than its deadline: past it, or if the worker cannot be
asked, the front's metrics are served alone, saying the worker is not up.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import attrs
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from maillaser.logs import observer

METRICS_TIMEOUT = 5.0
"""
Seconds a scrape waits for the delivery worker's metrics: well within
Prometheus's default scrape timeout (10 s), so that a stuck worker still
leaves the front's metrics, and C{maillaser_worker_up 0}, visible.
"""


@attrs.frozen
class Health:
    """A readiness verdict: C{problems} is empty when all is well."""

    problems: tuple[str, ...]
    details: dict[str, object]

    @property
    def ok(self) -> bool:
        return not self.problems


class _Endpoint(Resource):
    """
    A read-only resource at exactly one path: anything below it is not
    found, and any method but GET and HEAD is not allowed.
    """

    isLeaf = True

    def render(self, request: IRequest) -> bytes | int:
        if request.postpath:
            return _not_found(request)
        if request.method not in (b"GET", b"HEAD"):
            return _plain(request, 405, b"Method Not Allowed", allow=b"GET, HEAD")
        request.setHeader(b"cache-control", b"no-store")
        result: bytes | int = super().render(request)
        return result


class HealthResource(_Endpoint):
    """C{200} and the details when all is well, C{503} and the reasons if not."""

    def __init__(self, check: Callable[[], Health]) -> None:
        super().__init__()
        self._check = check

    def render_GET(self, request: IRequest) -> bytes:
        health = self._check()
        body: dict[str, object] = {"status": "ok" if health.ok else "unavailable"}
        if health.problems:
            body["reasons"] = list(health.problems)
        body.update(health.details)
        request.setResponseCode(200 if health.ok else 503)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body, separators=(",", ":")).encode("utf-8")


class MetricsResource(_Endpoint):
    """
    The Prometheus text of C{page(worker)}, where C{worker} is what
    C{worker_metrics()} fired with, or C{None} if it failed or did not fire
    within C{timeout} seconds.

    Rendered asynchronously, so the reactor serves SMTP while the worker is
    asked.  Nothing is cancelled at the deadline: the worker's own request
    ends on its own deadline, and its late answer is dropped.
    """

    _log = Logger(observer=observer)

    def __init__(
        self,
        page: Callable[[bytes | None], bytes],
        worker_metrics: Callable[[], Deferred[bytes]],
        *,
        clock: IReactorTime,
        timeout: float = METRICS_TIMEOUT,
    ) -> None:
        super().__init__()
        self._page = page
        self._worker_metrics = worker_metrics
        self._clock = clock
        self._timeout = timeout

    def render_GET(self, request: Request) -> int:
        finished = request.notifyFinish()
        finished.addErrback(lambda failure: None)  # the client went away
        self._scrape().addCallback(self._send, request, finished).addErrback(
            self._failed, request, finished
        )
        return NOT_DONE_YET

    def _scrape(self) -> Deferred[bytes]:
        """The page; it fires within the deadline, whatever the worker does."""
        done: Deferred[bytes] = Deferred()
        timer = self._clock.callLater(self._timeout, self._late, done)
        maybeDeferred(self._worker_metrics).addBoth(self._answered, done, timer)
        return done

    def _answered(
        self, worker: bytes | Failure, done: Deferred[bytes], timer: IDelayedCall
    ) -> None:
        if done.called:
            return  # too late: the page went without it
        timer.cancel()
        if isinstance(worker, Failure):
            self._log.warn(
                "no metrics from the delivery worker: {reason}",
                reason=worker.getErrorMessage(),
            )
            self._render(None, done)
        else:
            self._render(worker, done)

    def _late(self, done: Deferred[bytes]) -> None:
        self._log.warn(
            "no metrics from the delivery worker within {timeout}s",
            timeout=self._timeout,
        )
        self._render(None, done)

    def _render(self, worker: bytes | None, done: Deferred[bytes]) -> None:
        maybeDeferred(self._page, worker).chainDeferred(done)

    @staticmethod
    def _send(body: bytes, request: IRequest, finished: Deferred[None]) -> None:
        if finished.called:
            return
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def _failed(
        self, failure: Failure, request: IRequest, finished: Deferred[None]
    ) -> None:
        self._log.failure("cannot render the metrics", failure)
        if not finished.called:
            request.write(_plain(request, 500, b"Internal Server Error"))
            request.finish()


class _Root(Resource):
    """Anything but the known children is a 404, including ``/``."""

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        return notFound()

    def render(self, request: IRequest) -> bytes:
        return _not_found(request)


def _not_found(request: IRequest) -> bytes:
    return _plain(request, 404, b"Not Found")


def _plain(request: IRequest, code: int, text: bytes, **headers: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain")
    for name, value in headers.items():
        request.setHeader(name.encode("ascii"), value)
    return text


class QuietSite(Site):
    """A site without an access log: probes every few seconds would flood it."""

    noisy = False

    def log(self, request: object) -> None:
        pass


def make_site(
    health: Callable[[], Health],
    metrics: Callable[[bytes | None], bytes],
    worker_metrics: Callable[[], Deferred[bytes]],
    *,
    clock: IReactorTime,
    timeout: float = METRICS_TIMEOUT,
    attachments: IResource | None = None,
) -> Site:
    """
    The site serving ``/health`` and ``/metrics``, and ``/attachments``
    when given (L{maillaser.health.AttachmentResource}); nothing else.

    @param health: the verdict, asked at each request of ``/health``.
    @param metrics: the ``/metrics`` page given the worker's part, or
        C{None} without it (L{maillaser.health.FrontMetrics.page}).
    @param worker_metrics: the delivery worker's part, asked at each
        scrape (C{DeliveryWorker.metrics_text}).
    @param clock: what the deadline of C{worker_metrics}, and the site's
        idle timeout, are measured on: the reactor.
    """
    root = _Root()
    root.putChild(b"health", HealthResource(health))
    root.putChild(
        b"metrics",
        MetricsResource(metrics, worker_metrics, clock=clock, timeout=timeout),
    )
    if attachments is not None:
        root.putChild(b"attachments", attachments)
    return QuietSite(root, reactor=clock)


__all__ = [
    "METRICS_TIMEOUT",
    "Health",
    "HealthResource",
    "MetricsResource",
    "QuietSite",
    "make_site",
]
