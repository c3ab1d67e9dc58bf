"""Delivery rounds: attempts, quick backoff, classification, signing headers."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from zope.interface import implementer
from zope.interface.verify import verifyObject

from maillaser.interfaces import IPayloadBuilder, IWebhookPoster
from maillaser.message import Attempt, Message, Payload
from maillaser.webhook import (
    BreakerState,
    CircuitBreaker,
    Delivered,
    Deliverer,
    Failed,
    WebhookResponse,
    describe_error,
    encoded_payload,
    is_transient,
    quick_backoff,
    settlement,
    verify,
)
from tests.doubles import InlinePayloads, ScriptedPoster, message

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class DeliveryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.breaker = CircuitBreaker(threshold=2, reset=60.0, clock=self.clock)

    def deliverer(
        self,
        poster: ScriptedPoster,
        retries: int = 3,
        payloads: IPayloadBuilder | None = None,
    ) -> Deliverer:
        return Deliverer(
            poster=poster,
            payloads=payloads or InlinePayloads(("X-",)),
            clock=self.clock,
            breaker=self.breaker,
            max_retries=retries,
            secrets=(SECRET,),
        )

    def test_doubles(self) -> None:
        self.assertTrue(verifyObject(IWebhookPoster, ScriptedPoster()))
        self.assertTrue(verifyObject(IPayloadBuilder, InlinePayloads()))

    def test_the_payload_is_built_once_per_round(self) -> None:
        """Built by the payload builder, signed and sent as it built it."""
        payloads = InlinePayloads(("X-",))
        poster = ScriptedPoster(500, 200)
        d = self.deliverer(poster, payloads=payloads).deliver(message())
        self.clock.advance(0.1)
        self.assertIsInstance(self.successResultOf(d), Delivered)
        self.assertEqual(payloads.built, [message()])
        expected = encoded_payload(message(), ("X-",))
        self.assertEqual([body for body, _ in poster.requests], [expected] * 2)
        headers = {k.decode(): v.decode() for k, v in poster.requests[0][1].items()}
        verify(SECRET, headers, expected, now=1_700_000_000)

    def test_a_round_that_breaks_is_a_failed_round(self) -> None:
        """Settled and retried later like any failure, and the breaker hears it."""

        @implementer(IPayloadBuilder)
        class Broken:
            def build(self, message: Message) -> Deferred[Payload]:
                return fail(RuntimeError("a bug"))

        self.breaker.threshold = 1
        deliverer = self.deliverer(ScriptedPoster(), payloads=Broken())
        outcome = self.successResultOf(deliverer.deliver(message()))
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
        poster = ScriptedPoster(204)
        outcome = self.successResultOf(self.deliverer(poster).deliver(message()))
        self.assertEqual(outcome, Delivered((Attempt(1_700_000_000.0, 204),)))
        [(_body, headers)] = poster.requests
        self.assertEqual(headers[b"webhook-id"], b"msg_" + b"0" * 28)
        self.assertEqual(headers[b"webhook-timestamp"], b"1700000000")
        self.assertTrue(headers[b"webhook-signature"].startswith(b"v1,"))

    def test_two_failures_then_success_at_the_right_times(self) -> None:
        poster = ScriptedPoster(500, 503, 200)
        d = self.deliverer(poster).deliver(message())
        self.assertEqual(len(poster.requests), 1)
        self.clock.advance(0.099)
        self.assertEqual(len(poster.requests), 1)
        self.clock.advance(0.001)
        self.assertEqual(len(poster.requests), 2)
        self.clock.advance(0.2)
        self.assertEqual(len(poster.requests), 3)
        outcome = self.successResultOf(d)
        assert isinstance(outcome, Delivered)
        self.assertEqual([a.status for a in outcome.attempts], [500, 503, 200])
        ids = {headers[b"webhook-id"] for _, headers in poster.requests}
        self.assertEqual(len(ids), 1)
        stamps = [headers[b"webhook-timestamp"] for _, headers in poster.requests]
        self.assertEqual(stamps, [b"1700000000"] * 3)
        self.assertEqual(len({body for body, _ in poster.requests}), 1)

    def test_all_attempts_fail(self) -> None:
        poster = ScriptedPoster(default=500)
        d = self.deliverer(poster, retries=3).deliver(message())
        self.clock.pump([0.1, 0.2, 0.4])
        outcome = self.successResultOf(d)
        self.assertIsInstance(outcome, Failed)
        assert isinstance(outcome, Failed)
        self.assertFalse(outcome.permanent)
        self.assertEqual(len(poster.requests), 4)
        self.assertEqual(outcome.attempts[-1].error, "HTTP 500")

    def test_permanent_rejection_is_not_retried(self) -> None:
        response = WebhookResponse(422, reason="unknown queue")
        poster = ScriptedPoster(response)
        outcome = self.successResultOf(self.deliverer(poster).deliver(message()))
        self.assertEqual(
            outcome,
            Failed(
                (Attempt(1_700_000_000.0, 422, "HTTP 422: unknown queue"),),
                permanent=True,
                reason="unknown queue",
            ),
        )
        self.assertEqual(len(poster.requests), 1)

    def test_408_429_and_3xx_are_transient(self) -> None:
        for status in (408, 429, 302, 301, 502):
            poster = ScriptedPoster(status, 200)
            d = self.deliverer(poster).deliver(message())
            self.clock.advance(0.1)
            self.assertIsInstance(self.successResultOf(d), Delivered, status)

    def test_long_retry_after_ends_the_round(self) -> None:
        poster = ScriptedPoster(WebhookResponse(429, retry_after=30.0))
        outcome = self.successResultOf(self.deliverer(poster).deliver(message()))
        assert isinstance(outcome, Failed)
        self.assertEqual(outcome.retry_after, 30.0)
        self.assertEqual(len(poster.requests), 1)

    def test_short_retry_after_keeps_quick_retries(self) -> None:
        poster = ScriptedPoster(WebhookResponse(503, retry_after=0.0), 200)
        d = self.deliverer(poster).deliver(message())
        self.clock.advance(0.1)
        self.assertIsInstance(self.successResultOf(d), Delivered)

    def test_no_response_is_transient(self) -> None:
        poster = ScriptedPoster(
            ConnectionRefusedError(), DeferredTimeoutError(), default=500
        )
        d = self.deliverer(poster, retries=1).deliver(message())
        self.clock.advance(0.1)
        outcome = self.successResultOf(d)
        assert isinstance(outcome, Failed)
        self.assertEqual(
            [a.error for a in outcome.attempts], ["connection refused", "timed out"]
        )
        self.assertEqual([a.status for a in outcome.attempts], [None, None])

    def test_outcomes_drive_the_breaker(self) -> None:
        deliverer = self.deliverer(ScriptedPoster(default=500), retries=0)
        self.successResultOf(deliverer.deliver(message(1)))
        self.assertIs(self.breaker.state, BreakerState.closed)
        self.successResultOf(deliverer.deliver(message(2)))
        self.assertIs(self.breaker.state, BreakerState.open)

    def test_permanent_rejection_counts_as_reachable(self) -> None:
        self.breaker.failed()
        deliverer = self.deliverer(ScriptedPoster(400), retries=0)
        self.successResultOf(deliverer.deliver(message()))
        self.breaker.failed()
        self.assertIs(self.breaker.state, BreakerState.closed)

    def test_cancelling_a_round_stops_it(self) -> None:
        poster = ScriptedPoster(None)
        d = self.deliverer(poster).deliver(message())
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(len(poster.requests), 1)
        self.clock.advance(10)
        self.assertEqual(len(poster.requests), 1)


class ClassificationTests(SynchronousTestCase):
    def test_transient_statuses(self) -> None:
        self.assertEqual(
            [
                s
                for s in (200, 301, 400, 404, 408, 422, 429, 500, 503)
                if is_transient(s)
            ],
            [301, 408, 429, 500, 503],
        )

    def test_settlement(self) -> None:
        self.assertEqual(settlement(Delivered(())), "delivered")
        self.assertEqual(settlement(Failed((), permanent=True)), "rejected")
        self.assertEqual(settlement(Failed((), permanent=False)), "retry")

    def test_describe_error(self) -> None:
        """Agent's wrapped failures are described by what they wrap."""
        lost = ResponseNeverReceived([Failure(ConnectionLost("gone"))])
        self.assertEqual(
            [
                describe_error(DeferredTimeoutError()),
                describe_error(ConnectionRefusedError()),
                describe_error(lost),
                describe_error(ResponseNeverReceived([])),
            ],
            [
                "timed out",
                "connection refused",
                "ConnectionLost: Connection to the other side was lost in a"
                " non-clean fashion: gone.",
                "ResponseNeverReceived: []",
            ],
        )
