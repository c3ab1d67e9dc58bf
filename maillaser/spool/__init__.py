"""
The durable spool: accepted messages live in SQLite (or, shared by several
bridges, in PostgreSQL) until the webhook has them, and the dispatcher
that takes them out when they are due.

The delivery worker opens the spool with L{open_spool} (or
L{open_shared_spool}) and runs a L{Dispatcher} over it; the
C{maillaser-spool} tool (L{maillaser.spool.admin}) works on the
L{SpoolDatabase} (or L{PostgresDatabase}) directly.
"""

from maillaser.spool._database import (
    DATABASE_NAME,
    DuplicateMessage,
    MessageNotFound,
    SpoolDatabase,
    SpoolEntry,
    SpoolError,
    State,
)
from maillaser.spool._dispatch import Dispatcher, next_attempt_delay
from maillaser.spool._postgres import INSTALL_HINT, PostgresDatabase
from maillaser.spool._retention import SWEEP_INTERVAL, RetentionSweep
from maillaser.spool._shared import (
    PostgresSpool,
    check_shared_spool,
    open_shared_spool,
)
from maillaser.spool._sqlite import SqliteSpool, check_spool, open_spool

__all__ = [
    "DATABASE_NAME",
    "INSTALL_HINT",
    "SWEEP_INTERVAL",
    "Dispatcher",
    "DuplicateMessage",
    "MessageNotFound",
    "PostgresDatabase",
    "PostgresSpool",
    "RetentionSweep",
    "SpoolDatabase",
    "SpoolEntry",
    "SpoolError",
    "SqliteSpool",
    "State",
    "check_shared_spool",
    "check_spool",
    "next_attempt_delay",
    "open_shared_spool",
    "open_spool",
]
