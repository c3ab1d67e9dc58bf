"""
The whole bridge on loopback: makeService, smtplib (plain and STARTTLS), and
a real HTTP receiver.  These port upstream's integration tests with exact
counts, and go further where upstream lost mail.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import resource
from typing import Any

import treq
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from maillaser import __version__
from maillaser.testing import HANG, Reply, WebhookReceiver
from maillaser.webhook import VerificationError, verify
from tests.bridge import (
    Bridge,
    settled,
    spool_empty,
    start_bridge,
    worker_status,
)
from tests.helpers import TARGET, poll, simple_message, spec_keys, wait

QUEUED = re.compile(rb"^2\.0\.0 Ok: queued as (msg_[0-9a-f]{28})$")


def queued_id(result: dict[str, object]) -> str:
    reply = result["reply"]
    assert isinstance(reply, bytes), result
    match = QUEUED.match(reply)
    assert match is not None, result
    return match.group(1).decode()


class ForwardingTests(TestCase):
    async def test_one_mail_one_post(self) -> None:
        bridge = await start_bridge(self)
        result = await bridge.send(simple_message())
        self.assertEqual(result["code"], 250)
        [request] = await wait(bridge.receiver.wait_for(1))
        self.assertEqual(request.method, "POST")
        self.assertEqual(request.path, "/hook")
        self.assertEqual(request.headers["content-type"], "application/json")
        self.assertEqual(request.headers["user-agent"], f"MailLaser/{__version__}")
        self.assertEqual(request.headers["webhook-id"], queued_id(result))
        self.assertRegex(request.headers["webhook-timestamp"], r"^[0-9]{10}$")
        self.assertNotIn("webhook-signature", request.headers)
        self.assertEqual(
            spec_keys(request.json()),
            {
                "sender": "sender@test.com",
                "sender_name": "Sender Name",
                "recipient": TARGET,
                "recipients": [TARGET],
                "subject": "Integration Test",
                "body": "Hello!\n",
            },
        )
        self.assertEqual(
            list(spec_keys(request.json())),
            ["sender", "sender_name", "recipient", "recipients", "subject", "body"],
        )
        await spool_empty(bridge)
        self.assertEqual(len(bridge.receiver.requests), 1)

    async def test_compact_utf8_json(self) -> None:
        bridge = await start_bridge(self)
        await bridge.send(simple_message(subject="Grüße ☃", body="naïve\n"))
        [request] = await wait(bridge.receiver.wait_for(1))
        self.assertIn("Grüße ☃".encode(), request.body)
        self.assertNotIn(b'": ', request.body)
        self.assertEqual(request.json()["subject"], "Grüße ☃")

    async def test_several_recipients_one_post(self) -> None:
        bridge = await start_bridge(self)
        result = await bridge.send(
            simple_message(),
            recipients=("nobody@example.com", "Second@Example.com", TARGET),
        )
        self.assertEqual(result["code"], 250)
        self.assertEqual(list(result["refused"]), ["nobody@example.com"])
        [request] = await wait(bridge.receiver.wait_for(1))
        self.assertEqual(request.json()["recipient"], "Second@Example.com")
        self.assertEqual(request.json()["recipients"], ["Second@Example.com", TARGET])
        await spool_empty(bridge)
        self.assertEqual(len(bridge.receiver.requests), 1)

    async def test_starttls(self) -> None:
        bridge = await start_bridge(self)
        result = await bridge.send(simple_message(subject="over TLS"), starttls=True)
        self.assertEqual(result["code"], 250)
        [request] = await wait(bridge.receiver.wait_for(1))
        self.assertEqual(request.json()["subject"], "over TLS")

    async def test_retries_then_success_exactly_three_requests(self) -> None:
        receiver = WebhookReceiver()
        receiver.script(500, 500)
        bridge = await start_bridge(self, receiver, webhook_max_retries=3)
        result = await bridge.send(simple_message())
        requests = await wait(receiver.wait_for(3))
        await spool_empty(bridge)
        self.assertEqual(len(receiver.requests), 3)
        self.assertEqual(
            {r.headers["webhook-id"] for r in requests}, {queued_id(result)}
        )
        self.assertEqual(len({r.body for r in requests}), 1)

    async def test_breaker_open_sends_nothing_and_loses_nothing(self) -> None:
        receiver = WebhookReceiver(default=Reply(500))
        bridge = await start_bridge(
            self,
            receiver,
            webhook_max_retries=0,
            circuit_breaker_threshold=3,
            circuit_breaker_reset=2.0,
            retry_schedule=(0.2,),
        )
        ids = []
        for n in range(3):
            ids.append(queued_id(await bridge.send(simple_message(subject=f"m{n}"))))
            await wait(receiver.wait_for(n + 1))
        status = await worker_status(bridge)
        self.assertEqual(status["breaker"], "open")
        opened_at = reactor.seconds()
        ids.append(queued_id(await bridge.send(simple_message(subject="m3"))))
        # Every message is due again while the breaker stays open: still
        # nothing may be sent, and nothing leaves the spool.
        await deferLater(reactor, 1.0)
        status = await worker_status(bridge)
        if reactor.seconds() < opened_at + 2.0:  # still open: a slow machine
            self.assertEqual((status["breaker"], status["pending"]), ("open", 4))
        self.assertEqual(len(receiver.requests), 3)

        # The webhook recovers and the reset period ends: one probe closes
        # the breaker and every message arrives exactly once more.
        receiver.default = Reply(200)
        await wait(receiver.wait_for(7))
        status = await spool_empty(bridge)
        self.assertEqual((status["dead"], status["breaker"]), (0, "closed"))
        self.assertEqual(len(receiver.requests), 7)
        delivered = [r.headers["webhook-id"] for r in receiver.requests[3:]]
        self.assertEqual(sorted(delivered), sorted(ids))


class SyncModeTests(TestCase):
    async def check(self, reply: Reply, code: int, text: bytes) -> None:
        receiver = WebhookReceiver(default=reply)
        bridge = await start_bridge(
            self,
            receiver,
            delivery_mode="sync",
            webhook_max_retries=1,
            webhook_timeout=0.5,
        )
        result = await bridge.send(simple_message())
        self.assertEqual((result["code"], result["reply"]), (code, text))

    async def test_200_is_250(self) -> None:
        receiver = WebhookReceiver()
        bridge = await start_bridge(self, receiver, delivery_mode="sync")
        result = await bridge.send(simple_message())
        self.assertEqual(result["code"], 250)
        self.assertEqual(receiver.requests[0].headers["webhook-id"], queued_id(result))

    async def test_503_is_451(self) -> None:
        await self.check(
            Reply(503), 451, b"4.4.1 Webhook temporarily unavailable, try again later"
        )

    async def test_timeout_is_451(self) -> None:
        await self.check(
            HANG, 451, b"4.4.1 Webhook temporarily unavailable, try again later"
        )

    async def test_422_is_550_with_the_reason(self) -> None:
        reply = Reply(422, {"content-type": "text/plain"}, b"Unknown ticket queue\n")
        await self.check(reply, 550, b"5.6.0 Unknown ticket queue")

    async def test_4xx_without_text_reason(self) -> None:
        await self.check(
            Reply(404, {"content-type": "text/html"}, b"<h1>no</h1>"),
            550,
            b"5.6.0 Rejected by the webhook (HTTP 404)",
        )


class HealthTests(TestCase):
    async def test_health(self) -> None:
        bridge = await start_bridge(self)
        response = await treq.get(bridge.health_url + "/health", persistent=False)
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders("content-type"), ["application/json"]
        )
        body = json.loads(await response.content())
        self.assertEqual(body["status"], "ok")
        self.assertEqual(body["spool_depth"], 0)
        self.assertEqual(body["dead_letters"], 0)
        self.assertEqual(body["breaker"], "closed")
        head = await treq.head(bridge.health_url + "/health", persistent=False)
        self.assertEqual(head.code, 200)
        self.assertEqual(await head.content(), b"")
        for path in ("/", "/healthz", "/status", "/api/health", "/ready"):
            response = await treq.get(bridge.health_url + path, persistent=False)
            self.assertEqual(response.code, 404, path)
            await response.content()


class SigningTests(TestCase):
    async def test_signatures_verify_with_the_reference_library(self) -> None:
        old, new = (
            "whsec_" + base64.b64encode(b"o" * 32).decode(),
            "whsec_" + base64.b64encode(b"n" * 32).decode(),
        )
        bridge = await start_bridge(self, webhook_secrets=(old, new))
        await bridge.send(simple_message())
        [request] = await wait(bridge.receiver.wait_for(1))
        entries = request.headers["webhook-signature"].split(" ")
        self.assertEqual([entry[:3] for entry in entries], ["v1,", "v1,"])
        for secret in (old, new):
            payload = Webhook(secret).verify(request.body, request.headers)
            self.assertEqual(payload["subject"], "Integration Test")
            verify(secret, request.headers, request.body)
        wrong = "whsec_" + base64.b64encode(b"w" * 32).decode()
        self.assertRaises(
            WebhookVerificationError,
            Webhook(wrong).verify,
            request.body,
            request.headers,
        )
        self.assertRaises(
            VerificationError, verify, wrong, request.headers, request.body
        )


class SpoolFailureTests(TestCase):
    async def health(self, bridge: Bridge) -> tuple[int, dict[str, Any]]:
        response = await treq.get(bridge.health_url + "/health", persistent=False)
        return response.code, json.loads(await response.content())

    async def test_full_disk_is_451_then_recovers(self) -> None:
        """
        The worker's files may not grow, as on a full disk: 451 (never
        250) and /health 503; once there is room again, 250, delivery, and
        /health 200, with no restart.
        """
        bridge = await start_bridge(self)
        pid = bridge.service.worker.pid
        assert pid is not None
        # Smaller than the message below: storing it must fail.
        limit_file_size(pid, 16 * 1024)
        self.addCleanup(limit_file_size, pid, resource.RLIM_INFINITY)
        big = simple_message(
            subject="too big for the disk",
            body="".join(f"line {n} of a long report\n" for n in range(1000)),
        )

        result = await bridge.send(big)
        self.assertEqual(
            (result["code"], result["reply"]),
            (451, b"4.3.0 Could not store the message, try again later"),
        )
        await poll(lambda: bool(bridge.service.worker.problems()))
        code, body = await self.health(bridge)
        self.assertEqual(code, 503, body)
        self.assertEqual(body["status"], "unavailable", body)
        self.assertIn("spool is not writable", body["reasons"])
        self.assertEqual((await worker_status(bridge))["pending"], 0)
        # Meanwhile new mail is refused at once, before its data is sent.
        refused = await bridge.send(big)
        self.assertEqual(refused["code"], 451, refused)

        limit_file_size(pid, resource.RLIM_INFINITY)
        # The worker's periodic look finds out, with no mail to try it.
        await poll(lambda: not bridge.service.worker.problems(), timeout=15)
        code, body = await self.health(bridge)
        self.assertEqual((code, body["status"]), (200, "ok"), body)
        result = await bridge.send(big)
        self.assertEqual(result["code"], 250, result)
        [request] = await settled(bridge, 1)
        self.assertEqual(request.headers["webhook-id"], queued_id(result))
        self.assertEqual(request.json()["subject"], "too big for the disk")
        self.assertEqual(bridge.receiver.requests, [request])


def limit_file_size(pid: int, size: int) -> None:
    """
    Process C{pid}'s soft limit on the size of files it writes (which any
    process may move below its hard limit), if it still runs.
    """
    with contextlib.suppress(ProcessLookupError):
        _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (size, hard))
