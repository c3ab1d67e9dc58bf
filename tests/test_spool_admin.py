"""
Tests for L{maillaser.spool.admin}, the C{maillaser-spool} command, run
against real spools on disk.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

import maillaser
from maillaser.config import mask_url
from maillaser.message import Attempt, Envelope, Message, QueuedMessage, SpoolStats
from maillaser.spool import DATABASE_NAME, PostgresDatabase, SpoolDatabase, open_spool
from maillaser.spool._dispatch import POLL_INTERVAL
from maillaser.spool.admin import format_duration, format_size, main, run
from maillaser.testing import WebhookReceiver
from tests.bridge import spool_empty, start_bridge
from tests.helpers import poll, simple_message, wait
from tests.process import clean_environment

NOW = 1_700_000_000.0

HEADERS = (
    b"From: Monitoring <alerts@example.org>\r\n"
    b"Subject: disk almost\r\n full on db1\r\n"
    b"X-Name: Caf\xc3\xa9\r\n"
    b"X-Evil: \x1b[31mred\r\n"
    b"\r\n"
)
RAW = HEADERS + b"SECRET BODY LINE\r\n"
REJECTED = "HTTP 422: the receiver\nrejected \x07 this payload for good"


ENVELOPE = Envelope(
    sender="alerts@example.org",
    recipients=("ops@example.com", "Oncall@Example.com"),
    helo="mon.example.org",
    peer="198.51.100.4:51000",
)


def message(id: str, received_at: float, raw: bytes = RAW) -> Message:
    return Message(id=id, envelope=ENVELOPE, raw=raw, received_at=received_at)


class Output:
    """A stdout with a byte buffer under it, like the real one."""

    def __init__(self) -> None:
        self.bytes = io.BytesIO()
        self.text = io.TextIOWrapper(self.bytes, encoding="utf-8", newline="\n")

    def value(self) -> bytes:
        self.text.flush()
        return self.bytes.getvalue()


class SpoolAdminTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.join(self.mktemp(), "spool")

    @property
    def location(self) -> tuple[str, ...]:
        """The options that name the spool."""
        return ("--spool-dir", self.directory)

    def open_database(self, create: bool) -> Any:
        return SpoolDatabase.open(self.directory, create=create)

    def make_spool(self) -> None:
        """
        msg_a: pending, failed one round, next try in 5 minutes;
        msg_b: pending, never tried; msg_c: dead after two attempts.
        """
        database = self.open_database(create=True)
        try:
            with database.transaction():
                database.insert(message("msg_a", NOW - 192))
                database.insert(message("msg_b", NOW - 7500, b"x" * 2048))
                database.insert(message("msg_c", NOW - 349_200))
                database.reschedule(
                    "msg_a",
                    NOW + 300,
                    [
                        Attempt(NOW - 100, None, "connection refused"),
                        Attempt(NOW - 99, 503, "HTTP 503 Service Unavailable"),
                    ],
                )
                database.bury(
                    "msg_c",
                    NOW - 3600,
                    [
                        Attempt(NOW - 3700, 500, "HTTP 500"),
                        Attempt(NOW - 3600, 422, REJECTED),
                    ],
                )
        finally:
            database.close()

    def admin(
        self, *argv: str, environ: Mapping[str, str] | None = None
    ) -> tuple[int, str, str]:
        out, err = Output(), io.StringIO()
        if environ is None:
            argv = (*self.location, *argv)
        code = run(argv, out=out.text, err=err, now=NOW, environ=environ or {})
        return code, out.value().decode("utf-8"), err.getvalue()

    def entry_state(self, id: str) -> tuple[str, int, float | None]:
        database = self.open_database(create=False)
        self.addCleanup(database.close)
        entry = database.entry(id)
        return entry.state, entry.rounds, entry.next_attempt_at

    def test_list(self) -> None:
        self.make_spool()
        self.assertEqual(
            self.admin("list"),
            (
                0,
                "ID     STATE    AGE    ATTEMPTS  SIZE  NEXT   LAST ERROR\n"
                "msg_c  dead     4d1h          2  128B  -      "
                "HTTP 422: the receiver rejected \\x07 ...\n"
                "msg_b  pending  2h05m         0  2.0K  due\n"
                "msg_a  pending  3m12s         2  128B  in 5m  "
                "HTTP 503 Service Unavailable\n",
                "",
            ),
        )

    def test_list_filters(self) -> None:
        self.make_spool()
        code, out, _ = self.admin("list", "--dead")
        self.assertEqual(
            (code, [line.split()[0] for line in out.splitlines()]), (0, ["ID", "msg_c"])
        )
        code, out, _ = self.admin("list", "--pending")
        self.assertEqual(
            (code, [line.split()[0] for line in out.splitlines()]),
            (0, ["ID", "msg_b", "msg_a"]),
        )
        code, out, _ = self.admin("list", "--all")
        self.assertEqual(len(out.splitlines()), 4)

    def test_list_json(self) -> None:
        self.make_spool()
        code, out, err = self.admin("list", "--dead", "--json")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(
            [json.loads(line) for line in out.splitlines()],
            [
                {
                    "id": "msg_c",
                    "state": "dead",
                    "sender": "alerts@example.org",
                    "recipients": ["ops@example.com", "Oncall@Example.com"],
                    "helo": "mon.example.org",
                    "peer": "198.51.100.4:51000",
                    "size": len(RAW),
                    "received_at": NOW - 349_200,
                    "rounds": 0,
                    "attempts": 2,
                    "next_attempt_at": None,
                    "last_error": REJECTED,
                    "dead_at": NOW - 3600,
                }
            ],
        )
        code, out, _ = self.admin("list", "--pending", "--json")
        self.assertEqual(
            [
                (d["id"], d["next_attempt_at"])
                for d in map(json.loads, out.splitlines())
            ],
            [("msg_b", NOW - 7500), ("msg_a", NOW + 300)],
        )

    def test_list_empty(self) -> None:
        self.open_database(create=True).close()
        self.assertEqual(self.admin("list"), (0, "no messages in the spool\n", ""))
        self.assertEqual(
            self.admin("list", "--dead"), (0, "no dead messages in the spool\n", "")
        )
        self.assertEqual(self.admin("list", "--json"), (0, "", ""))

    def test_no_spool(self) -> None:
        """A wrong path is an error, and never leaves a new spool behind."""
        self.assertEqual(
            self.admin("list"),
            (1, "", f"maillaser-spool: error: no spool at {self.directory}\n"),
        )
        self.assertFalse(os.path.exists(self.directory))

    def test_spool_dir_from_environment(self) -> None:
        self.make_spool()
        code, out, _ = self.admin(
            "list", "--dead", environ={"MAIL_LASER_SPOOL_DIR": self.directory}
        )
        self.assertEqual((code, out.splitlines()[1].split()[0]), (0, "msg_c"))

    def test_default_spool_dir(self) -> None:
        """Without option or variable, the server's default, relative to here."""
        os.makedirs(self.directory)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.directory)
        self.assertEqual(
            self.admin("list", environ={}),
            (1, "", "maillaser-spool: error: no spool at ./maillaser-spool\n"),
        )

    def test_corrupt_database(self) -> None:
        os.makedirs(self.directory)
        path = os.path.join(self.directory, DATABASE_NAME)
        with open(path, "wb") as f:
            f.write(b"garbage " * 1000)
        self.assertEqual(
            self.admin("list"),
            (
                1,
                "",
                f"maillaser-spool: error: spool database {path}"
                " is unreadable or corrupt: file is not a database\n",
            ),
        )

    def test_show(self) -> None:
        """The envelope, the headers and the attempts; never the body."""
        self.make_spool()
        self.assertEqual(
            self.admin("show", "msg_c"),
            (
                0,
                "id:           msg_c\n"
                "state:        dead\n"
                "sender:       <alerts@example.org>\n"
                "recipients:   ops@example.com, Oncall@Example.com\n"
                "helo:         mon.example.org\n"
                "peer:         198.51.100.4:51000\n"
                "received:     2023-11-10T21:13:20Z (4d1h ago)\n"
                "size:         128 bytes\n"
                "rounds:       0\n"
                "attempts:     2\n"
                "dead since:   2023-11-14T21:13:20Z\n"
                "last error:   HTTP 422: the receiver\\nrejected \\x07"
                " this payload for good\n"
                "\n"
                "headers:\n"
                "  From: Monitoring <alerts@example.org>\n"
                "  Subject: disk almost full on db1\n"
                "  X-Name: Caf\u00e9\n"
                "  X-Evil: \\x1b[31mred\n"
                "\n"
                "recorded attempts:\n"
                "  2023-11-14T21:11:40Z  500  HTTP 500\n"
                "  2023-11-14T21:13:20Z  422  HTTP 422: the receiver\\nrejected \\x07"
                " this payload for good\n",
                "",
            ),
        )

    def test_show_pending(self) -> None:
        self.make_spool()
        code, out, _ = self.admin("show", "msg_b")
        lines = out.splitlines()
        self.assertEqual(code, 0)
        self.assertEqual(lines[10:12], ["next attempt: due", "last error:"])
        self.assertEqual(lines[-2:], ["", "recorded attempts: none"])
        self.assertNotIn("SECRET", out)

    def test_show_raw(self) -> None:
        """--raw writes the exact bytes accepted, and nothing else."""
        self.make_spool()
        out, err = Output(), io.StringIO()
        code = run(
            [*self.location, "show", "msg_a", "--raw"],
            out=out.text,
            err=err,
            now=NOW,
            environ={},
        )
        self.assertEqual((code, out.value(), err.getvalue()), (0, RAW, ""))

    def test_show_unknown(self) -> None:
        self.make_spool()
        self.assertEqual(
            self.admin("show", "msg_zzz"),
            (3, "", "maillaser-spool: no message msg_zzz in the spool\n"),
        )
        self.assertEqual(self.admin("show", "msg_zzz", "--raw")[0], 3)

    def test_requeue_one(self) -> None:
        self.make_spool()
        self.assertEqual(self.admin("requeue", "msg_c"), (0, "requeued msg_c\n", ""))
        self.assertEqual(self.entry_state("msg_c"), ("pending", 0, NOW))

    def test_requeue_not_dead(self) -> None:
        self.make_spool()
        self.assertEqual(
            self.admin("requeue", "msg_a"),
            (3, "", "maillaser-spool: message msg_a is pending, not dead\n"),
        )
        self.assertEqual(self.entry_state("msg_a"), ("pending", 1, NOW + 300))
        self.assertEqual(
            self.admin("requeue", "msg_zzz"),
            (3, "", "maillaser-spool: no message msg_zzz in the spool\n"),
        )

    def test_requeue_all_dead(self) -> None:
        self.make_spool()
        self.assertEqual(
            self.admin("requeue", "--all-dead"), (0, "requeued 1 dead messages\n", "")
        )
        self.assertEqual(self.entry_state("msg_c"), ("pending", 0, NOW))
        self.assertEqual(self.entry_state("msg_a"), ("pending", 1, NOW + 300))
        self.assertEqual(
            self.admin("requeue", "--all-dead"), (0, "requeued 0 dead messages\n", "")
        )

    def test_purge(self) -> None:
        """Only a dead message, only by its id."""
        self.make_spool()
        self.assertEqual(
            self.admin("purge", "msg_a"),
            (3, "", "maillaser-spool: message msg_a is pending, not dead\n"),
        )
        self.assertEqual(self.admin("purge", "msg_c"), (0, "purged msg_c\n", ""))
        self.assertEqual(
            self.admin("show", "msg_c"),
            (3, "", "maillaser-spool: no message msg_c in the spool\n"),
        )
        database = self.open_database(create=False)
        self.addCleanup(database.close)
        self.assertEqual(database.attempts("msg_c"), [])
        self.assertEqual([e.id for e in database.entries()], ["msg_b", "msg_a"])

    def test_usage_errors(self) -> None:
        self.make_spool()
        for argv in (
            [],
            ["frobnicate"],
            ["requeue"],
            ["requeue", "msg_c", "--all-dead"],
            ["purge"],
            ["list", "--dead", "--pending"],
        ):
            code, out, err = self.admin(*argv)
            self.assertEqual((code, out), (2, ""), argv)
            self.assertTrue(err.startswith("usage: maillaser-spool"), err)
        self.assertEqual(self.entry_state("msg_c")[0], "dead")

    def test_help(self) -> None:
        code, out, err = self.admin("--help")
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(out.startswith("usage: maillaser-spool"))

    def test_main_uses_process_streams(self) -> None:
        self.make_spool()
        out, err = Output(), io.StringIO()
        self.patch(sys, "stdout", out.text)
        self.patch(sys, "stderr", err)
        self.assertEqual(main([*self.location, "requeue", "msg_zzz"]), 3)
        self.assertEqual(
            (out.value(), err.getvalue()),
            (b"", "maillaser-spool: no message msg_zzz in the spool\n"),
        )

    def test_retry_one(self) -> None:
        """A pending message is due now and keeps its rounds."""
        self.make_spool()
        self.assertEqual(
            self.admin("retry", "msg_a"),
            (0, "retried 1 pending message: due now\n", ""),
        )
        self.assertEqual(self.entry_state("msg_a"), ("pending", 1, NOW))
        # Already due: it stays as due as it was.
        self.assertEqual(self.admin("retry", "msg_b")[0], 0)
        self.assertEqual(self.entry_state("msg_b"), ("pending", 0, NOW - 7500))

    def test_retry_all(self) -> None:
        """Every pending message not yet due is counted; dead ones stay dead."""
        self.make_spool()
        self.assertEqual(
            self.admin("retry", "--all"),
            (0, "retried 1 pending message: due now\n", ""),
        )
        self.assertEqual(self.entry_state("msg_a"), ("pending", 1, NOW))
        self.assertEqual(self.entry_state("msg_b"), ("pending", 0, NOW - 7500))
        self.assertEqual(self.entry_state("msg_c"), ("dead", 0, None))
        self.assertEqual(
            self.admin("retry", "--all"),
            (0, "retried 0 pending messages: due now\n", ""),
        )

    def test_retry_not_pending(self) -> None:
        """
        Dead messages are for requeue; an id that is gone does not keep the
        others from being retried.
        """
        self.make_spool()
        self.assertEqual(
            self.admin("retry", "msg_c", "msg_a", "msg_zzz"),
            (
                3,
                "retried 1 pending message: due now\n",
                "maillaser-spool: message msg_c is dead, not pending;"
                " no message msg_zzz in the spool\n",
            ),
        )
        self.assertEqual(self.entry_state("msg_a"), ("pending", 1, NOW))
        self.assertEqual(self.entry_state("msg_c"), ("dead", 0, None))

    def test_options_after_command(self) -> None:
        """--spool-dir and --json go before or after the command."""
        self.make_spool()
        before = run(
            [*self.location, "--json", "list", "--dead"],
            out=(out_before := Output()).text,
            err=io.StringIO(),
            now=NOW,
            environ={},
        )
        after = run(
            ["list", "--dead", "--json", *self.location],
            out=(out_after := Output()).text,
            err=io.StringIO(),
            now=NOW,
            environ={"MAIL_LASER_SPOOL_DIR": "/nonexistent"},
        )
        self.assertEqual((before, after), (0, 0))
        self.assertEqual(out_before.value(), out_after.value())
        self.assertEqual(json.loads(out_after.value())["id"], "msg_c")
        # Given after the command, it wins; not given there, the one before holds.
        code, out, _ = self.admin("list", *self.location)
        self.assertEqual((code, len(out.splitlines())), (0, 4))

    def test_json_only_where_there_is_json(self) -> None:
        self.make_spool()
        code, out, err = self.admin("--json", "retry", "--all")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("--json applies to list, show and stats only", err)
        self.assertEqual(self.entry_state("msg_a"), ("pending", 1, NOW + 300))

    def test_stats(self) -> None:
        self.make_spool()
        self.assertEqual(
            self.admin("stats"),
            (
                0,
                "pending: 2 (1 due now), 2.1K\noldest pending: 2h05m\ndead: 1\n"
                "retained: 0 (kept for attachment links), 0B\n",
                "",
            ),
        )
        code, out, _ = self.admin("stats", "--json")
        self.assertEqual(
            (code, json.loads(out)),
            (
                0,
                {
                    "pending": 2,
                    "due": 1,
                    "dead": 1,
                    "bytes": 2048 + len(RAW),
                    "oldest_pending_received_at": NOW - 7500,
                    "retained": 0,
                    "retained_bytes": 0,
                },
            ),
        )

    def test_show_json(self) -> None:
        self.make_spool()
        code, out, err = self.admin("show", "msg_c", "--json")
        shown = json.loads(out)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(
            shown["headers"],
            [
                "From: Monitoring <alerts@example.org>",
                "Subject: disk almost full on db1",
                "X-Name: Caf\u00e9",
                "X-Evil: \x1b[31mred",
            ],
        )
        self.assertEqual(
            shown["recorded_attempts"],
            [
                {"at": NOW - 3700, "status": 500, "error": "HTTP 500"},
                {"at": NOW - 3600, "status": 422, "error": REJECTED},
            ],
        )
        self.assertEqual(shown["state"], "dead")

    def test_show_headers_as_received(self) -> None:
        """
        Each header on one line, unfolded as RFC 5322 says (the line end
        goes, the space or tab stays): a tab is shown as a tab, not as an
        escape, and nothing a parser would tidy is changed.
        """
        database = self.open_database(create=True)
        raw = (
            b"Received: from mon.example.org ([198.51.100.4])\r\n"
            b"\tby mx.test (MailLaser) with ESMTP id msg_r;\r\n"
            b"\tThu, 3 Dec 2026 04:00:00 +0000\r\n"
            b"Subject:\r\n  folded  twice\r\n \r\n end\r\n"
            b"X-Bare: bare\n lf\r\n"
            b"\r\n"
            b"Not-A-Header: body\r\n"
        )
        with database.transaction():
            database.insert(message("msg_r", NOW, raw))
        database.close()
        code, out, _ = self.admin("show", "msg_r")
        headers = out.split("headers:\n", 1)[1].split("\n\n", 1)[0]
        self.assertEqual(
            (code, headers.splitlines()),
            (
                0,
                [
                    "  Received: from mon.example.org ([198.51.100.4])"
                    "\tby mx.test (MailLaser) with ESMTP id msg_r;"
                    "\tThu, 3 Dec 2026 04:00:00 +0000",
                    "  Subject:  folded  twice  end",
                    "  X-Bare: bare lf",
                ],
            ),
        )

    def test_unwritable_spool_named(self) -> None:
        """
        Permission checks name the path, where SQLite would only say "unable
        to open database file"; run as root, the check is seen through
        os.access.
        """
        self.make_spool()
        path = os.path.join(self.directory, DATABASE_NAME)
        denied: set[tuple[str, int]] = set()

        def access(name: str, mode: int, **kwargs: object) -> bool:
            return (name, mode) not in denied and (name, os.R_OK) not in denied

        self.patch(os, "access", access)
        denied.add((path, os.R_OK | os.W_OK))
        code, _, err = self.admin("retry", "--all")
        self.assertEqual(
            (code, err),
            (
                1,
                f"maillaser-spool: error: permission denied: {path}"
                " (needs read and write access)\n",
            ),
        )
        # Reading needs less.
        self.assertEqual(self.admin("stats")[0], 0)
        denied.add((path, os.R_OK))
        self.assertEqual(
            self.admin("list")[2],
            f"maillaser-spool: error: permission denied: {path} (needs read access)\n",
        )

    def test_format_duration(self) -> None:
        self.assertEqual(
            [
                format_duration(s)
                for s in (-5, 0, 59, 60, 192, 3599, 7200, 7500, 86400, 349_200, 90061)
            ],
            [
                "0s",
                "0s",
                "59s",
                "1m",
                "3m12s",
                "59m59s",
                "2h",
                "2h05m",
                "1d",
                "4d1h",
                "1d1h",
            ],
        )

    def test_format_size(self) -> None:
        self.assertEqual(
            [format_size(n) for n in (0, 1023, 1024, 2560, 1024 * 1024, 15_000_000)],
            ["0B", "1023B", "1.0K", "2.5K", "1.0M", "14.3M"],
        )


@pytest.mark.usefixtures("postgres_url")
class SharedSpoolAdminTests(SpoolAdminTests):
    """The same commands on a shared spool, named by C{--spool-url}."""

    postgres_url: str

    @property
    def location(self) -> tuple[str, ...]:
        return ("--spool-url", self.postgres_url)

    def open_database(self, create: bool) -> Any:
        return PostgresDatabase.open(self.postgres_url, create=create)

    def test_no_spool(self) -> None:
        """An empty database is an error, and the password is never shown."""
        url = self.postgres_url.replace("maillaser@", "maillaser:pa55@")
        code, out, err = self.admin("--spool-url", url, "list", environ={"X": ""})
        self.assertEqual(
            (code, out, err),
            (1, "", f"maillaser-spool: error: no spool at {mask_url(url)}\n"),
        )
        self.assertNotIn("pa55", err)

    def test_spool_dir_from_environment(self) -> None:
        self.make_spool()
        code, out, _ = self.admin(
            "list", "--dead", environ={"MAIL_LASER_SPOOL_URL": self.postgres_url}
        )
        self.assertEqual((code, out.splitlines()[1].split()[0]), (0, "msg_c"))

    def test_default_spool_dir(self) -> None:
        raise SkipTest("a SQLite spool's directory")

    def test_corrupt_database(self) -> None:
        raise SkipTest("a SQLite spool's file")

    def test_unwritable_spool_named(self) -> None:
        raise SkipTest("a SQLite spool's file")


class SpoolAdminProcessTests(TestCase):
    async def test_requeue_while_server_runs(self) -> None:
        """
        The command, as a real process, replays a dead letter while the
        delivery worker's spool holds the database open; the worker sees it
        after refresh().
        """
        directory = os.path.abspath(os.path.join(self.mktemp(), "spool"))
        spool = open_spool(directory, reactor)
        self.addCleanup(spool.close)
        await spool.add(message("msg_dead", 10.0))
        await spool.bury("msg_dead", [Attempt(11.0, 400, "HTTP 400")])

        root = os.path.dirname(os.path.dirname(os.path.abspath(maillaser.__file__)))
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [
                "-m",
                "maillaser.spool.admin",
                "--spool-dir",
                directory,
                "requeue",
                "--all-dead",
            ],
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [root, os.environ.get("PYTHONPATH")])
                ),
            },
            path=root,
        )
        self.assertEqual((out, err, code), (b"requeued 1 dead messages\n", b"", 0))
        self.assertEqual(
            await spool.refresh(), SpoolStats(pending=1, dead=0, bytes=len(RAW))
        )
        self.assertEqual(
            await spool.due(1e10, 10), [QueuedMessage(message("msg_dead", 10.0), 0)]
        )


# The console script as installed: ``maillaser-spool`` next to this
# interpreter, run as a program, against spools written by the project's own
# SpoolDatabase.  Times are real here, so every age and wait is 30 seconds off
# a display boundary: the output cannot change while the test runs.

DEAD_ID = "msg_019a7c0a11d2e3f4a5b6c7d8e9f0"
LATER_ID = "msg_019a7c1e2f3b8d0c4e5f6a7b8c9d"
DUE_ID = "msg_019a7c1f0a1b2c3d4e5f6a7b8c9d"
UNKNOWN_ID = "msg_0000000000000000000000000000"


def installed_command() -> Path:
    """Where the installer put C{maillaser-spool}, as for twistd in L{runner}."""
    return Path(sys.executable).with_name("maillaser-spool")


class InstalledCommandTests(TestCase):
    def setUp(self) -> None:
        self.command = installed_command()
        if not self.command.exists():
            raise SkipTest(f"maillaser-spool is not installed at {self.command}")
        self.directory = os.path.abspath(os.path.join(self.mktemp(), "spool"))
        self.now = time.time()

    def make_spool(self) -> None:
        """
        DEAD_ID: dead after one attempt (HTTP 410), accepted 1d3h ago;
        LATER_ID: pending, failed one round, accepted 3h ago, next in 5h30m;
        DUE_ID: pending, never tried, accepted 2h05m ago, due now.
        """
        now = self.now
        database = SpoolDatabase.open(self.directory, create=True)
        try:
            with database.transaction():
                database.insert(message(DEAD_ID, now - (86400 + 3 * 3600 + 30)))
                database.insert(message(LATER_ID, now - (3 * 3600 + 30)))
                database.insert(
                    message(DUE_ID, now - (2 * 3600 + 5 * 60 + 30), b"x" * 2048)
                )
                database.reschedule(
                    LATER_ID,
                    now + 5 * 3600 + 30 * 60 + 30,
                    [Attempt(now - 600, 503, "HTTP 503 Service Unavailable")],
                )
                database.bury(
                    DEAD_ID, now - 3600, [Attempt(now - 3600, 410, "HTTP 410: gone")]
                )
        finally:
            database.close()

    async def run_command(self, *argv: str, **environ: str) -> tuple[int, bytes, bytes]:
        """
        Run the installed command as a program, from an unrelated working
        directory; return its exit status, stdout and stderr.
        """
        cwd = self.mktemp()
        os.makedirs(cwd)
        out, err, code = await wait(
            getProcessOutputAndValue(
                str(self.command),
                argv,
                env={**clean_environment(), **environ},
                path=cwd,
                reactor=reactor,
            ),
            30,
        )
        return code, out, err

    async def admin(self, *argv: str) -> tuple[int, str, str]:
        """L{run_command} on this test's spool, output decoded."""
        code, out, err = await self.run_command("--spool-dir", self.directory, *argv)
        return code, out.decode("utf-8"), err.decode("utf-8")

    def state_of(self, id: str) -> str | None:
        database = SpoolDatabase.open(self.directory, create=False)
        try:
            return {entry.id: entry.state for entry in database.entries()}.get(id)
        finally:
            database.close()

    async def test_list_table(self) -> None:
        self.make_spool()
        self.assertEqual(
            await self.admin("list"),
            (
                0,
                "ID                                STATE    AGE    ATTEMPTS  SIZE"
                "  NEXT      LAST ERROR\n"
                f"{DEAD_ID}  dead     1d3h          1  128B  -         HTTP 410: gone\n"
                f"{LATER_ID}  pending  3h            1  128B  in 5h30m"
                "  HTTP 503 Service Unavailable\n"
                f"{DUE_ID}  pending  2h05m         0  2.0K  due\n",
                "",
            ),
        )
        # The spool directory from the environment, as the bridge reads it.
        code, out, err = await self.run_command(
            "list", "--dead", MAIL_LASER_SPOOL_DIR=self.directory
        )
        self.assertEqual(
            (code, [line.split()[0] for line in out.splitlines()], err),
            (0, [b"ID", DEAD_ID.encode()], b""),
        )

    async def test_list_json(self) -> None:
        self.make_spool()
        code, out, err = await self.admin("list", "--json")
        self.assertEqual((code, err), (0, ""))
        listed = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(
            [(d["id"], d["state"], d["attempts"], d["last_error"]) for d in listed],
            [
                (DEAD_ID, "dead", 1, "HTTP 410: gone"),
                (LATER_ID, "pending", 1, "HTTP 503 Service Unavailable"),
                (DUE_ID, "pending", 0, ""),
            ],
        )
        dead, later, due = listed
        self.assertEqual(
            dead,
            {
                "id": DEAD_ID,
                "state": "dead",
                "sender": "alerts@example.org",
                "recipients": ["ops@example.com", "Oncall@Example.com"],
                "helo": "mon.example.org",
                "peer": "198.51.100.4:51000",
                "size": len(RAW),
                "received_at": self.now - (86400 + 3 * 3600 + 30),
                "rounds": 0,
                "attempts": 1,
                "next_attempt_at": None,
                "last_error": "HTTP 410: gone",
                "dead_at": self.now - 3600,
            },
        )
        self.assertEqual(
            (later["next_attempt_at"], later["rounds"], later["dead_at"]),
            (self.now + 5 * 3600 + 30 * 60 + 30, 1, None),
        )
        self.assertEqual(
            (due["size"], due["next_attempt_at"]), (2048, due["received_at"])
        )

    async def test_show(self) -> None:
        """The envelope, headers and attempts; --raw gives the exact bytes."""
        self.make_spool()
        code, out, err = await self.admin("show", DEAD_ID)
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(
            lines[:6],
            [
                f"id:           {DEAD_ID}",
                "state:        dead",
                "sender:       <alerts@example.org>",
                "recipients:   ops@example.com, Oncall@Example.com",
                "helo:         mon.example.org",
                "peer:         198.51.100.4:51000",
            ],
        )
        self.assertIn("attempts:     1", lines)
        self.assertIn("last error:   HTTP 410: gone", lines)
        self.assertIn("  Subject: disk almost full on db1", lines)
        self.assertIn("  X-Name: Caf\u00e9", lines)
        self.assertEqual(lines[-2], "recorded attempts:")
        self.assertRegex(
            lines[-1], r"^  \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  410  HTTP 410: gone$"
        )
        self.assertNotIn("SECRET", out)

        raw = await self.run_command(
            "--spool-dir", self.directory, "show", DEAD_ID, "--raw"
        )
        self.assertEqual(raw, (0, RAW, b""))

    async def test_requeue_dead(self) -> None:
        """The dead message is pending and due again, under the same id."""
        self.make_spool()
        self.assertEqual(
            await self.admin("requeue", DEAD_ID), (0, f"requeued {DEAD_ID}\n", "")
        )
        code, out, _ = await self.admin("list", "--json")
        [requeued] = [
            d for d in map(json.loads, out.splitlines()) if d["id"] == DEAD_ID
        ]
        self.assertEqual(
            (code, requeued["state"], requeued["dead_at"], requeued["rounds"]),
            (0, "pending", None, 0),
        )
        self.assertGreaterEqual(requeued["next_attempt_at"], self.now)
        self.assertLessEqual(requeued["next_attempt_at"], time.time())
        self.assertEqual(
            await self.admin("requeue", "--all-dead"),
            (0, "requeued 0 dead messages\n", ""),
        )

    async def test_purge(self) -> None:
        """Only a dead message goes, and only it."""
        self.make_spool()
        self.assertEqual(
            await self.admin("purge", DEAD_ID), (0, f"purged {DEAD_ID}\n", "")
        )
        self.assertIsNone(self.state_of(DEAD_ID))
        code, out, err = await self.admin("list")
        self.assertEqual(
            (code, [line.split()[0] for line in out.splitlines()], err),
            (0, ["ID", LATER_ID, DUE_ID], ""),
        )
        self.assertEqual(
            await self.admin("purge", DUE_ID),
            (3, "", f"maillaser-spool: message {DUE_ID} is pending, not dead\n"),
        )
        self.assertEqual(self.state_of(DUE_ID), "pending")

    async def test_exit_status(self) -> None:
        """0 success, 1 no spool, 2 usage error, 3 unknown id."""
        missing = os.path.abspath(os.path.join(self.mktemp(), "nowhere"))
        self.assertEqual(
            await self.run_command("--spool-dir", missing, "list"),
            (1, b"", f"maillaser-spool: error: no spool at {missing}\n".encode()),
        )
        self.assertFalse(os.path.exists(missing))

        self.make_spool()
        for argv in ([], ["list", "--dead", "--pending"]):
            code, out, err = await self.admin(*argv)
            self.assertEqual((code, out), (2, ""), argv)
            self.assertTrue(err.startswith("usage: maillaser-spool"), (argv, err))

        for argv in (["show", UNKNOWN_ID], ["requeue", UNKNOWN_ID]):
            self.assertEqual(
                await self.admin(*argv),
                (3, "", f"maillaser-spool: no message {UNKNOWN_ID} in the spool\n"),
                argv,
            )
        self.assertEqual(
            [self.state_of(id) for id in (DEAD_ID, LATER_ID, DUE_ID)],
            ["dead", "pending", "pending"],
        )
        code, out, err = await self.admin("--help")
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(out.startswith("usage: maillaser-spool"), out)


def unprivileged() -> list[str]:
    """
    A prefix that runs a program subject to file permissions.  Tests run as
    root here, and this interpreter lives where no other user may read, so
    the program stays root but without the capabilities that override
    permissions (setpriv, from util-linux).
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise SkipTest("running as root, and no setpriv to drop CAP_DAC_OVERRIDE")
    capabilities = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={capabilities}", f"--bounding-set={capabilities}"]


class InstalledCommandMoreTests(InstalledCommandTests):
    """The installed command against the operator's first surprises (issue 15)."""

    async def test_options_after_command(self) -> None:
        self.make_spool()
        expected = await self.run_command("--spool-dir", self.directory, "stats")
        self.assertEqual(expected[0], 0)
        self.assertEqual(
            await self.run_command("stats", "--spool-dir", self.directory), expected
        )
        code, out, err = await self.run_command(
            "list", "--dead", "--spool-dir", self.directory, "--json"
        )
        self.assertEqual((code, json.loads(out)["id"], err), (0, DEAD_ID, b""))

    async def test_retry(self) -> None:
        self.make_spool()
        self.assertEqual(
            await self.admin("retry", "--all"),
            (0, "retried 1 pending message: due now\n", ""),
        )
        _, out, _ = await self.admin("list", "--json")
        later = next(
            d for d in map(json.loads, out.splitlines()) if d["id"] == LATER_ID
        )
        self.assertEqual((later["state"], later["rounds"]), ("pending", 1))
        self.assertLessEqual(later["next_attempt_at"], time.time())
        self.assertEqual(self.state_of(DEAD_ID), "dead")

    async def test_closed_pipe(self) -> None:
        """
        ``list --json | head -1`` through a real pipe: one line out, nothing
        on stderr, and the status a shell gives a program the pipe ended.
        """
        database = SpoolDatabase.open(self.directory, create=True)
        with database.transaction():
            for n in range(2000):  # far more than a pipe holds
                database.insert(message(f"msg_{n:028x}", self.now - n))
        database.close()
        cwd = self.mktemp()
        os.makedirs(cwd)
        script = (
            'set -o pipefail; "$0" --spool-dir "$1" list --json | head -1;'
            ' echo "status ${PIPESTATUS[0]}"'
        )
        out, err, _ = await wait(
            getProcessOutputAndValue(
                "bash",
                ["-c", script, str(self.command), self.directory],
                env=clean_environment(),
                path=cwd,
                reactor=reactor,
            ),
            60,
        )
        first, status = out.decode().splitlines()
        self.assertEqual(json.loads(first)["id"], f"msg_{1999:028x}")
        self.assertEqual((status, err), ("status 141", b""))

    async def run_unprivileged(self, *argv: str) -> tuple[int, str, str]:
        prefix = unprivileged()
        out, err, code = await wait(
            getProcessOutputAndValue(
                (prefix or [str(self.command)])[0],
                [*prefix[1:], *([str(self.command)] if prefix else []), *argv],
                env=clean_environment(),
                reactor=reactor,
            ),
            30,
        )
        return code, out.decode(), err.decode()

    async def test_permission_denied(self) -> None:
        """
        A spool this user may not open says so and names the path, rather
        than SQLite's "unable to open database file".
        """
        self.make_spool()
        path = os.path.join(self.directory, DATABASE_NAME)
        os.chmod(path, 0)
        self.addCleanup(os.chmod, path, 0o600)
        for command in ("list", "retry"):
            argv = ["--spool-dir", self.directory, command]
            argv += ["--all"] if command == "retry" else []
            code, out, err = await self.run_unprivileged(*argv)
            what = "read" if command == "list" else "read and write"
            self.assertEqual(
                (code, out, err),
                (
                    1,
                    "",
                    f"maillaser-spool: error: permission denied: {path}"
                    f" (needs {what} access)\n",
                ),
            )
        os.chmod(self.directory, 0)
        self.addCleanup(os.chmod, self.directory, 0o700)
        self.assertEqual(
            await self.run_unprivileged("--spool-dir", self.directory, "list"),
            (1, "", f"maillaser-spool: error: permission denied: {self.directory}\n"),
        )

    async def test_read_only_spool(self) -> None:
        """
        A spool this user may read but not write, while the bridge has it
        open (its -wal and -shm files exist): the commands that read work,
        the ones that write say permission denied.  With the bridge stopped,
        SQLite needs to create -shm even to read: that is named too.
        """
        self.make_spool()
        path = os.path.join(self.directory, DATABASE_NAME)
        bridge = SpoolDatabase.open(self.directory, create=False)
        self.addCleanup(bridge.close)
        bridge.counts()  # as a running bridge: the -wal and -shm files exist
        for name in (path, path + "-wal", path + "-shm"):
            os.chmod(name, 0o444)
        os.chmod(self.directory, 0o555)
        self.addCleanup(os.chmod, self.directory, 0o700)

        code, out, err = await self.run_unprivileged(
            "--spool-dir", self.directory, "list", "--json"
        )
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(
            [json.loads(line)["id"] for line in out.splitlines()],
            [DEAD_ID, LATER_ID, DUE_ID],
        )
        code, out, err = await self.run_unprivileged(
            "--spool-dir", self.directory, "show", DEAD_ID
        )
        self.assertEqual(
            (code, out.splitlines()[0], err), (0, f"id:           {DEAD_ID}", "")
        )
        self.assertEqual(
            (await self.run_unprivileged("--spool-dir", self.directory, "stats"))[0], 0
        )
        self.assertEqual(
            await self.run_unprivileged(
                "--spool-dir", self.directory, "retry", "--all"
            ),
            (
                1,
                "",
                f"maillaser-spool: error: permission denied: {path}"
                " (needs read and write access)\n",
            ),
        )

        bridge.close()
        self.assertEqual(sorted(os.listdir(self.directory)), [DATABASE_NAME])
        self.assertEqual(
            await self.run_unprivileged("--spool-dir", self.directory, "list"),
            (
                1,
                "",
                f"maillaser-spool: error: permission denied: {self.directory} (needs"
                f" write access: SQLite creates {DATABASE_NAME}-wal and -shm there,"
                " even to read)\n",
            ),
        )


class RetryWithRunningBridgeTests(TestCase):
    async def test_retry_reaches_running_bridge(self) -> None:
        """
        The webhook fails once and the message is rescheduled an hour ahead;
        the webhook recovers; ``maillaser-spool retry --all``, the installed
        program, makes it due, and the running bridge delivers it within its
        spool poll interval.
        """
        command = installed_command()
        if not command.exists():
            raise SkipTest(f"maillaser-spool is not installed at {command}")
        receiver = WebhookReceiver()
        receiver.script(503)
        bridge = await start_bridge(
            self,
            receiver,
            retry_schedule=(3600.0,),
            webhook_max_retries=0,
        )
        directory = os.path.abspath(bridge.service.config.spool_dir)
        await bridge.send(simple_message("retry me"))
        [failed] = await wait(receiver.wait_for(1), 30)

        def rescheduled() -> bool:
            database = SpoolDatabase.open(directory, create=False, read_only=True)
            try:
                entries = database.entries("pending")
            finally:
                database.close()
            return [
                (e.rounds, (e.next_attempt_at or 0) > time.time() + 3000)
                for e in entries
            ] == [(1, True)]

        await poll(rescheduled, timeout=30)
        out, err, code = await wait(
            getProcessOutputAndValue(
                str(command),
                ["retry", "--all", "--spool-dir", directory],
                env=clean_environment(),
                reactor=reactor,
            ),
            30,
        )
        self.assertEqual(
            (out, err, code), (b"retried 1 pending message: due now\n", b"", 0)
        )
        started = time.monotonic()
        requests = await wait(receiver.wait_for(2), POLL_INTERVAL + 10)
        self.assertLess(time.monotonic() - started, POLL_INTERVAL + 10)
        delivered = requests[1]
        self.assertEqual(delivered.body, failed.body)
        self.assertEqual(delivered.headers["webhook-id"], failed.headers["webhook-id"])
        self.assertEqual(delivered.json()["subject"], "retry me")
        status = await spool_empty(bridge)
        self.assertEqual((status["pending"], status["dead"]), (0, 0))
