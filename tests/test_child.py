"""
The child processes' machinery without the processes: the framing, and how
requests are answered (the processes themselves are in tests/test_spool.py
and tests/test_payload_process.py).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from maillaser.child import Answer, ChildError, FrameReader, Request, frame, run_each


class Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")  # its args cannot make it again


def divide(a: int, b: int) -> float:
    return a / b


def refuse(a: int, b: int) -> None:
    raise Unpicklable(a, b)


class FrameTests(SynchronousTestCase):
    @given(
        st.lists(st.binary(max_size=300), max_size=8),
        st.lists(st.integers(min_value=1, max_value=50), min_size=1),
    )
    def test_values_survive_any_split(
        self, values: list[bytes], sizes: list[int]
    ) -> None:
        stream = b"".join(piece for value in values for piece in frame(value))
        reader = FrameReader()
        received = []
        start = 0
        for size in sizes * (len(stream) // sum(sizes) + 1):
            received += reader.feed(stream[start : start + size])
            start += size
        self.assertEqual(received, values)


class RunEachTests(SynchronousTestCase):
    def test_each_answered_its_error_included(self) -> None:
        """A bad request fails alone; the child goes on with the next."""
        batch = run_each(
            [
                Request(0, divide, (1, 2)),
                Request(1, divide, (1, 0)),
                Request(2, refuse, (1, 2)),
                Request(3, divide, (3, 1)),
            ]
        )
        first, zero, refused, last = batch.answers
        self.assertEqual((first, last), (Answer(0, 0.5), Answer(3, 3.0)))
        self.assertEqual((zero.number, zero.failed), (1, True))
        self.assertIsInstance(zero.value, ZeroDivisionError)
        # What pickle could not make again on the bridge's side is described.
        self.assertEqual((refused.number, refused.failed), (2, True))
        self.assertIsInstance(refused.value, ChildError)
        self.assertEqual(str(refused.value), "Unpicklable('1/2')")
        self.assertEqual(batch.transactions, ())
