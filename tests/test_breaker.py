"""The circuit breaker's states, driven by a Clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from maillaser.webhook import BreakerState, CircuitBreaker


class BreakerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.breaker = CircuitBreaker(threshold=3, reset=60.0, clock=self.clock)

    def open_it(self) -> None:
        for _ in range(3):
            self.assertTrue(self.breaker.acquire())
            self.breaker.failed()

    def test_closed_allows_everything(self) -> None:
        self.assertIs(self.breaker.state, BreakerState.closed)
        self.assertIsNone(self.breaker.allowance())
        self.assertTrue(all(self.breaker.acquire() for _ in range(100)))

    def test_opens_after_threshold_consecutive_failures(self) -> None:
        self.breaker.failed()
        self.breaker.failed()
        self.breaker.succeeded()
        self.breaker.failed()
        self.breaker.failed()
        self.assertIs(self.breaker.state, BreakerState.closed)
        self.breaker.failed()
        self.assertIs(self.breaker.state, BreakerState.open)
        self.assertEqual(self.breaker.allowance(), 0)
        self.assertFalse(self.breaker.acquire())
        self.assertEqual(self.breaker.probe_at, 0.0 + 60.0)

    def test_one_probe_after_reset(self) -> None:
        self.open_it()
        self.clock.advance(59.9)
        self.assertFalse(self.breaker.acquire())
        self.clock.advance(0.1)
        self.assertIs(self.breaker.state, BreakerState.half_open)
        self.assertEqual(self.breaker.allowance(), 1)
        self.assertTrue(self.breaker.acquire())
        self.assertFalse(self.breaker.acquire())
        self.assertEqual(self.breaker.allowance(), 0)

    def test_probe_success_closes(self) -> None:
        self.open_it()
        self.clock.advance(60)
        self.breaker.acquire()
        self.breaker.succeeded()
        self.assertIs(self.breaker.state, BreakerState.closed)
        self.assertIsNone(self.breaker.probe_at)

    def test_probe_failure_reopens_at_once(self) -> None:
        self.open_it()
        self.clock.advance(60)
        self.breaker.acquire()
        self.breaker.failed()
        self.assertIs(self.breaker.state, BreakerState.open)
        self.assertEqual(self.breaker.probe_at, 120.0)
        self.clock.advance(59)
        self.assertFalse(self.breaker.acquire())

    def test_late_failure_while_open_keeps_the_timer(self) -> None:
        self.open_it()
        self.clock.advance(30)
        self.breaker.failed()  # a round that started before the breaker opened
        self.assertEqual(self.breaker.probe_at, 60.0)
