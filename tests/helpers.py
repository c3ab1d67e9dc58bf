"""
Helpers for end-to-end tests: a real bridge on loopback, smtplib as the
client (in a thread, since it blocks), and a real HTTP receiver.
"""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from maillaser.config import Config
from maillaser.service import MailLaserService, makeService
from maillaser.testing import WebhookReceiver

TARGET = "target@example.com"
LOOPBACK = "tcp:0:interface=127.0.0.1"


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
        return int(port.getHost().port)

    @property
    def health_url(self) -> str:
        port = self.service.health_listener.port
        assert port is not None
        return f"http://127.0.0.1:{port.getHost().port}"

    def send(
        self, message: EmailMessage | bytes, **kwargs: Any
    ) -> Deferred[dict[str, Any]]:
        return deferToThread(send_mail, self.smtp_port, message, **kwargs)


async def start_bridge(
    test: Any,
    receiver: WebhookReceiver | None = None,
    spool: Any = None,
    **overrides: Any,
) -> Bridge:
    """Start a bridge and a receiver; both are stopped when the test ends."""
    receiver = receiver or WebhookReceiver()
    url = await receiver.listen(reactor)
    test.addCleanup(receiver.stop)
    config = make_config(url, test.mktemp(), **overrides)
    service = makeService(config, reactor, spool=spool)
    service.startService()
    test.addCleanup(stop_service, service)
    return Bridge(service, receiver)


def stop_service(service: MailLaserService) -> Deferred[None] | None:
    return service.stopService() if service.running else None


def simple_message(
    subject: str = "Integration Test", body: str = "Hello!\n"
) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Sender Name <sender@test.com>"
    message["To"] = TARGET
    message["Subject"] = subject
    message.set_content(body)
    return message


def send_mail(
    port: int,
    message: EmailMessage | bytes,
    sender: str = "sender@test.com",
    recipients: tuple[str, ...] = (TARGET,),
    starttls: bool = False,
) -> dict[str, Any]:
    """
    Send one message with smtplib; return what the server answered.

    Returns C{{"code": int, "reply": bytes, "refused": dict}}; a refused
    DATA is reported, not raised, so tests can assert on the exact reply.
    """
    with smtplib.SMTP(
        "127.0.0.1", port, local_hostname="client.test", timeout=30
    ) as client:
        client.ehlo()
        if starttls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            client.starttls(context=context)
            client.ehlo()
        raw = message if isinstance(message, bytes) else message.as_bytes(policy=SMTP)
        code, reply = client.mail(sender)
        if code != 250:
            return {"code": code, "reply": reply, "refused": {}}
        refused = {}
        for recipient in recipients:
            rcode, rreply = client.rcpt(recipient)
            if rcode != 250:
                refused[recipient] = (rcode, rreply)
        if len(refused) == len(recipients):
            client.rset()
            return {"code": 554, "reply": b"all recipients refused", "refused": refused}
        code, reply = client.data(raw)
        return {"code": code, "reply": reply, "refused": refused}


async def poll(
    condition: Callable[[], bool], timeout: float = 10.0, step: float = 0.02
) -> None:
    """Wait until C{condition()} holds, or fail after C{timeout} seconds."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await deferLater(reactor, step)


async def wait(d: Awaitable[Any], timeout: float = 10.0) -> Any:
    """Await C{d}, failing the test if it takes longer than C{timeout}."""
    deferred = Deferred.fromCoroutine(_await(d)).addTimeout(timeout, reactor)
    return await deferred


async def _await(d: Awaitable[Any]) -> Any:
    return await d
