"""
The delivery worker: a child process of the SMTP front that owns the spool,
the dispatcher, payload building, the webhook poster and the breaker, and
the AMP protocol between the two: L{Hello}, L{Store}, L{Deliver},
L{Status}, L{Metrics}, L{FetchPart}, L{Stop}, and L{BuildPayload} and
L{ExtractPart} between the worker and its payload processes
(documented in L{maillaser.worker._commands}).

The front creates a L{DeliveryWorker} (a service: it starts the worker
process, checks its version, watches it, and stops it) and hands accepted
messages to its C{sink}.  The worker process runs L{worker_main}.
"""

from maillaser.worker._child import (
    ChildError,
    ChildProcess,
    ChildProgram,
    ChildTimeout,
    LogRelay,
)
from maillaser.worker._commands import (
    PROTOCOL_VERSION,
    BuildPayload,
    Deliver,
    ExtractPart,
    FetchPart,
    Hello,
    Metrics,
    PartNotFound,
    PartUnavailable,
    Reply,
    StartFailed,
    Status,
    Stop,
    Store,
    VersionMismatch,
)
from maillaser.worker._front import START_TIMEOUT, DeliveryWorker, WorkerStatus
from maillaser.worker._main import (
    payload_main,
    payload_program,
    worker_main,
    worker_program,
)
from maillaser.worker._payloads import PayloadBuilder, PayloadProtocol
from maillaser.worker._server import DeliveryStack, WorkerProtocol, build_stack
from maillaser.worker._sinks import (
    BATCH_BYTES,
    STORE_WINDOW,
    QueueSink,
    SyncSink,
    sync_deadline,
)
from maillaser.worker._stdio import ChildProtocol

__all__ = [
    "BATCH_BYTES",
    "PROTOCOL_VERSION",
    "START_TIMEOUT",
    "STORE_WINDOW",
    "BuildPayload",
    "ChildError",
    "ChildProcess",
    "ChildProgram",
    "ChildProtocol",
    "ChildTimeout",
    "Deliver",
    "DeliveryStack",
    "DeliveryWorker",
    "ExtractPart",
    "FetchPart",
    "Hello",
    "LogRelay",
    "Metrics",
    "PartNotFound",
    "PartUnavailable",
    "PayloadBuilder",
    "PayloadProtocol",
    "QueueSink",
    "Reply",
    "StartFailed",
    "Status",
    "Stop",
    "Store",
    "SyncSink",
    "VersionMismatch",
    "WorkerProtocol",
    "WorkerStatus",
    "build_stack",
    "payload_main",
    "payload_program",
    "sync_deadline",
    "worker_main",
    "worker_program",
]
