"""
The delivery worker's spool: L{SpoolDatabase} on the worker's reactor thread.

The worker's reactor does nothing but delivery work, so SQLite is called
right here, with no thread and no other process.  What costs is the commit
(an fsync, far dearer than an insert), so every write asked for in one turn
of the reactor shares one transaction committed at the end of that turn (a
group commit), and each write's Deferred fires only after the C{COMMIT}:
a C{Store} is answered, and the SMTP client hears C{250}, only once its
message is on disk.  Only a commit that stores a message waits for the
disk: one that only settles messages (deleted once delivered, rescheduled,
buried) is written without the fsync, and reaches the disk with the next
one that stores; what a power loss could undo then is a settlement, which
costs a repeated delivery or round, never a message.  Reads run at once
and see what is committed.

Each write returns what its commit changes in memory (counts, a claim
released); all of a commit's changes are made before any of its writes is
answered, so whatever an answer's callbacks read (counts, or the database
through L{SqliteSpool.refresh}) agrees with what is committed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from maillaser.interfaces import ISpool
from maillaser.logs import observer
from maillaser.message import Attempt, Message, QueuedMessage, SpoolStats
from maillaser.spool._database import SpoolDatabase, SpoolError
from maillaser.spool._throttle import LogThrottle

_T = TypeVar("_T")

_Committed = Callable[[], object]
"""What a write changes in memory once it is committed."""

_Operation = Callable[[Any], _Committed]
"""Run on the spool's database: a L{SpoolDatabase} or a PostgreSQL one."""


@implementer(ISpool)
@attrs.define(eq=False)
class SqliteSpool:
    """
    The worker's L{ISpool}: made by L{open_spool}.

    Counts are kept in memory, so health, metrics and back-pressure read
    them for free; L{refresh} re-reads them from the database, which the
    admin tool may change.  Claims (messages handed out by L{due} or
    L{claim} and not yet settled) live only in memory, so after a restart
    every pending message is due again.  A claim is released once the
    settling write committed, never before, so L{due} can never see a
    message both unclaimed and in its old state; a settling write that
    fails keeps the claim, and the claim's holder decides when the message
    may go again (the dispatcher: after its next backoff step).
    """

    _log = Logger(observer=observer)

    _database: Any
    """A L{SpoolDatabase}, or a L{maillaser.spool.PostgresDatabase} (the
    same methods) for the shared spool."""
    _clock: IReactorTime
    """Ends the reactor turn (C{callLater(0)}) and dates the dead letters."""
    _stats: SpoolStats
    _claimed: set[str] = attrs.Factory(set)
    _writes: list[tuple[_Operation, Deferred[None]]] = attrs.Factory(list)
    """Asked for in this turn, committed at its end."""
    _durable: bool = False
    """Whether one of this turn's writes must be on disk before it is answered."""
    _flush_call: IDelayedCall | None = None
    _committing: Deferred[None] | None = None
    """The commit under way, while it runs on another thread."""
    _closed: bool = False
    _writable: bool = True
    _throttle: LogThrottle = attrs.field(init=False)
    commits: int = 0
    """Transactions committed since open; lets tests see the grouping."""

    def __attrs_post_init__(self) -> None:
        self._throttle = LogThrottle(self._clock)

    @property
    def path(self) -> str:
        path: str = self._database.path
        return path

    def _read(self, operation: Callable[[Any], _T]) -> Deferred[_T]:
        """Run a read, on what is committed."""
        if self._closed:
            return fail(self._closed_error())
        return self._call(lambda: operation(self._database))

    def _call(self, work: Callable[[], _T]) -> Deferred[_T]:
        """
        Run database work: here at once, since SQLite is local and quick; a
        shared spool runs it on a thread of its own.
        """
        try:
            return succeed(work())
        except Exception:
            return fail()

    def _write(self, operation: _Operation, *, durable: bool = False) -> Deferred[None]:
        """
        Queue a write for this turn's transaction.

        @param durable: the write must be on disk before it is answered (a
            message stored); without it, it is in the database, safe from a
            crash but not from a power loss until the next durable commit
            (a settlement: losing one costs a repeat, never a message).
        """
        if self._closed:
            return fail(self._closed_error())
        written: Deferred[None] = Deferred()
        self._writes.append((operation, written))
        self._durable = self._durable or durable
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self._flush)
        return written

    def _closed_error(self) -> SpoolError:
        return SpoolError(f"spool {self.path} is closed")

    def _flush(self) -> None:
        """
        Commit this turn's writes, then answer them: each alone if only it
        could not be done (a message already there, or gone), all with the
        error if the transaction failed.  While a commit runs (on another
        thread, for a shared spool), later writes wait and share the next.
        """
        self._flush_call = None
        if self._committing is not None or not self._writes:
            return
        writes, self._writes = self._writes, []
        durable, self._durable = self._durable, False
        operations = [operation for operation, _ in writes]
        committing = self._call(
            lambda: self._database.apply(operations, durable=durable)
        )
        committing.addCallbacks(
            self._committed,
            self._not_committed,
            callbackArgs=(writes,),
            errbackArgs=(writes,),
        )
        if not committing.called:
            self._committing = committing
            committing.addBoth(self._commit_ended)

    def _commit_ended(self, ignored: None) -> None:
        self._committing = None
        if self._writes and self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self._flush)

    def _committed(
        self,
        results: list[_Committed | Failure],
        writes: list[tuple[_Operation, Deferred[None]]],
    ) -> None:
        self.commits += 1
        self._succeeded()
        for result in results:
            if not isinstance(result, Failure):
                result()
        for (_, written), result in zip(writes, results, strict=True):
            if isinstance(result, Failure):
                written.errback(result)
            else:
                written.callback(None)

    def _not_committed(
        self, failure: Failure, writes: list[tuple[_Operation, Deferred[None]]]
    ) -> None:
        self._failed(failure, len(writes))
        for _, written in writes:
            written.errback(failure)

    def _succeeded(self) -> None:
        if not self._writable and self._throttle.report("recovered"):
            self._log.info("spool commits succeed again")
        self._writable = True

    def _failed(self, failure: Failure, count: int) -> None:
        self._writable = False
        self._throttle.failure(
            self._log, "spool commit of {count} write(s) failed", failure, count=count
        )

    def _count(
        self,
        pending: int = 0,
        dead: int = 0,
        size: int = 0,
        retained: int = 0,
        retained_bytes: int = 0,
    ) -> None:
        stats = self._stats
        self._stats = SpoolStats(
            pending=stats.pending + pending,
            dead=stats.dead + dead,
            bytes=stats.bytes + size,
            retained=stats.retained + retained,
            retained_bytes=stats.retained_bytes + retained_bytes,
        )

    def _settled(self, message_id: str, **counts: int) -> _Committed:
        def committed() -> None:
            self._count(**counts)
            self._claimed.discard(message_id)

        return committed

    def add(self, message: Message) -> Deferred[None]:
        def insert(database: SpoolDatabase) -> _Committed:
            size = database.insert(message)
            return lambda: self._count(pending=1, size=size)

        return self._write(insert, durable=True)

    def due(self, now: float, limit: int) -> Deferred[list[QueuedMessage]]:
        unavailable = self._unavailable()
        found = self._read(lambda database: database.due(now, limit, unavailable))
        return found.addCallback(self._claim)

    def _claim(self, found: list[QueuedMessage]) -> list[QueuedMessage]:
        """
        Claim what was found, but for what was claimed meanwhile: a read
        that runs on another thread (a shared spool) can find a message
        stored and then claimed (L{claim}) while it ran.
        """
        fresh = [queued for queued in found if queued.message.id not in self._claimed]
        self._claimed.update(queued.message.id for queued in fresh)
        return fresh

    def claim(self, message_id: str) -> bool:
        if message_id in self._claimed:
            return False
        self._claimed.add(message_id)
        return True

    def release(self, message_id: str) -> None:
        self._claimed.discard(message_id)

    def next_due(self) -> Deferred[float | None]:
        unavailable = self._unavailable()
        return self._read(lambda database: database.next_due(unavailable))

    def _unavailable(self) -> Collection[str]:
        """What L{due} must not hand out: what is claimed already."""
        return frozenset(self._claimed)

    def delivered(
        self,
        message_id: str,
        attempts: Sequence[Attempt],
        keep_until: float | None = None,
    ) -> Deferred[None]:
        def delete(database: SpoolDatabase) -> _Committed:
            kept = 0 if keep_until is None else database.retain(message_id, keep_until)
            size = database.delete(message_id, "pending")
            return self._settled(
                message_id,
                pending=-1,
                size=-size,
                retained=1 if kept else 0,
                retained_bytes=kept,
            )

        return self._write(delete)

    def retained_raw(self, message_id: str, now: float) -> Deferred[bytes | None]:
        return self._read(lambda database: database.retained_raw(message_id, now))

    def expire_retained(self, now: float) -> Deferred[int]:
        """Forget what expired; the count is committed before it is answered."""
        expired: list[int] = []

        def expire(database: SpoolDatabase) -> _Committed:
            count, size = database.expire_retained(now)
            expired.append(count)
            return lambda: self._count(retained=-count, retained_bytes=-size)

        return self._write(expire).addCallback(lambda _: expired[0])

    def reschedule(
        self, message_id: str, at: float, attempts: Sequence[Attempt]
    ) -> Deferred[None]:
        recorded = tuple(attempts)

        def update(database: SpoolDatabase) -> _Committed:
            database.reschedule(message_id, at, recorded)
            return self._settled(message_id)

        return self._write(update)

    def bury(self, message_id: str, attempts: Sequence[Attempt]) -> Deferred[None]:
        at, recorded = self._clock.seconds(), tuple(attempts)

        def update(database: SpoolDatabase) -> _Committed:
            size = database.bury(message_id, at, recorded)
            return self._settled(message_id, pending=-1, dead=1, size=-size)

        return self._write(update)

    def stats(self) -> SpoolStats:
        return self._stats

    def refresh(self) -> Deferred[SpoolStats]:
        """
        Re-count from the database, which the admin tool may have changed
        (requeue, purge) behind this process's back; and if the last commit
        failed, first try a write, so that health sees the spool recover (a
        full disk freed, say) even if no mail comes to try it.
        """
        if self._writable:
            return self._recount()
        probed = self._write(_probe, durable=True)
        return probed.addBoth(lambda ignored: self._recount())

    def _recount(self) -> Deferred[SpoolStats]:
        return self._read(lambda database: database.counts()).addCallback(
            self._recounted
        )

    def _recounted(self, stats: SpoolStats) -> SpoolStats:
        self._stats = stats
        return stats

    def writable(self) -> bool:
        """For health: whether the last commit succeeded (and we are open)."""
        return not self._closed and self._writable

    def problem(self) -> str | None:
        return None if self.writable() else "spool is not writable"

    def watch(self, wake: Callable[[], object]) -> None:
        """Nobody else writes a SQLite spool but the admin tool: polled for."""

    def close(self) -> Deferred[None]:
        """Commit the writes already asked for, then release the database."""
        if self._closed:
            return succeed(None)
        self._closed = True
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush()
        self._database.close()
        self._log.info("spool {path} closed", path=self.path)
        return succeed(None)


def _probe(database: SpoolDatabase) -> _Committed:
    """The probe leaves nothing behind, in the database or in memory."""
    database.probe()
    return lambda: None


def open_spool(directory: str, clock: IReactorTime) -> SqliteSpool:
    """
    Check the spool in C{directory} (or create it) and return it, ready.

    It blocks for as long as SQLite's integrity check takes: it is for
    start-up, which must know the spool is usable before it takes mail.

    @param clock: the reactor the spool's users run on; its turns delimit
        the group commits.
    @raise SpoolError: the database is corrupt, not a spool, or unusable:
        the bridge must not accept mail it cannot keep.
    """
    database = SpoolDatabase.open(directory, create=True)
    try:
        stats = database.counts()
    except BaseException:
        database.close()
        raise
    SqliteSpool._log.info(
        "spool {path} opened: {pending} pending, {dead} dead",
        path=database.path,
        pending=stats.pending,
        dead=stats.dead,
    )
    return SqliteSpool(database, clock, stats)


def check_spool(directory: str) -> SpoolStats:
    """
    Check the spool in C{directory} (or create it), and close it again.

    For the SMTP front at start-up: the delivery worker opens the spool for
    real, but only the front can still refuse to start, with one line and
    before it binds a port, when mail could not be kept there.

    @raise SpoolError: as L{open_spool}.
    """
    database = SpoolDatabase.open(directory, create=True)
    try:
        return database.counts()
    finally:
        database.close()


__all__ = ["SqliteSpool", "check_spool", "open_spool"]
