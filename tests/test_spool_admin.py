"""
Tests for L{maillaser.spool_admin}, the C{maillaser-spool} command, run
against real spools on disk.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Mapping

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

import maillaser
from maillaser.message import Attempt, Envelope, Message, QueuedMessage, SpoolStats
from maillaser.spool import DATABASE_NAME, SpoolDatabase, SqliteSpool
from maillaser.spool_admin import format_duration, format_size, main, run
from tests.doubles import stored

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
    return stored(ENVELOPE, id, received_at, raw)


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

    def make_spool(self) -> None:
        """
        msg_a: pending, failed one round, next try in 5 minutes;
        msg_b: pending, never tried; msg_c: dead after two attempts.
        """
        database = SpoolDatabase.open(self.directory, create=True)
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
            argv = ("--spool-dir", self.directory, *argv)
        code = run(argv, out=out.text, err=err, now=NOW, environ=environ or {})
        return code, out.value().decode("utf-8"), err.getvalue()

    def entry_state(self, id: str) -> tuple[str, int, float | None]:
        database = SpoolDatabase.open(self.directory, create=False)
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
        SpoolDatabase.open(self.directory, create=True).close()
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
            ["--spool-dir", self.directory, "show", "msg_a", "--raw"],
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
        database = SpoolDatabase.open(self.directory, create=False)
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
        self.assertEqual(main(["--spool-dir", self.directory, "requeue", "msg_zzz"]), 3)
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


class SpoolAdminProcessTests(TestCase):
    async def test_requeue_while_server_runs(self) -> None:
        """
        The installed command, as a real process, replays a dead letter while
        the bridge holds the spool open; the bridge sees it after refresh().
        """
        directory = os.path.abspath(os.path.join(self.mktemp(), "spool"))
        spool = await SqliteSpool.open(directory, reactor)
        self.addCleanup(spool.close)
        await spool.add(message("msg_dead", 10.0))
        await spool.bury("msg_dead", [Attempt(11.0, 400, "HTTP 400")])

        root = os.path.dirname(os.path.dirname(os.path.abspath(maillaser.__file__)))
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [
                "-m",
                "maillaser.spool_admin",
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
