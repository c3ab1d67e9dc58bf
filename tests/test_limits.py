"""
Limits the operating system puts on the bridge: open files (the soft
C{RLIMIT_NOFILE}, 1,024 under systemd by default) and the listen backlog.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import smtplib
import socket
import subprocess

import attrs
import treq
from twisted.internet import reactor
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from maillaser.config import Config
from maillaser.service import with_backlog
from maillaser.tap import MARGIN, SPOOL_FILES, fit_open_files, open_files_needed
from maillaser.testing import WebhookReceiver
from tests.bridge import start_bridge
from tests.helpers import TARGET, send_mail, simple_message, wait
from tests.process import BridgeProcess

NOFILE = resource.RLIMIT_NOFILE
INFINITY = resource.RLIM_INFINITY
CONFIG = Config(target_emails=(TARGET,), webhook_url="http://127.0.0.1:9/hook")
NEEDED = 1000 + 16 + SPOOL_FILES + MARGIN


@attrs.define
class FakeLimits:
    """C{getrlimit} and C{setrlimit} on one limit, as the kernel applies them."""

    soft: int
    hard: int
    refuse: bool = False
    calls: list[tuple[int, tuple[int, int]]] = attrs.Factory(list)

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        self.calls.append((which, limits))
        soft, hard = limits
        if self.refuse or (self.hard != INFINITY and soft > self.hard):
            raise ValueError("not allowed to raise maximum limit")
        self.soft, self.hard = soft, hard


class FitOpenFilesTests(TestCase):
    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def fit(self, limits: FakeLimits, config: Config = CONFIG) -> Config:
        return fit_open_files(config, limits.getrlimit, limits.setrlimit)

    def warnings(self) -> list[str]:
        return [
            event["log_format"].split(":")[0]
            for event in self.events
            if event["log_level"] == LogLevel.warn
        ]

    def test_needed(self) -> None:
        """Connections, webhook pool, spool, and a margin for the rest."""
        self.assertEqual(open_files_needed(CONFIG), 1160)
        self.assertEqual(
            open_files_needed(
                attrs.evolve(CONFIG, max_connections=10, delivery_concurrency=2)
            ),
            10 + 2 + 16 + 128,
        )

    def test_enough_already(self) -> None:
        for soft in (NEEDED, 20000, INFINITY):
            limits = FakeLimits(soft, INFINITY)
            self.assertIs(self.fit(limits), CONFIG)
            self.assertEqual(limits.calls, [])
        self.assertEqual(self.warnings(), [])

    def test_raised_as_far_as_needed(self) -> None:
        """Not to the hard limit: only to what the settings can use."""
        for hard in (524288, INFINITY, NEEDED):
            limits = FakeLimits(1024, hard)
            self.assertIs(self.fit(limits), CONFIG)
            self.assertEqual(limits.calls, [(NOFILE, (NEEDED, hard))])
            self.assertEqual(limits.soft, NEEDED)
        self.assertEqual(self.warnings(), [])

    def test_capped_to_the_hard_limit(self) -> None:
        """Raised to the hard limit, and the connections lowered to fit, once."""
        limits = FakeLimits(512, 1100)
        config = self.fit(limits)
        self.assertEqual(limits.calls, [(NOFILE, (1100, 1100))])
        self.assertEqual(
            (config.max_connections, config.max_connections_per_ip),
            (1000 - (NEEDED - 1100), 50),
        )
        self.assertEqual(attrs.evolve(config, max_connections=1000), CONFIG)
        [warning] = [e for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertEqual(
            (warning["soft"], warning["hard"], warning["cap"], warning["needed"]),
            (1100, 1100, 940, NEEDED),
        )

    def test_not_allowed(self) -> None:
        """A refused raise keeps the soft limit, and the cap fits that."""
        limits = FakeLimits(1024, 1024 * 1024, refuse=True)
        config = self.fit(limits, attrs.evolve(CONFIG, max_connections_per_ip=1000))
        self.assertEqual(limits.soft, 1024)
        self.assertEqual(
            (config.max_connections, config.max_connections_per_ip), (864, 864)
        )
        self.assertEqual(len(self.warnings()), 1)

    def test_never_below_one(self) -> None:
        config = self.fit(FakeLimits(64, 64))
        self.assertEqual(config.max_connections, 1)


class BacklogTests(SynchronousTestCase):
    def test_added(self) -> None:
        for description in (
            "tcp:2525:interface=0.0.0.0",
            "tcp6:25:interface=\\:\\:",
            "TCP6:25",
            "ssl:465:privateKey=key.pem:certKey=cert.pem",
        ):
            self.assertEqual(
                with_backlog(description, 1024), f"{description}:backlog=1024"
            )

    def test_left_alone(self) -> None:
        for description in (
            "tcp:2525:backlog=10",
            "systemd:domain=INET:index=0",
            "unix:/run/maillaser.sock",
        ):
            self.assertEqual(with_backlog(description, 1024), description)


def listen_backlog(port: int) -> int:
    """The backlog the kernel reports for a listening socket (C{ss}'s Send-Q)."""
    output = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    [line] = output.splitlines()
    return int(line.split()[2])


class ListenBacklogTests(TestCase):
    def setUp(self) -> None:
        if shutil.which("ss") is None:
            self.skipTest("needs ss (Debian package iproute2)")

    async def test_default(self) -> None:
        """1,024 (capped by the kernel's somaxconn), not Twisted's 50."""
        bridge = await start_bridge(self, ready=False)
        self.assertEqual(listen_backlog(bridge.smtp_port), 1024)

    async def test_setting(self) -> None:
        bridge = await start_bridge(self, ready=False, smtp_backlog=7)
        self.assertEqual(listen_backlog(bridge.smtp_port), 7)

    async def test_endpoint_backlog_wins(self) -> None:
        bridge = await start_bridge(
            self, ready=False, smtp_endpoints=("tcp:0:interface=127.0.0.1:backlog=5",)
        )
        self.assertEqual(listen_backlog(bridge.smtp_port), 5)


IDLE = 2000


class OpenFilesProcessTests(TestCase):
    """
    A real bridge under C{ulimit -n 1024} and 2,000 idle connections:
    C{/health} still answers, and a sender gets C{421} only past the cap.
    """

    def setUp(self) -> None:
        soft, hard = resource.getrlimit(NOFILE)
        wanted = IDLE + 512
        if hard != INFINITY and hard < wanted:
            self.skipTest(f"the test itself needs {wanted} open files, hard {hard}")
        if soft != INFINITY and soft < wanted:
            resource.setrlimit(NOFILE, (wanted, hard))
            self.addCleanup(resource.setrlimit, NOFILE, (soft, hard))

    async def bridge(self, ulimit: str) -> tuple[BridgeProcess, WebhookReceiver]:
        receiver = WebhookReceiver()
        await receiver.listen(reactor)
        self.addCleanup(receiver.stop)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        process = BridgeProcess.start(
            [
                "--smtp=tcp:0:interface=127.0.0.1",
                "--health=tcp:0:interface=127.0.0.1",
                f"--target-emails={TARGET}",
                f"--webhook-url={receiver.url}",
                "--spool-dir=spool",
                "--hostname=mx.test",
                "--max-connections-per-ip=1000",
                "--shutdown-grace=1",
            ],
            directory,
            prefix=("sh", "-c", f'ulimit {ulimit} && exec "$0" "$@"'),
        )
        self.addCleanup(self.kill, process)
        await process.listening()
        return process, receiver

    async def kill(self, process: BridgeProcess) -> None:
        if not process.ended.called:
            process.signal("SIGKILL")
            await process.ended

    async def health(self, process: BridgeProcess) -> tuple[int, object]:
        url = f"http://127.0.0.1:{process.ports['health']}/health"
        response = await treq.get(url, persistent=False, timeout=10)
        return response.code, json.loads(await response.content())

    async def check(self, ulimit: str, cap: int) -> None:
        process, receiver = await self.bridge(ulimit)
        idle: list[socket.socket] = []
        self.addCleanup(close_all, idle)
        greetings = await deferToThread(open_idle, process.ports["SMTP"], IDLE, idle)
        # Past the cap, a connection gets 421, or during the burst (while
        # sockets that are being turned away still hold descriptors) is
        # closed by Twisted's EMFILE recovery: either way, the sender tries
        # again later.  The sessions under the cap all get in.
        self.assertEqual(greetings.count(b"220"), cap)
        self.assertLessEqual(set(greetings), {b"220", b"421", b""})
        self.assertIn(b"421", greetings)
        code, body = await self.health(process)
        self.assertEqual(code, 200, body)

        turned_away = await deferToThread(greeting_of, process.ports["SMTP"])
        self.assertEqual(
            turned_away, (421, b"4.7.0 mx.test Too many connections, try later")
        )
        idle.pop().close()
        result: dict[str, object] = {}
        deadline = reactor.seconds() + 10
        while reactor.seconds() < deadline:  # the server sees the close soon
            try:
                result = await deferToThread(
                    send_mail, process.ports["SMTP"], simple_message(subject="room")
                )
                break
            except smtplib.SMTPConnectError:
                continue
        self.assertEqual(result.get("code"), 250, result)
        [request] = await wait(receiver.wait_for(1))
        self.assertEqual(request.json()["subject"], "room")
        self.process = process

    async def test_soft_limit_raised(self) -> None:
        """The hard limit allows it: the soft one is raised, all 1,000 fit."""
        await self.check("-S -n 1024", 1000)
        self.assertIn(
            f"raised the open files limit to {NEEDED} (needed: {NEEDED})",
            self.process.output,
        )
        self.assertNotIn("open files limit 1024", self.process.output)

    async def test_hard_limit_lowers_the_cap(self) -> None:
        """It does not: fewer connections, one warning, /health still answers."""
        await self.check("-n 1024", 1000 - (NEEDED - 1024))
        self.assertEqual(
            self.process.output.count(
                f"open files limit 1024 (hard limit 1024) is below the {NEEDED}"
                f" needed: accepting at most 864 SMTP connections instead of 1000;"
            ),
            1,
        )


def open_idle(port: int, count: int, into: list[socket.socket]) -> list[bytes]:
    """
    Open C{count} connections, all at once, then read each one's greeting
    code; those greeted with C{220} stay open in C{into}.
    """
    connecting = []
    for _ in range(count):
        each = socket.socket()
        each.settimeout(20)
        each.connect(("127.0.0.1", port))
        connecting.append(each)
    codes = []
    for each in connecting:
        code = each.recv(3)
        codes.append(code)
        if code == b"220":
            into.append(each)
        else:
            each.close()
    return codes


def close_all(sockets: list[socket.socket]) -> None:
    for each in sockets:
        each.close()


def greeting_of(port: int) -> tuple[int, bytes | str]:
    client = smtplib.SMTP(local_hostname="client.test", timeout=10)
    try:
        return client.connect("127.0.0.1", port)
    except smtplib.SMTPConnectError as refused:
        return refused.smtp_code, refused.smtp_error
    finally:
        client.close()
