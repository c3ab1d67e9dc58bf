"""The circuit breaker's states, driven by a Clock."""

from __future__ import annotations

from functools import partial

import pytest
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from maillaser.spool import PostgresDatabase, SpoolError
from maillaser.webhook import BreakerState, CircuitBreaker, SharedBreaker, webhook_key
from tests.test_spool import PostgresCase


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


@pytest.mark.usefixtures("postgres_url")
class SharedBreakerTests(PostgresCase):
    """Two bridges' breakers over one shared spool: one state, one probe."""

    def breakers(self) -> list[CircuitBreaker]:
        self.woken: list[str] = []
        breakers = []
        for name in ("one", "two"):
            breaker = CircuitBreaker(threshold=2, reset=60.0, clock=self.clock)
            shared = SharedBreaker(
                self.open(name),
                webhook_key("https://hooks.example/x"),
                partial(self.woken.append, name),
            )
            shared.start(breaker)
            self.addCleanup(shared.stop)
            breakers.append(breaker)
        return breakers

    def test_one_opening_opens_it_for_all(self) -> None:
        one, two = self.breakers()
        one.failed()
        one.failed()
        self.assertEqual(two.state, BreakerState.closed)
        self.clock.advance(1.0)
        self.assertEqual((one.state, two.state), (BreakerState.open,) * 2)
        self.assertEqual((one.allowance(), two.allowance()), (0, 0))

    def test_one_probe_per_reset_period_and_its_success_closes_all(self) -> None:
        one, two = self.breakers()
        one.failed()
        one.failed()
        self.clock.advance(60.0)
        self.assertEqual((one.state, two.state), (BreakerState.half_open,) * 2)
        self.assertEqual(one.allowance(), 0)  # asked; granted, and woken
        self.assertEqual(self.woken, ["one"])
        self.assertEqual(two.allowance(), 0)  # asked; refused
        self.assertEqual(two.allowance(), 0)
        self.assertEqual(self.woken, ["one"])
        self.assertTrue(one.acquire())
        self.assertFalse(two.acquire())
        one.succeeded()
        self.clock.advance(1.0)
        self.assertEqual((one.state, two.state), (BreakerState.closed,) * 2)
        self.assertIsNone(two.allowance())

    def test_a_failed_probe_reopens_it_for_all(self) -> None:
        one, two = self.breakers()
        one.failed()
        one.failed()
        self.clock.advance(60.0)
        one.allowance()
        self.assertTrue(one.acquire())
        self.clock.advance(5.0)
        one.failed()
        self.clock.advance(1.0)
        self.assertEqual(two.probe_at, 125.0)
        self.clock.advance(59.0)
        self.assertEqual(two.allowance(), 0)  # asked, granted: its turn now
        self.assertTrue(two.acquire())
        self.assertFalse(one.acquire())

    def test_without_the_store_it_decides_alone(self) -> None:
        [one, _] = self.breakers()
        one.failed()
        one.failed()
        assert one.shared is not None

        def unreachable(*args: object) -> bool:
            raise SpoolError("unreachable")

        self.patch(PostgresDatabase, "claim_probe", unreachable)
        self.clock.advance(60.0)
        one.allowance()
        self.assertTrue(one.acquire())
