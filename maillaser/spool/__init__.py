"""
The durable spool: accepted messages live in SQLite until the webhook has
them, and the dispatcher that takes them out when they are due.

The delivery worker opens the spool with L{open_spool} and runs a
L{Dispatcher} over it; the C{maillaser-spool} tool (L{maillaser.spool.admin})
works on the L{SpoolDatabase} directly.
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
from maillaser.spool._retention import SWEEP_INTERVAL, RetentionSweep
from maillaser.spool._sqlite import SqliteSpool, check_spool, open_spool

__all__ = [
    "DATABASE_NAME",
    "SWEEP_INTERVAL",
    "Dispatcher",
    "DuplicateMessage",
    "MessageNotFound",
    "RetentionSweep",
    "SpoolDatabase",
    "SpoolEntry",
    "SpoolError",
    "SqliteSpool",
    "State",
    "check_spool",
    "next_attempt_delay",
    "open_spool",
]
