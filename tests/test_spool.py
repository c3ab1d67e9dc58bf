"""
Tests for L{maillaser.spool}: the durable queue behind every SMTP ``250``.

These use the real reactor, because the spool runs SQLite in a real child
process and its answers come back through a pipe.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
from typing import cast

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, gatherResults
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from maillaser.child import Answer, ChildError, Request
from maillaser.message import Attempt, Envelope, Message, QueuedMessage, SpoolStats
from maillaser.spool import (
    DATABASE_NAME,
    DUE_BYTES,
    DuplicateMessage,
    MessageNotFound,
    SpoolDatabase,
    SpoolEntry,
    SpoolError,
    SqliteSpool,
    answer_requests,
    open_spool,
)
from tests.doubles import stored
from tests.helpers import failure_of

RAW = (
    b"From: =?utf-8?q?Caf=C3=A9?= <a@example.org>\r\n"
    b"Subject: caf\xc3\xa9 \xff\r\n"
    b"\r\n"
    b"line one\r\n\x00binary\xfe\r\n.dot\r\n"
)


ENVELOPE = Envelope(
    sender="",
    recipients=("Ops@Example.org", "b@example.org"),
    helo="mx.example.net",
    peer="192.0.2.7:40001",
)


def message(
    id: str = "msg_1", received_at: float = 1000.0, raw: bytes = RAW
) -> Message:
    return stored(ENVELOPE, id, received_at, raw)


# Run in the spool process by spool._call, which pickle finds by name.


def pid(database: SpoolDatabase) -> int:
    return os.getpid()


def settings(database: SpoolDatabase) -> tuple[object, ...]:
    return tuple(
        database._connection.execute(f"PRAGMA {name}").fetchone()[0]
        for name in ("journal_mode", "synchronous", "busy_timeout")
    )


def limit_pages(database: SpoolDatabase, pages: int) -> None:
    """SQLite then refuses to grow the file, as on a full disk."""
    database._connection.execute(f"PRAGMA max_page_count = {pages}")


def ended(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class SqliteSpoolTests(TestCase):
    """
    Where a test must act on the spool's own connection, it does so through
    C{spool._call}, in the spool process.
    """

    def setUp(self) -> None:
        self.directory = os.path.join(self.mktemp(), "spool")
        self.clock = Clock()

    async def open(self) -> SqliteSpool:
        spool = open_spool(self.directory, reactor, self.clock)
        self.addCleanup(spool.close)
        return spool

    def database(self) -> SpoolDatabase:
        """A second connection, as the admin tool would open it."""
        database = SpoolDatabase.open(self.directory, create=False)
        self.addCleanup(database.close)
        return database

    async def test_add_then_due(self) -> None:
        """What was added comes back byte for byte, envelope included."""
        spool = await self.open()
        await spool.add(message())
        self.assertEqual(await spool.due(1000.0, 10), [QueuedMessage(message(), 0)])

    async def test_creates_private_directory(self) -> None:
        await self.open()
        mode = os.stat(self.directory).st_mode
        self.assertEqual(stat.S_IMODE(mode), 0o700)
        self.assertTrue(os.path.isfile(os.path.join(self.directory, DATABASE_NAME)))

    async def test_database_settings(self) -> None:
        """WAL with synchronous commits: durable at commit, readable alongside."""
        spool = await self.open()
        self.assertEqual(await spool._call(settings), ("wal", 2, 10000))

    async def test_survives_reopen_and_forgets_claims(self) -> None:
        """
        A committed message is still pending after a restart, and is due
        again even though it was claimed before (at-least-once).
        """
        spool = await self.open()
        await spool.add(message())
        self.assertEqual(len(await spool.due(1000.0, 10)), 1)
        await spool.close()

        reopened = await self.open()
        self.assertEqual(
            reopened.stats(), SpoolStats(pending=1, dead=0, bytes=len(RAW))
        )
        self.assertEqual(await reopened.due(1000.0, 10), [QueuedMessage(message(), 0)])

    async def test_group_commit(self) -> None:
        """
        Adds made in one turn of the reactor share one transaction, and each
        Deferred fires only once its message is visible to another connection.
        """
        spool = await self.open()
        committed_before_callback = []

        def check(_: None, id: str) -> None:
            committed_before_callback.append(self.database().entry(id).id)

        ids = [f"msg_{i:02d}" for i in range(20)]
        adds = [spool.add(message(id)).addCallback(check, id) for id in ids]
        await gatherResults(adds)

        self.assertEqual(committed_before_callback, ids)
        self.assertEqual(spool.commits, 1)
        self.assertEqual(spool.stats(), SpoolStats(pending=20, bytes=20 * len(RAW)))

    async def test_all_database_work_in_one_other_process(self) -> None:
        """SQLite never runs in the bridge's process, and always in the same one."""
        spool = await self.open()
        writing, reading = spool._write(pid), spool._call(pid)
        [child] = set(await gatherResults([writing, reading]))
        self.assertNotEqual(child, os.getpid())
        await spool.add(message())
        await spool.due(1000.0, 1)
        self.assertEqual(await spool._call(pid), child)

    async def test_the_spool_process_outlives_signals_for_the_group(self) -> None:
        """
        SIGINT and SIGTERM, which a terminal or a service manager sends to
        the bridge's whole process group, leave the spool to the bridge.
        """
        spool = await self.open()
        child = await spool._call(pid)
        for number in (signal.SIGINT, signal.SIGTERM):
            os.kill(child, number)
        await spool.add(message())
        self.assertEqual(await spool._call(pid), child)

    async def test_a_spool_process_that_dies_is_started_again(self) -> None:
        """
        What it had not answered fails (451 for SMTP), health says the spool
        is not writable, and the next request starts a new one.
        """
        spool = await self.open()
        child = await spool._call(pid)
        os.kill(child, signal.SIGKILL)
        error = await failure_of(self, spool.add(message()), SpoolError)
        self.assertIn("child spool", str(error))
        self.assertEqual(len(self.flushLoggedErrors(ChildError)), 1)
        self.assertFalse(spool.writable())
        # At most one start a second, for a child that keeps dying: the
        # next request waits for it rather than fail.
        added = spool.add(message())
        self.assertNoResult(added)
        self.clock.advance(1.0)
        await added
        self.assertTrue(spool.writable())
        self.assertNotEqual(await spool._call(pid), child)
        self.assertEqual(spool.stats(), SpoolStats(pending=1, bytes=len(RAW)))

    async def test_due_order_limit_and_claims(self) -> None:
        """
        Oldest first; C{limit} respected; a claimed message is not handed out
        again, not even to a due() that was already running.
        """
        spool = await self.open()
        for id, received_at in (("msg_c", 30.0), ("msg_a", 10.0), ("msg_b", 20.0)):
            await spool.add(message(id, received_at))
        first, second = spool.due(100.0, 2), spool.due(100.0, 2)
        self.assertEqual([q.message.id for q in await first], ["msg_a", "msg_b"])
        self.assertEqual([q.message.id for q in await second], [])
        self.assertEqual([q.message.id for q in await spool.due(100.0, 5)], ["msg_c"])
        self.assertEqual(await spool.due(100.0, 5), [])

    async def test_due_only_when_due(self) -> None:
        spool = await self.open()
        await spool.add(message(received_at=50.0))
        self.assertEqual(await spool.due(49.0, 10), [])
        self.assertEqual(len(await spool.due(50.0, 10)), 1)

    async def test_next_due(self) -> None:
        spool = await self.open()
        self.assertIsNone(await spool.next_due())
        await spool.add(message("msg_late", 70.0))
        await spool.add(message("msg_early", 40.0))
        self.assertEqual(await spool.next_due(), 40.0)
        await spool.due(40.0, 1)
        self.assertEqual(await spool.next_due(), 70.0)
        await spool.due(70.0, 1)
        self.assertIsNone(await spool.next_due())

    async def test_reschedule(self) -> None:
        """
        A failed round counts, hides the message until its time, records the
        attempts and the last error, and releases the claim.
        """
        spool = await self.open()
        await spool.add(message())
        await spool.due(1000.0, 1)
        attempts = [Attempt(1001.0, 503, "HTTP 503"), Attempt(1002.0, None, "timeout")]
        await spool.reschedule("msg_1", 1300.0, attempts)

        self.assertEqual(await spool.due(1299.0, 10), [])
        self.assertEqual(await spool.next_due(), 1300.0)
        self.assertEqual(await spool.due(1300.0, 10), [QueuedMessage(message(), 1)])
        self.assertEqual(spool.stats(), SpoolStats(pending=1, bytes=len(RAW)))
        database = self.database()
        self.assertEqual(database.attempts("msg_1"), attempts)
        self.assertEqual(
            database.entry("msg_1"),
            SpoolEntry(
                id="msg_1",
                state="pending",
                envelope=message().envelope,
                size=len(RAW),
                received_at=1000.0,
                rounds=1,
                attempts=2,
                next_attempt_at=1300.0,
                last_error="timeout",
                dead_at=None,
            ),
        )

    async def test_claim_held_until_settled(self) -> None:
        """
        A due() that runs while a reschedule waits for its commit does not
        hand the message out again under its old due time.
        """
        spool = await self.open()
        await spool.add(message())
        await spool.due(1000.0, 1)
        committing = spool.add(message("msg_2", 5000.0))
        waiting = spool.reschedule("msg_1", 2000.0, [])
        racing = spool.due(1000.0, 10)
        self.assertEqual(await racing, [])
        await gatherResults([committing, waiting])
        self.assertEqual(spool.commits, 2)
        self.assertEqual(await spool.due(1999.0, 10), [])
        self.assertEqual(await spool.due(2000.0, 10), [QueuedMessage(message(), 1)])

    async def test_attempts_kept_are_bounded(self) -> None:
        """Only the last 20 attempts stay on disk; the count keeps them all."""
        spool = await self.open()
        await spool.add(message())
        attempts = [Attempt(float(i), 500, f"HTTP 500 #{i}") for i in range(25)]
        await spool.reschedule("msg_1", 1300.0, attempts[:15])
        await spool.reschedule("msg_1", 1600.0, attempts[15:])
        database = self.database()
        self.assertEqual(database.attempts("msg_1"), attempts[5:])
        self.assertEqual(database.entry("msg_1").attempts, 25)

    async def test_bury(self) -> None:
        spool = await self.open()
        await spool.add(message())
        await spool.add(message("msg_2"))
        await spool.due(1000.0, 10)
        self.clock.advance(5000.0)
        await spool.bury("msg_1", [Attempt(4999.0, 400, "HTTP 400 bad payload")])

        self.assertEqual(spool.stats(), SpoolStats(pending=1, dead=1, bytes=len(RAW)))
        self.assertIsNone(await spool.next_due())
        entry = self.database().entry("msg_1")
        self.assertEqual(
            (entry.state, entry.dead_at, entry.last_error, entry.next_attempt_at),
            ("dead", 5000.0, "HTTP 400 bad payload", None),
        )
        # A dead letter is not delivered, even after a restart.
        await spool.close()
        reopened = await self.open()
        self.assertEqual(
            [q.message.id for q in await reopened.due(10_000.0, 10)], ["msg_2"]
        )

    async def test_delivered(self) -> None:
        spool = await self.open()
        await spool.add(message())
        await spool.due(1000.0, 1)
        await spool.reschedule("msg_1", 1000.0, [Attempt(1000.0, 500, "HTTP 500")])
        await spool.due(1000.0, 1)
        await spool.delivered("msg_1", [Attempt(1001.0, 204)])

        self.assertEqual(spool.stats(), SpoolStats())
        self.assertEqual(await spool.due(2000.0, 10), [])
        database = self.database()
        self.assertEqual(database.attempts("msg_1"), [])
        self.assertRaises(MessageNotFound, database.entry, "msg_1")

    async def test_settling_unknown_message(self) -> None:
        """Settling a message the spool does not hold fails; stats stay right."""
        spool = await self.open()
        for settle in (
            spool.delivered("msg_nope", []),
            spool.reschedule("msg_nope", 1.0, []),
            spool.bury("msg_nope", []),
        ):
            error = await failure_of(self, settle, MessageNotFound)
            self.assertEqual(str(error), "no message msg_nope in the spool")
        self.assertEqual(spool.stats(), SpoolStats())
        self.assertTrue(spool.writable())

    async def test_duplicate_add_fails_alone(self) -> None:
        """A second add of the same id fails; its batch-mates still commit."""
        spool = await self.open()
        first = spool.add(message())
        again, other = spool.add(message()), spool.add(message("msg_2"))
        await first
        await self.assertFailure(again, DuplicateMessage)
        await other
        self.assertEqual(spool.commits, 1)
        self.assertTrue(spool.writable())
        self.assertEqual(spool.stats(), SpoolStats(pending=2, bytes=2 * len(RAW)))

    async def test_stats_refresh_after_external_change(self) -> None:
        """The admin tool changes the database; refresh() sees it."""
        spool = await self.open()
        await spool.add(message())
        await spool.bury("msg_1", [])
        self.assertEqual(spool.stats(), SpoolStats(pending=0, dead=1, bytes=0))

        database = self.database()
        with database.transaction():
            database.requeue("msg_1", 2000.0)
        self.assertEqual(spool.stats(), SpoolStats(pending=0, dead=1, bytes=0))
        expected = SpoolStats(pending=1, dead=0, bytes=len(RAW))
        self.assertEqual(await spool.refresh(), expected)
        self.assertEqual(spool.stats(), expected)
        self.assertEqual(await spool.due(2000.0, 1), [QueuedMessage(message(), 0)])

    async def test_disk_full(self) -> None:
        """
        When the database cannot grow, every add of the failed group fails
        with SpoolError (the SMTP layer answers 451), nothing is half
        stored, writable() turns False, and recovers with the next commit.
        """
        spool = await self.open()
        await spool._call(limit_pages, 1)
        big = b"x" * 200_000
        first = [spool.add(message("msg_0", raw=big))]
        results = await DeferredList(first, consumeErrors=True)
        later = [spool.add(message(f"msg_{i}", raw=big)) for i in (1, 2)]
        results += await DeferredList(later, consumeErrors=True)

        self.assertEqual([ok for ok, _ in results], [False, False, False])
        for _, result in results:
            # A failed add's result is its Failure, which Twisted's
            # annotation of DeferredList leaves out.
            failure = cast(Failure, result)
            failure.trap(SpoolError)
            self.assertIn("database or disk is full", failure.getErrorMessage())
            self.assertIn(DATABASE_NAME, failure.getErrorMessage())
        # The first failed commit in full; the next, while it lasts, a warning.
        self.assertEqual(len(self.flushLoggedErrors(SpoolError)), 1)
        self.assertFalse(spool.writable())
        self.assertEqual(spool.commits, 0)
        self.assertEqual(spool.stats(), SpoolStats())
        self.assertEqual(await spool.due(5000.0, 10), [])

        await spool._call(limit_pages, 1_000_000)
        await spool.add(message(raw=big))
        self.assertTrue(spool.writable())
        self.assertEqual(spool.stats(), SpoolStats(pending=1, bytes=len(big)))

    async def test_refresh_finds_out_when_the_disk_has_room_again(self) -> None:
        """Without any mail to try it, health would say unwritable for ever."""
        spool = await self.open()
        await spool._call(limit_pages, 1)
        await self.assertFailure(spool.add(message(raw=b"x" * 200_000)), SpoolError)
        self.flushLoggedErrors(SpoolError)
        await spool.refresh()
        self.assertFalse(spool.writable())  # the probe could not store either
        await spool._call(limit_pages, 1_000_000)
        await spool.refresh()
        self.assertTrue(spool.writable())
        self.assertEqual(await spool.refresh(), SpoolStats())  # nothing left behind
        self.assertEqual(await spool._call(SpoolDatabase.entries), [])

    async def test_corrupt_database(self) -> None:
        """A damaged file stops start-up with an error naming it."""
        os.makedirs(self.directory)
        path = os.path.join(self.directory, DATABASE_NAME)
        with open(path, "wb") as f:
            f.write(b"this is not an SQLite database, it is garbage " * 200)
        error = self.assertRaises(SpoolError, open_spool, self.directory, reactor)
        self.assertEqual(
            str(error),
            f"spool database {path} is unreadable or corrupt: file is not a database",
        )

    async def test_damaged_page(self) -> None:
        """quick_check finds damage inside an otherwise valid database file."""
        spool = await self.open()
        for i in range(50):
            await spool.add(message(f"msg_{i:02d}", raw=b"y" * 3000))
        await spool.close()
        # Closing the last connection checkpointed the WAL into the file.
        path = os.path.join(self.directory, DATABASE_NAME)
        self.assertFalse(os.path.exists(path + "-wal"))
        with open(path, "r+b") as f:
            f.seek(4096 * 3)
            f.write(b"\xa5" * 4096)
        error = self.assertRaises(SpoolError, open_spool, self.directory, reactor)
        self.assertTrue(str(error).startswith(f"spool database {path} is "), error)

    async def test_foreign_database(self) -> None:
        """Somebody else's database is refused and left untouched."""
        os.makedirs(self.directory)
        path = os.path.join(self.directory, DATABASE_NAME)
        other = sqlite3.connect(path)
        other.execute("CREATE TABLE messages (id TEXT)")
        other.commit()
        other.close()
        error = self.assertRaises(SpoolError, open_spool, self.directory, reactor)
        self.assertEqual(str(error), f"{path} is not a MailLaser spool database")
        other = sqlite3.connect(path)
        self.assertEqual(other.execute("PRAGMA journal_mode").fetchone(), ("delete",))
        other.close()

    async def test_newer_schema(self) -> None:
        spool = await self.open()
        await spool.close()
        path = os.path.join(self.directory, DATABASE_NAME)
        newer = sqlite3.connect(path)
        newer.execute("PRAGMA user_version = 2")
        newer.close()
        error = self.assertRaises(SpoolError, open_spool, self.directory, reactor)
        self.assertEqual(
            str(error),
            f"{path} has spool schema version 2; this MailLaser reads version 1",
        )

    async def test_close_finishes_writes(self) -> None:
        """
        Writes submitted before close() are committed; later ones fail; and
        the spool process is gone.
        """
        spool = await self.open()
        child = await spool._call(pid)
        adds = [spool.add(message(f"msg_{i}")) for i in range(3)]
        closing = spool.close()
        late = spool.add(message("msg_late"))
        await gatherResults(adds)
        await closing
        error = await failure_of(self, late, SpoolError)
        self.assertEqual(
            str(error), f"spool {self.directory}/{DATABASE_NAME} is closed"
        )
        self.assertFalse(spool.writable())
        await self.assertFailure(spool.due(1000.0, 1), SpoolError)
        self.assertTrue(ended(child))
        self.assertEqual(
            [entry.id for entry in self.database().entries()],
            ["msg_0", "msg_1", "msg_2"],
        )

    async def test_open_spool_waits(self) -> None:
        """The blocking open, for start-up code: a ready spool, or the error."""
        spool = open_spool(self.directory, reactor, self.clock)
        self.addCleanup(spool.close)
        await spool.add(message())
        await spool.close()

        reopened = open_spool(self.directory, reactor)
        self.addCleanup(reopened.close)
        self.assertEqual(reopened.stats(), SpoolStats(pending=1, bytes=len(RAW)))
        await reopened.close()

        with open(os.path.join(self.directory, DATABASE_NAME), "wb") as f:
            f.write(b"garbage" * 1000)
        self.assertRaises(SpoolError, open_spool, self.directory, reactor)


class AnswerRequestsTests(SynchronousTestCase):
    """The spool process's side: a batch of requests, each run of writes at once."""

    def setUp(self) -> None:
        self.database = SpoolDatabase.open(self.mktemp(), create=True)
        self.addCleanup(self.database.close)

    def test_each_run_of_writes_is_one_transaction(self) -> None:
        """In order; reads see the writes before them, not those after."""
        requests = [
            Request(0, SpoolDatabase.insert, (message("msg_1"),), write=True),
            Request(1, SpoolDatabase.insert, (message("msg_2"),), write=True),
            Request(2, SpoolDatabase.counts, (), write=False),
            Request(
                3, SpoolDatabase.delete, (message("msg_1").id, "pending"), write=True
            ),
        ]
        batch = answer_requests(self.database, requests)
        size = len(message("msg_1").raw)
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
        batch = answer_requests(
            self.database,
            [
                Request(0, SpoolDatabase.insert, (message("msg_1"),), write=True),
                Request(1, SpoolDatabase.insert, (message("msg_1"),), write=True),
                Request(2, SpoolDatabase.delete, ("msg_nope", "pending"), write=True),
            ],
        )
        self.assertEqual(batch.answers[0], Answer(0, len(message("msg_1").raw)))
        self.assertIsInstance(batch.answers[1].value, DuplicateMessage)
        self.assertIsInstance(batch.answers[2].value, MessageNotFound)
        self.assertEqual([a.failed for a in batch.answers], [False, True, True])
        self.assertEqual(batch.transactions, [(3, None)])

    def test_a_failed_transaction_fails_every_write_in_it(self) -> None:
        self.database._connection.execute("PRAGMA max_page_count = 1")
        big = [message(f"msg_{n}", raw=b"x" * 200_000) for n in range(2)]
        batch = answer_requests(
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
        """A read's fails alone, a write's fails its transaction."""

        def broken(database: SpoolDatabase) -> None:
            raise ZeroDivisionError("a bug")

        batch = answer_requests(
            self.database,
            [
                Request(0, broken, (), write=False),
                Request(1, SpoolDatabase.insert, (message(),), write=True),
                Request(2, broken, (), write=True),
                Request(3, SpoolDatabase.counts, (), write=False),
            ],
        )
        [(count, error)] = batch.transactions
        self.assertEqual(count, 2)
        self.assertIsInstance(error, ZeroDivisionError)
        self.assertEqual([a.failed for a in batch.answers], [True, True, True, False])
        self.assertIsInstance(batch.answers[0].value, ZeroDivisionError)
        self.assertEqual(batch.answers[3], Answer(3, SpoolStats()))  # rolled back


class DueTests(SynchronousTestCase):
    def test_at_most_due_bytes_but_never_none(self) -> None:
        """The bridge unpickles a due() at once: large messages come a few at a time."""
        database = SpoolDatabase.open(self.mktemp(), create=True)
        self.addCleanup(database.close)
        megabyte = b"x" * (1024 * 1024 - 100)
        with database.transaction():
            database.insert(message("msg_huge", 1.0, raw=b"y" * (2 * DUE_BYTES)))
            for n in range(6):
                database.insert(message(f"msg_{n}", 2.0 + n, raw=megabyte))
        first = database.due(100.0, 10, ())
        self.assertEqual([q.message.id for q in first], ["msg_huge"])
        rest = database.due(100.0, 10, ["msg_huge"])
        self.assertEqual([q.message.id for q in rest], [f"msg_{n}" for n in range(4)])
