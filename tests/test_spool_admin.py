"""
Tests for L{maillaser.spool.admin}, the C{maillaser-spool} command, run
against real spools on disk.
"""

from __future__ import annotations

import io
import json
import os
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
from maillaser.spool.admin import format_duration, format_size, main, run
from tests.helpers import wait
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
