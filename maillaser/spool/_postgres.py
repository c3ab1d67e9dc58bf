"""
The shared spool's SQL: accepted messages live in PostgreSQL, where every
bridge given the same URL takes the due ones.

L{PostgresDatabase} offers what L{maillaser.spool.SpoolDatabase} offers
(the worker's spool and the admin tool call the same methods on either),
and what only a shared spool needs: leases.  A bridge claims a message by
writing itself and an expiry into the row (C{lease_owner},
C{lease_expires}), taken with C{FOR UPDATE SKIP LOCKED} so two bridges never
take the same row, renewed while its round runs, and given back when it
stops; a bridge that dies keeps its leases only until they expire.  Lease
times are the database's clock, the one clock every bridge shares; due
times stay the bridges' own, as on SQLite.

Every method is synchronous (psycopg's blocking API): the worker calls it
from a thread of its own (L{maillaser.spool.PostgresSpool}), the admin tool
directly.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
from twisted.python.failure import Failure

from maillaser.config import mask_url
from maillaser.message import Attempt, Message, QueuedMessage, SpoolStats
from maillaser.spool._database import (
    _ENTRY_COLUMNS,
    _PROBE,
    DUE_BYTES,
    KEPT_ATTEMPTS,
    DuplicateMessage,
    MessageNotFound,
    SpoolEntry,
    SpoolError,
    State,
    _each,
    _entry,
    _not_found,
    _queued,
    _tls_column,
    _within,
)

if TYPE_CHECKING:
    import psycopg
    import psycopg.rows
else:
    # Imported by require_psycopg on first use: the driver costs each process
    # some megabytes, and a bridge with a SQLite spool never needs it.
    psycopg = None

_T = TypeVar("_T")

INSTALL_HINT = "pip install 'maillaser[postgresql]'"

SCHEMA_VERSION = 1
"""Stored in C{maillaser_schema}; a later schema adds a step to L{_MIGRATIONS}."""

CHANNEL = "maillaser_spool"
"""Notified when a message becomes free to take: every bridge listens."""

CONNECT_TIMEOUT = 5
"""Seconds to reach the database, unless the URL says otherwise: libpq's
default is to wait for ever, and a bridge must answer 451 instead."""

_LOCK = 0x4D4C5350
"""The advisory lock held while the schema is checked or migrated ("MLSP")."""

_NOW = "extract(epoch from clock_timestamp())"

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE messages (
            id text PRIMARY KEY,
            state text NOT NULL CHECK (state IN ('pending', 'dead')),
            sender text NOT NULL,
            recipients text NOT NULL,
            helo text NOT NULL,
            peer text NOT NULL,
            tls text NOT NULL DEFAULT '',
            size bigint NOT NULL,
            received_at double precision NOT NULL,
            rounds integer NOT NULL DEFAULT 0,
            next_attempt_at double precision NOT NULL,
            last_error text NOT NULL DEFAULT '',
            dead_at double precision,
            attempt_count integer NOT NULL DEFAULT 0,
            lease_owner text,
            lease_expires double precision,
            raw bytea NOT NULL
        )
        """,
        "CREATE INDEX messages_due ON messages (state, next_attempt_at)",
        "CREATE INDEX messages_lease ON messages (lease_owner)",
        """
        CREATE TABLE attempts (
            serial bigserial PRIMARY KEY,
            message_id text NOT NULL,
            at double precision NOT NULL,
            status integer,
            error text NOT NULL
        )
        """,
        "CREATE INDEX attempts_message ON attempts (message_id)",
        """
        CREATE TABLE retained (
            message_id text PRIMARY KEY,
            expires_at double precision NOT NULL,
            raw bytea NOT NULL
        )
        """,
        "CREATE INDEX retained_expires ON retained (expires_at)",
        """
        CREATE TABLE breakers (
            webhook text PRIMARY KEY,
            opened_at double precision,
            probe_owner text,
            probe_expires double precision
        )
        """,
    ),
)
"""Step I{n} takes the schema from version I{n} to I{n + 1}."""

_FREE = (
    f"(lease_owner IS NULL OR lease_expires < {_NOW} OR lease_owner = %(owner)s)"
    " AND NOT (id = ANY(%(claimed)s))"
)
"""
A row this bridge may take: no bridge holds it (never leased, given back,
or its lease expired), or this one does but has not claimed it in memory
(stored here, and not yet handed to a round).
"""


def require_psycopg() -> None:
    """
    Import the optional driver, or stop start-up with one line when it is
    missing.
    """
    global psycopg
    if psycopg is not None:
        return
    try:
        import psycopg.rows
    except ImportError:
        raise SpoolError(f"a spool URL needs psycopg: {INSTALL_HINT}") from None


def _connect(url: str, **options: Any) -> psycopg.Connection[Any]:
    require_psycopg()
    return psycopg.connect(**_conninfo(url), autocommit=True, **options)


def _conninfo(url: str) -> dict[str, Any]:
    """The URL's parameters, with our connect timeout unless it has one."""
    try:
        parameters = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as e:
        raise SpoolError(f"invalid spool URL {mask_url(url)}") from e
    parameters.setdefault("connect_timeout", CONNECT_TIMEOUT)
    return parameters


@attrs.define
class PostgresDatabase:
    """
    The shared spool's SQL, synchronous, over one connection that is made
    again after it broke.

    Like L{maillaser.spool.SpoolDatabase}, methods that change the database
    run inside a L{transaction} their caller opens; the reading methods open
    their own; errors surface as L{SpoolError}, naming the database by its
    URL without the password.
    """

    url: str = attrs.field(repr=False)
    owner: str | None = None
    """Who this process is in C{lease_owner}; C{None} for the admin tool."""
    lease: float = 60.0
    _connection: Any = None
    _durable: bool = True

    @property
    def path(self) -> str:
        """How the database is named in log lines and errors: no password."""
        return mask_url(self.url)

    @property
    def connected(self) -> bool:
        """Whether the last connection still stands (it is dropped once broken)."""
        return self._connection is not None

    @classmethod
    def open(
        cls,
        url: str,
        *,
        create: bool,
        owner: str | None = None,
        lease: float = 60.0,
    ) -> PostgresDatabase:
        """
        Connect, and create or migrate the schema: under an advisory lock, so
        that bridges starting at once wait for each other instead of racing.

        @param create: make the tables if there are none; the admin tool
            passes C{False}, so a wrong URL never leaves a stray spool.
        """
        require_psycopg()
        database = cls(url, owner, lease)
        try:
            database._prepare(create)
        except BaseException:
            database.close()
            raise
        return database

    def _prepare(self, create: bool) -> None:
        with self.transaction():
            self._execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            self._execute(
                "CREATE TABLE IF NOT EXISTS maillaser_schema (version integer NOT NULL)"
                if create
                else "SELECT 1"
            )
            exists = self._execute(
                "SELECT to_regclass('maillaser_schema') IS NOT NULL AS found"
            ).fetchone()
            if not exists["found"]:
                raise SpoolError(f"no spool at {self.path}")
            row = self._execute("SELECT version FROM maillaser_schema").fetchone()
            version = 0 if row is None else int(row["version"])
            if version > SCHEMA_VERSION:
                raise SpoolError(
                    f"{self.path} has spool schema version {version};"
                    f" this MailLaser reads version {SCHEMA_VERSION}"
                )
            if version < SCHEMA_VERSION and not create:
                raise SpoolError(
                    f"{self.path} has spool schema version {version}; start a"
                    f" bridge once to migrate it to version {SCHEMA_VERSION}"
                )
            for step in _MIGRATIONS[version:]:
                for statement in step:
                    self._execute(statement)
            if row is None:
                self._execute(
                    "INSERT INTO maillaser_schema VALUES (%s)", (SCHEMA_VERSION,)
                )
            else:
                self._execute(
                    "UPDATE maillaser_schema SET version = %s", (SCHEMA_VERSION,)
                )

    def _connected(self) -> Any:
        if self._connection is None or self._connection.closed:
            require_psycopg()
            with self._errors("is unreachable"):
                self._connection = _connect(self.url, row_factory=psycopg.rows.dict_row)
            self._durable = True
        return self._connection

    def _execute(
        self, statement: str, parameters: Sequence[Any] | Mapping[str, Any] = ()
    ) -> Any:
        return self._connected().execute(statement, parameters)

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[None]:
        """One transaction: committed if the block succeeds, else rolled back."""
        connection = self._connected()
        with self._errors("failed"), connection.transaction():
            yield

    @contextmanager
    def _errors(self, failed: str) -> Iterator[None]:
        """
        Turn psycopg's errors into L{SpoolError}s; a connection that broke is
        dropped, so the next call connects again (the database came back).
        """
        try:
            yield
        except psycopg.Error as e:
            connection = self._connection
            if connection is not None and (connection.broken or connection.closed):
                connection.close()
                self._connection = None
            text = " ".join(str(e).split()) or type(e).__name__
            raise SpoolError(f"spool database {self.path} {failed}: {text}") from e

    def apply(
        self,
        operations: Sequence[Callable[[PostgresDatabase], _T]],
        *,
        durable: bool = True,
    ) -> list[_T | Failure]:
        """
        Run C{operations} in one transaction (a group commit), as
        L{maillaser.spool.SpoolDatabase.apply} does.

        @param durable: without it, the commit does not wait for the WAL to
            reach the disk (C{synchronous_commit = off}): for settlements,
            whose loss costs a repeat, never a message.
        """
        with self.transaction():
            if not durable:
                self._execute("SET LOCAL synchronous_commit = off")
            return _each(operations, self)

    def insert(self, message: Message) -> int:
        """
        Spool C{message} as pending and due at once, leased to this process
        (which delivers it from memory); returns its size.
        """
        envelope = message.envelope
        row = (
            self._connected()
            .execute(
                "INSERT INTO messages (id, state, sender, recipients, helo, peer,"
                " tls, raw, size, received_at, next_attempt_at, lease_owner,"
                " lease_expires) VALUES (%(id)s, 'pending', %(sender)s,"
                " %(recipients)s, %(helo)s, %(peer)s, %(tls)s, %(raw)s, %(size)s,"
                " %(at)s, %(at)s, %(owner)s,"
                " CASE WHEN %(owner)s::text IS NULL THEN NULL"
                f" ELSE {_NOW} + %(lease)s END)"
                " ON CONFLICT (id) DO NOTHING RETURNING size",
                {
                    "id": message.id,
                    "sender": envelope.sender,
                    "recipients": json.dumps(envelope.recipients),
                    "helo": envelope.helo,
                    "peer": envelope.peer,
                    "tls": _tls_column(envelope.tls),
                    "raw": message.raw,
                    "size": len(message.raw),
                    "at": message.received_at,
                    "owner": self.owner,
                    "lease": self.lease,
                },
                binary=True,
            )
            .fetchone()
        )
        if row is None:
            raise DuplicateMessage(f"message {message.id} is already spooled")
        return len(message.raw)

    def delete(self, message_id: str, state: State) -> int:
        """
        Forget a message in C{state} and its attempts; returns its size.  A
        delivered message is forgotten whoever holds it now: the webhook
        has it.
        """
        return self._change(
            "WITH gone AS (DELETE FROM messages WHERE id = %s AND state = %s"
            " RETURNING id, size), attempts AS (DELETE FROM attempts"
            " WHERE message_id IN (SELECT id FROM gone))"
            " SELECT size FROM gone",
            (message_id, state),
            message_id,
            state,
        )

    def retain(self, message_id: str, until: float) -> int:
        """
        Keep a pending message's bytes until C{until}, for its links, as it
        is deleted (the caller deletes it in the same transaction); returns
        its size.
        """
        return self._change(
            "INSERT INTO retained (message_id, expires_at, raw)"
            " SELECT id, %s, raw FROM messages WHERE id = %s AND state = 'pending'"
            " ON CONFLICT (message_id) DO UPDATE"
            " SET expires_at = excluded.expires_at, raw = excluded.raw"
            " RETURNING length(raw) AS size",
            (until, message_id),
            message_id,
            "pending",
        )

    def retained_raw(self, message_id: str, now: float) -> bytes | None:
        """
        The bytes a link to C{message_id} is served from: kept after
        delivery and not yet expired, or still spooled.
        """
        with self.transaction(write=False):
            row = self._execute(
                "SELECT raw FROM retained WHERE message_id = %s AND expires_at > %s",
                (message_id, now),
            ).fetchone()
            if row is None:
                row = self._execute(
                    "SELECT raw FROM messages WHERE id = %s", (message_id,)
                ).fetchone()
        return None if row is None else bytes(row["raw"])

    def expire_retained(self, now: float) -> tuple[int, int]:
        """Forget what expired at C{now}; returns how many and their bytes."""
        row = self._execute(
            "WITH gone AS (DELETE FROM retained WHERE expires_at <= %s"
            " RETURNING length(raw) AS size)"
            " SELECT count(*) AS count, coalesce(sum(size), 0) AS size FROM gone",
            (now,),
        ).fetchone()
        return int(row["count"]), int(row["size"])

    def reschedule(
        self, message_id: str, at: float, attempts: Sequence[Attempt]
    ) -> int:
        """End a failed round of a pending message; returns its size."""
        return self._settle(
            message_id, "rounds = rounds + 1, next_attempt_at = %s", (at,), attempts
        )

    def bury(self, message_id: str, at: float, attempts: Sequence[Attempt]) -> int:
        """Move a pending message to the dead letters; returns its size."""
        return self._settle(message_id, "state = 'dead', dead_at = %s", (at,), attempts)

    def probe(self) -> None:
        """Store a message and forget it again: fails when storing mail would."""
        self.insert(_PROBE)
        self.delete(_PROBE.id, "pending")

    def _settle(
        self,
        message_id: str,
        assignments: str,
        parameters: tuple[object, ...],
        attempts: Sequence[Attempt],
    ) -> int:
        """
        Record a round's end, and give the lease back, unless another bridge
        holds the message now (ours expired): its round will settle it.
        """
        last_error = attempts[-1].error if attempts else None
        size = self._change(
            f"UPDATE messages SET {assignments},"
            " last_error = coalesce(%s, last_error),"
            " attempt_count = attempt_count + %s,"
            " lease_owner = NULL, lease_expires = NULL"
            " WHERE id = %s AND state = 'pending'"
            " AND (lease_owner IS NULL OR lease_owner = %s"
            f" OR lease_expires < {_NOW}) RETURNING size",
            (*parameters, last_error, len(attempts), message_id, self.owner),
            message_id,
            "pending",
        )
        if attempts:
            with self._connected().cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO attempts (message_id, at, status, error)"
                    " VALUES (%s, %s, %s, %s)",
                    [(message_id, a.at, a.status, a.error) for a in attempts],
                )
            self._execute(
                "DELETE FROM attempts WHERE message_id = %s AND serial NOT IN"
                " (SELECT serial FROM attempts WHERE message_id = %s"
                " ORDER BY serial DESC LIMIT %s)",
                (message_id, message_id, KEPT_ATTEMPTS),
            )
        return size

    def requeue(self, message_id: str | None, now: float) -> int:
        """
        Make one dead message (or, with C{None}, every one) pending and due
        at C{now}, with a fresh retry schedule; returns how many, and tells
        the bridges.
        """
        update = (
            "UPDATE messages SET state = 'pending', next_attempt_at = %s,"
            " rounds = 0, dead_at = NULL, lease_owner = NULL, lease_expires = NULL"
            " WHERE state = 'dead'"
        )
        if message_id is None:
            count: int = self._execute(update, (now,)).rowcount
        else:
            self._change(
                f"{update} AND id = %s RETURNING size",
                (now, message_id),
                message_id,
                "dead",
            )
            count = 1
        self._notify()
        return count

    def retry(self, message_id: str | None, now: float) -> int:
        """
        Make one pending message (or, with C{None}, every one) due at
        C{now}, keeping its rounds; returns how many were made due, and
        tells the bridges.
        """
        if message_id is None:
            count: int = self._execute(
                "UPDATE messages SET next_attempt_at = %s"
                " WHERE state = 'pending' AND next_attempt_at > %s",
                (now, now),
            ).rowcount
        else:
            self._change(
                "UPDATE messages SET next_attempt_at = least(next_attempt_at, %s)"
                " WHERE state = 'pending' AND id = %s RETURNING size",
                (now, message_id),
                message_id,
                "pending",
            )
            count = 1
        self._notify()
        return count

    def release(self, message_ids: Collection[str] | None) -> None:
        """
        Give back this process's leases on C{message_ids} (C{None}: all of
        them), and wake the other bridges to take them.
        """
        self._execute(
            "UPDATE messages SET lease_owner = NULL, lease_expires = NULL"
            " WHERE lease_owner = %(owner)s"
            " AND (%(ids)s::text[] IS NULL OR id = ANY(%(ids)s))",
            {
                "owner": self.owner,
                "ids": None if message_ids is None else list(message_ids),
            },
        )
        self._notify()

    def renew(self, message_ids: Collection[str]) -> int:
        """Extend this process's leases on C{message_ids}; how many it still had."""
        cursor = self._execute(
            f"UPDATE messages SET lease_expires = {_NOW} + %s"
            " WHERE lease_owner = %s AND id = ANY(%s)",
            (self.lease, self.owner, list(message_ids)),
        )
        renewed: int = cursor.rowcount
        return renewed

    def breaker_opened_at(self, webhook: str) -> float | None:
        row = self._execute(
            "SELECT opened_at FROM breakers WHERE webhook = %s", (webhook,)
        ).fetchone()
        return None if row is None else row["opened_at"]

    def open_breaker(self, webhook: str, now: float) -> None:
        self._execute(
            "INSERT INTO breakers (webhook, opened_at) VALUES (%(webhook)s, %(now)s)"
            " ON CONFLICT (webhook) DO UPDATE SET opened_at = %(now)s,"
            " probe_owner = NULL, probe_expires = NULL",
            {"webhook": webhook, "now": now},
        )

    def close_breaker(self, webhook: str) -> None:
        self._execute(
            "UPDATE breakers SET opened_at = NULL, probe_owner = NULL,"
            " probe_expires = NULL WHERE webhook = %s",
            (webhook,),
        )

    def claim_probe(self, webhook: str, now: float, reset: float) -> bool:
        """
        The probe goes to one bridge: the row's update is atomic, and the
        claim lasts C{reset} seconds (a bridge that died with it loses it).
        """
        parameters = {
            "webhook": webhook,
            "now": now,
            "reset": reset,
            "owner": self.owner,
        }
        with self.transaction():
            self._execute(
                "INSERT INTO breakers (webhook) VALUES (%(webhook)s)"
                " ON CONFLICT (webhook) DO NOTHING",
                parameters,
            )
            row = self._execute(
                "UPDATE breakers SET probe_owner = %(owner)s,"
                " probe_expires = %(now)s + %(reset)s"
                " WHERE webhook = %(webhook)s"
                " AND (opened_at IS NULL OR opened_at + %(reset)s <= %(now)s)"
                " AND (probe_owner IS NULL OR probe_expires <= %(now)s)"
                " RETURNING webhook",
                parameters,
            ).fetchone()
        return row is not None

    def _notify(self) -> None:
        self._execute(f"NOTIFY {CHANNEL}")

    def _change(
        self,
        statement: str,
        parameters: Sequence[object] | Mapping[str, object],
        message_id: str,
        state: State,
    ) -> int:
        """Run a C{RETURNING size} statement that must touch exactly one row."""
        row = self._execute(statement, parameters).fetchone()
        if row is None:
            raise self._not_found(message_id, state)
        return int(row["size"])

    def _not_found(self, message_id: str, wanted: State) -> MessageNotFound:
        row = self._execute(
            "SELECT state, lease_owner FROM messages WHERE id = %s", (message_id,)
        ).fetchone()
        if row is not None and row["state"] == wanted:
            return MessageNotFound(
                f"message {message_id} is held by another bridge ({row['lease_owner']})"
            )
        return _not_found(message_id, None if row is None else row["state"], wanted)

    def due(
        self, now: float, limit: int, claimed: Collection[str]
    ) -> list[QueuedMessage]:
        """
        Lease up to C{limit} pending messages due at C{now} that no bridge
        holds, oldest first, and no more than L{DUE_BYTES} of them but the
        first.  The rows are locked with C{SKIP LOCKED}, so bridges asking
        at once each get others; the lease outlives the transaction.
        """
        with self.transaction():
            sizes = self._execute(
                "SELECT id, size FROM messages WHERE state = 'pending'"
                f" AND next_attempt_at <= %(now)s AND {_FREE}"
                " ORDER BY next_attempt_at, received_at LIMIT %(limit)s"
                " FOR UPDATE SKIP LOCKED",
                {
                    "now": now,
                    "limit": limit,
                    "owner": self.owner,
                    "claimed": list(claimed),
                },
            ).fetchall()
            chosen = list(_within(DUE_BYTES, [(r["id"], r["size"]) for r in sizes]))
            rows = (
                self._connected()
                .execute(
                    f"UPDATE messages SET lease_owner = %s, lease_expires = {_NOW} + %s"
                    " WHERE id = ANY(%s) RETURNING id, sender, recipients, helo, peer,"
                    " tls, raw, received_at, rounds, next_attempt_at",
                    (self.owner, self.lease, chosen),
                    binary=True,
                )
                .fetchall()
            )
        rows.sort(key=lambda row: (row["next_attempt_at"], row["received_at"]))
        return [_queued(row) for row in rows]

    def next_due(self, claimed: Collection[str]) -> float | None:
        """The earliest due time of a pending message nobody holds."""
        with self.transaction(write=False):
            row = self._execute(
                "SELECT min(next_attempt_at) AS due FROM messages"
                f" WHERE state = 'pending' AND {_FREE}",
                {"owner": self.owner, "claimed": list(claimed)},
            ).fetchone()
        return None if row["due"] is None else float(row["due"])

    def counts(self) -> SpoolStats:
        """Count what is stored, by every bridge."""
        with self.transaction(write=False):
            rows = self._execute(
                "SELECT state, count(*) AS count, coalesce(sum(size), 0) AS size"
                " FROM messages GROUP BY state"
            ).fetchall()
            kept = self._execute(
                "SELECT count(*) AS count, coalesce(sum(length(raw)), 0) AS size"
                " FROM retained"
            ).fetchone()
        by_state = {row["state"]: (row["count"], row["size"]) for row in rows}
        pending, size = by_state.get("pending", (0, 0))
        dead, _ = by_state.get("dead", (0, 0))
        return SpoolStats(
            pending=pending,
            dead=dead,
            bytes=int(size),
            retained=kept["count"],
            retained_bytes=int(kept["size"]),
        )

    def entries(self, state: State | None = None) -> list[SpoolEntry]:
        """Every message in C{state} (or all), oldest first."""
        with self.transaction(write=False):
            rows = self._execute(
                f"SELECT {_ENTRY_COLUMNS} FROM messages"
                " WHERE %s::text IS NULL OR state = %s ORDER BY received_at, id",
                (state, state),
            ).fetchall()
        return [_entry(row) for row in rows]

    def entry(self, message_id: str) -> SpoolEntry:
        """One message, or L{MessageNotFound}."""
        with self.transaction(write=False):
            row = self._execute(
                f"SELECT {_ENTRY_COLUMNS} FROM messages WHERE id = %s", (message_id,)
            ).fetchone()
        if row is None:
            raise MessageNotFound(f"no message {message_id} in the spool")
        return _entry(row)

    def raw(self, message_id: str) -> bytes:
        """The exact bytes accepted, or L{MessageNotFound}."""
        with self.transaction(write=False):
            row = self._execute(
                "SELECT raw FROM messages WHERE id = %s", (message_id,)
            ).fetchone()
        if row is None:
            raise MessageNotFound(f"no message {message_id} in the spool")
        return bytes(row["raw"])

    def attempts(self, message_id: str) -> list[Attempt]:
        """The recorded attempts, oldest first."""
        with self.transaction(write=False):
            rows = self._execute(
                "SELECT at, status, error FROM attempts WHERE message_id = %s"
                " ORDER BY serial",
                (message_id,),
            ).fetchall()
        return [Attempt(row["at"], row["status"], row["error"]) for row in rows]

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


@attrs.define(eq=False)
class Listener:
    """
    Waits, on a thread of its own and a connection of its own, for
    C{NOTIFY}s on L{CHANNEL}, and calls C{wake} (through C{call}, which
    crosses to the reactor thread) for each burst of them.  When the
    database is unreachable it tries again every C{interval} seconds; the
    dispatcher's polling covers the gap.
    """

    url: str = attrs.field(repr=False)
    wake: Callable[[], object]
    call: Callable[[Callable[[], object]], object]
    interval: float = 1.0
    _stop: threading.Event = attrs.Factory(threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        require_psycopg()
        self._thread = threading.Thread(
            target=self._run, name="maillaser-spool-listener", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end; it does within L{interval} seconds."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with _connect(self.url) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    self.call(self.wake)  # anything freed while we were away
                    while not self._stop.is_set():
                        heard = list(connection.notifies(timeout=self.interval))
                        if heard:
                            self.call(self.wake)
            except psycopg.Error:
                self._stop.wait(self.interval)


__all__ = [
    "CHANNEL",
    "INSTALL_HINT",
    "Listener",
    "PostgresDatabase",
    "require_psycopg",
]
