"""
The delivery worker's shared spool: L{PostgresDatabase} on a thread of its
own, with leases instead of in-memory claims.

psycopg's blocking API runs on a thread pool of one thread that only this
spool uses (one connection, used by one thread at a time, so statements
keep their order), reached with C{deferToThreadPool}: the worker's reactor
never waits for the database, and a database that hangs blocks spool work
only, never the reactor (AMP answers, webhook requests, timers).  psycopg's
asyncio API would need an asyncio event loop under Twisted (the asyncio
reactor, chosen before anything imports the reactor) for one part of the
worker; a thread keeps the reactor the worker already runs, and a commit
is a network round trip that a thread hop does not make noticeably dearer.

The group commits are L{SqliteSpool}'s: the writes asked for while a
commit runs share the next one.  What differs is claims: a message this
bridge stores is leased to it in the same statement (it delivers it from
memory, as on SQLite), L{due} leases rows in the database, leases held are
renewed every third of their length, L{release} and L{close} give them back
and tell the other bridges (C{NOTIFY}), and L{watch} wakes the dispatcher
when another bridge gives messages back or an operator requeues some.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from maillaser.interfaces import IBreakerStore
from maillaser.message import SpoolStats
from maillaser.spool._database import SpoolError
from maillaser.spool._postgres import Listener, PostgresDatabase
from maillaser.spool._sqlite import SqliteSpool, _Committed

_T = TypeVar("_T")


@implementer(IBreakerStore)
@attrs.define(eq=False)
class PostgresSpool(SqliteSpool):
    """
    The worker's L{maillaser.interfaces.ISpool} on a database shared by
    several bridges: made by L{open_shared_spool}.

    Counts are kept in memory as on SQLite, and re-counted from the database
    at every lease renewal, so back-pressure and health see what every
    bridge stored within a third of a lease.
    """

    run: Callable[[Callable[[], Any]], Deferred[Any]] = attrs.field(kw_only=True)
    """Runs database work off the reactor thread and fires with its result."""
    stop_threads: Callable[[], object] | None = attrs.field(kw_only=True, default=None)
    listener: Listener | None = attrs.field(kw_only=True, default=None)
    _releasing: set[str] = attrs.Factory(set)
    """Released, but not yet committed as such."""
    _renew_call: IDelayedCall | None = None
    _reachable: str | None = None
    """Why the database could not be used last time, if it could not."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._schedule_renewal()

    def _call(self, work: Callable[[], _T]) -> Deferred[_T]:
        d: Deferred[_T] = self.run(work)
        return d.addCallbacks(self._reached, self._unreachable)

    def _reached(self, result: _T) -> _T:
        self._reachable = None
        return result

    def _unreachable(self, failure: Failure) -> Failure:
        if failure.check(SpoolError) and not self._database.connected:
            self._reachable = failure.getErrorMessage()
        return failure

    @property
    def lease(self) -> float:
        lease: float = self._database.lease
        return lease

    def _schedule_renewal(self) -> None:
        if not self._closed:
            self._renew_call = self._clock.callLater(self.lease / 3, self._renew)

    def _renew(self) -> None:
        """Keep what this bridge holds, and learn what the others stored."""
        self._renew_call = None
        if self._claimed:
            held = frozenset(self._claimed)
            renewed = self._write(lambda database: _nothing(database.renew(held)))
            renewed.addErrback(self._renew_failed)
        self.refresh().addErrback(self._renew_failed)
        self._schedule_renewal()

    def _renew_failed(self, failure: Failure) -> None:
        """
        A failed commit is logged by the commit, once per interval; a
        database that cannot be read shows in L{problem}, for health.
        """

    def release(self, message_id: str) -> None:
        """
        Give the lease back with the next commit.  Until it is committed,
        L{due} does not take the message again: the commit would clear the
        lease a new round holds.
        """
        super().release(message_id)
        self._releasing.add(message_id)

        def release(database: PostgresDatabase) -> _Committed:
            database.release([message_id])
            return lambda: self._releasing.discard(message_id)

        self._write(release).addErrback(self._release_failed, message_id)

    def _release_failed(self, failure: Failure, message_id: str) -> None:
        """Logged by the commit; the lease expires instead."""
        self._releasing.discard(message_id)

    def _unavailable(self) -> Collection[str]:
        return frozenset(self._claimed | self._releasing)

    # IBreakerStore: the breaker's few statements go straight to the
    # spool's thread, outside the group commits.

    def opened_at(self, webhook: str) -> Deferred[float | None]:
        return self._read(lambda database: database.breaker_opened_at(webhook))

    def record_open(self, webhook: str, now: float) -> Deferred[None]:
        return self._read(lambda database: database.open_breaker(webhook, now))

    def record_closed(self, webhook: str) -> Deferred[None]:
        return self._read(lambda database: database.close_breaker(webhook))

    def claim_probe(self, webhook: str, now: float, reset: float) -> Deferred[bool]:
        return self._read(lambda database: database.claim_probe(webhook, now, reset))

    def watch(self, wake: Callable[[], object]) -> None:
        if self.listener is not None:
            self.listener.wake = wake
            self.listener.start()

    def writable(self) -> bool:
        return super().writable() and self._reachable is None

    def problem(self) -> str | None:
        if self._reachable is not None:
            return f"spool database unreachable: {self._reachable}"
        return super().problem()

    def close(self) -> Deferred[None]:
        """
        Commit the writes already asked for, give every lease back (the
        other bridges take the messages at once), then disconnect.
        """
        if self._closed:
            return succeed(None)
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        if self._renew_call is not None:
            self._renew_call.cancel()
            self._renew_call = None
        if self.listener is not None:
            self.listener.stop()
        while self._committing is not None or self._writes:
            if self._committing is not None:
                await self._committing
            else:
                if self._flush_call is not None:
                    self._flush_call.cancel()
                self._flush()
        self._closed = True
        self._claimed.clear()
        database = self._database
        try:
            await self.run(lambda: database.release(None))
        except SpoolError as error:
            self._log.warn(
                "could not give the leases back; they expire in {lease}s: {error}",
                lease=self.lease,
                error=str(error),
            )
        await self.run(database.close)
        if self.stop_threads is not None:
            self.stop_threads()
        self._log.info("spool {path} closed", path=self.path)


def _nothing(ignored: object) -> _Committed:
    return lambda: None


def lease_owner() -> str:
    """Who this process is, in the rows it leases: readable, and unique."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def open_shared_spool(url: str, reactor: Any, lease: float) -> PostgresSpool:
    """
    Connect to the shared spool at C{url}, create or migrate its schema,
    and return it, ready, with its own thread and its C{LISTEN}er.

    It blocks for as long as connecting and the migration take: it is for
    start-up, which must know the spool is usable before it takes mail.

    @raise SpoolError: psycopg is not installed, or the database cannot be
        reached or is not a spool this MailLaser reads.
    """
    database = PostgresDatabase.open(url, create=True, owner=lease_owner(), lease=lease)
    try:
        stats = database.counts()
    except BaseException:
        database.close()
        raise
    pool = ThreadPool(minthreads=1, maxthreads=1, name="maillaser-spool")
    pool.start()
    # Its thread must not keep the process alive if the reactor stops
    # before the spool is closed.
    shutdown = reactor.addSystemEventTrigger("during", "shutdown", pool.stop)

    def stop_threads() -> None:
        reactor.removeSystemEventTrigger(shutdown)
        pool.stop()

    PostgresSpool._log.info(
        "spool {path} opened: {pending} pending, {dead} dead (shared, lease {lease}s)",
        path=database.path,
        pending=stats.pending,
        dead=stats.dead,
        lease=lease,
    )
    return PostgresSpool(
        database,
        reactor,
        stats,
        run=lambda work: deferToThreadPool(reactor, pool, work),
        stop_threads=stop_threads,
        listener=Listener(url, lambda: None, reactor.callFromThread),
    )


def check_shared_spool(url: str) -> SpoolStats:
    """
    Reach the shared spool and migrate it, for the SMTP front at start-up:
    a bridge that cannot keep mail stops with one line, before it binds.
    """
    database = PostgresDatabase.open(url, create=True)
    try:
        return database.counts()
    finally:
        database.close()


__all__ = ["PostgresSpool", "check_shared_spool", "lease_owner", "open_shared_spool"]
