"""
A real delivery worker, spawned by a L{DeliveryWorker} as the front does,
delivering to a real webhook receiver on loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import LogLevel, formatEvent
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

import maillaser
from maillaser.message import Refusal
from maillaser.spool import DATABASE_NAME
from maillaser.testing import Reply, WebhookReceiver
from maillaser.webhook import encoded_payload
from maillaser.worker import PROTOCOL_VERSION, DeliveryWorker, worker_program
from tests.helpers import failure_of, poll, wait
from tests.test_sinks import message
from tests.test_worker_child import events_logged
from tests.test_worker_front import config
from tests.test_worker_payloads import html, nested


class RealWorkerTests(TestCase):
    async def start(self, version: str | None = None, **changes: Any) -> DeliveryWorker:
        self.receiver = WebhookReceiver()
        url = await self.receiver.listen(reactor)
        self.addCleanup(self.receiver.stop)
        settings: dict[str, Any] = {
            "webhook_url": url,
            "spool_dir": self.mktemp(),
            "worker_timeout": 5.0,
            "webhook_timeout": 5.0,
            "log_level": "info",
            **changes,
        }
        worker = DeliveryWorker(
            config(**settings), reactor, version=version or maillaser.__version__
        )
        worker.startService()
        self.addCleanup(worker.stop, 2.0)
        if version is None:
            await poll(lambda: worker.ready)
        return worker

    async def test_stored_and_delivered(self) -> None:
        events = events_logged(self)
        worker = await self.start()
        worker.sink.check_capacity()
        await wait(worker.sink.receive(message(1)))
        [request] = await wait(self.receiver.wait_for(1))
        self.assertEqual(request.headers["webhook-id"], "msg_1")
        self.assertEqual(request.json()["subject"], "1")
        await poll(lambda: worker.status is not None and worker.status.pending == 0)
        metrics = await wait(worker.metrics_text())
        self.assertIn(b'maillaser_deliveries_total{outcome="delivered"} 1.0', metrics)
        self.assertIn(b"maillaser_worker_process_", metrics)
        # The worker's log is ours, with its level and fields.
        await poll(lambda: any(e.get("message_id") == "msg_1" for e in events))
        [delivered] = [e for e in events if e.get("message_id") == "msg_1"]
        self.assertEqual(delivered["log_level"], LogLevel.info)
        self.assertEqual(
            formatEvent(delivered),
            "delivery worker: delivered msg_1 after 1 attempt(s)",
        )
        self.assertEqual(await wait(worker.stop(2.0)), 0)
        self.assertIsNone(worker.pid)

    async def test_a_stopped_worker(self) -> None:
        """
        SIGSTOP: health says so, the message in hand gets its 451 at the
        deadline, and the worker is killed; a new one takes the next.
        """
        worker = await self.start(worker_timeout=2.5)
        pid = worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(_kill, pid)
        started = reactor.seconds()
        refused = worker.sink.receive(message(1))
        await poll(lambda: "has not answered" in " ".join(worker.problems()))
        error = await wait(failure_of(self, refused, Refusal))
        self.assertEqual(
            str(error), "451 4.3.0 Could not store the message, try again later"
        )
        self.assertLess(reactor.seconds() - started, 3.0)
        self.assertIn("did not answer", " ".join(worker.problems()))
        await poll(lambda: worker.ready)
        self.assertNotEqual(worker.pid, pid)
        await wait(worker.sink.receive(message(2)))
        [request] = await wait(self.receiver.wait_for(1))
        self.assertEqual(request.headers["webhook-id"], "msg_2")

    async def test_a_worker_whose_front_died_ends(self) -> None:
        """
        A front killed (SIGKILL) closes both ends of the worker's pipes at
        once, and the worker may see either first.  Nobody reading its
        answers is enough: it closes its spool and ends, it does not linger
        with its input still open.
        """
        ended: Deferred[None] = Deferred()

        class Orphaned(ProcessProtocol):
            def processEnded(self, reason: Failure) -> None:
                ended.callback(None)

        argv = worker_program("info").argv()
        process = reactor.spawnProcess(Orphaned(), argv[0], argv, env=os.environ)
        self.addCleanup(_kill, process.pid)
        spool = self.mktemp()
        hello = amp.AmpBox(
            _ask=b"1",
            _command=b"Hello",
            version=maillaser.__version__.encode(),
            protocol=b"%d" % PROTOCOL_VERSION,
            config=config(spool_dir=spool).to_json(),
        )
        process.write(hello.serialize())
        database = os.path.join(spool, DATABASE_NAME)
        await poll(lambda: os.path.exists(database), timeout=30)
        process.closeChildFD(1)  # its input stays open
        await wait(ended, 20)

    async def test_a_worker_that_exits_is_restarted(self) -> None:
        worker = await self.start()
        pid = worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await poll(lambda: not worker.ready)
        self.assertIn("delivery worker ended", " ".join(worker.problems()))
        await poll(lambda: worker.ready)
        self.assertNotEqual(worker.pid, pid)
        await wait(worker.sink.receive(message(1)))
        await wait(self.receiver.wait_for(1))

    async def test_another_version_is_refused(self) -> None:
        worker = await self.start(version="0.0.0-other")
        await poll(lambda: "refused" in " ".join(worker.problems()))
        self.assertEqual(
            worker.problems(),
            [
                "delivery worker refused: the front runs MailLaser 0.0.0-other"
                f" (protocol {PROTOCOL_VERSION}), this worker"
                f" {maillaser.__version__} (protocol {PROTOCOL_VERSION})"
            ],
        )
        self.assertFalse(worker.ready)
        with self.assertRaises(Refusal):
            worker.sink.check_capacity()

    async def test_sync_mode(self) -> None:
        worker = await self.start(delivery_mode="sync")
        self.receiver.script(
            Reply(422, {"Content-Type": "text/plain"}, b"no such queue")
        )
        error = await wait(failure_of(self, worker.sink.receive(message(1)), Refusal))
        self.assertEqual(str(error), "550 5.6.0 no such queue")
        await wait(worker.sink.receive(message(2)))
        self.assertEqual(len(self.receiver.requests), 2)

    async def test_a_pathological_message_is_delivered_with_a_parse_error(
        self,
    ) -> None:
        """
        Its payload process is killed at the deadline; the message waiting
        behind it is built by the next.
        """
        worker = await self.start(payload_timeout=2.0)
        await wait(worker.sink.receive(html(1)))
        await wait(self.receiver.wait_for(1))  # the payload process is up
        await wait(worker.sink.receive(nested(300, 300_000)))
        await wait(worker.sink.receive(html(2)))
        requests = await wait(self.receiver.wait_for(3), timeout=20)
        bodies = {r.headers["webhook-id"]: r.body for r in requests}
        deep = json.loads(bodies["msg_99"])
        self.assertEqual(deep["parse_error"], "payload not built within 2s")
        self.assertEqual(deep["subject"], "deep")
        self.assertEqual(bodies["msg_2"], encoded_payload(html(2), ()))


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
