"""
The health endpoint's paths and methods, over a real HTTP connection: only
``/health`` and ``/metrics`` exist, exactly there, for GET and HEAD.
"""

from __future__ import annotations

import treq
from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase

from maillaser.web import Health, make_site


class PathAndMethodTests(TestCase):
    async def url(self) -> str:
        site = make_site(lambda: Health((), {"breaker": "closed"}), CollectorRegistry())
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
