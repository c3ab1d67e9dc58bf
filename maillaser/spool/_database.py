"""
The spool's SQL: accepted messages live in SQLite until the webhook has them.

The SMTP front answers ``250`` only once a message is committed here, so
this module is where "no accepted mail is ever lost" is kept or broken: a
message leaves the database only when the webhook accepted it, or when an
operator purges it from the dead letters by id.

All SQL lives in L{SpoolDatabase}, a synchronous class over one connection.
The delivery worker drives it through L{maillaser.spool.SqliteSpool}, which
groups the writes of one reactor turn into one transaction; the
C{maillaser-spool} admin command uses it directly, with no reactor, possibly
while the worker is running: WAL lets it read alongside the worker and
C{busy_timeout} makes its writes wait their turn.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import (
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import contextmanager
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import attrs
from twisted.python.failure import Failure

from maillaser.message import (
    Attempt,
    Envelope,
    Message,
    QueuedMessage,
    SpoolStats,
    TLSInfo,
)

DATABASE_NAME = "spool.sqlite3"

SCHEMA_VERSION = 3
"""
Stored in C{PRAGMA user_version}; a later schema bumps it and migrates
(L{_MIGRATIONS}), so a spool left by an older MailLaser keeps its mail.
"""

APPLICATION_ID = 0x4D4C5350
"""C{PRAGMA application_id} ("MLSP"): tells our database from any other."""

KEPT_ATTEMPTS = 20
"""Attempts recorded per message; older ones are dropped, the count is kept."""

DUE_BYTES = 4 * 1024 * 1024
"""Bytes of messages one L{SpoolDatabase.due} hands out, past its first."""

BUSY_TIMEOUT_MS = 10_000
"""How long a write waits for the other process (worker or admin) to finish."""

PROBE_SIZE = 64 * 1024
"""Bytes written to see whether a spool that failed can store mail again."""

State = Literal["pending", "dead"]

_T = TypeVar("_T")

_SCHEMA = (
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
        tls TEXT NOT NULL DEFAULT '',
        -- Last: reading any other column never walks a large message's
        -- overflow pages.
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


def _add_tls_column(connection: sqlite3.Connection) -> None:
    """
    1 -> 2: the session's TLS, as compact JSON; C{''} for cleartext, and
    for every message spooled before it was recorded.
    """
    columns = {row[1] for row in connection.execute("PRAGMA table_info(messages)")}
    if "tls" not in columns:
        connection.execute(
            "ALTER TABLE messages ADD COLUMN tls TEXT NOT NULL DEFAULT ''"
        )


def _add_retained_table(connection: sqlite3.Connection) -> None:
    """2 -> 3: delivered messages kept for their attachment links."""
    connection.execute(
        """
        CREATE TABLE IF NOT EXISTS retained (
            message_id TEXT PRIMARY KEY,
            expires_at REAL NOT NULL,
            raw BLOB NOT NULL
        )
        """
    )
    connection.execute(
        "CREATE INDEX IF NOT EXISTS retained_expiry ON retained (expires_at)"
    )


_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _add_tls_column,
    2: _add_retained_table,
}
"""What takes a spool from each older version to the next; each is idempotent."""

_UNCLAIMED_PENDING = "state = 'pending' AND id NOT IN (SELECT value FROM json_each(?))"

_PROBE = Message("probe", Envelope("", ()), bytes(PROBE_SIZE))
"""Never a real message: real ids are C{msg_} and 28 hex digits."""

_ENTRY_COLUMNS = (
    "id, state, sender, recipients, helo, peer, tls, size, received_at, rounds,"
    " attempt_count, next_attempt_at, last_error, dead_at"
)


class SpoolError(Exception):
    """
    The spool could not store or read: disk full, I/O error, corrupt or
    foreign database, closed spool.  The SMTP layer answers ``451`` to it, so
    the sending server keeps the message and tries again later.
    """


class DuplicateMessage(SpoolError):
    """A message with this id is already spooled; the new copy was not stored."""


class MessageNotFound(LookupError):
    """
    No message with this id in the state an operation needs (for example,
    requeueing a message that is not dead).  Nothing was changed.
    """


@attrs.frozen
class SpoolEntry:
    """What an operator sees of a spooled message, without its bytes."""

    id: str
    state: State
    envelope: Envelope
    size: int
    received_at: float
    rounds: int
    attempts: int
    """Every attempt made, including those no longer recorded."""
    next_attempt_at: float | None
    """C{None} for dead letters."""
    last_error: str
    dead_at: float | None


@attrs.define
class SpoolDatabase:
    """
    The spool's SQL, synchronous, over one connection.

    Methods that change the database run inside a L{transaction} their caller
    opens, so the worker can put many of them in one commit; the reading
    methods open their own.  SQLite errors surface as L{SpoolError}.
    """

    path: str
    _connection: sqlite3.Connection
    _durable: bool = True
    """Whether commits wait for the disk (C{synchronous = FULL}, as set)."""

    @classmethod
    def open(
        cls, directory: str, *, create: bool, read_only: bool = False
    ) -> SpoolDatabase:
        """
        Connect to the spool in C{directory}, checking it is intact and ours.

        SQLite's integrity check reads the whole file, so this blocks for as
        long as that takes: it is for start-up and for the admin tool.

        @param create: make the directory and an empty spool if there is
            none; the admin tool passes C{False}, so a typo in a path can
            never leave a stray spool behind.
        @param read_only: open it for reading only (SQLite's C{mode=ro}), so
            an operator who may read the spool but not write it can still
            look into it; any write then fails.
        """
        path = os.path.join(directory, DATABASE_NAME)
        if create:
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            except OSError as e:
                raise SpoolError(
                    f"cannot create spool directory {directory}: {e.strerror}"
                ) from e
        else:
            _check_searchable(directory)
            if not os.path.isfile(path):
                raise SpoolError(f"no spool at {directory}")
        _check_access(directory, path, read_only=read_only)
        mode = "ro" if read_only else "rwc" if create else "rw"
        uri = f"file:{quote(os.path.abspath(path))}?mode={mode}"
        try:
            connection = sqlite3.connect(uri, uri=True, isolation_level=None)
        except sqlite3.Error as e:
            raise SpoolError(f"cannot open spool database {path}: {e}") from e
        connection.row_factory = sqlite3.Row
        database = cls(path, connection)
        try:
            database._prepare(create, read_only)
        except BaseException:
            connection.close()
            raise
        return database

    def _prepare(self, create: bool, read_only: bool = False) -> None:
        with self._errors("is unreadable or corrupt"):
            self._connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            checked = self._connection.execute("PRAGMA quick_check")
            problems = [row[0] for row in checked]
        if problems not in ([], ["ok"]):
            raise SpoolError(
                f"spool database {self.path} is corrupt: {'; '.join(problems[:3])}"
            )
        # The schema is checked before anything is written, so a database
        # that is not ours is left exactly as it was found.
        with self.transaction(write=create):
            if self._is_empty():
                if not create:
                    raise SpoolError(f"{self.path} is empty, not a MailLaser spool")
                for statement in _SCHEMA:
                    self._connection.execute(statement)
        if self._pragma("user_version") < SCHEMA_VERSION:
            if read_only:
                raise SpoolError(
                    f"{self.path} has an older schema: start the bridge or run"
                    " a command that writes to upgrade it"
                )
            self._migrate()
        if read_only:
            return  # the writers set the journal up; a reader cannot
        with self._errors("cannot be set up"):
            (mode,) = self._connection.execute("PRAGMA journal_mode = WAL").fetchone()
            self._connection.execute("PRAGMA synchronous = FULL")
        if mode != "wal":
            raise SpoolError(f"spool database {self.path} cannot use WAL mode")

    def _is_empty(self) -> bool:
        """Whether this is a new database; raises if it is somebody else's."""
        application_id = self._pragma("application_id")
        version = self._pragma("user_version")
        tables = self._connection.execute("SELECT 1 FROM sqlite_master").fetchone()
        if application_id == version == 0 and not tables:
            return True
        if application_id != APPLICATION_ID:
            raise SpoolError(f"{self.path} is not a MailLaser spool database")
        if version != SCHEMA_VERSION and version not in _MIGRATIONS:
            raise SpoolError(
                f"{self.path} has spool schema version {version};"
                f" this MailLaser reads version {SCHEMA_VERSION}"
            )
        return False

    def _migrate(self) -> None:
        """
        Bring an older spool to L{SCHEMA_VERSION}, one version per
        transaction; the version is read again inside each, so two
        processes opening the same old spool migrate it once.
        """
        while True:
            with self.transaction():
                version = self._pragma("user_version")
                if version >= SCHEMA_VERSION:
                    return
                _MIGRATIONS[version](self._connection)
                self._connection.execute(f"PRAGMA user_version = {version + 1}")

    def _pragma(self, name: str) -> int:
        (value,) = self._connection.execute(f"PRAGMA {name}").fetchone()
        return int(value)

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[None]:
        """
        One transaction: committed if the block succeeds, else rolled back.

        Writers take the write lock up front (C{BEGIN IMMEDIATE}), so waiting
        for the other process happens here, under C{busy_timeout}, and never
        as a deadlock half-way through.
        """
        with self._errors("failed"):
            self._connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield
                self._connection.execute("COMMIT")
            except BaseException:
                if self._connection.in_transaction:
                    self._connection.execute("ROLLBACK")
                raise

    @contextmanager
    def _errors(self, failed: str) -> Iterator[None]:
        """Turn SQLite's errors into L{SpoolError}s that name the file."""
        try:
            yield
        except sqlite3.Error as e:
            raise SpoolError(f"spool database {self.path} {failed}: {e}") from e

    def apply(
        self,
        operations: Sequence[Callable[[SpoolDatabase], _T]],
        *,
        durable: bool = True,
    ) -> list[_T | Failure]:
        """
        Run C{operations} in one transaction (a group commit).

        An operation that finds its message missing or already there gets its
        own L{Failure} in the result and the others still commit; any other
        error rolls back the whole group.

        @param durable: the commit returns only once it is on disk (an
            fsync of the log).  Without it the commit survives the process
            (a crash, C{kill -9}) but not a power loss, until the next
            durable commit or checkpoint writes it out too: for writes whose
            loss costs a repeat, never a message (a delivered message
            deleted, a round's outcome recorded).
        """
        self._set_durable(durable)
        with self.transaction():
            return _each(operations, self)

    def _set_durable(self, durable: bool) -> None:
        if durable != self._durable:
            mode = "FULL" if durable else "NORMAL"
            with self._errors("cannot be set up"):
                self._connection.execute(f"PRAGMA synchronous = {mode}")
            self._durable = durable

    def insert(self, message: Message) -> int:
        """Spool C{message} as pending and due at once; returns its size."""
        envelope = message.envelope
        try:
            self._connection.execute(
                "INSERT INTO messages (id, state, sender, recipients, helo, peer,"
                " tls, raw, size, received_at, next_attempt_at)"
                " VALUES (?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    message.id,
                    envelope.sender,
                    json.dumps(envelope.recipients),
                    envelope.helo,
                    envelope.peer,
                    _tls_column(envelope.tls),
                    message.raw,
                    len(message.raw),
                    message.received_at,
                    message.received_at,
                ),
            )
        except sqlite3.IntegrityError as e:
            raise DuplicateMessage(f"message {message.id} is already spooled") from e
        return len(message.raw)

    def delete(self, message_id: str, state: State) -> int:
        """Forget a message in C{state} and its attempts; returns its size."""
        size = self._change(
            "DELETE FROM messages WHERE id = ? AND state = ? RETURNING size",
            (message_id, state),
            message_id,
            state,
        )
        self._connection.execute(
            "DELETE FROM attempts WHERE message_id = ?", (message_id,)
        )
        return size

    def retain(self, message_id: str, until: float) -> int:
        """
        Keep a pending message's bytes until C{until}, for its links, as it
        is deleted (the caller deletes it in the same transaction); returns
        its size.
        """
        row = self._connection.execute(
            "INSERT OR REPLACE INTO retained (message_id, expires_at, raw)"
            " SELECT id, ?, raw FROM messages WHERE id = ? AND state = 'pending'"
            " RETURNING length(raw)",
            (until, message_id),
        ).fetchone()
        if row is None:
            raise self._not_found(message_id, "pending")
        return int(row[0])

    def retained_raw(self, message_id: str, now: float) -> bytes | None:
        """
        The bytes a link to C{message_id} is served from: kept after
        delivery and not yet expired, or still spooled (a link works
        before its message is delivered too).
        """
        with self.transaction(write=False):
            row = self._connection.execute(
                "SELECT raw FROM retained WHERE message_id = ? AND expires_at > ?",
                (message_id, now),
            ).fetchone()
            if row is None:
                row = self._connection.execute(
                    "SELECT raw FROM messages WHERE id = ?", (message_id,)
                ).fetchone()
        return None if row is None else bytes(row[0])

    def expire_retained(self, now: float) -> tuple[int, int]:
        """Forget what expired at C{now}; returns how many and their bytes."""
        row = self._connection.execute(
            "SELECT count(*), coalesce(sum(length(raw)), 0) FROM retained"
            " WHERE expires_at <= ?",
            (now,),
        ).fetchone()
        self._connection.execute("DELETE FROM retained WHERE expires_at <= ?", (now,))
        return int(row[0]), int(row[1])

    def reschedule(
        self, message_id: str, at: float, attempts: Sequence[Attempt]
    ) -> int:
        """End a failed round of a pending message; returns its size."""
        return self._settle(
            message_id, "rounds = rounds + 1, next_attempt_at = ?", (at,), attempts
        )

    def probe(self) -> None:
        """
        Store a message of L{PROBE_SIZE} bytes and forget it again, in the
        caller's transaction: it fails when storing mail would.
        """
        self.insert(_PROBE)
        self.delete(_PROBE.id, "pending")

    def bury(self, message_id: str, at: float, attempts: Sequence[Attempt]) -> int:
        """Move a pending message to the dead letters; returns its size."""
        return self._settle(message_id, "state = 'dead', dead_at = ?", (at,), attempts)

    def _settle(
        self,
        message_id: str,
        assignments: str,
        parameters: tuple[object, ...],
        attempts: Sequence[Attempt],
    ) -> int:
        last_error = attempts[-1].error if attempts else None
        size = self._change(
            f"UPDATE messages SET {assignments},"
            " last_error = coalesce(?, last_error),"
            " attempt_count = attempt_count + ?"
            " WHERE id = ? AND state = 'pending' RETURNING size",
            (*parameters, last_error, len(attempts), message_id),
            message_id,
            "pending",
        )
        self._connection.executemany(
            "INSERT INTO attempts (message_id, at, status, error) VALUES (?, ?, ?, ?)",
            [(message_id, a.at, a.status, a.error) for a in attempts],
        )
        self._connection.execute(
            "DELETE FROM attempts WHERE message_id = ? AND rowid NOT IN"
            " (SELECT rowid FROM attempts WHERE message_id = ?"
            " ORDER BY rowid DESC LIMIT ?)",
            (message_id, message_id, KEPT_ATTEMPTS),
        )
        return size

    def requeue(self, message_id: str | None, now: float) -> int:
        """
        Make one dead message (or, with C{None}, every one) pending and due
        at C{now}, with a fresh retry schedule; returns how many.
        """
        update = (
            "UPDATE messages SET state = 'pending', next_attempt_at = ?,"
            " rounds = 0, dead_at = NULL WHERE state = 'dead'"
        )
        if message_id is None:
            return self._connection.execute(update, (now,)).rowcount
        self._change(
            f"{update} AND id = ? RETURNING size", (now, message_id), message_id, "dead"
        )
        return 1

    def retry(self, message_id: str | None, now: float) -> int:
        """
        Make one pending message (or, with C{None}, every one) due at
        C{now}, keeping its rounds: its schedule goes on where it was, and
        it is still buried when the schedule ends.  Returns how many were
        made due; with C{None}, those already due are not counted.
        """
        if message_id is None:
            return self._connection.execute(
                "UPDATE messages SET next_attempt_at = ?"
                " WHERE state = 'pending' AND next_attempt_at > ?",
                (now, now),
            ).rowcount
        self._change(
            "UPDATE messages SET next_attempt_at = min(next_attempt_at, ?)"
            " WHERE state = 'pending' AND id = ? RETURNING size",
            (now, message_id),
            message_id,
            "pending",
        )
        return 1

    def _change(
        self,
        statement: str,
        parameters: tuple[object, ...],
        message_id: str,
        state: State,
    ) -> int:
        """Run a C{RETURNING size} statement that must touch exactly one row."""
        row = self._connection.execute(statement, parameters).fetchone()
        if row is None:
            raise self._not_found(message_id, state)
        return int(row[0])

    def _not_found(self, message_id: str, wanted: State) -> MessageNotFound:
        row = self._connection.execute(
            "SELECT state FROM messages WHERE id = ?", (message_id,)
        ).fetchone()
        return _not_found(message_id, None if row is None else row[0], wanted)

    def due(
        self, now: float, limit: int, claimed: Collection[str]
    ) -> list[QueuedMessage]:
        """
        Up to C{limit} pending messages due at C{now}, skipping C{claimed},
        oldest first, and no more than L{DUE_BYTES} of them but the first:
        the worker reads them all at once, on its reactor thread, and holds
        them in memory until their rounds end.
        """
        with self.transaction(write=False):
            sizes = self._connection.execute(
                f"SELECT id, size FROM messages WHERE {_UNCLAIMED_PENDING}"
                " AND next_attempt_at <= ? ORDER BY next_attempt_at, received_at"
                " LIMIT ?",
                (json.dumps(list(claimed)), now, limit),
            ).fetchall()
            chosen = list(_within(DUE_BYTES, sizes))
            rows = self._connection.execute(
                "SELECT id, sender, recipients, helo, peer, tls, raw, received_at,"
                " rounds"
                " FROM messages WHERE id IN (SELECT value FROM json_each(?))"
                " ORDER BY next_attempt_at, received_at",
                (json.dumps(chosen),),
            ).fetchall()
        return [_queued(row) for row in rows]

    def next_due(self, claimed: Collection[str]) -> float | None:
        """The earliest due time of a pending message not in C{claimed}."""
        with self.transaction(write=False):
            row = self._connection.execute(
                f"SELECT next_attempt_at FROM messages WHERE {_UNCLAIMED_PENDING}"
                " ORDER BY next_attempt_at LIMIT 1",
                (json.dumps(list(claimed)),),
            ).fetchone()
        return None if row is None else float(row[0])

    def counts(self) -> SpoolStats:
        """Count what is stored, for when nobody kept count (start, admin)."""
        with self.transaction(write=False):
            rows = self._connection.execute(
                "SELECT state, count(*), coalesce(sum(size), 0)"
                " FROM messages GROUP BY state"
            ).fetchall()
            retained, retained_bytes = self._connection.execute(
                "SELECT count(*), coalesce(sum(length(raw)), 0) FROM retained"
            ).fetchone()
        by_state = {state: (count, size) for state, count, size in rows}
        pending, size = by_state.get("pending", (0, 0))
        dead, _ = by_state.get("dead", (0, 0))
        return SpoolStats(
            pending=pending,
            dead=dead,
            bytes=size,
            retained=retained,
            retained_bytes=retained_bytes,
        )

    def entries(self, state: State | None = None) -> list[SpoolEntry]:
        """Every message in C{state} (or all), oldest first."""
        with self.transaction(write=False):
            rows = self._connection.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM messages"
                " WHERE ? IS NULL OR state = ? ORDER BY received_at, id",
                (state, state),
            ).fetchall()
        return [_entry(row) for row in rows]

    def entry(self, message_id: str) -> SpoolEntry:
        """One message, or L{MessageNotFound}."""
        with self.transaction(write=False):
            row = self._connection.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM messages WHERE id = ?", (message_id,)
            ).fetchone()
        if row is None:
            raise MessageNotFound(f"no message {message_id} in the spool")
        return _entry(row)

    def raw(self, message_id: str) -> bytes:
        """The exact bytes accepted, or L{MessageNotFound}."""
        with self.transaction(write=False):
            row = self._connection.execute(
                "SELECT raw FROM messages WHERE id = ?", (message_id,)
            ).fetchone()
        if row is None:
            raise MessageNotFound(f"no message {message_id} in the spool")
        return bytes(row[0])

    def attempts(self, message_id: str) -> list[Attempt]:
        """The recorded attempts, oldest first."""
        with self.transaction(write=False):
            rows = self._connection.execute(
                "SELECT at, status, error FROM attempts WHERE message_id = ?"
                " ORDER BY rowid",
                (message_id,),
            ).fetchall()
        return [Attempt(at, status, error) for at, status, error in rows]

    def close(self) -> None:
        self._connection.close()


def _check_searchable(directory: str) -> None:
    """A spool directory we may not enter looks like no spool at all: say why."""
    if os.path.isdir(directory) and not _may(directory, os.X_OK):
        raise SpoolError(f"permission denied: {directory}")


def _check_access(directory: str, path: str, *, read_only: bool) -> None:
    """
    Name the file or directory this process may not use, before SQLite
    tries: it would only say "unable to open database file", or open the
    database read-only without a word and fail at the first write.

    The C{-wal} and C{-shm} files sit next to the database; whichever is
    missing is created in the directory on opening, even to read.
    """
    need, what = (
        (os.R_OK, "read") if read_only else (os.R_OK | os.W_OK, "read and write")
    )
    companions = [path + "-wal", path + "-shm"]
    for name in (path, *companions):
        if os.path.exists(name) and not _may(name, need):
            raise SpoolError(f"permission denied: {name} (needs {what} access)")
    missing = not all(os.path.exists(name) for name in companions)
    if missing and not _may(directory, os.W_OK | os.X_OK):
        raise SpoolError(
            f"permission denied: {directory} (needs write access: SQLite creates"
            f" {DATABASE_NAME}-wal and -shm there, even to read)"
        )


def _may(name: str, mode: int) -> bool:
    """Whether this process, as it runs now (its effective ids), may."""
    return os.access(name, mode, effective_ids=os.access in os.supports_effective_ids)


def _within(budget: int, sizes: Iterable[tuple[str, int]]) -> Iterator[str]:
    """The ids, in order, while their sizes add up to C{budget}; the first always."""
    total = 0
    for number, (message_id, size) in enumerate(sizes):
        total += size
        if number and total > budget:
            return
        yield message_id


def _not_found(message_id: str, state: str | None, wanted: State) -> MessageNotFound:
    """Why a change that needed a message in C{wanted} found it in C{state}."""
    if state is None:
        return MessageNotFound(f"no message {message_id} in the spool")
    return MessageNotFound(f"message {message_id} is {state}, not {wanted}")


def _tls_column(tls: TLSInfo | None) -> str:
    """The C{tls} column: compact JSON, or C{''} for a cleartext session."""
    if tls is None:
        return ""
    return json.dumps(attrs.asdict(tls), separators=(",", ":"))


def _queued(row: Mapping[str, Any]) -> QueuedMessage:
    """A message handed out for a round, from its row."""
    return QueuedMessage(
        Message(row["id"], _envelope(row), row["raw"], row["received_at"]),
        row["rounds"],
    )


_D = TypeVar("_D")


def _each(operations: Sequence[Callable[[_D], _T]], database: _D) -> list[_T | Failure]:
    """
    Run every operation of a group commit on C{database}: one that finds
    its message missing or already there gets its own L{Failure}, and the
    others still run; any other error propagates and rolls the group back.
    """
    results: list[_T | Failure] = []
    for operation in operations:
        try:
            results.append(operation(database))
        except (DuplicateMessage, MessageNotFound):
            results.append(Failure())
    return results


def _envelope(row: Mapping[str, Any]) -> Envelope:
    tls = json.loads(row["tls"]) if row["tls"] else None
    return Envelope(
        row["sender"],
        tuple(json.loads(row["recipients"])),
        row["helo"],
        row["peer"],
        None if tls is None else TLSInfo(**tls),
    )


def _entry(row: Mapping[str, Any]) -> SpoolEntry:
    state = row["state"]
    return SpoolEntry(
        id=row["id"],
        state=state,
        envelope=_envelope(row),
        size=row["size"],
        received_at=row["received_at"],
        rounds=row["rounds"],
        attempts=row["attempt_count"],
        next_attempt_at=row["next_attempt_at"] if state == "pending" else None,
        last_error=row["last_error"],
        dead_at=row["dead_at"],
    )


__all__ = [
    "DATABASE_NAME",
    "DUE_BYTES",
    "DuplicateMessage",
    "MessageNotFound",
    "SpoolDatabase",
    "SpoolEntry",
    "SpoolError",
    "State",
]
