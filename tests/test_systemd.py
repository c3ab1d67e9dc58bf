"""
The systemd units in C{contrib/systemd}: they parse, the service starts
from its socket as systemd would start it, and the README's install steps
keep Twisted's plugin cache from being rewritten at every start.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from maillaser.testing import WebhookReceiver
from tests.helpers import TARGET, poll, send_mail, simple_message, wait
from tests.process import BridgeProcess, clean_environment, runner
from tests.test_process import CLEAN_SIGTERM, QUEUED
from tests.test_tap import PROBE

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "contrib" / "systemd"
SERVICE = UNITS / "maillaser.service"
SOCKET = UNITS / "maillaser.socket"
TWISTD_N = ("twistd", "-n", "--pidfile=", "maillaser")
INSTALLED_TWISTD = "/opt/maillaser/bin/twistd"
"""Where the README's install steps put twistd, as ExecStart says."""


def unit(path: Path) -> dict[str, list[str]]:
    """
    C{Section.Key} to its values in order, for the subset of systemd's
    syntax the shipped units use: comments, sections, C{Key=value} lines.
    """
    values: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key}", []).append(value)
    return values


def exec_start() -> list[str]:
    [command] = unit(SERVICE)["Service.ExecStart"]
    return shlex.split(command)


def environment(state: Path) -> dict[str, str]:
    """The service's C{Environment=} lines, C{%S} standing for C{state}."""
    return dict(
        line.replace("%S", str(state)).split("=", 1)
        for line in unit(SERVICE)["Service.Environment"]
    )


class UnitFileTests(SynchronousTestCase):
    def test_keys(self) -> None:
        """What the README and the bridge rely on."""
        service, socket_unit = unit(SERVICE), unit(SOCKET)
        self.assertEqual(socket_unit["Socket.ListenStream"], ["0.0.0.0:25"])
        self.assertEqual(
            exec_start(),
            [
                INSTALLED_TWISTD,
                "-n",
                "--pidfile=",
                "maillaser",
                "--smtp",
                "systemd:domain=INET:index=0",
            ],
        )
        self.assertEqual(
            environment(Path("/var/lib"))["MAIL_LASER_SPOOL_DIR"],
            "/var/lib/maillaser",
        )
        for key, value in [
            ("Unit.Requires", "maillaser.socket"),
            ("Service.StateDirectory", "maillaser"),
            ("Service.LimitNOFILE", "65536"),
            ("Service.DynamicUser", "yes"),
            ("Service.NoNewPrivileges", "yes"),
            ("Service.ProtectSystem", "strict"),
            ("Service.ProtectHome", "yes"),
            ("Service.PrivateTmp", "yes"),
            ("Service.RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
            ("Service.SystemCallFilter", "@system-service"),
            ("Service.EnvironmentFile", "/etc/maillaser/maillaser.env"),
            ("Install.WantedBy", "multi-user.target"),
        ]:
            self.assertIn(value, service[key], key)
        self.assertEqual(socket_unit["Install.WantedBy"], ["sockets.target"])

    def test_systemd_analyze_verify(self) -> None:
        """
        systemd's own parser finds nothing to say, once ExecStart names a
        twistd that exists (it checks that).
        """
        if shutil.which("systemd-analyze") is None:
            self.skipTest("needs systemd-analyze (Debian package systemd)")
        directory = Path(self.mktemp())
        directory.mkdir()
        shutil.copy(SOCKET, directory)
        twistd = Path(sys.executable).with_name("twistd")
        (directory / SERVICE.name).write_text(
            SERVICE.read_text().replace(INSTALLED_TWISTD, str(twistd))
        )
        result = subprocess.run(
            ["systemd-analyze", "verify", SOCKET.name, SERVICE.name],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, "", ""))


class SocketActivationTests(TestCase):
    """
    The service's ExecStart under C{systemd-socket-activate}, which listens
    as C{maillaser.socket} does and starts the command on the first
    connection, the socket as descriptor 3.
    """

    def setUp(self) -> None:
        if shutil.which("systemd-socket-activate") is None:
            self.skipTest("needs systemd-socket-activate (Debian package systemd)")

    async def test_mail_through_the_activated_socket(self) -> None:
        receiver = WebhookReceiver()
        await receiver.listen(reactor)
        self.addCleanup(receiver.stop)
        state = Path(self.mktemp()).resolve()
        (state / "maillaser").mkdir(parents=True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]

        settings = {
            **environment(state),
            # What /etc/maillaser/maillaser.env would hold:
            "MAIL_LASER_TARGET_EMAILS": TARGET,
            "MAIL_LASER_WEBHOOK_URL": receiver.url,
            "MAIL_LASER_HOSTNAME": "mx.test",
            "MAIL_LASER_HEALTH_PORT": "0",
        }
        command = exec_start()
        self.assertEqual(command[0], INSTALLED_TWISTD)
        argv = [
            "systemd-socket-activate",
            f"--listen=127.0.0.1:{port}",
            # systemd names each socket, after its unit unless the unit's
            # FileDescriptorName= says otherwise; systemd-socket-activate
            # names none unless told, and Twisted then finds no socket.
            f"--fdname={SOCKET.name}",
            *(f"--setenv={key}={value}" for key, value in settings.items()),
            *runner("twistd"),
            *command[1:],
        ]
        process = BridgeProcess()
        transport = reactor.spawnProcess(
            process,
            shutil.which(argv[0]) or argv[0],
            argv,
            env=clean_environment(),
            path=str(state / "maillaser"),
        )
        process.pid = transport.pid
        self.addCleanup(self.kill, process)
        await poll(lambda: f"Listening on 127.0.0.1:{port}" in process.output, 10)
        self.assertNotIn("SMTP listening", process.output)  # not started yet

        # The first connection starts the bridge, which takes it from the
        # socket's queue; until its delivery worker is ready, a second or
        # so, mail gets 451 and the sender tries again.
        first = await deferToThread(send_mail, port, simple_message(subject="first"))
        self.assertIn(
            (first["code"], first["reply"]),
            [(250, first["reply"]), (451, b"4.3.0 Not ready, try again later")],
        )
        await process.listening()
        result = await deferToThread(
            send_mail, port, simple_message(subject="socket activated")
        )
        self.assertEqual(result["code"], 250, result)
        match = QUEUED.search(result["reply"])
        assert match is not None
        expected = ["first"] * (first["code"] == 250) + ["socket activated"]
        received = await wait(receiver.wait_for(len(expected)), 30)
        self.assertEqual(sorted(each.json()["subject"] for each in received), expected)
        [request] = [each for each in received if each.json()["subject"] != "first"]
        self.assertEqual(request.headers["webhook-id"], match.group(1).decode())
        self.assertEqual(process.ports["SMTP"], port)
        self.assertTrue((state / "maillaser" / "spool.sqlite3").exists())

        process.signal("SIGTERM")
        self.assertEqual(await wait(process.ended, 30), CLEAN_SIGTERM, process.output)

    async def kill(self, process: BridgeProcess) -> None:
        if not process.ended.called:
            process.signal("SIGKILL")
            await process.ended


class PluginCacheTests(SynchronousTestCase):
    """
    With the README's install steps, a service user that cannot write to
    the plugin directories never sees C{Unable to write to plugin cache}.
    """

    def setUp(self) -> None:
        self.site = Path(self.mktemp()).resolve()
        plugins = self.site / "twisted" / "plugins"
        plugins.mkdir(parents=True)
        shutil.copy(ROOT / "twisted" / "plugins" / "maillaser_plugin.py", plugins)
        plugins.chmod(0o555)
        self.addCleanup(plugins.chmod, 0o755)
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            # root writes anywhere; without these capabilities, only where
            # the mode bits let it, as a service user would.
            if shutil.which("setpriv") is None:
                self.skipTest("needs setpriv (Debian package util-linux) as root")
            self.prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
        self.environment = {
            **clean_environment(),
            "PYTHONPATH": os.pathsep.join([str(self.site), str(ROOT)]),
            "MAIL_LASER_TARGET_EMAILS": TARGET,
            "MAIL_LASER_WEBHOOK_URL": "http://127.0.0.1:9/hook",
            "MAIL_LASER_HOSTNAME": "mx.test",
        }

    def start_as_service_user(self) -> str:
        """A twistd start of the plugin (with a stand-in service): its log."""
        result = subprocess.run(
            [*self.prefix, sys.executable, "-c", PROBE, *TWISTD_N],
            env=self.environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result)
        return result.stdout + result.stderr

    def install_step(self) -> list[str]:
        """The README's command that regenerates the cache, for this Python."""
        readme = (ROOT / "README.rst").read_text()
        [line] = [each for each in readme.splitlines() if "getPlugins(IPlugin)" in each]
        command = shlex.split(line.strip())
        self.assertEqual(command[0], "/opt/maillaser/bin/python")
        return [sys.executable, *command[1:]]

    def test_cache_written_at_install(self) -> None:
        cache = self.site / "twisted" / "plugins" / "dropin.cache"
        unable = f"Unable to write to plugin cache {cache}"
        self.assertIn(unable, self.start_as_service_user())
        subprocess.run(
            self.install_step(), env=self.environment, check=True, timeout=60
        )
        self.assertTrue(cache.exists())
        self.assertNotIn(unable, self.start_as_service_user())
