"""
Run MailLaser as operators do: a real ``twistd`` or ``twist`` process.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from tests.helpers import poll

_LISTENING = re.compile(r"(SMTP|health) listening on 127\.0\.0\.1:(\d+)")
_READY = "delivery worker ready"


def runner(name: str) -> list[str]:
    """The command for C{twistd} or C{twist} from this interpreter's environment."""
    script = Path(sys.executable).with_name(name)
    if script.exists():
        return [sys.executable, str(script)]
    module = "twisted.scripts.twistd" if name == "twistd" else "twisted"
    if name == "twistd":
        return [sys.executable, "-c", f"from {module} import run; run()"]
    return [sys.executable, "-m", module]


def clean_environment() -> dict[str, str]:
    """The test's environment without MAIL_LASER_* settings that could leak in."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MAIL_LASER_")}


class BridgeProcess(ProcessProtocol):
    """A bridge in a child process, its output collected and its ports learnt."""

    def __init__(self) -> None:
        self.output = ""
        self.ports: dict[str, int] = {}
        self.ended: Deferred[int] = Deferred()
        self.pid = 0

    @classmethod
    def start(
        cls,
        args: list[str],
        directory: str,
        command: str = "twistd",
        environment: dict[str, str] | None = None,
        tac: str | None = None,
        prefix: tuple[str, ...] = (),
    ) -> BridgeProcess:
        """
        @param prefix: a command that runs the rest, such as C{sh -c ...}.
        """
        process = cls()
        argv = [*prefix, *runner(command)]
        if tac is not None:
            argv += ["-n", "--pidfile=", "-y", tac]
        elif command == "twistd":
            argv += ["-n", "--pidfile=", "maillaser"]
        else:
            argv += ["--log-format=text", "maillaser"]
        transport = reactor.spawnProcess(
            process,
            argv[0],
            [*argv, *args],
            env={**clean_environment(), **(environment or {})},
            path=directory,
        )
        process.pid = transport.pid
        return process

    def outReceived(self, data: bytes) -> None:
        self._take(data)

    def errReceived(self, data: bytes) -> None:
        self._take(data)

    def _take(self, data: bytes) -> None:
        self.output += data.decode("utf-8", "replace")
        for kind, port in _LISTENING.findall(self.output):
            self.ports[kind] = int(port)

    def processEnded(self, reason: Failure) -> None:
        if reason.check(ProcessDone):
            self.ended.callback(0)
        elif reason.check(ProcessTerminated):
            value = reason.value
            assert isinstance(value, ProcessTerminated)
            self.ended.callback(
                value.exitCode if value.exitCode is not None else -value.signal
            )

    async def listening(self, timeout: float = 30.0) -> None:
        """Wait until both ports listen and the delivery worker is ready."""
        await poll(lambda: self.ready or self.ended.called, timeout)
        if self.ended.called:
            raise AssertionError(f"the bridge exited early:\n{self.output}")

    @property
    def ready(self) -> bool:
        return {"SMTP", "health"} <= set(self.ports) and _READY in self.output

    def signal(self, name: str) -> None:
        os.kill(self.pid, getattr(signal, name))
