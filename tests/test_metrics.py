"""
``/metrics`` and ``/health`` of a real bridge on loopback: the numbers move
as mail is accepted, refused, delivered, retried, buried, and as the bridge
stops.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import TestCase

from maillaser.interfaces import ISpool
from maillaser.testing import HANG, MemorySpool, WebhookReceiver
from tests.helpers import (
    Bridge,
    connect_raw,
    poll,
    simple_message,
    start_bridge,
    start_quiet_bridge,
    wait,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

NOBODY = ("nobody@example.com",)

HANGING: dict[str, Any] = {"webhook_max_retries": 0, "shutdown_grace": 0.5}
"""
For a webhook that never answers.  No quick retries: cancelling a round at
shutdown does not end it (treq reports the cancellation as a lost
connection, which the deliverer retries), so each retry would cost a whole
webhook timeout.
"""


async def scrape(bridge: Bridge) -> Samples:
    """Every sample of C{/metrics}, keyed by name and sorted labels."""
    response = await treq.get(bridge.health_url + "/metrics", persistent=False)
    assert response.code == 200, response.code
    assert response.headers.getRawHeaders("content-type") == [CONTENT_TYPE_LATEST]
    text = (await response.content()).decode("utf-8")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def pick(samples: Samples, *names: str) -> dict[str, float]:
    """The samples named, as C{name{label="value"}} strings, for exact comparison."""
    return {
        name + "".join(f'{{{k}="{v}"}}' for k, v in labels): value
        for (name, labels), value in samples.items()
        if name in names
    }


def outcomes(
    delivered: int = 0, retry: int = 0, dead: int = 0, rejected: int = 0
) -> dict[str, float]:
    return {
        'maillaser_deliveries_total{outcome="delivered"}': delivered,
        'maillaser_deliveries_total{outcome="retry"}': retry,
        'maillaser_deliveries_total{outcome="dead"}': dead,
        'maillaser_deliveries_total{outcome="rejected"}': rejected,
    }


COUNTERS = (
    "maillaser_smtp_replies_total",
    "maillaser_messages_accepted_total",
    "maillaser_deliveries_total",
    "maillaser_webhook_requests_total",
    "maillaser_webhook_latency_seconds_count",
)
SPOOL = ("maillaser_spool_messages", "maillaser_spool_bytes")
STATE = ("maillaser_circuit_breaker_state", "maillaser_smtp_connections")


def spool_of(bridge: Bridge) -> ISpool:
    spool = bridge.service.spool
    assert spool is not None
    return spool


async def settled(bridge: Bridge, pending: int = 0, dead: int = 0) -> None:
    """Wait until the spool holds exactly this, and every session is gone."""
    spool = spool_of(bridge)
    await poll(lambda: (spool.stats().pending, spool.stats().dead) == (pending, dead))
    await poll(lambda: not bridge.service.smtp_factory.sessions)


class MetricsTests(TestCase):
    async def test_mail_flow(self) -> None:
        """One message accepted and delivered, one refused at RCPT."""
        bridge = await start_quiet_bridge(self)
        self.assertEqual((await bridge.send(simple_message()))["code"], 250)
        await bridge.send(simple_message(), recipients=NOBODY)
        await wait(bridge.receiver.wait_for(1))
        await settled(bridge)
        samples = await scrape(bridge)
        self.assertEqual(
            pick(samples, *COUNTERS, *SPOOL, *STATE),
            {
                'maillaser_smtp_replies_total{code="250"}': 1,
                'maillaser_smtp_replies_total{code="550"}': 1,
                "maillaser_messages_accepted_total": 1,
                **outcomes(delivered=1),
                'maillaser_webhook_requests_total{status="200"}': 1,
                "maillaser_webhook_latency_seconds_count": 1,
                'maillaser_spool_messages{state="pending"}': 0,
                'maillaser_spool_messages{state="dead"}': 0,
                "maillaser_spool_bytes": 0,
                "maillaser_circuit_breaker_state": 0,
                "maillaser_smtp_connections": 0,
            },
        )
        latency = samples[("maillaser_webhook_latency_seconds_sum", ())]
        self.assertTrue(0 < latency < 5.0, latency)
        self.assertIn(("maillaser_process_start_time_seconds", ()), samples)

    async def test_rejected_retried_and_dead(self) -> None:
        """A 422 is rejected; a 500 is retried once, then buried when the
        schedule is over."""
        receiver = WebhookReceiver()
        receiver.script(422, 500, 500)
        bridge = await start_quiet_bridge(
            self, receiver, webhook_max_retries=0, retry_schedule=(0.2,)
        )
        await bridge.send(simple_message(subject="rejected"))
        await settled(bridge, dead=1)
        await bridge.send(simple_message(subject="dead"))
        await wait(receiver.wait_for(3))
        await settled(bridge, dead=2)
        samples = await scrape(bridge)
        self.assertEqual(
            pick(samples, *COUNTERS[2:], *SPOOL, "maillaser_circuit_breaker_state"),
            {
                **outcomes(retry=1, dead=1, rejected=1),
                'maillaser_webhook_requests_total{status="422"}': 1,
                'maillaser_webhook_requests_total{status="500"}': 2,
                "maillaser_webhook_latency_seconds_count": 3,
                'maillaser_spool_messages{state="pending"}': 0,
                'maillaser_spool_messages{state="dead"}': 2,
                "maillaser_spool_bytes": 0,
                "maillaser_circuit_breaker_state": 0,
            },
        )

    async def test_unreachable_webhook_opens_the_breaker(self) -> None:
        bridge = await start_quiet_bridge(
            self,
            webhook_max_retries=0,
            circuit_breaker_threshold=1,
            circuit_breaker_reset=3600.0,
            retry_schedule=(3600.0,),
        )
        await bridge.receiver.stop()  # connection refused from now on
        await bridge.send(simple_message())
        await poll(lambda: bridge.service.breaker.allowance() == 0)
        await settled(bridge, pending=1)
        samples = await scrape(bridge)
        stored = spool_of(bridge).stats().bytes
        self.assertGreater(stored, 0)
        self.assertEqual(
            pick(samples, *COUNTERS[2:], *SPOOL, "maillaser_circuit_breaker_state"),
            {
                **outcomes(retry=1),
                'maillaser_webhook_requests_total{status="error"}': 1,
                "maillaser_webhook_latency_seconds_count": 1,
                'maillaser_spool_messages{state="pending"}': 1,
                'maillaser_spool_messages{state="dead"}': 0,
                "maillaser_spool_bytes": stored,
                "maillaser_circuit_breaker_state": 2,
            },
        )

    async def test_in_flight(self) -> None:
        """While the webhook has not answered: spooled, counted nowhere else."""
        bridge = await start_quiet_bridge(
            self, WebhookReceiver(default=HANG), **HANGING
        )
        await bridge.send(simple_message())
        await wait(bridge.receiver.wait_for(1))
        await connect_raw(self, bridge.smtp_port)
        samples = await scrape(bridge)
        self.assertEqual(
            pick(samples, *COUNTERS, "maillaser_spool_messages", *STATE),
            {
                'maillaser_smtp_replies_total{code="250"}': 1,
                "maillaser_messages_accepted_total": 1,
                **outcomes(),
                "maillaser_webhook_latency_seconds_count": 0,
                'maillaser_spool_messages{state="pending"}': 1,
                'maillaser_spool_messages{state="dead"}': 0,
                "maillaser_circuit_breaker_state": 0,
                "maillaser_smtp_connections": 1,
            },
        )

    async def test_sync_mode(self) -> None:
        """No spool: the deliverer's rounds are counted, and the 550 it causes."""
        receiver = WebhookReceiver()
        receiver.script(200, 422)
        bridge = await start_quiet_bridge(self, receiver, delivery_mode="sync")
        self.assertEqual((await bridge.send(simple_message()))["code"], 250)
        self.assertEqual((await bridge.send(simple_message()))["code"], 550)
        samples = await scrape(bridge)
        self.assertEqual(
            pick(samples, *COUNTERS, *SPOOL),
            {
                'maillaser_smtp_replies_total{code="250"}': 1,
                'maillaser_smtp_replies_total{code="550"}': 1,
                "maillaser_messages_accepted_total": 1,
                **outcomes(delivered=1, rejected=1),
                'maillaser_webhook_requests_total{status="200"}': 1,
                'maillaser_webhook_requests_total{status="422"}': 1,
                "maillaser_webhook_latency_seconds_count": 2,
            },
        )

    async def test_bridges_do_not_share_metrics(self) -> None:
        first = await start_quiet_bridge(self)
        second = await start_quiet_bridge(self)
        await first.send(simple_message())
        accepted = ("maillaser_messages_accepted_total", ())
        self.assertEqual(
            [(await scrape(bridge))[accepted] for bridge in (first, second)], [1, 0]
        )


async def get_health(bridge: Bridge, method: str = "GET") -> tuple[int, Any]:
    """Status and JSON body (C{None} for HEAD), with uptime checked and removed."""
    response = await treq.request(
        method, bridge.health_url + "/health", persistent=False
    )
    content = await response.content()
    if method == "HEAD":
        assert content == b"", content
        return response.code, None
    body = json.loads(content)
    uptime = body.pop("uptime")
    assert isinstance(uptime, float) and 0 <= uptime < 60, uptime
    return response.code, body


class HealthTests(TestCase):
    async def test_ready(self) -> None:
        bridge = await start_quiet_bridge(self)
        self.assertEqual(
            await get_health(bridge),
            (
                200,
                {
                    "status": "ok",
                    "breaker": "closed",
                    "spool_depth": 0,
                    "dead_letters": 0,
                },
            ),
        )
        self.assertEqual(await get_health(bridge, "HEAD"), (200, None))

    async def test_spool_not_writable(self) -> None:
        """A spool that cannot commit: 503, and the SMTP client hears 451."""
        bridge = await start_bridge(self, spool=MemorySpool(broken=True))
        self.assertEqual((await bridge.send(simple_message()))["code"], 451)
        self.assertEqual(
            await get_health(bridge),
            (
                503,
                {
                    "status": "unavailable",
                    "reasons": ["spool is not writable"],
                    "breaker": "closed",
                    "spool_depth": 0,
                    "dead_letters": 0,
                },
            ),
        )
        self.assertEqual(await get_health(bridge, "HEAD"), (503, None))
        samples = await scrape(bridge)
        self.assertEqual(
            pick(samples, *COUNTERS[:2]),
            {
                'maillaser_smtp_replies_total{code="451"}': 1,
                "maillaser_messages_accepted_total": 0,
            },
        )

    async def test_shutting_down(self) -> None:
        """While a delivery holds up the shutdown, readiness is withdrawn."""
        bridge = await start_quiet_bridge(
            self, WebhookReceiver(default=HANG), **HANGING
        )
        await bridge.send(simple_message())
        await wait(bridge.receiver.wait_for(1))
        stopping = bridge.service.stopService()
        self.assertEqual(
            await get_health(bridge),
            (
                503,
                {
                    "status": "unavailable",
                    "reasons": ["shutting down", "SMTP listener is not listening"],
                    "breaker": "closed",
                    "spool_depth": 1,
                    "dead_letters": 0,
                },
            ),
        )
        await wait(stopping)
