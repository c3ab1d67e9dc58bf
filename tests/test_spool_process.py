"""
The spool process's two halves without the process: the framing, and how a
batch of requests is answered (the whole process is in tests/test_spool.py).
"""

from __future__ import annotations

import attrs
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from maillaser.message import SpoolStats
from maillaser.spool import DuplicateMessage, MessageNotFound, SpoolDatabase, SpoolError
from maillaser.spool_process import Answer, FrameReader, Request, frame, run
from tests.doubles import message


class FrameTests(SynchronousTestCase):
    @given(
        st.lists(st.binary(max_size=300), max_size=8),
        st.lists(st.integers(min_value=1, max_value=50), min_size=1),
    )
    def test_values_survive_any_split(
        self, values: list[bytes], sizes: list[int]
    ) -> None:
        stream = b"".join(frame(value) for value in values)
        reader = FrameReader()
        received = []
        start = 0
        for size in sizes * (len(stream) // sum(sizes) + 1):
            received += reader.feed(stream[start : start + size])
            start += size
        self.assertEqual(received, values)


class RunTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.database = SpoolDatabase.open(self.mktemp(), create=True)
        self.addCleanup(self.database.close)

    def test_each_run_of_writes_is_one_transaction(self) -> None:
        """In order; reads see the writes before them, not those after."""
        requests = [
            Request(0, SpoolDatabase.insert, (message(1),), write=True),
            Request(1, SpoolDatabase.insert, (message(2),), write=True),
            Request(2, SpoolDatabase.counts, (), write=False),
            Request(3, SpoolDatabase.delete, (message(1).id, "pending"), write=True),
        ]
        batch = run(self.database, requests)
        size = len(message(1).raw)
        self.assertEqual(
            batch.answers,
            [
                Answer(0, size),
                Answer(1, size),
                Answer(2, SpoolStats(pending=2, bytes=2 * size)),
                Answer(3, size),
            ],
        )
        self.assertEqual(batch.transactions, [(2, None), (1, None)])

    def test_a_write_that_cannot_be_done_fails_alone(self) -> None:
        batch = run(
            self.database,
            [
                Request(0, SpoolDatabase.insert, (message(1),), write=True),
                Request(1, SpoolDatabase.insert, (message(1),), write=True),
                Request(2, SpoolDatabase.delete, ("msg_nope", "pending"), write=True),
            ],
        )
        self.assertEqual(batch.answers[0], Answer(0, len(message(1).raw)))
        self.assertIsInstance(batch.answers[1].value, DuplicateMessage)
        self.assertIsInstance(batch.answers[2].value, MessageNotFound)
        self.assertEqual([a.failed for a in batch.answers], [False, True, True])
        self.assertEqual(batch.transactions, [(3, None)])

    def test_a_failed_transaction_fails_every_write_in_it(self) -> None:
        self.database._connection.execute("PRAGMA max_page_count = 1")
        big = [attrs.evolve(message(n), raw=b"x" * 200_000) for n in range(2)]
        batch = run(
            self.database,
            [
                Request(n, SpoolDatabase.insert, (m,), write=True)
                for n, m in enumerate(big)
            ],
        )
        [(count, error)] = batch.transactions
        self.assertEqual(count, 2)
        assert error is not None
        self.assertIn("database or disk is full", str(error))
        self.assertEqual(
            batch.answers, [Answer(0, error, True), Answer(1, error, True)]
        )

    def test_a_bug_is_answered_and_the_spool_goes_on(self) -> None:
        def broken(database: SpoolDatabase) -> None:
            raise ZeroDivisionError("a bug")

        batch = run(
            self.database,
            [
                Request(0, broken, (), write=False),
                Request(1, broken, (), write=True),
                Request(2, SpoolDatabase.counts, (), write=False),
            ],
        )
        for answer in batch.answers[:2]:
            self.assertTrue(answer.failed)
            self.assertIsInstance(answer.value, SpoolError)
            self.assertIn("ZeroDivisionError('a bug')", str(answer.value))
        self.assertEqual(batch.answers[2], Answer(2, SpoolStats()))
