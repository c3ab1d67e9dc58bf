"""
Several real bridges (C{twistd} processes) on one PostgreSQL spool: any
bridge delivers any message, a bridge killed with SIGKILL loses nothing,
no message is delivered twice at once, and a database that goes away
costs 451s, never mail.
"""

from __future__ import annotations

import json
import os
import re
import smtplib
import threading
from collections import Counter
from email.policy import SMTP
from typing import Any

import pytest
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from maillaser.smtp._content import SPILL_AT
from maillaser.testing import HANG, Reply, WebhookReceiver
from tests.bridge import start_bridge
from tests.helpers import TARGET, poll, simple_message, wait
from tests.postgres import Cluster
from tests.process import BridgeProcess
from tests.test_process import CLEAN_SIGTERM, ProcessTestCase

QUEUED = re.compile(rb"queued as (msg_[0-9a-f]{28})")
CONCURRENCY = 16


def send_many(
    port: int, count: int, prefix: str, stop: threading.Event | None = None
) -> list[tuple[int, str | None]]:
    """
    Send C{count} messages (or until C{stop} is set), over one SMTP
    session while the bridge keeps it; each one's reply code (to MAIL if
    refused there, else to DATA) and queued id.
    """
    results: list[tuple[int, str | None]] = []
    n = 0
    while n < count and not (stop is not None and stop.is_set()):
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test") as client:
            client.ehlo()
            while n < count and not (stop is not None and stop.is_set()):
                raw = simple_message(subject=f"{prefix} {n}").as_bytes(policy=SMTP)
                n += 1
                code, reply = client.mail("sender@test.com")
                if code == 250:
                    client.rcpt(TARGET)
                    code, reply = client.data(raw)
                else:
                    client.rset()
                found = QUEUED.search(reply)
                results.append((code, found.group(1).decode() if found else None))
                if code == 421:
                    break
    return results


def accepted(results: list[tuple[int, str | None]]) -> list[str]:
    return [mid for code, mid in results if code == 250 and mid is not None]


@pytest.mark.usefixtures("postgres_url")
class SharedSpoolProcessTests(ProcessTestCase):
    postgres_url: str

    def shared(
        self, receiver: WebhookReceiver, *extra: str, concurrency: int = CONCURRENCY
    ) -> list[str]:
        return self.arguments(
            receiver,
            "spool",
            f"--spool-url={self.postgres_url}",
            f"--delivery-concurrency={concurrency}",
            *extra,
        )

    async def bridges(self, count: int, args: list[str]) -> list[BridgeProcess]:
        started = [Deferred.fromCoroutine(self.start(args)) for _ in range(count)]
        return list(await gatherResults(started))

    async def test_a_killed_bridge_loses_nothing(self) -> None:
        """
        200 messages split across two bridges while the webhook answers
        503; one is killed mid-rounds; the webhook comes back: the survivor
        delivers all 200 once its leases expired.  An id arrives twice only
        where the kill interrupted a round: the killed bridge's worker (its
        child) ends the rounds it had in flight, which the webhook may
        accept, and cannot record them any more.
        """
        receiver = await self.receiver(Reply(503))
        args = self.shared(
            receiver,
            "--spool-lease=2",
            "--webhook-max-retries=0",
            "--circuit-breaker-threshold=100000",
            "--retry-schedule=" + ",".join(["1s"] * 50),
        )
        one, two = await self.bridges(2, args)
        sent = await gatherResults(
            [
                deferToThread(send_many, one.ports["SMTP"], 100, "one"),
                deferToThread(send_many, two.ports["SMTP"], 100, "two"),
            ]
        )
        ids = [mid for results in sent for mid in accepted(results)]
        self.assertEqual(len(set(ids)), 200)
        await poll(lambda: len(receiver.requests) >= 250, timeout=30)
        one.signal("SIGKILL")
        await one.ended
        switch = len(receiver.requests)
        receiver.default = Reply(200)

        def delivered() -> Counter[str]:
            return Counter(r.headers["webhook-id"] for r in receiver.requests[switch:])

        await poll(lambda: set(delivered()) >= set(ids), timeout=60)
        self.assertEqual(set(delivered()), set(ids))
        repeated = [mid for mid, count in delivered().items() if count > 1]
        self.assertLessEqual(len(repeated), CONCURRENCY, delivered().most_common(3))
        self.assertLessEqual(max(delivered().values()), 2)

    async def test_a_bridge_stopped_cleanly_gives_its_messages_back(self) -> None:
        """
        Messages a bridge holds when it stops (here: waiting for its one
        delivery slot) are given back: the other bridge delivers them at
        once, long before their leases would expire.
        """
        receiver = await self.receiver(HANG)
        one, _ = await self.bridges(
            2,
            self.shared(
                receiver,
                "--spool-lease=60",
                "--retry-schedule=1h",
                concurrency=1,
            ),
        )
        results = await deferToThread(send_many, one.ports["SMTP"], 5, "stopped")
        ids = accepted(results)
        self.assertEqual(len(ids), 5)
        await poll(lambda: len(receiver.requests) >= 1, timeout=20)
        waiting = set(ids) - {receiver.requests[0].headers["webhook-id"]}
        receiver.default = Reply(200)
        one.signal("SIGTERM")
        self.assertEqual(await one.ended, CLEAN_SIGTERM)
        stopped = reactor.seconds()
        await poll(
            lambda: waiting <= {r.headers["webhook-id"] for r in receiver.requests},
            timeout=20,
        )
        self.assertLess(reactor.seconds() - stopped, 20)

    async def test_two_bridges_never_deliver_a_message_twice(self) -> None:
        receiver = await self.receiver()
        one, two = await self.bridges(2, self.shared(receiver))
        sent = await gatherResults(
            [
                deferToThread(send_many, process.ports["SMTP"], 500, f"{name}{n}")
                for name, process in (("one", one), ("two", two))
                for n in range(2)
            ]
        )
        ids = [mid for results in sent for mid in accepted(results)]
        self.assertEqual(len(set(ids)), 2000)
        await poll(lambda: len(receiver.requests) >= 2000, timeout=60)
        received = Counter(r.headers["webhook-id"] for r in receiver.requests)
        self.assertEqual(set(received), set(ids))
        self.assertEqual(max(received.values()), 1, received.most_common(3))

    async def test_database_stopped_under_load(self) -> None:
        """
        While the database is down the bridge answers 451 and /health says
        why; once it is back both recover, with no restart, and every
        message that got 250 arrives.
        """
        cluster: Cluster = self.postgres_cluster
        receiver = await self.receiver()
        [bridge] = await self.bridges(1, self.shared(receiver))
        stop = threading.Event()
        sending = deferToThread(send_many, bridge.ports["SMTP"], 100_000, "load", stop)
        await poll(lambda: len(receiver.requests) >= 50, timeout=30)
        await deferToThread(cluster.stop)
        try:
            health = await poll_health(bridge, lambda body: body["status"] != "ok")
            self.assertTrue(
                any("spool database unreachable" in r for r in health["reasons"]),
                health,
            )
        finally:
            await deferToThread(cluster.start)
        await poll_health(bridge, lambda body: body["status"] == "ok", timeout=30)
        before = len(receiver.requests)
        await poll(lambda: len(receiver.requests) >= before + 50, timeout=30)
        stop.set()
        results = await sending
        codes = Counter(code for code, _ in results)
        self.assertGreater(codes[451], 0, codes)
        self.assertEqual(set(codes), {250, 451}, codes)
        ids = set(accepted(results))
        await poll(
            lambda: ids <= {r.headers["webhook-id"] for r in receiver.requests},
            timeout=60,
        )

    @pytest.fixture(autouse=True)
    def _cluster(self, request: pytest.FixtureRequest) -> None:
        """The session's own cluster, only for the test that stops it."""
        if request.function.__name__ == "test_database_stopped_under_load":
            self.postgres_cluster = request.getfixturevalue("postgres_cluster")


async def poll_health(
    process: BridgeProcess, condition: Any, timeout: float = 20.0
) -> Any:
    """The bridge's /health body, once C{condition(body)} holds."""
    url = f"http://127.0.0.1:{process.ports['health']}/health"
    found: list[Any] = []

    async def look() -> None:
        response = await treq.get(url, persistent=False)
        found.append(json.loads(await response.content()))

    deadline = reactor.seconds() + timeout
    while True:
        await look()
        if condition(found[-1]):
            return found[-1]
        if reactor.seconds() > deadline:
            raise AssertionError(f"/health never changed: {found[-1]}")
        await deferLater(reactor, 0.1)


@pytest.mark.usefixtures("postgres_url")
class SharedSpoolLargeMessageTests(TestCase):
    """A bridge on a shared spool has no spool directory of its own."""

    postgres_url: str

    async def test_large_message_waits_in_the_temporary_directory(self) -> None:
        """
        A message large enough to wait on disk during DATA is accepted and
        delivered: with a shared spool it waits in the system's temporary
        directory, not in C{MAIL_LASER_SPOOL_DIR}, which need not exist.
        """
        bridge = await start_bridge(self, spool_url=self.postgres_url)
        self.assertFalse(os.path.exists(bridge.service.config.spool_dir))
        body = "large enough to wait on disk\n" * (2 * SPILL_AT // 29)
        result = await bridge.send(simple_message(body=body))
        self.assertEqual(result["code"], 250)
        [request] = await wait(bridge.receiver.wait_for(1))
        self.assertEqual(request.json()["body"], body)
