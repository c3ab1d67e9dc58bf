"""
Where a message's content waits in the front: in memory while small, on
disk once large, and in memory whole only for its hand-over, a few
messages at a time.

Fifty sessions sending 10 MB each would otherwise hold 500 MB in the
front alone while the worker commits them one by one.  As Postfix writes
its queue file while DATA arrives, a large message here goes to an
unlinked temporary file (in the spool's directory in queue mode, so on
the spool's disk); the front's memory then holds, per session, at most
L{SPILL_AT} bytes, plus the few messages L{HandOverGate} lets through.
"""

from __future__ import annotations

import tempfile
from collections import deque
from typing import IO

from twisted.internet.defer import Deferred, succeed

SPILL_AT = 256 * 1024
"""Bytes of one message kept in memory before it goes to a temporary file."""

HAND_OVER_BYTES = 16 * 1024 * 1024
"""Bytes of whole messages in the front's memory at once, waiting for the
sink's answer (one message always may, whatever its size)."""


class MessageContent:
    """
    One message's content as it arrives: written, then read once, whole.
    Discarded (the message refused, the client gone), it is empty.
    """

    def __init__(self, spill_dir: str | None = None) -> None:
        self._file: IO[bytes] | None = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=SPILL_AT, dir=spill_dir
        )
        self.size = 0

    def write(self, data: bytes) -> None:
        if self._file is not None:
            self.size += len(data)
            self._file.write(data)

    def read(self) -> bytes:
        """All of it, once: the storage is gone afterwards."""
        if self._file is None:
            return b""
        self._file.seek(0)
        data = self._file.read()
        self.discard()
        return data

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.size = 0


class HandOverGate:
    """
    Lets whole messages into memory while their bytes stay under C{limit}
    (one always), first come first served; each holds its bytes until it
    gives them back.
    """

    def __init__(self, limit: int = HAND_OVER_BYTES) -> None:
        self.limit = limit
        self.held = 0
        self._waiting: deque[tuple[int, Deferred[None]]] = deque()

    def acquire(self, size: int) -> Deferred[None]:
        if not self._waiting and self._fits(size):
            self.held += size
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiting.append((size, waiter))
        return waiter

    def release(self, size: int) -> None:
        self.held -= size
        while self._waiting and self._fits(self._waiting[0][0]):
            size, waiter = self._waiting.popleft()
            self.held += size
            waiter.callback(None)

    def _fits(self, size: int) -> bool:
        return not self.held or self.held + size <= self.limit


__all__ = ["HAND_OVER_BYTES", "SPILL_AT", "HandOverGate", "MessageContent"]
