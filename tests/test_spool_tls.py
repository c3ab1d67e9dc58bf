"""
Tests for the spool's C{tls} column (schema version 2): the session's TLS
is kept with the message, and a spool left by the previous version opens,
keeps its mail and migrates once.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3

import psycopg
import pytest

from maillaser.message import Envelope, Message, QueuedMessage, TLSInfo
from maillaser.spool import SpoolDatabase
from maillaser.spool._database import APPLICATION_ID, SCHEMA_VERSION, _add_tls_column
from maillaser.spool.admin import run
from maillaser.worker._commands import MessageList
from tests.test_spool import PostgresCase, SpoolCase

TLS = TLSInfo(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384")


def message(id: str, tls: TLSInfo | None) -> Message:
    envelope = Envelope("a@example.org", ("t@example.com",), "h.example", "::1", tls)
    return Message(id, envelope, b"Subject: s\r\n\r\nbody\r\n", 1000.0)


VERSION_1 = (
    """
    CREATE TABLE messages (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN ('pending', 'dead')),
        sender TEXT NOT NULL,
        recipients TEXT NOT NULL,
        helo TEXT NOT NULL,
        peer TEXT NOT NULL,
        size INTEGER NOT NULL,
        received_at REAL NOT NULL,
        rounds INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT NOT NULL DEFAULT '',
        dead_at REAL,
        attempt_count INTEGER NOT NULL DEFAULT 0,
        raw BLOB NOT NULL
    )
    """,
    "CREATE INDEX messages_due ON messages (state, next_attempt_at)",
    """
    CREATE TABLE attempts (
        message_id TEXT NOT NULL,
        at REAL NOT NULL,
        status INTEGER,
        error TEXT NOT NULL
    )
    """,
    "CREATE INDEX attempts_message ON attempts (message_id)",
    f"PRAGMA application_id = {APPLICATION_ID}",
    "PRAGMA user_version = 1",
)
"""The schema MailLaser wrote before the tls column, as it wrote it."""


class TLSColumnTests(SpoolCase):
    def test_kept_with_the_message(self) -> None:
        spool = self.open()
        for queued in (message("msg_1", TLS), message("msg_2", None)):
            self.done(spool.add(queued))
        self.assertEqual(
            self.done(spool.due(1000.0, 10)),
            [
                QueuedMessage(message("msg_1", TLS)),
                QueuedMessage(message("msg_2", None)),
            ],
        )
        self.assertEqual(
            [entry.envelope.tls for entry in self.database().entries()], [TLS, None]
        )

    def test_stored_as_compact_json(self) -> None:
        spool = self.open()
        self.done(spool.add(message("msg_1", TLS)))
        self.done(spool.add(message("msg_2", None)))
        rows = sqlite3.connect(self.path).execute(
            "SELECT tls FROM messages ORDER BY id"
        )
        self.assertEqual(
            [row[0] for row in rows],
            ['{"version":"TLSv1.3","cipher":"TLS_AES_256_GCM_SHA384"}', ""],
        )

    def test_crosses_to_the_worker(self) -> None:
        """The Store command's encoding carries it, and its absence."""
        messages = [message("msg_1", TLS), message("msg_2", None)]
        encoding = MessageList()
        self.assertEqual(encoding.decode(encoding.encode(messages)), messages)


class MigrationTests(SpoolCase):
    def old_spool(self) -> None:
        """A spool file exactly as the previous version left it, one message in."""
        os.makedirs(self.directory)
        old = sqlite3.connect(self.path, isolation_level=None)
        for statement in VERSION_1:
            old.execute(statement)
        old.execute(
            "INSERT INTO messages (id, state, sender, recipients, helo, peer, size,"
            " received_at, next_attempt_at, raw) VALUES"
            " ('msg_old', 'pending', 'a@example.org', ?, 'h.example', '::1', 20,"
            " 1000.0, 1000.0, ?)",
            (json.dumps(["t@example.com"]), b"Subject: s\r\n\r\nbody\r\n"),
        )
        old.execute("PRAGMA journal_mode = WAL")
        old.close()

    def version(self) -> int:
        connection = sqlite3.connect(self.path)
        try:
            return int(connection.execute("PRAGMA user_version").fetchone()[0])
        finally:
            connection.close()

    def test_old_spool_keeps_its_mail(self) -> None:
        self.old_spool()
        spool = self.open()
        self.assertEqual(self.version(), SCHEMA_VERSION)
        self.assertEqual(
            self.done(spool.due(1000.0, 10)), [QueuedMessage(message("msg_old", None))]
        )
        self.done(spool.add(message("msg_new", TLS)))
        self.assertEqual(
            {entry.id: entry.envelope.tls for entry in self.database().entries()},
            {"msg_old": None, "msg_new": TLS},
        )

    def test_the_admin_tool_opens_an_old_spool(self) -> None:
        self.old_spool()
        database = SpoolDatabase.open(self.directory, create=False)
        self.addCleanup(database.close)
        self.assertEqual([entry.id for entry in database.entries()], ["msg_old"])
        self.assertEqual(self.version(), SCHEMA_VERSION)

    def test_reopened_migrated_spool(self) -> None:
        self.old_spool()
        self.open().close()
        self.assertEqual(len(self.done(self.open().due(1000.0, 10))), 1)

    def test_migration_is_idempotent(self) -> None:
        """A column already there (a migration half done by hand) is kept."""
        self.old_spool()
        connection = sqlite3.connect(self.path, isolation_level=None)
        _add_tls_column(connection)
        _add_tls_column(connection)
        connection.close()
        spool = self.open()
        self.assertEqual(len(self.done(spool.due(1000.0, 10))), 1)
        self.assertEqual(self.version(), SCHEMA_VERSION)


class AdminToolTests(SpoolCase):
    """C{maillaser-spool} shows the TLS of a session that had one."""

    def test_show_and_json(self) -> None:
        spool = self.open()
        self.done(spool.add(message("msg_tls", TLS)))
        self.done(spool.add(message("msg_clear", None)))

        def admin(*argv: str) -> str:
            buffer = io.BytesIO()
            out = io.TextIOWrapper(buffer, encoding="utf-8", newline="\n")
            code = run(
                ("--spool-dir", self.directory, *argv),
                out=out,
                err=io.StringIO(),
                now=2000.0,
                environ={},
            )
            self.assertEqual(code, 0)
            out.flush()
            return buffer.getvalue().decode()

        self.assertIn(
            "\npeer:         ::1\ntls:          TLSv1.3 TLS_AES_256_GCM_SHA384\n",
            admin("show", "msg_tls"),
        )
        self.assertNotIn("tls:", admin("show", "msg_clear"))
        lines = {
            entry["id"]: entry
            for entry in map(json.loads, admin("list", "--json").splitlines())
        }
        self.assertEqual(
            lines["msg_tls"]["tls"],
            {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"},
        )
        self.assertNotIn("tls", lines["msg_clear"])


@pytest.mark.usefixtures("postgres_url")
class SharedTLSColumnTests(PostgresCase):
    """The same column in the shared spool's schema."""

    test_kept_with_the_message = TLSColumnTests.test_kept_with_the_message

    def test_stored_as_compact_json(self) -> None:
        spool = self.open()
        self.done(spool.add(message("msg_1", TLS)))
        self.done(spool.add(message("msg_2", None)))
        with psycopg.connect(self.postgres_url) as connection:
            rows = connection.execute("SELECT tls FROM messages ORDER BY id")
            self.assertEqual(
                [row[0] for row in rows],
                ['{"version":"TLSv1.3","cipher":"TLS_AES_256_GCM_SHA384"}', ""],
            )
