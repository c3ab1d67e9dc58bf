"""
Helpers for end-to-end tests: a real bridge on loopback, with a real HTTP
receiver, driven by the clients in L{tests.helpers}.
"""

from __future__ import annotations

from email.message import EmailMessage
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from maillaser.config import Config
from maillaser.service import MailLaserService, makeService
from maillaser.testing import ReceivedRequest, WebhookReceiver
from maillaser.worker import Status
from tests.helpers import LOOPBACK, TARGET, poll, send_mail, wait


def make_config(webhook_url: str, spool_dir: str, **overrides: Any) -> Config:
    settings: dict[str, Any] = dict(
        target_emails=(TARGET, "second@example.com"),
        webhook_url=webhook_url,
        smtp_endpoints=(LOOPBACK,),
        health_endpoint=LOOPBACK,
        spool_dir=spool_dir,
        hostname="mx.test",
        webhook_timeout=5.0,
        retry_schedule=(0.2, 0.2, 0.2),
        shutdown_grace=2.0,
    )
    settings.update(overrides)
    return Config(**settings)


@attrs.define
class Bridge:
    service: MailLaserService
    receiver: WebhookReceiver

    @property
    def smtp_port(self) -> int:
        port = self.service.smtp_listeners[0].port
        assert port is not None
        address = port.getHost()
        assert isinstance(address, IPv4Address)  # tests listen on 127.0.0.1
        return address.port

    @property
    def health_url(self) -> str:
        port = self.service.health_listener.port
        assert port is not None
        address = port.getHost()
        assert isinstance(address, IPv4Address)  # tests listen on 127.0.0.1
        return f"http://127.0.0.1:{address.port}"

    def send(
        self, message: EmailMessage | bytes, **kwargs: Any
    ) -> Deferred[dict[str, Any]]:
        return deferToThread(send_mail, self.smtp_port, message, **kwargs)


async def start_bridge(
    test: Any,
    receiver: WebhookReceiver | None = None,
    *,
    ready: bool = True,
    **overrides: Any,
) -> Bridge:
    """
    Start a bridge and a receiver; both are stopped when the test ends.

    @param ready: wait until the delivery worker is ready (it takes mail).
    """
    receiver = receiver or WebhookReceiver()
    url = await receiver.listen(reactor)
    test.addCleanup(receiver.stop)
    return Bridge(await start_service(test, url, ready=ready, **overrides), receiver)


async def start_service(
    test: Any, webhook_url: str, *, ready: bool = True, **overrides: Any
) -> MailLaserService:
    """Start a bridge posting to C{webhook_url}; it is stopped when the test ends."""
    config = make_config(webhook_url, test.mktemp(), **overrides)
    service = makeService(config, reactor)
    service.startService()
    test.addCleanup(stop_service, service)
    if ready:
        await poll(lambda: service.worker.ready, timeout=30)
    return service


def stop_service(service: MailLaserService) -> Deferred[None] | None:
    return service.stopService() if service.running else None


async def worker_status(bridge: Bridge) -> dict[str, Any]:
    """The delivery worker's L{Status} answer, asked now."""
    return await bridge.service.worker.call(Status, timeout=10)


async def spool_empty(bridge: Bridge, timeout: float = 10.0) -> dict[str, Any]:
    """
    Wait until the worker's spool holds no pending message: every round is
    then settled, so no more requests can come.  Returns that status.
    """
    deadline = reactor.seconds() + timeout
    while (status := await worker_status(bridge))["pending"]:
        if reactor.seconds() > deadline:
            raise AssertionError(f"spool not empty within {timeout}s: {status}")
        await deferLater(reactor, 0.02)
    return status


def count_admissions(factory: Any) -> list[str]:
    """
    Record the peer address of every connection the SMTP factory admits,
    which is how a test tells several messages per connection from one each.
    """
    admitted: list[str] = []
    admit = factory.admit

    def counting(session: Any) -> bytes | None:
        refusal: bytes | None = admit(session)
        if refusal is None:
            admitted.append(session.peer_host)
        return refusal

    factory.admit = counting
    return admitted


async def settled(
    bridge: Bridge, count: int, timeout: float = 10.0
) -> list[ReceivedRequest]:
    """
    Wait for C{count} webhook requests and an empty spool (so that nothing
    more can arrive); prove that no request came beyond them, and none was
    dead-lettered; return the requests.
    """
    await wait(bridge.receiver.wait_for(count), timeout)
    status = await spool_empty(bridge, timeout)
    assert status["dead"] == 0, status
    requests = bridge.receiver.requests
    assert len(requests) == count, [r.json() for r in requests]
    return list(requests)
