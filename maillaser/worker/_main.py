"""
The entry points of the two kinds of child: the SMTP front starts the
delivery worker with L{worker_main}, the worker starts its payload
processes with L{payload_main}.  Each takes the log level as its only
argument.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from maillaser.worker._child import ChildProgram


def worker_program(level: str) -> ChildProgram:
    return ChildProgram(__name__, worker_main.__name__, (level,))


def payload_program(level: str) -> ChildProgram:
    return ChildProgram(__name__, payload_main.__name__, (level,))


def worker_main(argv: Sequence[str] | None = None) -> None:
    """The delivery worker: AMP on standard input and output."""
    from twisted.internet import reactor

    from maillaser.worker._server import WorkerProtocol
    from maillaser.worker._stdio import run_child

    run_child(WorkerProtocol(reactor), _level(argv), reactor)


def payload_main(argv: Sequence[str] | None = None) -> None:
    """A payload process: builds payloads, one at a time, for the worker."""
    from twisted.internet import reactor

    from maillaser.worker._payloads import PayloadProtocol
    from maillaser.worker._stdio import run_child

    run_child(PayloadProtocol(), _level(argv), reactor)


def _level(argv: Sequence[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return args[0] if args else "info"


__all__ = ["payload_main", "payload_program", "worker_main", "worker_program"]
