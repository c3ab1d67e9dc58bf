"""
The bridge as a real process: started by ``twistd``/``twist``, fed with
smtplib, stopped with SIGTERM, and killed with SIGKILL in the middle of a
burst.  Every message that got ``250`` must reach the webhook.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
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


class DurabilityTests(ProcessTestCase):
    """Nothing that got 250 is lost, whatever happens to the process."""

    async def burst_while_webhook_is_down(self, spool: str, count: int) -> list[str]:
        down = await self.receiver(default=Reply(503))
        process = await self.start(
            self.arguments(
                down,
                spool,
                "--webhook-max-retries=0",
                "--circuit-breaker-threshold=1",
                "--circuit-breaker-reset=3600",
            )
        )
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
