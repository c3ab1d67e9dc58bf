"""
The bridge as a real process: started by ``twistd``/``twist``, fed with
smtplib, stopped with SIGTERM, and killed with SIGKILL in the middle of a
burst.  Every message that got ``250`` must reach the webhook.
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import threading
from email.policy import SMTP
from pathlib import Path
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from maillaser.testing import Reply, WebhookReceiver
from tests.helpers import TARGET, poll, send_mail, simple_message, wait
from tests.process import BridgeProcess

TAC = str(Path(__file__).parent.parent / "examples" / "maillaser.tac")
OK = Reply(200)
CLEAN_SIGTERM = -signal.SIGTERM
"""
After a clean shutdown twistd and twist re-raise the signal that stopped
them (SPEC section 5); systemd and container runtimes count that as success.
"""
QUEUED = re.compile(rb"queued as (msg_[0-9a-f]{28})")


class ProcessTestCase(TestCase):
    async def receiver(self, default: Reply = OK) -> WebhookReceiver:
        receiver = WebhookReceiver(default=default)
        await receiver.listen(reactor)
        self.addCleanup(receiver.stop)
        return receiver

    def arguments(
        self, receiver: WebhookReceiver, spool: str, *extra: str
    ) -> list[str]:
        return [
            "--smtp=tcp:0:interface=127.0.0.1",
            "--health=tcp:0:interface=127.0.0.1",
            f"--target-emails={TARGET}",
            f"--webhook-url={receiver.url}",
            f"--spool-dir={spool}",
            "--hostname=mx.test",
            "--shutdown-grace=2",
            *extra,
        ]

    async def start(self, args: list[str], command: str = "twistd") -> BridgeProcess:
        directory = self.mktemp()
        os.makedirs(directory)
        process = BridgeProcess.start(args, directory, command)
        self.addCleanup(self._kill, process)
        await process.listening()
        return process

    async def _kill(self, process: BridgeProcess) -> None:
        if not process.ended.called:
            process.signal("SIGKILL")
            await process.ended

    async def send(self, process: BridgeProcess, subject: str) -> str:
        result = await deferToThread(
            send_mail, process.ports["SMTP"], simple_message(subject=subject)
        )
        self.assertEqual(result["code"], 250, result)
        match = QUEUED.search(result["reply"])
        assert match is not None
        return match.group(1).decode()


class TwistdTests(ProcessTestCase):
    async def test_twistd_delivers_and_stops_cleanly_on_sigterm(self) -> None:
        receiver = await self.receiver()
        process = await self.start(
            self.arguments(receiver, os.path.abspath(self.mktemp()))
        )
        message_id = await self.send(process, "via twistd")
        [request] = await wait(receiver.wait_for(1))
        self.assertEqual(request.headers["webhook-id"], message_id)
        self.assertEqual(request.json()["subject"], "via twistd")
        process.signal("SIGTERM")
        self.assertEqual(await wait(process.ended, 20), CLEAN_SIGTERM, process.output)
        self.assertIn("clean shutdown; 0 message(s) stay spooled", process.output)

    async def test_twist_runs_the_plugin(self) -> None:
        receiver = await self.receiver()
        process = await self.start(
            self.arguments(receiver, os.path.abspath(self.mktemp())), command="twist"
        )
        await self.send(process, "via twist")
        await wait(receiver.wait_for(1))
        process.signal("SIGINT")
        # twist re-raises the signal after a clean shutdown (SPEC section 5).
        self.assertEqual(await wait(process.ended, 20), -signal.SIGINT, process.output)
        self.assertIn("clean shutdown; 0 message(s) stay spooled", process.output)

    async def test_tac_file_from_the_environment(self) -> None:
        receiver = await self.receiver()
        directory = self.mktemp()
        os.makedirs(directory)
        environment = {
            "MAIL_LASER_TARGET_EMAILS": TARGET,
            "MAIL_LASER_WEBHOOK_URL": receiver.url,
            "MAIL_LASER_BIND_ADDRESS": "127.0.0.1",
            "MAIL_LASER_PORT": "0",
            "MAIL_LASER_HEALTH_BIND_ADDRESS": "127.0.0.1",
            "MAIL_LASER_HEALTH_PORT": "0",
            "MAIL_LASER_SPOOL_DIR": "spool",
            "MAIL_LASER_HOSTNAME": "mx.test",
        }
        process = BridgeProcess.start([], directory, environment=environment, tac=TAC)
        self.addCleanup(self._kill, process)
        await process.listening()
        await self.send(process, "via tac")
        [request] = await wait(receiver.wait_for(1))
        self.assertEqual(request.json()["subject"], "via tac")

    async def test_bad_setting_is_one_line_and_exit_1(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        process = BridgeProcess.start(
            ["--target-emails=a@b.test", "--webhook-url=http://h.test/", "--port=abc"],
            directory,
        )
        self.assertEqual(await wait(process.ended, 30), 1)
        self.assertEqual(
            process.output,
            "maillaser: MAIL_LASER_PORT / --port: 'abc' is not a valid port number"
            " (0-65535)\n",
        )

    async def test_corrupt_spool_is_one_line_and_exit_1(self) -> None:
        receiver = await self.receiver()
        directory = self.mktemp()
        os.makedirs(os.path.join(directory, "spool"))
        with open(os.path.join(directory, "spool", "spool.sqlite3"), "wb") as garbage:
            garbage.write(b"not a database at all " * 1000)
        process = BridgeProcess.start(self.arguments(receiver, "spool"), directory)
        self.assertEqual(await wait(process.ended, 30), 1)
        self.assertTrue(
            process.output.rstrip().endswith(
                "maillaser: spool database spool/spool.sqlite3 is unreadable or"
                " corrupt: file is not a database"
            ),
            process.output,
        )
        self.assertNotIn("Traceback", process.output)

    async def test_address_in_use_is_one_line_and_exit_1(self) -> None:
        """Whichever runner, and whichever listener: no traceback, no hang."""
        receiver = await self.receiver()
        taken = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory()
        )
        self.addCleanup(taken.stopListening)
        busy = f"tcp:{taken.getHost().port}:interface=127.0.0.1"
        for command, listener in (("twistd", "smtp"), ("twist", "health")):
            directory = self.mktemp()
            os.makedirs(directory)
            args = [*self.arguments(receiver, "spool"), f"--{listener}={busy}"]
            process = BridgeProcess.start(args, directory, command)
            self.assertEqual(await wait(process.ended, 30), 1, process.output)
            self.assertTrue(
                process.output.rstrip().endswith(
                    f"maillaser: Couldn't listen on 127.0.0.1:{taken.getHost().port}:"
                    " [Errno 98] Address already in use."
                ),
                process.output,
            )
            self.assertNotIn("Traceback", process.output)


class Burst:
    """
    Senders in threads of their own, each sending with smtplib one message
    per connection until its connection fails, it sent C{quota}, or it is
    told to stop.  Each reply to DATA is noted the moment it arrives, before
    QUIT, which a killed server never answers.
    """

    def __init__(self, port: int, senders: int, quota: int) -> None:
        self.port = port
        self.senders = senders
        self.quota = quota
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._attempted: set[str] = set()
        self._replies: dict[str, tuple[int, bytes]] = {}
        self._per_sender = [0] * senders
        self._ended = 0

    def start(self) -> Deferred[list[Any]]:
        """
        Fires once every sender has ended, with what ended each: the
        C{OSError} (smtplib's errors are ones too) that cut it off, or
        C{None} if it sent its quota or was stopped.
        """
        ended: list[Deferred[Any]] = []
        for sender in range(self.senders):
            done: Deferred[Any] = Deferred()
            threading.Thread(
                target=self._run,
                args=(sender, done),
                name=f"burst-{sender}",
                daemon=True,
            ).start()
            ended.append(done)
        return gatherResults(ended)

    def snapshot(self) -> tuple[int, int, int]:
        """Replies so far, the fewest any sender got, and senders ended."""
        with self._lock:
            return len(self._replies), min(self._per_sender), self._ended

    def attempted(self) -> set[str]:
        with self._lock:
            return set(self._attempted)

    def replies(self) -> dict[str, tuple[int, bytes]]:
        """Subject to (code, text) of every reply to DATA (or MAIL, RCPT)."""
        with self._lock:
            return dict(self._replies)

    def _run(self, sender: int, done: Deferred[Any]) -> None:
        outcome: OSError | None = None
        try:
            for count in range(self.quota):
                if self.stopping.is_set():
                    break
                self._send(sender, f"burst {sender}-{count}")
        except OSError as e:
            outcome = e
        finally:
            with self._lock:
                self._ended += 1
            IReactorThreads(reactor).callFromThread(done.callback, outcome)

    def _send(self, sender: int, subject: str) -> None:
        raw = simple_message(subject=subject).as_bytes(policy=SMTP)
        client = smtplib.SMTP(local_hostname="client.test", timeout=10)
        try:
            client.connect("127.0.0.1", self.port)
            client.ehlo()
            with self._lock:
                self._attempted.add(subject)
            code, reply = client.mail("sender@test.com")
            if code == 250:
                code, reply = client.rcpt(TARGET)
            if code == 250:
                code, reply = client.data(raw)
            with self._lock:
                self._replies[subject] = (code, reply)
                self._per_sender[sender] += 1
            client.quit()
        finally:
            client.close()


class DurabilityTests(ProcessTestCase):
    """Nothing that got 250 is lost, whatever happens to the process."""

    async def start_with_webhook_down(self, spool: str, *extra: str) -> BridgeProcess:
        """A bridge whose webhook answers 503, and whose breaker then stays open."""
        down = await self.receiver(default=Reply(503))
        return await self.start(
            self.arguments(
                down,
                spool,
                "--webhook-max-retries=0",
                "--circuit-breaker-threshold=1",
                "--circuit-breaker-reset=3600",
                *extra,
            )
        )

    async def burst_while_webhook_is_down(self, spool: str, count: int) -> list[str]:
        process = await self.start_with_webhook_down(spool)
        ids = [await self.send(process, f"burst {n}") for n in range(count)]
        self.process = process
        return ids

    async def restart_and_collect(self, spool: str, ids: list[str]) -> None:
        receiver = await self.receiver()
        await self.start(self.arguments(receiver, spool, "--retry-schedule=1s"))
        await wait(receiver.wait_for(len(ids)), 30)
        await poll(
            lambda: {r.headers["webhook-id"] for r in receiver.requests} >= set(ids)
        )
        delivered = [r.headers["webhook-id"] for r in receiver.requests]
        self.assertEqual(set(delivered), set(ids))
        subjects = {r.json()["subject"] for r in receiver.requests}
        self.assertEqual(subjects, {f"burst {n}" for n in range(len(ids))})

    async def test_sigkill_loses_nothing(self) -> None:
        spool = os.path.abspath(self.mktemp())
        ids = await self.burst_while_webhook_is_down(spool, 25)
        self.process.signal("SIGKILL")
        await wait(self.process.ended, 20)
        await self.restart_and_collect(spool, ids)

    async def test_sigterm_keeps_the_spool(self) -> None:
        spool = os.path.abspath(self.mktemp())
        ids = await self.burst_while_webhook_is_down(spool, 10)
        self.process.signal("SIGTERM")
        self.assertEqual(
            await wait(self.process.ended, 20), CLEAN_SIGTERM, self.process.output
        )
        self.assertIn("clean shutdown; 10 message(s) stay spooled", self.process.output)
        await self.restart_and_collect(spool, ids)

    async def test_sigkill_mid_concurrent_burst_loses_nothing(self) -> None:
        """
        Eight clients send at once, each message on its own connection,
        while the webhook is down; SIGKILL lands while they are all still
        sending.  After a restart on the same spool every message that got
        250 arrives, under the id its 250 named.
        """
        senders, kill_after = 8, 40
        spool = os.path.abspath(self.mktemp())
        process = await self.start_with_webhook_down(spool, "--retry-schedule=1s,1h")
        # A quota no sender can reach before the kill: the burst is still
        # going when it comes.
        burst = Burst(process.ports["SMTP"], senders, quota=10_000)
        self.addCleanup(burst.stopping.set)
        ended = burst.start()

        def enough() -> bool:
            replies, fewest, finished = burst.snapshot()
            return (replies >= kill_after and fewest >= 1) or finished > 0

        await poll(enough, timeout=30)
        _, fewest, finished = burst.snapshot()
        self.assertEqual((finished, fewest >= 1), (0, True), "not all were sending")
        process.signal("SIGKILL")
        self.assertEqual(await wait(process.ended, 20), -signal.SIGKILL)

        # The kill cut every sender off, and some in the middle of a session
        # (not just refused at connect): the burst really was in progress.
        outcomes = await wait(ended, 30)
        for outcome in outcomes:
            self.assertIsInstance(outcome, OSError, outcomes)
        self.assertTrue(
            [o for o in outcomes if not isinstance(o, ConnectionRefusedError)],
            outcomes,
        )

        accepted: dict[str, str] = {}
        for subject, (code, text) in burst.replies().items():
            if code == 250:
                match = QUEUED.search(text)
                self.assertIsNotNone(match, text)
                assert match is not None
                accepted[match.group(1).decode()] = subject
        self.assertGreaterEqual(len(accepted), kill_after)
        self.assertEqual(len(set(accepted.values())), len(accepted))

        receiver = await self.receiver()
        restarted = await self.start(
            self.arguments(receiver, spool, "--retry-schedule=1s")
        )
        await poll(
            lambda: (
                {r.headers["webhook-id"] for r in receiver.requests} >= set(accepted)
            ),
            timeout=30,
        )
        # Whatever was committed, acknowledged or not, leaves the spool
        # delivered: none of it waits or is dead-lettered.
        health = await self.drained(restarted)
        self.assertEqual(health["dead_letters"], 0, health)

        attempted = burst.attempted()
        ids_of: dict[str, set[str]] = {}
        for request in receiver.requests:
            subject = request.json()["subject"]
            self.assertIn(subject, attempted)
            ids_of.setdefault(subject, set()).add(request.headers["webhook-id"])
        # A message that arrives twice carries the same id both times.
        for subject, ids in ids_of.items():
            self.assertEqual(len(ids), 1, (subject, ids))
        for message_id, subject in accepted.items():
            self.assertEqual(ids_of[subject], {message_id})

    async def drained(self, process: BridgeProcess, timeout: float = 30) -> Any:
        """Poll the bridge's /health until its spool is empty; return the body."""
        url = f"http://127.0.0.1:{process.ports['health']}/health"
        deadline = reactor.seconds() + timeout
        while True:
            response = await treq.get(url, persistent=False)
            body = json.loads(await response.content())
            if body["spool_depth"] == 0:
                return body
            if reactor.seconds() > deadline:
                raise AssertionError(f"spool not drained within {timeout}s: {body}")
            await deferLater(reactor, 0.05)
