"""
Logs: JSON lines are one flat object per line, MailLaser's events are
filtered at the level set wherever the log goes, and under the real
C{twistd} and C{twist} that level holds.

That one id ties a message's events to its C{webhook-id}, and that no body
or secret reaches the log above debug, takes a whole bridge: those are the
bridge's tests, not these.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import pkgutil
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import (
    Logger,
    LogLevel,
    eventAsText,
    eventsFromJSONLogFile,
    formatEvent,
    globalLogPublisher,
)
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

import maillaser
from maillaser import logs
from maillaser.interfaces import IWebhookPoster
from maillaser.message import WebhookResponse
from maillaser.webhook import CircuitBreaker, Deliverer, quick_backoff
from tests.doubles import InlinePayloads, message
from tests.test_smtp_helpers import RecordingSink, Session, make_factory
from tests.test_tap import run_plugin

LEVELS = (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error)
PROBE = "__main__.Probe"
"""The namespace of the stand-in service's events in L{run_plugin}."""


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


class _Emitter:
    """Emits as MailLaser's classes do."""

    log = Logger(observer=logs.observer)

    def each_level(self) -> None:
        each_level(self.log)


def each_level(log: Logger) -> None:
    for level in LEVELS:
        log.emit(level, "at {level_name}", level_name=level.name)


class LevelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.addCleanup(logs.set_level, logs.level_set())
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def emitted(self) -> list[tuple[str, str]]:
        """Namespace and level of the events that reached the global publisher."""
        return [
            (event["log_namespace"], event["log_level"].name) for event in self.events
        ]

    def test_nothing_dropped_until_set(self) -> None:
        """A program composing the bridge filters in its own observers."""
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "from maillaser import logs; print(logs.current_level().name)",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual((result.stdout, result.stderr), ("debug\n", ""))
        logs.set_level(LogLevel.debug)
        _Emitter().each_level()
        namespace = f"{__name__}._Emitter"
        self.assertEqual(self.emitted(), [(namespace, level.name) for level in LEVELS])

    def test_set_level(self) -> None:
        for level, expected, shown in [
            ("warn", LogLevel.warn, ["warn", "error"]),
            ("error", LogLevel.error, ["error"]),
            (LogLevel.info, LogLevel.info, ["info", "warn", "error"]),
        ]:
            logs.set_level(level)
            before = len(self.events)
            _Emitter().each_level()
            self.assertEqual(
                [event["log_level"].name for event in list(self.events)[before:]],
                shown,
            )
            self.assertIs(logs.current_level(), expected)

    def test_only_maillaser_events(self) -> None:
        """Others' events are the runner's, or the composing program's, to filter."""
        logs.set_level(LogLevel.error)
        Logger(namespace="twisted.other").info("not ours")
        self.assertEqual(self.emitted(), [("twisted.other", "info")])

    def observed(self, make_observer: Any) -> list[str]:
        """What an observer made for twistd writes to stdout, one event per level."""
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        each_level(Logger(namespace="twisted.other", observer=make_observer()))
        return stdout.getvalue().splitlines()

    def test_json_observer(self) -> None:
        """For C{twistd --logger}: everything at the level, Twisted's events too."""
        logs.set_level("warn")
        self.assertEqual(
            [json.loads(line)["text"] for line in self.observed(logs.json_observer)],
            ["at warn", "at error"],
        )

    def test_text_observer(self) -> None:
        logs.set_level("error")
        [line] = self.observed(logs.text_observer)
        self.assertTrue(line.endswith(" [twisted.other#error] at error"), line)

    def test_at_level(self) -> None:
        """Every event, Twisted's too, at MailLaser's level."""
        written = io.StringIO()
        logs.set_level("warn")
        destination = logs.at_level(logs.json_lines(written))
        each_level(Logger(namespace="twisted.other", observer=destination))
        self.assertEqual(
            [json.loads(line)["text"] for line in written.getvalue().splitlines()],
            ["at warn", "at error"],
        )

    def test_observers_follow_the_level(self) -> None:
        """The level set after an observer was made applies to it."""
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        logs.set_level("debug")
        observer = logs.json_observer()
        logs.set_level("error")
        Logger(namespace="twisted.other", observer=observer).warn("dropped")
        self.assertEqual(stdout.getvalue(), "")


def probe_lines(text: str) -> list[str]:
    """The stand-in service's lines of a text log, from the namespace on."""
    return [
        line.split(" [", 1)[1] for line in text.splitlines() if f"[{PROBE}#" in line
    ]


def loggers() -> dict[str, Logger]:
    """Every L{Logger} of the package, at module level or on a class."""
    found: dict[str, Logger] = {}
    for module_info in pkgutil.walk_packages(maillaser.__path__, "maillaser."):
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            owner = getattr(value, "__module__", None)
            if isinstance(value, Logger):
                found[f"{module.__name__}.{name}"] = value
            elif isinstance(value, type) and owner == module.__name__:
                for attribute, member in vars(value).items():
                    if isinstance(member, Logger):
                        found[f"{owner}.{value.__name__}.{attribute}"] = member
    return found


class EveryLoggerTests(SynchronousTestCase):
    def test_every_logger_is_filtered_at_the_source(self) -> None:
        """
        The level holds for every event MailLaser makes only if each of its
        loggers sends to L{logs.observer}; one made with C{Logger()} would
        go to the global publisher whatever the level.
        """
        found = loggers()
        self.assertLessEqual(
            {
                "maillaser.smtp._message.AcceptedMessage._log",
                "maillaser.webhook._delivery.Deliverer._log",
                "maillaser.spool._sqlite.SqliteSpool._log",
            },
            set(found),
        )
        unfiltered = [
            name
            for name, logger in found.items()
            if logger.observer is not logs.observer
        ]
        self.assertEqual(unfiltered, [])


class RunnerTests(SynchronousTestCase):
    """
    The real C{twistd} and C{twist} at C{MAIL_LASER_LOG_LEVEL=warn}: the
    level holds for MailLaser's events wherever the runner sends them.
    """

    WARN = {"MAIL_LASER_LOG_LEVEL": "warn"}

    def run_ok(
        self, runner: list[str], environ: dict[str, str] | None = None
    ) -> tuple[str, str]:
        """Standard output and the working directory of a clean run."""
        directory = self.mktemp()
        os.mkdir(directory)
        result = run_plugin(runner, environ=environ or self.WARN, cwd=directory)
        self.assertEqual((result.returncode, result.stderr), (0, ""), runner)
        return result.stdout, directory

    def test_twistd_text(self) -> None:
        """C{twistd -n}: Twisted's own events are twistd's, at all levels."""
        stdout, _ = self.run_ok(["twistd", "--nodaemon", "--pidfile="])
        self.assertEqual(
            probe_lines(stdout),
            [
                f"{PROBE}#warn] probe at warn",
                f"{PROBE}#error] probe at error",
                f"{PROBE}#error] reactor EPollReactor",
            ],
        )
        self.assertIn("[twisted.internet.base#info] Main loop terminated.", stdout)

    def test_twistd_log_file(self) -> None:
        stdout, directory = self.run_ok(
            ["twistd", "--nodaemon", "--pidfile=", "--logfile=bridge.log"]
        )
        with open(os.path.join(directory, "bridge.log")) as log_file:
            written = log_file.read()
        self.assertEqual(
            (stdout, probe_lines(written)),
            (
                "",
                [
                    f"{PROBE}#warn] probe at warn",
                    f"{PROBE}#error] probe at error",
                    f"{PROBE}#error] reactor EPollReactor",
                ],
            ),
        )

    def test_twistd_json(self) -> None:
        """L{logs.json_observer}: JSON lines, all at the level."""
        stdout, _ = self.run_ok(
            [
                "twistd",
                "--nodaemon",
                "--pidfile=",
                "--logger=maillaser.logs.json_observer",
            ]
        )
        self.assertEqual(
            [
                (line["level"], line["namespace"], line["text"])
                for line in map(json.loads, stdout.splitlines())
            ],
            [
                ("warn", PROBE, "probe at warn"),
                ("error", PROBE, "probe at error"),
                ("error", PROBE, "reactor EPollReactor"),
            ],
        )

    def twist_events(self, stdout: str) -> list[tuple[str, str]]:
        """Level and text of the stand-in's events in Twisted's JSON log."""
        return [
            (event["log_level"].name, formatEvent(event))
            for event in eventsFromJSONLogFile(io.StringIO(stdout))
            if event["log_namespace"] == PROBE
        ]

    def test_twist(self) -> None:
        """JSON (Twisted's event format) since standard output is not a tty."""
        stdout, _ = self.run_ok(["twist"])
        self.assertEqual(
            self.twist_events(stdout),
            [
                ("warn", "probe at warn"),
                ("error", "probe at error"),
                ("error", "reactor EPollReactor"),
            ],
        )

    def test_twist_log_level(self) -> None:
        """
        Debug events need both levels: C{twist} drops what is below its
        own, MailLaser what is below the configured one.
        """
        for twist_level, level, shown in [
            ("debug", "debug", ["debug", "info", "warn", "error"]),
            ("debug", "warn", ["warn", "error"]),
            ("info", "debug", ["info", "warn", "error"]),
        ]:
            stdout, _ = self.run_ok(
                ["twist", f"--log-level={twist_level}"],
                {"MAIL_LASER_LOG_LEVEL": level},
            )
            self.assertEqual(
                [
                    event_level
                    for event_level, text in self.twist_events(stdout)
                    if text.startswith("probe at ")
                ],
                shown,
                (twist_level, level),
            )


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


class DebugLogTests(SynchronousTestCase):
    """
    At debug: every SMTP command and reply, never the message's content,
    credentials masked; every webhook request's status and time; each with
    the message id where there is one.
    """

    def setUp(self) -> None:
        self.addCleanup(logs.set_level, logs.level_set())
        logs.set_level("debug")
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def smtp_events(self) -> list[tuple[str, Any, Any]]:
        """(what, text, message id) of each SMTP debug event."""
        found = []
        for event in self.events:
            if event["log_level"] is LogLevel.debug and "peer" in event:
                text = event.get("command", event.get("reply"))
                what = "command" if "command" in event else f"reply {event['code']}"
                found.append((what, text, event.get("message_id")))
        return found

    def session(self) -> Session:
        return Session(make_factory(RecordingSink(), Clock()), "192.0.2.9")

    def test_smtp_commands_and_replies(self) -> None:
        session = self.session()
        session.send(
            b"EHLO c\r\nAUTH PLAIN c2VjcmV0\r\nMAIL FROM:<a@b.test>\r\n"
            b"RCPT TO:<target@example.com>\r\nDATA\r\n"
        )
        session.send(b"Subject: secret content\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        found = self.smtp_events()
        [message_id] = {mid for _, _, mid in found if mid is not None}
        self.assertEqual(
            [(what, mid) for what, _, mid in found],
            [
                ("reply 220", None),
                ("command", None),
                ("reply 250", None),
                ("command", None),
                ("reply 502", None),
                ("command", None),
                ("reply 250", message_id),
                ("command", message_id),
                ("reply 250", message_id),
                ("command", message_id),
                ("reply 354", message_id),
                ("reply 250", message_id),
                ("command", message_id),
                ("reply 221", message_id),
            ],
        )
        texts = [text for _, text, _ in found]
        self.assertIn("AUTH ****", texts)
        self.assertIn("MAIL FROM:<a@b.test>", texts)
        self.assertIn(f"2.0.0 Ok: queued as {message_id}", texts)
        rendered = " ".join(eventAsText(event) for event in self.events)
        self.assertNotIn("c2VjcmV0", rendered)
        self.assertNotIn("secret content", rendered)
        self.assertNotIn("body", texts)
        for event in self.events:
            if "peer" in event:
                self.assertEqual(event["peer"], "192.0.2.9")

    def test_only_when_asked_for(self) -> None:
        """Before any level is set nothing is dropped, yet these are not made."""
        logs.set_level(None)
        self.assertEqual(
            (logs.level_set(), logs.current_level(), logs.debugging()),
            (None, LogLevel.debug, False),
        )
        self.session().send(b"EHLO c\r\n")
        self.assertEqual(self.smtp_events(), [])

    def test_nothing_at_info(self) -> None:
        logs.set_level("info")
        self.session().send(b"EHLO c\r\nNOOP\r\n")
        self.assertEqual(self.smtp_events(), [])

    def test_webhook_requests(self) -> None:
        clock = Clock()
        poster = SlowPoster(clock, 0.25, 503, 204)
        deliverer = Deliverer(
            poster=poster,
            payloads=InlinePayloads(),
            clock=clock,
            breaker=CircuitBreaker(threshold=5, reset=60.0, clock=clock),
            max_retries=3,
        )
        sent = message(7)
        delivered = deliverer.deliver(sent)
        clock.advance(0.25)  # the 503
        clock.advance(quick_backoff(1))
        clock.advance(0.25)  # the 204
        self.assertTrue(delivered.called)
        requests = [
            (event["message_id"], event["status"], event["elapsed"])
            for event in self.events
            if event["log_level"] is LogLevel.debug and "elapsed" in event
        ]
        self.assertEqual(requests, [(sent.id, 503, 0.25), (sent.id, 204, 0.25)])


@implementer(IWebhookPoster)
class SlowPoster:
    """Answers each POST with the next status after C{delay} seconds."""

    def __init__(self, clock: Clock, delay: float, *statuses: int) -> None:
        self.clock = clock
        self.delay = delay
        self.statuses = list(statuses)

    def post(
        self, body: bytes, headers: dict[bytes, bytes]
    ) -> Deferred[WebhookResponse]:
        return deferLater(self.clock, self.delay, WebhookResponse, self.statuses.pop(0))
