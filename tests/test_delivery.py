"""Delivery rounds: attempts, quick backoff, classification, signing headers."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from typing import TypeVar

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from maillaser.breaker import BreakerState, CircuitBreaker
from maillaser.delivery import (
    INLINE_SIZE,
    Delivered,
    Deliverer,
    Failed,
    quick_backoff,
)
from maillaser.message import Attempt
from maillaser.payload import build_payload, encode_payload
from maillaser.webhook import WebhookResponse
from tests.doubles import ScriptedClient, message

_T = TypeVar("_T")

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class DeliveryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.breaker = CircuitBreaker(threshold=2, reset=60.0, clock=self.clock)

    def deliverer(self, client: ScriptedClient, retries: int = 3) -> Deliverer:
        return Deliverer(
            client=client,
            clock=self.clock,
            breaker=self.breaker,
            max_retries=retries,
            secrets=(SECRET,),
        )

    def test_a_round_that_breaks_is_a_failed_round(self) -> None:
        """Settled and retried later like any failure, and the breaker hears it."""

        def broken(function: Callable[[], _T]) -> Deferred[_T]:
            raise RuntimeError("a bug")

        self.breaker.threshold = 1
        deliverer = self.deliverer(ScriptedClient())
        deliverer.offload = broken
        html = attrs.evolve(message(), raw=b"Content-Type: text/html\r\n\r\n<p>x</p>")
        outcome = self.successResultOf(deliverer.deliver(html))
        reason = "internal error: RuntimeError: a bug"
        self.assertEqual(
            outcome,
            Failed((Attempt(1_700_000_000.0, None, reason),), False, reason=reason),
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIs(self.breaker.state, BreakerState.open)

    def test_backoff_is_100ms_doubling(self) -> None:
        self.assertEqual([quick_backoff(n) for n in (1, 2, 3, 4)], [0.1, 0.2, 0.4, 0.8])

    def test_first_attempt_succeeds(self) -> None:
        client = ScriptedClient(204)
        outcome = self.successResultOf(self.deliverer(client).deliver(message()))
        self.assertEqual(outcome, Delivered((Attempt(1_700_000_000.0, 204),)))
        [(_body, headers)] = client.requests
        self.assertEqual(headers[b"webhook-id"], b"msg_" + b"0" * 28)
        self.assertEqual(headers[b"webhook-timestamp"], b"1700000000")
        self.assertTrue(headers[b"webhook-signature"].startswith(b"v1,"))

    def test_two_failures_then_success_at_the_right_times(self) -> None:
        client = ScriptedClient(500, 503, 200)
        d = self.deliverer(client).deliver(message())
        self.assertEqual(len(client.requests), 1)
        self.clock.advance(0.099)
        self.assertEqual(len(client.requests), 1)
        self.clock.advance(0.001)
        self.assertEqual(len(client.requests), 2)
        self.clock.advance(0.2)
        self.assertEqual(len(client.requests), 3)
        outcome = self.successResultOf(d)
        assert isinstance(outcome, Delivered)
        self.assertEqual([a.status for a in outcome.attempts], [500, 503, 200])
        ids = {headers[b"webhook-id"] for _, headers in client.requests}
        self.assertEqual(len(ids), 1)
        stamps = [headers[b"webhook-timestamp"] for _, headers in client.requests]
        self.assertEqual(stamps, [b"1700000000"] * 3)
        self.assertEqual(len({body for body, _ in client.requests}), 1)

    def test_all_attempts_fail(self) -> None:
        client = ScriptedClient(default=500)
        d = self.deliverer(client, retries=3).deliver(message())
        self.clock.pump([0.1, 0.2, 0.4])
        outcome = self.successResultOf(d)
        self.assertIsInstance(outcome, Failed)
        assert isinstance(outcome, Failed)
        self.assertFalse(outcome.permanent)
        self.assertEqual(len(client.requests), 4)
        self.assertEqual(outcome.attempts[-1].error, "HTTP 500")

    def test_permanent_rejection_is_not_retried(self) -> None:
        response = WebhookResponse(422, reason="unknown queue")
        client = ScriptedClient(response)
        outcome = self.successResultOf(self.deliverer(client).deliver(message()))
        self.assertEqual(
            outcome,
            Failed(
                (Attempt(1_700_000_000.0, 422, "HTTP 422: unknown queue"),),
                permanent=True,
                reason="unknown queue",
            ),
        )
        self.assertEqual(len(client.requests), 1)

    def test_408_429_and_3xx_are_transient(self) -> None:
        for status in (408, 429, 302, 301, 502):
            client = ScriptedClient(status, 200)
            d = self.deliverer(client).deliver(message())
            self.clock.advance(0.1)
            self.assertIsInstance(self.successResultOf(d), Delivered, status)

    def test_long_retry_after_ends_the_round(self) -> None:
        client = ScriptedClient(WebhookResponse(429, retry_after=30.0))
        outcome = self.successResultOf(self.deliverer(client).deliver(message()))
        assert isinstance(outcome, Failed)
        self.assertEqual(outcome.retry_after, 30.0)
        self.assertEqual(len(client.requests), 1)

    def test_short_retry_after_keeps_quick_retries(self) -> None:
        client = ScriptedClient(WebhookResponse(503, retry_after=0.0), 200)
        d = self.deliverer(client).deliver(message())
        self.clock.advance(0.1)
        self.assertIsInstance(self.successResultOf(d), Delivered)

    def test_no_response_is_transient(self) -> None:
        client = ScriptedClient(
            ConnectionRefusedError(), DeferredTimeoutError(), default=500
        )
        d = self.deliverer(client, retries=1).deliver(message())
        self.clock.advance(0.1)
        outcome = self.successResultOf(d)
        assert isinstance(outcome, Failed)
        self.assertEqual(
            [a.error for a in outcome.attempts], ["connection refused", "timed out"]
        )
        self.assertEqual([a.status for a in outcome.attempts], [None, None])

    def test_outcomes_drive_the_breaker(self) -> None:
        deliverer = self.deliverer(ScriptedClient(default=500), retries=0)
        self.successResultOf(deliverer.deliver(message(1)))
        self.assertIs(self.breaker.state, BreakerState.closed)
        self.successResultOf(deliverer.deliver(message(2)))
        self.assertIs(self.breaker.state, BreakerState.open)

    def test_permanent_rejection_counts_as_reachable(self) -> None:
        self.breaker.failed()
        deliverer = self.deliverer(ScriptedClient(400), retries=0)
        self.successResultOf(deliverer.deliver(message()))
        self.breaker.failed()
        self.assertIs(self.breaker.state, BreakerState.closed)

    def test_cancelling_a_round_stops_it(self) -> None:
        client = ScriptedClient(None)
        d = self.deliverer(client).deliver(message())
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(len(client.requests), 1)
        self.clock.advance(10)
        self.assertEqual(len(client.requests), 1)


class OffloadTests(SynchronousTestCase):
    """Payloads are built by the offload, but for small messages with no HTML."""

    def deliver(
        self, raw: bytes, offload: bool = True, inline_size: int = INLINE_SIZE
    ) -> bytes:
        """The body posted for C{raw}; C{self.built} holds what was offloaded."""
        self.built: list[object] = []

        def record(function: Callable[[], _T]) -> Deferred[_T]:
            self.built.append(function)
            return succeed(function())

        clock = Clock()
        client = ScriptedClient(200)
        deliverer = Deliverer(
            client=client,
            clock=clock,
            breaker=CircuitBreaker(threshold=1, reset=1.0, clock=clock),
            max_retries=0,
            header_prefixes=("X-",),
            offload=record if offload else None,
            inline_size=inline_size,
        )
        delivered = deliverer.deliver(attrs.evolve(message(), raw=raw))
        self.assertIsInstance(self.successResultOf(delivered), Delivered)
        [(body, _headers)] = client.requests
        return body

    def test_built_by_the_offload_unless_small_and_without_html(self) -> None:
        small = b"Subject: small\r\nX-Id: 1\r\n\r\nplain"
        for raw, offloaded in [
            (small, False),
            (small + b"y" * (INLINE_SIZE - len(small)), False),
            (small + b"y" * (INLINE_SIZE - len(small) + 1), True),
            (b"Content-Type: Text/HTML\r\n\r\n<p>rendered</p>", True),
            (b"Subject: mentions text/html\r\n\r\nplain", True),
        ]:
            body = self.deliver(raw)
            expected = encode_payload(
                build_payload(attrs.evolve(message(), raw=raw), ("X-",))
            )
            self.assertEqual(body, expected)
            self.assertEqual(len(self.built), offloaded, raw[:30])

    def test_with_no_inline_size_everything_is_offloaded(self) -> None:
        self.deliver(b"Subject: small\r\n\r\nplain", inline_size=0)
        self.assertEqual(len(self.built), 1)

    def test_what_goes_to_the_offload_can_cross_a_pipe(self) -> None:
        """The payload process gets the build by pickle."""
        self.deliver(b"Content-Type: text/html\r\n\r\n<p>body</p>")
        [build] = self.built
        self.assertEqual(pickle.loads(pickle.dumps(build))(), build())  # type: ignore[operator]

    def test_without_offload_built_here(self) -> None:
        body = self.deliver(b"Content-Type: text/html\r\n\r\n<p>x</p>", offload=False)
        self.assertEqual(json.loads(body)["body"], "x")
        self.assertEqual(self.built, [])
