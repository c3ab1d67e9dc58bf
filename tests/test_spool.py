"""
Tests for L{maillaser.spool}'s storage: the durable queue behind every
SMTP ``250``.

Real SQLite files throughout; a L{Clock} stands for the worker's reactor,
whose turns delimit the group commits (C{turn()} ends one).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from functools import partial
from typing import Any
from unittest import mock

import psycopg
import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from maillaser.config import mask_url
from maillaser.interfaces import ISpool
from maillaser.message import Attempt, Envelope, Message, QueuedMessage, SpoolStats
from maillaser.spool import (
    DATABASE_NAME,
    DuplicateMessage,
    MessageNotFound,
    PostgresDatabase,
    PostgresSpool,
    SpoolDatabase,
    SpoolEntry,
    SpoolError,
    SqliteSpool,
    _postgres,
    open_spool,
)
from maillaser.spool._database import DUE_BYTES, SCHEMA_VERSION
from maillaser.spool._postgres import SCHEMA_VERSION as SHARED_SCHEMA_VERSION
from maillaser.spool._postgres import Listener
from maillaser.spool._shared import check_shared_spool, lease_owner
from maillaser.spool._throttle import REPEAT_INTERVAL, LogThrottle, Report

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

BIG = b"x" * 200_000
"""More than a database limited to one page can hold."""


def message(
    id: str = "msg_1", received_at: float = 1000.0, raw: bytes = RAW
) -> Message:
    return Message(id=id, envelope=ENVELOPE, raw=raw, received_at=received_at)


def connection(spool: SqliteSpool) -> sqlite3.Connection:
    """The spool's own connection, for settings only it can show or change."""
    sqlite: sqlite3.Connection = spool._database._connection
    return sqlite


def limit_pages(spool: SqliteSpool, pages: int) -> None:
    """SQLite then refuses to grow the file, as on a full disk."""
    connection(spool).execute(f"PRAGMA max_page_count = {pages}")


def failing(operation: str) -> Any:
    """A L{SpoolDatabase} method that fails as a full disk makes it fail."""

    def fail(database: SpoolDatabase, *args: object) -> int:
        raise sqlite3.OperationalError("database or disk is full")

    fail.__name__ = operation
    return fail


def log_events(test: SynchronousTestCase) -> EventLoggingObserver:
    """Every event logged until the end of C{test}."""
    events = EventLoggingObserver()
    globalLogPublisher.addObserver(events)
    test.addCleanup(globalLogPublisher.removeObserver, events)
    return events


def formats(events: EventLoggingObserver, level: LogLevel) -> list[str]:
    return [e["log_format"] for e in events if e["log_level"] is level]


class SpoolCase(SynchronousTestCase):
    database_class: Any = SpoolDatabase
    full = "database or disk is full"
    """What the error of a full disk says."""

    def failing(self, operation: str) -> Any:
        return failing(operation)

    @property
    def location(self) -> tuple[str, ...]:
        """How C{maillaser-spool} is told where this spool is."""
        return ("--spool-dir", self.directory)

    def setUp(self) -> None:
        self.directory = os.path.join(self.mktemp(), "spool")
        self.path = os.path.join(self.directory, DATABASE_NAME)
        self.clock = Clock()

    def open(self) -> SqliteSpool:
        spool = open_spool(self.directory, self.clock)
        self.addCleanup(spool.close)
        return spool

    def turn(self) -> None:
        """End the reactor's turn: this turn's writes commit."""
        self.clock.advance(0)

    def done(self, d: Deferred[Any]) -> Any:
        """What C{d} fires with once the turn ended."""
        self.turn()
        return self.successResultOf(d)

    def failed(self, d: Deferred[Any], *errors: type[Exception]) -> Exception:
        """The exception C{d} fails with once the turn ended."""
        self.turn()
        error = self.failureResultOf(d, *errors).value
        assert isinstance(error, Exception)
        return error

    def database(self) -> Any:
        """A second connection, as the admin tool would open it."""
        database = SpoolDatabase.open(self.directory, create=False)
        self.addCleanup(database.close)
        return database

    def ids(self, d: Deferred[list[QueuedMessage]]) -> list[str]:
        return [queued.message.id for queued in self.done(d)]


class PostgresCase(SpoolCase):
    """The same, on a shared spool in an empty schema of a test server."""

    database_class = PostgresDatabase
    full = "could not extend file"
    postgres_url: str
    """Set by the C{postgres_url} fixture."""

    def setUp(self) -> None:
        super().setUp()
        self.path = mask_url(self.postgres_url)

    @property
    def location(self) -> tuple[str, ...]:
        return ("--spool-url", self.postgres_url)

    def failing(self, operation: str) -> Any:
        def fail(database: PostgresDatabase, *args: object) -> int:
            raise psycopg.errors.DiskFull(f"{self.full}: No space left on device")

        fail.__name__ = operation
        return fail

    def open(self, owner: str | None = None, lease: float = 60.0) -> Any:
        database = PostgresDatabase.open(
            self.postgres_url, create=True, owner=owner or lease_owner(), lease=lease
        )
        spool = PostgresSpool(
            database, self.clock, database.counts(), run=partial(maybeDeferred)
        )
        self.addCleanup(spool.close)
        return spool

    def database(self) -> Any:
        database = PostgresDatabase.open(self.postgres_url, create=False)
        self.addCleanup(database.close)
        return database


class SpoolContract(SpoolCase):
    """
    What every spool backend does: run once per backend, by the classes
    below that set C{__test__}.
    """

    __test__ = False

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(ISpool, self.open()))

    def test_add_then_due(self) -> None:
        """What was added comes back byte for byte, envelope included."""
        spool = self.open()
        self.done(spool.add(message()))
        self.assertEqual(self.done(spool.due(1000.0, 10)), [QueuedMessage(message())])

    def test_survives_reopen_and_forgets_claims(self) -> None:
        """
        A committed message is still pending after a restart, and is due
        again even though it was claimed before (at-least-once).
        """
        spool = self.open()
        self.done(spool.add(message()))
        self.assertEqual(len(self.done(spool.due(1000.0, 10))), 1)
        self.done(spool.close())

        reopened = self.open()
        self.assertEqual(
            reopened.stats(), SpoolStats(pending=1, dead=0, bytes=len(RAW))
        )
        self.assertEqual(
            self.done(reopened.due(1000.0, 10)), [QueuedMessage(message())]
        )

    def test_group_commit(self) -> None:
        """
        Writes asked for in one turn of the reactor share one transaction at
        its end, and each Deferred fires only once its message is visible to
        another connection.
        """
        spool = self.open()
        database = self.database()
        committed_before_callback = []

        def check(_: None, id: str) -> None:
            committed_before_callback.append(database.entry(id).id)

        ids = [f"msg_{i:02d}" for i in range(20)]
        adds = [spool.add(message(id)).addCallback(check, id) for id in ids]
        for d in adds:
            self.assertNoResult(d)
        self.assertEqual(database.entries(), [])
        self.turn()

        for d in adds:
            self.successResultOf(d)
        self.assertEqual(committed_before_callback, ids)
        self.assertEqual(spool.commits, 1)
        self.assertEqual(spool.stats(), SpoolStats(pending=20, bytes=20 * len(RAW)))

    def test_a_write_asked_for_by_a_commit_goes_in_the_next(self) -> None:
        """
        The callbacks of a commit run after it: what they write is not lost
        with the transaction that ended, it has one of its own.
        """
        spool = self.open()
        later: list[Deferred[None]] = []
        first = spool.add(message("msg_1"))
        first.addCallback(lambda _: later.append(spool.add(message("msg_2"))))
        self.turn()
        [second] = later
        self.successResultOf(second)
        self.assertEqual(spool.commits, 2)
        self.assertEqual(
            [entry.id for entry in self.database().entries()], ["msg_1", "msg_2"]
        )

    def test_due_order_limit_and_claims(self) -> None:
        """
        Oldest first; C{limit} respected; a claimed message is not handed out
        again.
        """
        spool = self.open()
        for id, received_at in (("msg_c", 30.0), ("msg_a", 10.0), ("msg_b", 20.0)):
            spool.add(message(id, received_at))
        self.turn()
        self.assertEqual(self.ids(spool.due(100.0, 2)), ["msg_a", "msg_b"])
        self.assertEqual(self.ids(spool.due(100.0, 5)), ["msg_c"])
        self.assertEqual(self.ids(spool.due(100.0, 5)), [])

    def test_claim_and_release(self) -> None:
        """
        A message just added can be claimed once, to deliver it from memory;
        released, it is due from the spool again.
        """
        spool = self.open()
        self.done(spool.add(message()))
        self.assertTrue(spool.claim("msg_1"))
        self.assertFalse(spool.claim("msg_1"))
        self.assertEqual(self.done(spool.due(1000.0, 10)), [])
        self.assertIsNone(self.done(spool.next_due()))
        spool.release("msg_1")
        self.turn()  # a shared spool gives the lease back with a commit
        self.assertEqual(self.ids(spool.due(1000.0, 10)), ["msg_1"])

    def test_due_only_when_due(self) -> None:
        spool = self.open()
        self.done(spool.add(message(received_at=50.0)))
        self.assertEqual(self.done(spool.due(49.0, 10)), [])
        self.assertEqual(len(self.done(spool.due(50.0, 10))), 1)

    def test_next_due(self) -> None:
        spool = self.open()
        self.assertIsNone(self.done(spool.next_due()))
        spool.add(message("msg_late", 70.0))
        spool.add(message("msg_early", 40.0))
        self.turn()
        self.assertEqual(self.done(spool.next_due()), 40.0)
        spool.due(40.0, 1)
        self.assertEqual(self.done(spool.next_due()), 70.0)
        spool.due(70.0, 1)
        self.assertIsNone(self.done(spool.next_due()))

    def test_reads_see_what_is_committed(self) -> None:
        """A read runs at once: a write of the same turn is not there yet."""
        spool = self.open()
        added = spool.add(message())
        self.assertEqual(self.successResultOf(spool.due(1000.0, 10)), [])
        self.done(added)
        self.assertEqual(self.successResultOf(spool.next_due()), 1000.0)

    def test_reschedule(self) -> None:
        """
        A failed round counts, hides the message until its time, records the
        attempts and the last error, and releases the claim.
        """
        spool = self.open()
        self.done(spool.add(message()))
        spool.due(1000.0, 1)
        attempts = [Attempt(1001.0, 503, "HTTP 503"), Attempt(1002.0, None, "timeout")]
        self.done(spool.reschedule("msg_1", 1300.0, attempts))

        self.assertEqual(self.done(spool.due(1299.0, 10)), [])
        self.assertEqual(self.done(spool.next_due()), 1300.0)
        self.assertEqual(
            self.done(spool.due(1300.0, 10)), [QueuedMessage(message(), 1)]
        )
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

    def test_claim_held_until_settled(self) -> None:
        """
        A due() that runs while a reschedule waits for its commit does not
        hand the message out again under its old due time.
        """
        spool = self.open()
        self.done(spool.add(message()))
        spool.due(1000.0, 1)
        committing = spool.add(message("msg_2", 5000.0))
        waiting = spool.reschedule("msg_1", 2000.0, [])
        self.assertEqual(self.successResultOf(spool.due(1000.0, 10)), [])
        self.done(committing)
        self.successResultOf(waiting)
        self.assertEqual(spool.commits, 2)
        self.assertEqual(self.done(spool.due(1999.0, 10)), [])
        self.assertEqual(
            self.done(spool.due(2000.0, 10)), [QueuedMessage(message(), 1)]
        )

    def test_a_settling_write_that_fails_keeps_the_claim(self) -> None:
        """
        The message is still in the spool as it was, due at once: whoever
        claimed it decides when it may go again, by releasing it.
        """
        spool = self.open()
        self.done(spool.add(message()))
        self.done(spool.due(1000.0, 1))
        for name in ("delete", "reschedule", "bury"):
            self.patch(self.database_class, name, self.failing(name))
        for settle in (
            spool.delivered("msg_1", [Attempt(1001.0, 200)]),
            spool.reschedule("msg_1", 2000.0, []),
            spool.bury("msg_1", []),
        ):
            error = self.failed(settle, SpoolError)
            self.assertIn(self.full, str(error))
            self.assertEqual(self.done(spool.due(1000.0, 10)), [])
        self.assertEqual(len(self.flushLoggedErrors(SpoolError)), 1)
        self.assertEqual(spool.stats(), SpoolStats(pending=1, bytes=len(RAW)))
        spool.release("msg_1")
        self.turn()  # a shared spool gives the lease back with a commit
        self.assertEqual(self.done(spool.due(1000.0, 10)), [QueuedMessage(message())])

    def test_attempts_kept_are_bounded(self) -> None:
        """Only the last 20 attempts stay on disk; the count keeps them all."""
        spool = self.open()
        self.done(spool.add(message()))
        attempts = [Attempt(float(i), 500, f"HTTP 500 #{i}") for i in range(25)]
        self.done(spool.reschedule("msg_1", 1300.0, attempts[:15]))
        self.done(spool.reschedule("msg_1", 1600.0, attempts[15:]))
        database = self.database()
        self.assertEqual(database.attempts("msg_1"), attempts[5:])
        self.assertEqual(database.entry("msg_1").attempts, 25)

    def test_bury(self) -> None:
        spool = self.open()
        spool.add(message())
        spool.add(message("msg_2"))
        self.turn()
        spool.due(1000.0, 10)
        self.clock.advance(5000.0)
        self.done(spool.bury("msg_1", [Attempt(4999.0, 400, "HTTP 400 bad payload")]))

        self.assertEqual(spool.stats(), SpoolStats(pending=1, dead=1, bytes=len(RAW)))
        self.assertIsNone(self.done(spool.next_due()))
        entry = self.database().entry("msg_1")
        self.assertEqual(
            (entry.state, entry.dead_at, entry.last_error, entry.next_attempt_at),
            ("dead", 5000.0, "HTTP 400 bad payload", None),
        )
        # A dead letter is not delivered, even after a restart.
        self.done(spool.close())
        reopened = self.open()
        self.assertEqual(self.ids(reopened.due(10_000.0, 10)), ["msg_2"])

    def test_delivered(self) -> None:
        spool = self.open()
        self.done(spool.add(message()))
        spool.due(1000.0, 1)
        self.done(spool.reschedule("msg_1", 1000.0, [Attempt(1000.0, 500, "HTTP 500")]))
        spool.due(1000.0, 1)
        self.done(spool.delivered("msg_1", [Attempt(1001.0, 204)]))

        self.assertEqual(spool.stats(), SpoolStats())
        self.assertEqual(self.done(spool.due(2000.0, 10)), [])
        database = self.database()
        self.assertEqual(database.attempts("msg_1"), [])
        self.assertRaises(MessageNotFound, database.entry, "msg_1")

    def test_settling_unknown_message(self) -> None:
        """Settling a message the spool does not hold fails; stats stay right."""
        spool = self.open()
        for settle in (
            spool.delivered("msg_nope", []),
            spool.reschedule("msg_nope", 1.0, []),
            spool.bury("msg_nope", []),
        ):
            error = self.failed(settle, MessageNotFound)
            self.assertEqual(str(error), "no message msg_nope in the spool")
        self.assertEqual(spool.stats(), SpoolStats())
        self.assertTrue(spool.writable())

    def test_duplicate_add_fails_alone(self) -> None:
        """A second add of the same id fails; its batch-mates still commit."""
        spool = self.open()
        first = spool.add(message())
        again, other = spool.add(message()), spool.add(message("msg_2"))
        self.turn()
        self.successResultOf(first)
        self.failureResultOf(again, DuplicateMessage)
        self.successResultOf(other)
        self.assertEqual(spool.commits, 1)
        self.assertTrue(spool.writable())
        self.assertEqual(spool.stats(), SpoolStats(pending=2, bytes=2 * len(RAW)))

    def test_a_bug_fails_its_commit_and_the_spool_goes_on(self) -> None:
        """Every write of the group gets the error; the next turn commits."""
        spool = self.open()

        def broken(database: object, message: Message) -> int:
            raise ZeroDivisionError("a bug")

        patched = self.patch(self.database_class, "insert", broken)
        adds = [spool.add(message(f"msg_{n}")) for n in range(2)]
        for added in adds:
            self.failed(added, ZeroDivisionError)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        patched.restore()
        self.done(spool.add(message()))
        self.assertEqual(spool.stats(), SpoolStats(pending=1, bytes=len(RAW)))
        self.assertEqual([entry.id for entry in self.database().entries()], ["msg_1"])

    def test_stats_refresh_after_external_change(self) -> None:
        """The admin tool changes the database; refresh() sees it."""
        spool = self.open()
        self.done(spool.add(message()))
        self.done(spool.bury("msg_1", []))
        self.assertEqual(spool.stats(), SpoolStats(pending=0, dead=1, bytes=0))

        database = self.database()
        with database.transaction():
            database.requeue("msg_1", 2000.0)
        self.assertEqual(spool.stats(), SpoolStats(pending=0, dead=1, bytes=0))
        expected = SpoolStats(pending=1, dead=0, bytes=len(RAW))
        self.assertEqual(self.done(spool.refresh()), expected)
        self.assertEqual(spool.stats(), expected)
        self.assertEqual(self.done(spool.due(2000.0, 1)), [QueuedMessage(message())])

    def test_close_finishes_writes(self) -> None:
        """
        Writes asked for before close() are committed by it; later ones
        fail, and so do reads.
        """
        spool = self.open()
        adds = [spool.add(message(f"msg_{i}")) for i in range(3)]
        self.successResultOf(spool.close())
        for d in adds:
            self.successResultOf(d)
        late = spool.add(message("msg_late"))
        self.assertEqual(
            str(self.failed(late, SpoolError)), f"spool {self.path} is closed"
        )
        self.assertFalse(spool.writable())
        self.failed(spool.due(1000.0, 1), SpoolError)
        self.assertEqual(
            [entry.id for entry in self.database().entries()],
            ["msg_0", "msg_1", "msg_2"],
        )
        self.successResultOf(spool.close())

    def test_open_spool(self) -> None:
        """The blocking open, for start-up: a ready spool, or the error."""
        spool = self.open()
        self.done(spool.add(message()))
        self.done(spool.close())

        reopened = self.open()
        self.assertEqual(reopened.stats(), SpoolStats(pending=1, bytes=len(RAW)))
        self.done(reopened.close())


class SqliteSpoolTests(SpoolContract):
    __test__ = True

    def test_open_garbage(self) -> None:
        self.done(self.open().close())
        with open(self.path, "wb") as f:
            f.write(b"garbage" * 1000)
        self.assertRaises(SpoolError, open_spool, self.directory, self.clock)

    def test_creates_private_directory(self) -> None:
        self.open()
        mode = os.stat(self.directory).st_mode
        self.assertEqual(stat.S_IMODE(mode), 0o700)
        self.assertTrue(os.path.isfile(self.path))

    def test_database_settings(self) -> None:
        """WAL with synchronous commits: durable at commit, readable alongside."""
        spool = self.open()
        self.assertEqual(
            tuple(
                connection(spool).execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "synchronous", "busy_timeout")
            ),
            ("wal", 2, 10000),
        )

    def test_only_commits_that_store_wait_for_the_disk(self) -> None:
        """
        A commit that stores a message is synchronous (C{FULL}: an fsync
        before the answer); one that only settles messages is not
        (C{NORMAL}), and the next one that stores makes it durable too.
        """
        spool = self.open()
        modes: list[int] = []

        def mode(_: object) -> None:
            [(synchronous,)] = connection(spool).execute("PRAGMA synchronous")
            modes.append(synchronous)

        self.done(spool.add(message("msg_1")).addCallback(mode))
        self.done(spool.add(message("msg_2")).addCallback(mode))
        [queued, _] = self.done(spool.due(1000.0, 10))
        self.done(spool.delivered(queued.message.id, []).addCallback(mode))
        stored = spool.add(message("msg_3")).addCallback(mode)
        settled = spool.reschedule("msg_2", 2000.0, []).addCallback(mode)
        self.done(gatherResults([stored, settled]))
        self.assertEqual(modes, [2, 2, 1, 2, 2])

    def test_disk_full(self) -> None:
        """
        When the database cannot grow, every add of the failed group fails
        with SpoolError (the SMTP front answers 451), nothing is half
        stored, writable() turns False, and recovers with the next commit.
        """
        spool = self.open()
        limit_pages(spool, 1)
        first = self.failed(spool.add(message("msg_0", raw=BIG)), SpoolError)
        later = [spool.add(message(f"msg_{i}", raw=BIG)) for i in (1, 2)]
        errors = [first] + [self.failed(d, SpoolError) for d in later]

        for error in errors:
            self.assertIn("database or disk is full", str(error))
            self.assertIn(DATABASE_NAME, str(error))
        self.assertEqual(len(self.flushLoggedErrors(SpoolError)), 1)
        self.assertFalse(spool.writable())
        self.assertEqual(spool.commits, 0)
        self.assertEqual(spool.stats(), SpoolStats())
        self.assertEqual(self.done(spool.due(5000.0, 10)), [])

        limit_pages(spool, 1_000_000)
        self.done(spool.add(message(raw=BIG)))
        self.assertTrue(spool.writable())
        self.assertEqual(spool.stats(), SpoolStats(pending=1, bytes=len(BIG)))

    def test_failed_commits_are_logged_once_per_interval(self) -> None:
        """
        The first failure with its traceback; while the disk stays full, one
        line per interval counting the failures not logged; then one line
        when commits succeed again.
        """
        events = log_events(self)
        spool = self.open()
        limit_pages(spool, 1)
        for n in range(1000):
            self.failed(spool.add(message(f"msg_{n}", raw=BIG)), SpoolError)
            self.clock.advance(0.5)
        self.assertEqual(len(self.flushLoggedErrors(SpoolError)), 1)
        failed = [e for e in events if e["log_format"].startswith("spool commit")]
        self.assertEqual(len(failed), 1 + (500 - 1) // REPEAT_INTERVAL)
        self.assertIn("log_failure", failed[0])
        self.assertEqual(
            [e.get("repeated") for e in failed[1:3]],
            [REPEAT_INTERVAL * 2 - 1, REPEAT_INTERVAL * 2 - 1],
        )
        limit_pages(spool, 1_000_000)
        self.done(spool.add(message("msg_ok")))
        self.done(spool.add(message("msg_ok_too")))
        self.assertEqual(
            formats(events, LogLevel.info).count("spool commits succeed again"), 1
        )

    def test_refresh_finds_out_when_the_disk_has_room_again(self) -> None:
        """Without any mail to try it, health would say unwritable for ever."""
        spool = self.open()
        limit_pages(spool, 1)
        self.failed(spool.add(message(raw=BIG)), SpoolError)
        self.flushLoggedErrors(SpoolError)
        self.done(spool.refresh())
        self.assertFalse(spool.writable())  # the probe could not store either
        limit_pages(spool, 1_000_000)
        self.assertEqual(self.done(spool.refresh()), SpoolStats())
        self.assertTrue(spool.writable())
        self.assertEqual(self.database().entries(), [])  # nothing left behind

    def test_counts_are_right_when_the_first_write_is_answered(self) -> None:
        """
        Every write of a commit has counted before any is answered: a
        refresh() after the probe, with adds in the same commit, counts
        each once.
        """
        spool = self.open()
        limit_pages(spool, 1)
        self.failed(spool.add(message("msg_0", raw=BIG)), SpoolError)
        self.flushLoggedErrors(SpoolError)
        limit_pages(spool, 1_000_000)
        refreshed = spool.refresh()
        adds = [spool.add(message(f"msg_{n}")) for n in range(3)]
        self.turn()
        self.assertEqual(
            self.successResultOf(refreshed), SpoolStats(pending=3, bytes=3 * len(RAW))
        )
        for added in adds:
            self.successResultOf(added)
        self.assertEqual(spool.stats(), SpoolStats(pending=3, bytes=3 * len(RAW)))


class DamagedSpoolTests(SpoolCase):
    """What start-up refuses: the bridge must not take mail it cannot keep."""

    def test_corrupt_database(self) -> None:
        """A damaged file stops start-up with an error naming it."""
        os.makedirs(self.directory)
        with open(self.path, "wb") as f:
            f.write(b"this is not an SQLite database, it is garbage " * 200)
        error = self.assertRaises(SpoolError, open_spool, self.directory, self.clock)
        self.assertEqual(
            str(error),
            f"spool database {self.path} is unreadable or corrupt:"
            " file is not a database",
        )

    def test_damaged_page(self) -> None:
        """quick_check finds damage inside an otherwise valid database file."""
        spool = self.open()
        for i in range(50):
            spool.add(message(f"msg_{i:02d}", raw=b"y" * 3000))
        self.turn()
        self.done(spool.close())
        # Closing the last connection checkpointed the WAL into the file.
        self.assertFalse(os.path.exists(self.path + "-wal"))
        with open(self.path, "r+b") as f:
            f.seek(4096 * 3)
            f.write(b"\xa5" * 4096)
        error = self.assertRaises(SpoolError, open_spool, self.directory, self.clock)
        self.assertTrue(str(error).startswith(f"spool database {self.path} is "))

    def test_foreign_database(self) -> None:
        """Somebody else's database is refused and left untouched."""
        os.makedirs(self.directory)
        other = sqlite3.connect(self.path)
        other.execute("CREATE TABLE messages (id TEXT)")
        other.commit()
        other.close()
        error = self.assertRaises(SpoolError, open_spool, self.directory, self.clock)
        self.assertEqual(str(error), f"{self.path} is not a MailLaser spool database")
        other = sqlite3.connect(self.path)
        self.addCleanup(other.close)
        self.assertEqual(other.execute("PRAGMA journal_mode").fetchone(), ("delete",))
        self.assertEqual(
            other.execute("SELECT name FROM sqlite_master").fetchall(), [("messages",)]
        )

    def test_newer_schema(self) -> None:
        self.done(self.open().close())
        newer = sqlite3.connect(self.path)
        newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        newer.close()
        error = self.assertRaises(SpoolError, open_spool, self.directory, self.clock)
        self.assertEqual(
            str(error),
            f"{self.path} has spool schema version {SCHEMA_VERSION + 1};"
            f" this MailLaser reads version {SCHEMA_VERSION}",
        )


_KILLED_AFTER_COMMIT = textwrap.dedent(
    """
    import os, signal, sys
    from twisted.internet import reactor
    from twisted.internet.defer import gatherResults
    from maillaser.message import Envelope, Message
    from maillaser.spool import open_spool

    spool = open_spool(sys.argv[1], reactor)

    def message(id):
        return Message(id, Envelope("", ("ops@example.org",)), id.encode(), 1.0)

    def committed(ignored):
        spool.add(message("msg_unanswered"))
        print("committed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def start():
        adds = [spool.add(message(f"msg_{n}")) for n in range(3)]
        gatherResults(adds).addCallback(committed)

    reactor.callWhenRunning(start)
    reactor.run()
    """
)


class CrashTests(SpoolCase):
    def test_kill_after_commit_loses_nothing(self) -> None:
        """
        A worker killed (SIGKILL) right after its writes were answered: the
        next start finds every answered message, from the WAL it left, and
        nothing of the write that was never answered.
        """
        child = subprocess.run(
            [sys.executable, "-c", _KILLED_AFTER_COMMIT, self.directory],
            capture_output=True,
            timeout=60,
        )
        self.assertEqual(
            (child.returncode, child.stdout, child.stderr),
            (-signal.SIGKILL, b"committed\n", b""),
        )
        self.assertTrue(os.path.exists(self.path + "-wal"))
        spool = self.open()
        self.assertEqual(spool.stats(), SpoolStats(pending=3, bytes=15))
        self.assertEqual(self.ids(spool.due(1.0, 10)), ["msg_0", "msg_1", "msg_2"])


class DriverTests(SynchronousTestCase):
    def test_a_sqlite_bridge_never_imports_the_postgresql_driver(self) -> None:
        """
        Both processes import L{maillaser.spool}; the driver, some megabytes
        in each, is imported by the first shared spool only.
        """
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, maillaser.service, maillaser.worker._main;"
                " print('psycopg' in sys.modules)",
            ],
            capture_output=True,
            check=True,
            text=True,
        )
        self.assertEqual(child.stdout, "False\n")


class ReactorTests(TestCase):
    async def test_one_commit_per_reactor_turn(self) -> None:
        """On the real reactor, the writes of one turn share one commit."""
        spool = open_spool(os.path.join(self.mktemp(), "spool"), reactor)
        self.addCleanup(spool.close)
        await gatherResults([spool.add(message(f"msg_{n}")) for n in range(20)])
        await spool.add(message("msg_later"))
        self.assertEqual(spool.commits, 2)
        self.assertEqual(spool.stats().pending, 21)


class SpoolDatabaseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.database = self.open_database()
        self.addCleanup(self.database.close)

    def open_database(self) -> Any:
        return SpoolDatabase.open(self.mktemp(), create=True)

    def test_apply_is_one_transaction(self) -> None:
        """In order; a write that cannot be done fails alone."""
        size = len(RAW)
        results = self.database.apply(
            [
                lambda database: database.insert(message("msg_1")),
                lambda database: database.insert(message("msg_1")),
                lambda database: database.delete("msg_nope", "pending"),
                lambda database: database.insert(message("msg_2")),
            ]
        )
        self.assertEqual(results[0], size)
        self.assertEqual(results[3], size)
        for result, error in zip(
            results[1:3], (DuplicateMessage, MessageNotFound), strict=True
        ):
            assert not isinstance(result, int)
            self.assertIsInstance(getattr(result, "value", None), error)
        self.assertEqual(self.database.counts(), SpoolStats(pending=2, bytes=2 * size))

    def test_a_failed_transaction_stores_nothing(self) -> None:
        self.database._connection.execute("PRAGMA max_page_count = 1")
        error = self.assertRaises(
            SpoolError,
            self.database.apply,
            [
                partial(SpoolDatabase.insert, message=message(f"msg_{n}", raw=BIG))
                for n in range(2)
            ],
        )
        self.assertIn("database or disk is full", str(error))
        self.assertEqual(self.database.counts(), SpoolStats())

    def test_a_bug_rolls_back_the_whole_group(self) -> None:
        def broken(database: SpoolDatabase) -> None:
            raise ZeroDivisionError("a bug")

        self.assertRaises(
            ZeroDivisionError,
            self.database.apply,
            [lambda database: database.insert(message()), broken],
        )
        self.assertEqual(self.database.counts(), SpoolStats())
        self.assertEqual(
            self.database.apply([lambda database: database.insert(message())]),
            [len(RAW)],
        )

    def test_due_at_most_due_bytes_but_never_none(self) -> None:
        """
        The worker holds a due() in memory at once: large messages come a
        few at a time.
        """
        megabyte = b"x" * (1024 * 1024 - 100)
        with self.database.transaction():
            self.database.insert(message("msg_huge", 1.0, raw=b"y" * (2 * DUE_BYTES)))
            for n in range(6):
                self.database.insert(message(f"msg_{n}", 2.0 + n, raw=megabyte))
        first = self.database.due(100.0, 10, ())
        self.assertEqual([q.message.id for q in first], ["msg_huge"])
        rest = self.database.due(100.0, 10, ["msg_huge"])
        self.assertEqual([q.message.id for q in rest], [f"msg_{n}" for n in range(4)])


class LogThrottleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = LogThrottle(self.clock, interval=60.0)

    def test_first_then_once_per_interval(self) -> None:
        reports = []
        for _ in range(150):
            reports.append(self.throttle.report("full"))
            self.clock.advance(1.0)
        self.assertEqual(
            [(n, r) for n, r in enumerate(reports) if r is not None],
            [
                (0, Report(first=True, repeated=0)),
                (60, Report(first=False, repeated=59)),
                (120, Report(first=False, repeated=59)),
            ],
        )

    def test_keys_are_separate(self) -> None:
        self.assertEqual(self.throttle.report("a"), Report(first=True, repeated=0))
        self.assertEqual(self.throttle.report("b"), Report(first=True, repeated=0))
        self.assertIsNone(self.throttle.report("a"))

    def test_what_was_not_logged_is_told_with_the_next_report(self) -> None:
        """However long the condition is quiet in between."""
        self.throttle.report("a")
        self.clock.advance(30.0)
        self.assertIsNone(self.throttle.report("a"))
        self.clock.advance(1000.0)
        self.assertEqual(self.throttle.report("a"), Report(first=False, repeated=1))

    def test_a_condition_that_ended_is_new_when_it_comes_back(self) -> None:
        """Reported an interval ago and not seen since, it is over."""
        self.throttle.report("a")
        self.clock.advance(60.0)
        self.assertEqual(self.throttle.report("a"), Report(first=True, repeated=0))

    def test_conditions_over_are_forgotten(self) -> None:
        """Many keys, each once, do not pile up."""
        for n in range(1000):
            self.throttle.report(n)
            self.clock.advance(1.0)
        self.assertLessEqual(len(self.throttle._reported), 61)


@pytest.mark.usefixtures("postgres_url")
class PostgresSpoolTests(PostgresCase, SpoolContract):
    __test__ = True


def lease_of(url: str, message_id: str) -> tuple[str | None, float | None]:
    with psycopg.connect(url, autocommit=True) as other:
        row = other.execute(
            "SELECT lease_owner, lease_expires FROM messages WHERE id = %s",
            (message_id,),
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def expire_leases(url: str) -> None:
    """As if their owner had died long enough ago."""
    with psycopg.connect(url, autocommit=True) as other:
        other.execute(
            "UPDATE messages SET lease_expires = 0 WHERE lease_owner IS NOT NULL"
        )


@pytest.mark.usefixtures("postgres_url")
class SharedSpoolTests(PostgresCase):
    """What only a spool shared by several bridges does: leases."""

    def test_a_message_stored_is_held_by_its_bridge(self) -> None:
        """It delivers it from memory; the others do not take it meanwhile."""
        one, two = self.open("one"), self.open("two")
        self.done(one.add(message()))
        self.assertTrue(one.claim("msg_1"))
        self.assertEqual(self.done(two.due(5000.0, 10)), [])
        self.assertIsNone(self.done(two.next_due()))
        self.assertEqual(lease_of(self.postgres_url, "msg_1")[0], "one")

    def test_two_bridges_never_hold_the_same_message(self) -> None:
        accepting = self.open("accepting")
        for n in range(4):
            accepting.add(message(f"msg_{n}", 1000.0 + n))
        self.done(accepting.close())  # its leases given back
        one, two = self.open("one"), self.open("two")
        self.assertEqual(self.ids(one.due(5000.0, 2)), ["msg_0", "msg_1"])
        self.assertEqual(self.ids(two.due(5000.0, 10)), ["msg_2", "msg_3"])
        self.assertEqual(self.ids(one.due(5000.0, 10)), [])

    def test_skip_locked(self) -> None:
        """A row another bridge is leasing right now is skipped, not waited for."""
        spool = self.open()
        spool.add(message("msg_a", 1.0))
        spool.add(message("msg_b", 2.0))
        self.turn()
        self.done(spool.close())
        with psycopg.connect(self.postgres_url) as locker:
            locker.execute("SELECT 1 FROM messages WHERE id = 'msg_a' FOR UPDATE")
            self.assertEqual(self.ids(self.open("two").due(5000.0, 10)), ["msg_b"])

    def test_expired_lease_is_taken_over(self) -> None:
        """
        A bridge killed mid-round: once its leases expire another bridge
        takes its messages; the dead one's late settlement is refused.
        """
        one, two = self.open("one"), self.open("two")
        self.done(one.add(message()))
        self.assertEqual(self.ids(one.due(5000.0, 10)), ["msg_1"])
        self.assertEqual(self.done(two.due(5000.0, 10)), [])
        expire_leases(self.postgres_url)
        self.assertEqual(self.ids(two.due(5000.0, 10)), ["msg_1"])
        error = self.failed(one.reschedule("msg_1", 9000.0, []), MessageNotFound)
        self.assertEqual(str(error), "message msg_1 is held by another bridge (two)")
        self.done(two.delivered("msg_1", [Attempt(5001.0, 200)]))
        self.assertEqual(self.database().entries(), [])

    def test_leases_are_renewed_while_held(self) -> None:
        spool = self.open(lease=30.0)
        self.done(spool.add(message()))
        spool.claim("msg_1")
        expire_leases(self.postgres_url)
        self.clock.advance(9.9)
        self.turn()
        self.assertEqual(lease_of(self.postgres_url, "msg_1")[1], 0)
        self.clock.advance(0.1)
        self.turn()
        owner, expires = lease_of(self.postgres_url, "msg_1")
        self.assertEqual(owner, spool._database.owner)
        assert expires is not None
        self.assertGreater(expires, self.clock.seconds())  # the database's clock

    def test_renewal_recounts_what_the_others_stored(self) -> None:
        """Back-pressure and health count the shared spool."""
        one, two = self.open("one", lease=3.0), self.open("two", lease=3.0)
        self.done(two.add(message()))
        self.assertEqual(one.stats(), SpoolStats())
        self.clock.advance(1.0)
        self.assertEqual(one.stats(), SpoolStats(pending=1, bytes=len(RAW)))

    def test_release_and_close_give_leases_back(self) -> None:
        one, two = self.open("one"), self.open("two")
        for n in range(3):
            one.add(message(f"msg_{n}"))
        self.turn()
        for n in range(3):
            one.claim(f"msg_{n}")
        one.release("msg_0")
        self.assertEqual(self.done(two.due(5000.0, 10)), [])  # not yet committed
        self.assertEqual(self.ids(two.due(5000.0, 10)), ["msg_0"])
        self.done(one.close())
        self.assertEqual(self.ids(two.due(5000.0, 10)), ["msg_1", "msg_2"])

    def test_a_release_wakes_the_other_bridges(self) -> None:
        """LISTEN/NOTIFY: the other bridge looks at once, not at its next poll."""
        woken = threading.Event()
        listener = Listener(self.postgres_url, woken.set, lambda f: f(), 0.05)
        self.addCleanup(listener.stop)
        listener.start()
        self.assertTrue(woken.wait(10))  # it looks once when it connects
        woken.clear()
        spool = self.open()
        self.done(spool.add(message()))
        spool.claim("msg_1")
        self.assertFalse(woken.is_set())
        spool.release("msg_1")
        self.turn()
        self.assertTrue(woken.wait(10))

    def test_schema_created_once_by_bridges_starting_together(self) -> None:
        results: list[object] = []

        def start() -> None:
            try:
                PostgresDatabase.open(self.postgres_url, create=True).close()
                results.append("ok")
            except Exception as e:
                results.append(e)

        threads = [threading.Thread(target=start) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(results, ["ok"] * 4)
        with psycopg.connect(self.postgres_url) as other:
            rows = other.execute("SELECT version FROM maillaser_schema").fetchall()
        self.assertEqual(rows, [(SHARED_SCHEMA_VERSION,)])

    def test_no_spool_and_newer_schema(self) -> None:
        error = self.assertRaises(
            SpoolError, PostgresDatabase.open, self.postgres_url, create=False
        )
        self.assertEqual(str(error), f"no spool at {self.path}")
        self.open()
        with psycopg.connect(self.postgres_url, autocommit=True) as other:
            other.execute("UPDATE maillaser_schema SET version = 99")
        error = self.assertRaises(
            SpoolError, PostgresDatabase.open, self.postgres_url, create=True
        )
        self.assertEqual(
            str(error),
            f"{self.path} has spool schema version 99;"
            f" this MailLaser reads version {SHARED_SCHEMA_VERSION}",
        )

    def test_unreachable_then_back_without_restart(self) -> None:
        """
        Writes fail (the SMTP front answers 451), health gets the reason
        (without the password), and all recovers once the database is back.
        """
        spool = self.open()
        database = spool._database
        url = database.url
        database.url = "postgresql://ml:pa55@127.0.0.1:1/nowhere"
        database._connection.close()
        error = self.failed(spool.add(message()), SpoolError)
        self.flushLoggedErrors(SpoolError)
        self.assertFalse(spool.writable())
        problem = spool.problem()
        assert problem is not None
        self.assertTrue(
            problem.startswith(
                "spool database unreachable: spool database"
                " postgresql://***@127.0.0.1:1/nowhere is unreachable: "
            ),
            problem,
        )
        self.assertNotIn("pa55", problem + str(error))
        self.failed(spool.refresh(), SpoolError)
        self.assertFalse(spool.writable())
        database.url = url
        self.assertEqual(self.done(spool.refresh()), SpoolStats())
        self.assertTrue(spool.writable())
        self.assertIsNone(spool.problem())
        self.done(spool.add(message()))

    def test_without_psycopg_one_line_says_what_to_install(self) -> None:
        self.patch(_postgres, "psycopg", None)
        missing = mock.patch.dict(sys.modules, {"psycopg": None})
        missing.start()
        self.addCleanup(missing.stop)
        error = self.assertRaises(SpoolError, check_shared_spool, self.postgres_url)
        self.assertEqual(
            str(error), "a spool URL needs psycopg: pip install 'maillaser[postgresql]'"
        )

    def test_a_message_claimed_while_due_ran_is_not_handed_out_twice(self) -> None:
        """
        The read runs on the spool's thread: a message stored and claimed
        (to go from memory) while it ran is left to the claim's round.
        """
        spool = self.open()
        self.done(spool.add(message()))
        later: list[Callable[[], Any]] = []

        def run_later(work: Callable[[], Any]) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            later.append(lambda: d.callback(work()))
            return d

        spool.run = run_later
        found = spool.due(1000.0, 10)
        self.assertTrue(spool.claim("msg_1"))
        later.pop()()
        self.assertEqual(self.successResultOf(found), [])


@pytest.mark.usefixtures("postgres_url")
class PostgresDatabaseTests(SpoolDatabaseTests):
    postgres_url: str

    def open_database(self) -> Any:
        return PostgresDatabase.open(self.postgres_url, create=True)

    def test_a_failed_transaction_stores_nothing(self) -> None:
        inserted: list[str] = []

        def insert_then_fail(database: PostgresDatabase) -> None:
            database.insert(message("msg_1"))
            inserted.append("msg_1")
            database._execute("SELECT 1 / 0")

        error = self.assertRaises(SpoolError, self.database.apply, [insert_then_fail])
        self.assertIn("division by zero", str(error))
        self.assertEqual((inserted, self.database.counts()), (["msg_1"], SpoolStats()))
