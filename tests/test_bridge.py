"""
The whole bridge across its process boundary: the SMTP front and a real
delivery worker process, with a real receiver on loopback.  What only the
two together can show: a worker that stops answering or dies costs a 451,
never a hang or a lost message; one id ties every log event of a message,
whichever process logged it; metrics come from both; shutdown lets DATA in
progress finish; bytes stay bytes from the socket to the JSON.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogEvent, LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

from maillaser import logs
from maillaser.testing import ReceivedRequest, Reply, WebhookReceiver
from tests.bridge import (
    Bridge,
    settled,
    spool_empty,
    start_bridge,
    stop_service,
    worker_status,
)
from tests.helpers import (
    TARGET,
    RawClient,
    connect_raw,
    poll,
    simple_message,
    spec_keys,
    wait,
)

QUEUED = re.compile(rb"^(?:250 )?2\.0\.0 Ok: queued as (msg_[0-9a-f]{28})$")
KEY = "b2JzZXJ2YWJpbGl0eS10ZXN0LXNlY3JldA=="
SECRET = "whsec_" + KEY
BODY = "Confidential-body-marker 7d1f"


def queued_id(reply: bytes) -> str:
    match = QUEUED.match(reply)
    assert match is not None, reply
    return match.group(1).decode()


async def get(bridge: Bridge, path: str) -> tuple[int, bytes]:
    response = await treq.get(bridge.health_url + path, persistent=False)
    return response.code, await response.content()


def resume(pid: int) -> None:
    """Let a stopped process run again, if it still exists."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


class WorkerOutageTests(TestCase):
    async def test_a_stopped_worker_costs_451_and_is_replaced(self) -> None:
        """
        A worker that stops answering (SIGSTOP) leaves the end of DATA
        waiting only as long as the deadline: the sender gets 451 and
        keeps the message, /health says why, /metrics still answers, and a
        new worker takes the next message.
        """
        bridge = await start_bridge(self, worker_timeout=3.0)
        worker = bridge.service.worker
        stopped = worker.pid
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)
        self.addCleanup(resume, stopped)
        started = reactor.seconds()
        sending = bridge.send(simple_message(subject="while stopped"))
        scraping = get(bridge, "/metrics")

        await poll(lambda: any("not answered" in p for p in worker.problems()))
        code, body = await get(bridge, "/health")
        self.assertEqual(code, 503, body)
        [reason] = json.loads(body)["reasons"]
        self.assertRegex(reason, "^delivery worker has not answered for [0-9]+s$")

        result = await wait(sending, 30)
        self.assertEqual(
            (result["code"], result["reply"]),
            (451, b"4.3.0 Could not store the message, try again later"),
        )
        self.assertLess(reactor.seconds() - started, 10)
        code, metrics = await wait(Deferred.fromCoroutine(scraping))
        self.assertEqual(code, 200)
        self.assertEqual(metric(metrics, "maillaser_worker_up"), 0)
        self.assertIn(b"maillaser_smtp_connections", metrics)

        await poll(lambda: worker.ready and worker.pid != stopped, timeout=30)
        result = await bridge.send(simple_message(subject="after"))
        self.assertEqual(result["code"], 250, result)
        [request] = await settled(bridge, 1)
        self.assertEqual(request.json()["subject"], "after")
        code, body = await get(bridge, "/health")
        self.assertEqual(code, 200, body)
        self.assertNotIn(
            b"\nmaillaser_worker_up 0.0\n", (await get(bridge, "/metrics"))[1]
        )

    async def test_a_killed_worker_is_replaced_and_its_spool_delivered(self) -> None:
        """What a worker had spooled when it died is delivered by the next."""
        receiver = WebhookReceiver(default=Reply(503))
        bridge = await start_bridge(self, receiver, retry_schedule=(0.2,) * 50)
        worker = bridge.service.worker
        result = await bridge.send(simple_message(subject="spooled"))
        self.assertEqual(result["code"], 250, result)
        await wait(receiver.wait_for(1))
        killed = worker.pid
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        await poll(lambda: worker.ready and worker.pid != killed, timeout=30)
        receiver.default = Reply(200)
        await spool_empty(bridge, timeout=20)
        delivered = [r for r in receiver.requests if r.json()["subject"] == "spooled"]
        self.assertEqual(
            {r.headers["webhook-id"] for r in delivered},
            {queued_id(result["reply"])},
        )


class ShutdownTests(TestCase):
    async def test_data_in_progress_finishes(self) -> None:
        """
        Shutdown stops listening, but a transaction in DATA finishes within
        the grace period: 250, then 421 and close; the message is delivered
        or stays spooled, never lost; the log says which.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        bridge = await start_bridge(self, shutdown_grace=5.0)
        client = await connect_raw(self, bridge.smtp_port)
        client.send(
            b"EHLO client.test\r\nMAIL FROM:<a@test.com>\r\n"
            b"RCPT TO:<target@example.com>\r\nDATA\r\n"
        )
        await client.wait_for_replies(5)
        client.send(b"Subject: in flight\r\n\r\nhalf")
        stopped = stop_service(bridge.service)
        assert stopped is not None
        await poll(lambda: bridge.service.smtp_factory.draining)
        client.send(b" and the rest\r\n.\r\n")
        replies = await client.wait_for_replies(7)
        queued_id(replies[5])
        self.assertEqual(replies[6], b"421 4.3.2 mx.test Service shutting down")
        await client.wait_closed()
        await wait(stopped, 30)
        [shutdown] = [e for e in events if "clean shutdown" in e.get("log_format", "")]
        self.assertEqual(shutdown["pending"] + len(bridge.receiver.requests), 1)

    async def test_stopping_right_after_start_logs_no_error(self) -> None:
        """
        A port scanner's favourite moment: the bridge stops while its
        worker is still starting.  Nothing may be logged as an error (the
        test fails on any), and nothing may be left running.
        """
        for _ in range(3):
            bridge = await start_bridge(self, ready=False)
            stopping = stop_service(bridge.service)
            assert stopping is not None  # start_bridge left it running
            await wait(stopping, 30)


class CorrelationTests(TestCase):
    """A message whose first webhook attempt fails and whose second succeeds."""

    async def story(self) -> tuple[list[LogEvent], list[ReceivedRequest], bytes]:
        """The events logged, the requests received, and the final SMTP reply."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        receiver = WebhookReceiver()
        receiver.script(500)
        bridge = await start_bridge(
            self, receiver, webhook_max_retries=1, webhook_secrets=(SECRET,)
        )
        result = await bridge.send(simple_message(body=BODY + "\n"))
        requests = await wait(receiver.wait_for(2))
        await spool_empty(bridge)
        return list(events), requests, result["reply"]

    async def test_one_id(self) -> None:
        """SMTP reply, log events and C{webhook-id} all name the message alike,
        in the front's log and the worker's alike."""
        events, requests, reply = await self.story()
        [webhook_id] = {request.headers["webhook-id"] for request in requests}
        self.assertEqual(queued_id(b"250 " + reply), webhook_id)
        self.assertEqual(
            [
                (event["log_namespace"], event["log_level"], event["message_id"])
                for event in events
                if "message_id" in event
            ],
            [
                ("maillaser.smtp._message.AcceptedMessage", LogLevel.info, webhook_id),
                ("maillaser.webhook._delivery.Deliverer", LogLevel.warn, webhook_id),
                ("maillaser.webhook._delivery.Deliverer", LogLevel.info, webhook_id),
            ],
        )

    async def test_no_body_or_secret(self) -> None:
        """Neither reaches any event above debug, as JSON or as text."""
        events, requests, _ = await self.story()
        self.assertEqual(requests[-1].json()["body"], BODY + "\n")
        self.assertIn("webhook-signature", requests[-1].headers)
        written = io.StringIO()
        observer = logs.json_lines(written)
        shown = [event for event in events if event["log_level"] != LogLevel.debug]
        for event in shown:
            observer(event)
        lines = written.getvalue().splitlines()
        self.assertEqual(len(lines), len(shown))
        self.assertGreater(len(lines), 5)
        for needle in (BODY, KEY):
            self.assertNotIn(needle, written.getvalue())


def metric(text: bytes, name: str) -> float:
    """The value of the sample C{name} (with its labels) in C{text}."""
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} in:\n{text.decode()}")


class MetricsTests(TestCase):
    async def test_one_page_from_both_processes(self) -> None:
        """
        SMTP counters from the front, delivery counters and the spool from
        the worker, each process's own process metrics, every family once.
        """
        receiver = WebhookReceiver()
        receiver.script(500)
        bridge = await start_bridge(self, receiver, webhook_max_retries=0)
        result = await bridge.send(
            simple_message(), recipients=(TARGET, "nobody@example.com")
        )
        self.assertEqual(result["code"], 250, result)
        await wait(receiver.wait_for(2))
        await spool_empty(bridge)
        code, text = await get(bridge, "/metrics")
        self.assertEqual(code, 200)
        for name, value in [
            ('maillaser_smtp_replies_total{code="250"}', 1),
            ('maillaser_smtp_replies_total{code="550"}', 1),
            ("maillaser_messages_accepted_total", 1),
            ('maillaser_deliveries_total{outcome="retry"}', 1),
            ('maillaser_deliveries_total{outcome="delivered"}', 1),
            ('maillaser_webhook_requests_total{status="500"}', 1),
            ('maillaser_webhook_requests_total{status="200"}', 1),
            ("maillaser_webhook_latency_seconds_count", 2),
            ('maillaser_spool_messages{state="pending"}', 0),
            ("maillaser_circuit_breaker_state", 0),
            ("maillaser_worker_up", 1),
        ]:
            self.assertEqual(metric(text, name), value, name)
        self.assertGreater(metric(text, "maillaser_process_resident_memory_bytes"), 0)
        self.assertGreater(
            metric(text, "maillaser_worker_process_resident_memory_bytes"), 0
        )
        families = re.findall(rb"^# TYPE (\S+)", text, re.MULTILINE)
        self.assertEqual(len(families), len(set(families)), families)

    async def test_bridges_do_not_share_metrics(self) -> None:
        first = await start_bridge(self)
        second = await start_bridge(self)
        await first.send(simple_message())
        await settled(first, 1)
        _, text = await get(second, "/metrics")
        self.assertEqual(metric(text, "maillaser_messages_accepted_total"), 0)
        self.assertEqual(
            metric(text, 'maillaser_deliveries_total{outcome="delivered"}'), 0
        )

    async def test_sync_mode(self) -> None:
        bridge = await start_bridge(self, delivery_mode="sync")
        result = await bridge.send(simple_message())
        self.assertEqual(result["code"], 250, result)
        code, text = await get(bridge, "/metrics")
        self.assertEqual(code, 200)
        self.assertEqual(
            metric(text, 'maillaser_deliveries_total{outcome="delivered"}'), 1
        )
        self.assertNotIn(b"maillaser_spool_messages", text)
        status = await worker_status(bridge)
        self.assertEqual(status["breaker"], "closed")


EIGHT_BIT = [
    # (raw message, expected sender_name, subject, body)
    # No charset and not UTF-8: windows-1252 (0x80 is the euro sign).
    (
        b"From: Ren\xe9 <rene@test.com>\r\nSubject: caf\xe9\r\n\r\n"
        b"caf\xe9 na\xefve \x80 \xa3\r\n",
        "René",
        "café",
        "café naïve € £\n",
    ),
    # No charset, valid UTF-8.
    (
        "From: Grüße <g@test.com>\r\nSubject: Grüße ☃\r\n\r\nGrüße ☃ 日本\r\n".encode(),
        "Grüße",
        "Grüße ☃",
        "Grüße ☃ 日本\n",
    ),
    # NUL bytes are content too.
    (
        b"From: nul@test.com\r\nSubject: nul\r\n\r\na\x00b\x00\r\n",
        None,
        "nul",
        "a\x00b\x00\n",
    ),
    # A declared charset wins over guessing.
    (
        b"From: g@test.com\r\nSubject: greek\r\n"
        b"Content-Type: text/plain; charset=iso-8859-7\r\n\r\n\xe1\xe2\xe3\r\n",
        None,
        "greek",
        "αβγ\n",
    ),
]


async def exchange(client: RawClient, data: bytes, count: int) -> list[bytes]:
    """Send C{data}; return the C{count} replies it brings."""
    before = len(client.replies())
    client.send(data)
    return (await client.wait_for_replies(before + count))[before:]


class EightBitTests(TestCase):
    """Bytes are bytes on the wire and across the pipe; the payload decodes
    them by SPEC §4."""

    async def test_eight_bit_and_non_utf8_content(self) -> None:
        bridge = await start_bridge(self)
        client = await connect_raw(self, bridge.smtp_port)
        await exchange(client, b"EHLO client.test\r\n", 1)
        expected: dict[str, dict[str, object]] = {}
        for raw, sender_name, subject, body in EIGHT_BIT:
            replies = await exchange(
                client,
                b"MAIL FROM:<sender@test.com> BODY=8BITMIME\r\n"
                b"RCPT TO:<target@example.com>\r\nDATA\r\n",
                3,
            )
            self.assertEqual([reply[:3] for reply in replies], [b"250", b"250", b"354"])
            [reply] = await exchange(client, raw + b".\r\n", 1)
            payload: dict[str, object] = {"sender": "sender@test.com"}
            if sender_name is not None:
                payload["sender_name"] = sender_name
            payload.update(
                recipient=TARGET, recipients=[TARGET], subject=subject, body=body
            )
            expected[queued_id(reply)] = payload
        for request in await settled(bridge, len(EIGHT_BIT)):
            self.assertEqual(request.headers["content-type"], "application/json")
            # Well-formed: strict UTF-8, valid JSON, exactly the decoded text.
            self.assertEqual(
                spec_keys(json.loads(request.body.decode("utf-8"))),
                expected[request.headers["webhook-id"]],
            )
