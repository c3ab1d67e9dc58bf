"""
Logs: one id ties a message's events to its C{webhook-id}, nothing secret
reaches info, JSON lines are one object per line, and the configured level
holds under C{twistd} and C{twist} (run for real).
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.application.twist._options import TwistOptions
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import (
    LogEvent,
    Logger,
    LogLevel,
    eventAsText,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.python.syslog import SyslogObserver
from twisted.scripts._twistd_unix import ServerOptions  # what twistd runs on POSIX
from twisted.trial.unittest import SynchronousTestCase, TestCase

from maillaser import logs
from maillaser.interfaces import ISpool
from maillaser.tap import Options
from maillaser.testing import ReceivedRequest, WebhookReceiver
from tests.helpers import RawClient, poll, simple_message, start_quiet_bridge, wait

KEY = "b2JzZXJ2YWJpbGl0eS10ZXN0LXNlY3JldA=="
SECRET = "whsec_" + KEY
BODY = "Confidential-body-marker 7d1f"
QUEUED = re.compile(rb"^2\.0\.0 Ok: queued as (msg_[0-9a-f]{28})$")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = ("-c", "from twisted.scripts.twistd import run; run()")
WARNING = "connection limit reached, refusing "  # no peer host on a UNIX socket
REQUIRED = {
    "MAIL_LASER_TARGET_EMAILS": "alerts@example.com",
    "MAIL_LASER_WEBHOOK_URL": "http://127.0.0.1:9/hook",
}


class CorrelationTests(TestCase):
    """A message whose first webhook attempt fails and whose second succeeds."""

    async def story(self) -> tuple[list[LogEvent], list[ReceivedRequest], bytes]:
        """The events logged, the requests received, and the final SMTP reply."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        receiver = WebhookReceiver()
        receiver.script(500)
        bridge = await start_quiet_bridge(
            self, receiver, webhook_max_retries=1, webhook_secrets=(SECRET,)
        )
        result = await bridge.send(simple_message(body=BODY + "\n"))
        requests = await wait(receiver.wait_for(2))
        spool: ISpool | None = bridge.service.spool
        assert spool is not None
        await poll(lambda: spool.stats().pending == 0)
        return list(events), requests, result["reply"]

    async def test_one_id(self) -> None:
        """SMTP reply, log events and C{webhook-id} all name the message alike."""
        events, requests, reply = await self.story()
        [webhook_id] = {request.headers["webhook-id"] for request in requests}
        match = QUEUED.match(reply)
        assert match is not None, reply
        self.assertEqual(match.group(1).decode(), webhook_id)
        self.assertEqual(
            [
                (event["log_namespace"], event["log_level"], event["message_id"])
                for event in events
                if "message_id" in event
            ],
            [
                ("maillaser.smtp.SMTPSession", LogLevel.info, webhook_id),
                ("maillaser.delivery.Deliverer", LogLevel.warn, webhook_id),
                ("maillaser.delivery.Deliverer", LogLevel.info, webhook_id),
            ],
        )

    async def test_no_body_or_secret(self) -> None:
        """Neither reaches any event above debug, as JSON or as text."""
        events, requests, _ = await self.story()
        self.assertEqual(requests[-1].json()["body"], BODY + "\r\n")
        self.assertIn("webhook-signature", requests[-1].headers)
        written = io.StringIO()
        observer = logs.json_lines(written)
        shown = [event for event in events if event["log_level"] != LogLevel.debug]
        for event in shown:
            observer(event)
        lines = written.getvalue().splitlines()
        self.assertEqual(len(lines), len(shown))
        self.assertGreater(len(lines), 5)
        for needle in (BODY, KEY):
            self.assertNotIn(needle, written.getvalue())


def json_lines_of(emit: Any) -> list[dict[str, Any]]:
    """What L{logs.json_lines} writes for the events C{emit(observer)} sends."""
    written = io.StringIO()
    emit(logs.json_lines(written))
    text = written.getvalue()
    assert text.endswith("\n"), text
    return [json.loads(line) for line in text[:-1].split("\n")]


class JsonLinesTests(SynchronousTestCase):
    def test_fields(self) -> None:
        """Ours first; the event's own fields next; Twisted's C{log_} ones not."""
        event = {
            "log_format": "accepted {message_id} from {peer}",
            "log_level": LogLevel.info,
            "log_namespace": "maillaser.smtp.SMTPSession",
            "log_time": 1700000000.25,
            "log_source": object(),
            "message_id": "msg_1",
            "peer": "127.0.0.1",
        }
        written = io.StringIO()
        logs.json_lines(written)(event)
        self.assertEqual(
            written.getvalue(),
            '{"timestamp":"2023-11-14T22:13:20.250000+00:00","level":"info",'
            '"namespace":"maillaser.smtp.SMTPSession",'
            '"text":"accepted msg_1 from 127.0.0.1","message_id":"msg_1",'
            '"peer":"127.0.0.1"}\n',
        )

    @given(st.floats(min_value=0, max_value=2**33))
    def test_timestamp_as_datetime_writes_it(self, when: float) -> None:
        """The cached date changes nothing, down to the rounding."""
        self.assertEqual(
            logs._timestamp(when),
            datetime.fromtimestamp(when, UTC).isoformat(timespec="microseconds"),
        )

    def test_failure_and_odd_values(self) -> None:
        """A traceback goes into C{text}; a value JSON lacks is its repr."""

        def emit(observer: Any) -> None:
            log = Logger(namespace="maillaser.test", observer=observer)
            log.failure(
                "could not accept {message_id}",
                Failure(ZeroDivisionError("boom")),
                message_id="msg_2",
            )
            log.warn("odd {value}", value={1, 2})

        failed, odd = json_lines_of(emit)
        self.assertEqual(
            (failed["level"], failed["message_id"], failed["text"].splitlines()[0]),
            ("critical", "msg_2", "could not accept msg_2"),
        )
        self.assertIn("ZeroDivisionError: boom", failed["text"])
        self.assertNotIn("log_failure", failed)
        del odd["timestamp"]
        self.assertEqual(
            odd,
            {
                "level": "warn",
                "namespace": "maillaser.test",
                "text": "odd {1, 2}",
                "value": "{1, 2}",
            },
        )

    def test_legacy_event(self) -> None:
        """C{twisted.python.log} events keep only what is not repeated."""

        def emit(observer: Any) -> None:
            globalLogPublisher.addObserver(observer)
            try:
                legacy_log.msg("legacy hello", colour="blue")
            finally:
                globalLogPublisher.removeObserver(observer)

        [line] = json_lines_of(emit)
        del line["timestamp"]
        self.assertEqual(
            line,
            {
                "level": "info",
                "namespace": "log_legacy",
                "text": "legacy hello",
                "colour": "blue",
            },
        )


class LevelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(logs, "_process_level", LogLevel.info)
        self.patch(logs, "_twistd_destination", logs._twistd_destination)

    def configure(
        self, level: str | None, runner: Any = None, arguments: tuple[str, ...] = ()
    ) -> None:
        """Parse the plugin's options as a subcommand of C{runner}."""
        environ = dict(REQUIRED, MAIL_LASER_LOG_LEVEL=level) if level else REQUIRED
        options = Options(environ=environ, dotenv_path=None)
        options.parent = runner
        options.parseOptions(list(arguments))

    def emitted(self, make_observer: Any) -> list[str]:
        """The lines an observer made now writes to stdout, for one event per level."""
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        log = Logger(namespace="maillaser.test", observer=make_observer())
        for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error):
            log.emit(level, "at {name}", name=level.name)
        return stdout.getvalue().splitlines()

    def test_json_observer(self) -> None:
        self.configure("warn")
        self.assertEqual(
            [json.loads(line)["text"] for line in self.emitted(logs.json_observer)],
            ["at warn", "at error"],
        )

    def test_text_observer(self) -> None:
        """The command line's C{--log-level} beats the environment."""
        self.configure("info", arguments=("--log-level", "error"))
        [line] = self.emitted(logs.text_observer)
        self.assertTrue(line.endswith(" [maillaser.test#error] at error"), line)

    def test_default_level(self) -> None:
        self.configure(None)
        self.assertEqual(
            [json.loads(line)["level"] for line in self.emitted(logs.json_observer)],
            ["info", "warn", "error"],
        )

    def test_twist(self) -> None:
        """C{twist} is told the level, and to write JSON lines for C{json}."""
        twist = TwistOptions()
        twist.opt_log_format("json")
        self.configure("warn", twist)
        self.assertEqual(
            (twist["logLevel"], twist["fileLogObserverFactory"]),
            (LogLevel.warn, logs.json_lines),
        )

    def test_twist_chose(self) -> None:
        """C{twist --log-level} wins; its text format stays."""
        twist = TwistOptions()
        twist.opt_log_level("debug")
        twist.opt_log_format("text")
        self.configure("warn", twist)
        self.assertEqual(
            (twist["logLevel"], twist["fileLogObserverFactory"]),
            (LogLevel.debug, textFileLogObserver),
        )

    def test_twistd(self) -> None:
        """C{twistd -n} logging text to stdout does so through L{text_observer}."""
        for arguments in (["--nodaemon"], ["--nodaemon", "--logfile=-"]):
            twistd = ServerOptions()
            twistd.parseOptions(arguments)
            self.configure("warn", twistd)
            self.assertEqual(twistd["logger"], "maillaser.logs.text_observer")
        self.assertIs(logs._process_level, LogLevel.warn)

    def test_twistd_file_and_syslog(self) -> None:
        """The observer twistd would build, with the level in front."""
        for arguments, observer, destination in [
            ([], "file_observer", "twistd.log"),  # a daemon
            (["--logfile=bridge.log"], "file_observer", "bridge.log"),
            (["-n", "--logfile=bridge.log"], "file_observer", "bridge.log"),
            (["-n", "--syslog", "--prefix=mail"], "syslog_observer", "mail"),
            (["--syslog"], "syslog_observer", "twisted"),
        ]:
            twistd = ServerOptions()
            twistd.parseOptions(arguments)
            self.configure("warn", twistd)
            self.assertEqual(
                (twistd["logger"], logs._twistd_destination),
                (f"maillaser.logs.{observer}", destination),
                arguments,
            )

    def test_twistd_chose(self) -> None:
        """C{--logger} is left alone, and so is a daemon told to use stdout."""
        for arguments in (
            ["--nodaemon", "--logger=maillaser.logs.json_observer"],
            ["--logfile=-"],
        ):
            twistd = ServerOptions()
            twistd.parseOptions(arguments)
            before = dict(twistd)
            self.configure("warn", twistd)
            self.assertEqual(dict(twistd), before, arguments)

    def log_each_level(self, observer: Any) -> None:
        log = Logger(namespace="maillaser.test", observer=observer)
        for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error):
            log.emit(level, "at {name}", name=level.name)

    def test_file_observer(self) -> None:
        """Text at the level, in a file that SIGUSR1 will rotate."""
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        path = os.path.abspath(self.mktemp())
        self.patch(logs, "_twistd_destination", path)
        self.configure("warn")
        self.log_each_level(logs.file_observer())
        rotate = signal.getsignal(signal.SIGUSR1)
        assert isinstance(rotate, functools.partial)
        [log_file] = rotate.args
        self.addCleanup(log_file.close)
        with open(path) as written:
            lines = written.read().splitlines()
        self.assertEqual(
            [line.rsplit("] ", 1)[1] for line in lines], ["at warn", "at error"]
        )

    def test_file_observer_leaves_sigusr1_taken(self) -> None:
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        self.patch(logs, "_twistd_destination", os.path.abspath(self.mktemp()))
        logs.file_observer()
        self.assertEqual(signal.getsignal(signal.SIGUSR1), signal.SIG_IGN)

    def test_syslog_observer(self) -> None:
        sent: list[tuple[object, ...]] = []
        self.patch(SyslogObserver, "openlog", lambda *arguments: None)
        self.patch(SyslogObserver, "syslog", lambda *arguments: sent.append(arguments))
        self.patch(logs, "_twistd_destination", "mail")
        self.configure("warn")
        self.log_each_level(logs.syslog_observer())
        self.assertEqual(
            [arguments[-1] for arguments in sent],
            ["[-] at warn", "[-] at error"],  # what twistd's own sends
        )


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


class RunnerTests(TestCase):
    """
    The real C{twistd} and C{twist}, at C{MAIL_LASER_LOG_LEVEL=warn}: a
    refused connection is the one event worth a warning, and the only line.
    """

    async def run_bridge(self, *command: str, before_stop: Any = None) -> list[str]:
        """
        Its standard output; C{before_stop(process, directory)} is awaited
        once the bridge has refused a connection.
        """
        directory = tempfile.mkdtemp(prefix="maillaser-")  # short: socket paths
        self.addCleanup(shutil.rmtree, directory)
        sockets = [os.path.join(directory, name) for name in ("smtp", "health")]
        arguments = ["--smtp", "unix:smtp", "--health", "unix:health"]
        environ = {
            **REQUIRED,
            "PYTHONPATH": ROOT,
            "MAIL_LASER_LOG_LEVEL": "warn",
            "MAIL_LASER_MAX_CONNECTIONS": "1",
        }
        process = _Collect()
        reactor.spawnProcess(
            process,
            sys.executable,
            [sys.executable, *command, "maillaser", *arguments],
            env=environ,
            path=directory,
        )
        self.addCleanup(self.kill, process)
        await poll(lambda: all(map(os.path.exists, sockets)), timeout=30)
        clients = [await self.connect(sockets[0]) for _ in range(2)]
        self.assertEqual(
            [client.replies() for client in clients],
            [
                [b"220 localhost ESMTP MailLaser"],
                [b"421 4.7.0 localhost Too many connections, try later"],
            ],
        )
        if before_stop is not None:
            await before_stop(process, directory)
        assert process.transport is not None
        process.transport.signalProcess("TERM")
        await wait(process.ended, timeout=30)
        self.assertEqual(process.err, b"")
        return process.out.decode().splitlines()

    def kill(self, process: _Collect) -> Deferred[None]:
        if not process.ended.called and process.transport is not None:
            process.transport.signalProcess("KILL")
        return process.ended

    async def connect(self, path: str) -> RawClient:
        client: RawClient = await wait(
            connectProtocol(UNIXClientEndpoint(reactor, path), RawClient())
        )
        self.addCleanup(client.abort)
        await client.wait_for_replies(1)
        return client

    def assertOnlyTheWarning(self, lines: list[str]) -> None:
        """One JSON line: the warning."""
        self.assertEqual(
            [
                (line["level"], line["namespace"], line["text"])
                for line in map(json.loads, lines)
            ],
            [("warn", "maillaser.smtp.SMTPServerFactory", WARNING)],
        )

    async def test_twistd_json(self) -> None:
        lines = await self.run_bridge(
            *TWISTD,
            "--nodaemon",
            "--pidfile=",
            "--logger=maillaser.logs.json_observer",
        )
        self.assertOnlyTheWarning(lines)

    async def test_twistd_text(self) -> None:
        """Without C{--logger}, C{twistd -n} logs text, at the level too."""
        [line] = await self.run_bridge(*TWISTD, "--nodaemon", "--pidfile=")
        self.assertTrue(
            line.endswith(f" [maillaser.smtp.SMTPServerFactory#warn] {WARNING}"), line
        )

    async def test_twistd_log_file(self) -> None:
        """At the level too, and rotated on SIGUSR1 as twistd's own is."""
        written: list[str] = []

        async def rotate(process: _Collect, directory: str) -> None:
            path = os.path.join(directory, "bridge.log")
            await poll(lambda: os.path.exists(path) and os.path.getsize(path) > 0)
            assert process.transport is not None
            process.transport.signalProcess(signal.SIGUSR1)
            await poll(lambda: os.path.exists(path + ".1"))
            with open(path + ".1") as rotated:
                written.extend(rotated.read().splitlines())

        arguments = ("--nodaemon", "--pidfile=", "--logfile=bridge.log")
        self.assertEqual(
            await self.run_bridge(*TWISTD, *arguments, before_stop=rotate), []
        )
        [line] = written
        self.assertTrue(
            line.endswith(f" [maillaser.smtp.SMTPServerFactory#warn] {WARNING}"), line
        )

    async def test_twist(self) -> None:
        """JSON, since standard output is not a terminal."""
        self.assertOnlyTheWarning(await self.run_bridge("-m", "twisted"))


class RenderingTests(SynchronousTestCase):
    """The fast rendering of JSON lines says exactly what eventAsText says."""

    def test_same_text_as_twisted(self) -> None:
        events: list[dict[str, object]] = [
            {
                "log_format": "got {message_id}: {size} bytes",
                "message_id": "m",
                "size": 3,
            },
            {"log_format": "next round in {delay:.0f}s", "delay": 4.6},
            {"log_format": "{value!r} and {{braces}}", "value": "q"},
            {"log_format": "missing {field}"},
            {"log_format": "{obj.attribute}", "obj": RenderingTests},
        ]
        for event in events:
            self.assertEqual(
                logs._text(event),
                eventAsText(event, includeTimestamp=False, includeSystem=False),
            )
