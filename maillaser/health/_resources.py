"""
The HTTP side: ``/health`` and ``/metrics`` on their own endpoint.

These resources only read the state of the other parts; they never drive
them.  They render on the reactor thread because what they render is a
handful of counters, and because the state they read (spool counts,
sessions, breaker) belongs to the reactor thread.  That is also why
``/metrics`` is not C{prometheus_client.twisted.MetricsResource}, which
renders in the thread pool and imports the global reactor.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import attrs
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.web.iweb import IRequest
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site


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

    def render(self, request: IRequest) -> bytes:
        if request.postpath:
            return _not_found(request)
        if request.method not in (b"GET", b"HEAD"):
            return _plain(request, 405, b"Method Not Allowed", allow=b"GET, HEAD")
        result: bytes = super().render(request)
        return result


class HealthResource(_Endpoint):
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
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body, separators=(",", ":")).encode("utf-8")


class MetricsResource(_Endpoint):
    """One registry in the Prometheus text format."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return generate_latest(self._registry)


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


def make_site(check: Callable[[], Health], registry: CollectorRegistry) -> Site:
    root = _Root()
    root.putChild(b"health", HealthResource(check))
    root.putChild(b"metrics", MetricsResource(registry))
    return QuietSite(root)
