"""
C{twistd} as a daemon (no C{-n}): a start-up error ends the command that
started it, at once, with the reason on its stderr, as C{twistd web} does,
and leaves neither a pidfile nor a process behind.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.process import clean_environment, runner

TWISTD_SAYS = (
    "An error has occurred: {reason!r}\nPlease look at log file for more information.\n"
)
"""What the daemonising twistd's parent prints of the reason its child sent."""


def processes_in(directory: Path) -> list[int]:
    """The processes whose working directory is C{directory}."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd") == str(directory):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


class DaemonStartUpErrorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()
        self.directory.mkdir(parents=True)
        self.pidfile = self.directory / "twistd.pid"

    def daemon(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        """
        Start the bridge as a daemon, its working directory a fresh one, under
        C{timeout 20}; once the command has ended, no process may be left in
        that directory (the daemon and its worker both start there).
        """
        started = time.monotonic()
        result = subprocess.run(
            [
                "timeout",
                "20",
                *runner("twistd"),
                f"--pidfile={self.pidfile}",
                f"--logfile={self.directory / 'twistd.log'}",
                "maillaser",
                "--target-emails=alerts@example.com",
                "--webhook-url=http://127.0.0.1:9/hook",
                "--hostname=mx.test",
                "--smtp=tcp:0:interface=127.0.0.1",
                "--health=tcp:0:interface=127.0.0.1",
                "--spool-dir=spool",
                *arguments,
            ],
            cwd=self.directory,
            env=clean_environment(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        self.assertLess(time.monotonic() - started, 15, result)
        deadline = time.monotonic() + 10
        while processes_in(self.directory) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(processes_in(self.directory), [])
        self.assertFalse(self.pidfile.exists())
        return result

    def assert_reported(
        self, result: subprocess.CompletedProcess[str], reason: str
    ) -> None:
        self.assertEqual(
            (result.returncode, result.stdout, result.stderr),
            (1, "", TWISTD_SAYS.format(reason=f"maillaser: {reason}".encode())),
        )
        log = (self.directory / "twistd.log").read_text()
        self.assertIn(f"maillaser: {reason}\n", log)

    def test_busy_port(self) -> None:
        """Either listener: the SMTP one, or the one for /health."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            for listener in ("smtp", "health"):
                result = self.daemon(f"--{listener}=tcp:{port}:interface=127.0.0.1")
                self.assert_reported(
                    result,
                    f"Couldn't listen on 127.0.0.1:{port}:"
                    " [Errno 98] Address already in use.",
                )

    def test_unusable_spool(self) -> None:
        (self.directory / "spool").mkdir()
        (self.directory / "spool" / "spool.sqlite3").write_bytes(b"garbage " * 1000)
        result = self.daemon()
        self.assert_reported(
            result,
            "spool database spool/spool.sqlite3 is unreadable or corrupt:"
            " file is not a database",
        )

    def test_bad_certificate(self) -> None:
        """Found while the options are read, before twistd forks: its one line."""
        (self.directory / "cert.pem").write_text("not a certificate\n")
        result = self.daemon("--tls-cert=cert.pem", "--tls-key=cert.pem")
        self.assertEqual(
            (result.returncode, result.stdout, result.stderr),
            (
                1,
                "",
                "maillaser: MAIL_LASER_TLS_CERT / --tls-cert: 'cert.pem' holds no"
                " PEM certificate\n",
            ),
        )
