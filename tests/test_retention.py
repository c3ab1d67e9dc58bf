"""
What attachment links need from the spool and the configuration: a
delivered message kept until its links expire (then swept, on a
C{Clock}), the schema migration, C{maillaser-spool stats}, and the
settings that turn links on, with their start-up checks.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3

import pytest
from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface.verify import verifyObject

from maillaser.config import Config, link_base
from maillaser.health import DeliveryMetrics
from maillaser.interfaces import ISpool
from maillaser.message import Attempt, SpoolStats
from maillaser.spool import DATABASE_NAME, SWEEP_INTERVAL, RetentionSweep
from maillaser.spool.admin import run
from maillaser.testing import MemorySpool
from maillaser.worker import (
    ChildError,
    ChildTimeout,
    DeliveryWorker,
    PartNotFound,
    PartUnavailable,
)
from tests.test_attachments import CORPUS
from tests.test_config import env, error, label, load
from tests.test_metrics import samples
from tests.test_spool import PostgresCase, SpoolCase, message
from tests.test_worker_front import config
from tests.test_worker_server import WorkerTestCase

DONE = [Attempt(1000.0, 200)]


class RetainedTests(SpoolCase):
    def test_kept_until_expiry_then_swept(self) -> None:
        spool = self.open()
        self.assertTrue(verifyObject(ISpool, spool))
        self.done(spool.add(message("msg_1", raw=b"one")))
        self.done(spool.add(message("msg_2", raw=b"two!")))
        self.done(spool.delivered("msg_1", DONE, keep_until=5000.0))
        self.done(spool.delivered("msg_2", DONE))
        self.assertEqual(spool.stats(), SpoolStats(retained=1, retained_bytes=3))
        self.assertEqual(self.done(spool.retained_raw("msg_1", 4999.0)), b"one")
        self.assertIsNone(self.done(spool.retained_raw("msg_1", 5000.0)))
        self.assertIsNone(self.done(spool.retained_raw("msg_2", 0.0)))
        self.assertEqual(self.database().counts(), spool.stats())
        sweep = RetentionSweep(spool, self.clock)
        self.clock.advance(4000 - SWEEP_INTERVAL)
        sweep.start()
        self.turn()
        self.assertEqual(spool.stats().retained, 1)
        self.clock.advance(SWEEP_INTERVAL)  # 4000: not yet
        self.assertEqual(spool.stats().retained, 1)
        self.clock.advance(1000)  # past 5000, on the next sweep
        self.turn()
        self.assertEqual(spool.stats(), SpoolStats())
        self.assertEqual(self.database().counts(), SpoolStats())
        sweep.stop()

    def test_pending_and_dead_serve_too(self) -> None:
        """A link works before its message is delivered, or after it died."""
        spool = self.open()
        self.done(spool.add(message("msg_1", raw=b"one")))
        self.assertEqual(self.done(spool.retained_raw("msg_1", 0.0)), b"one")
        self.done(spool.bury("msg_1", DONE))
        self.assertEqual(self.done(spool.retained_raw("msg_1", 0.0)), b"one")

    def test_kept_in_the_delivering_transaction(self) -> None:
        spool = self.open()
        self.done(spool.add(message("msg_1", raw=b"one")))
        commits = spool.commits
        self.done(spool.delivered("msg_1", DONE, keep_until=10.0))
        self.assertEqual(spool.commits, commits + 1)

    def test_migrated_from_version_2(self) -> None:
        """A spool from before links (version 2) gains the table, once."""
        self.open().close()
        old = sqlite3.connect(os.path.join(self.directory, DATABASE_NAME))
        old.execute("DROP TABLE retained")
        old.execute("PRAGMA user_version = 2")
        old.commit()
        old.close()
        spool = self.open()
        self.done(spool.add(message("msg_1", raw=b"one")))
        self.done(spool.delivered("msg_1", DONE, keep_until=10.0))
        self.assertEqual(spool.stats().retained, 1)
        check = sqlite3.connect(os.path.join(self.directory, DATABASE_NAME))
        self.addCleanup(check.close)
        self.assertEqual(check.execute("PRAGMA user_version").fetchone(), (3,))

    def test_admin_stats(self) -> None:
        spool = self.open()
        self.done(spool.add(message("msg_1", raw=b"x" * 2048)))
        self.done(spool.add(message("msg_2", raw=b"two")))
        self.done(spool.delivered("msg_1", DONE, keep_until=10.0))
        out, err = io.StringIO(), io.StringIO()
        argv = [*self.location, "stats", "--json"]
        self.assertEqual(run(argv, out=out, err=err, now=0.0, environ={}), 0)
        self.assertEqual(
            json.loads(out.getvalue()),
            {
                "pending": 1,
                "due": 0,
                "dead": 0,
                "bytes": 3,
                "oldest_pending_received_at": 1000.0,
                "retained": 1,
                "retained_bytes": 2048,
            },
        )
        out = io.StringIO()
        run(argv[:-1], out=out, err=err, now=0.0, environ={})
        self.assertEqual(
            out.getvalue().splitlines()[-1].split()[:2], ["retained:", "1"]
        )


@pytest.mark.usefixtures("postgres_url")
class SharedRetainedTests(PostgresCase, RetainedTests):
    """The same on a shared spool."""

    def test_migrated_from_version_2(self) -> None:
        raise SkipTest("a SQLite spool's migration")


class MemorySpoolTests(SynchronousTestCase):
    def test_keeps_like_the_real_one(self) -> None:
        spool = MemorySpool()
        self.assertTrue(verifyObject(ISpool, spool))
        spool.add(message("msg_1", raw=b"one"))
        spool.delivered("msg_1", DONE, keep_until=10.0)
        self.assertEqual(spool.stats(), SpoolStats(retained=1, retained_bytes=3))
        self.assertEqual(self.successResultOf(spool.retained_raw("msg_1", 9.0)), b"one")
        self.assertEqual(self.successResultOf(spool.expire_retained(10.0)), 1)
        self.assertIsNone(self.successResultOf(spool.retained_raw("msg_1", 9.0)))


SECRET = "whsec_" + "c2VjcmV0c2VjcmV0c2VjcmV0"


def link_settings(config: Config) -> tuple[object, ...]:
    """The settings of attachments, links and the raw message."""
    return (
        config.attachments,
        config.attachment_inline_max,
        config.attachment_link_ttl,
        config.include_raw,
        config.webhook_max_body,
        config.public_url,
    )


class SettingsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        config = load()
        self.assertEqual(
            link_settings(config),
            ("inline", 1024 * 1024, 7 * 86400.0, False, 25 * 1024 * 1024, None),
        )

    def test_values(self) -> None:
        config = load(
            {
                env("attachments"): "LINK",
                env("webhook-secret"): SECRET,
                env("attachment-inline-max"): "0",
                env("attachment-link-ttl"): "36h",
                env("include-raw"): "yes",
                env("webhook-max-body"): "65536",
                env("public-url"): "https://mx.example.com/maillaser/",
            }
        )
        self.assertEqual(
            link_settings(config),
            ("link", 0, 36 * 3600.0, True, 65536, "https://mx.example.com/maillaser"),
        )

    def test_link_needs_a_secret_a_spool_and_an_address(self) -> None:
        self.assertEqual(
            error({env("attachments"): "link"}),
            f"{label('attachments')}: link needs MAIL_LASER_WEBHOOK_SECRET"
            " (links are signed)",
        )
        self.assertEqual(
            error(
                {
                    env("attachments"): "link",
                    env("webhook-secret"): SECRET,
                    env("delivery-mode"): "sync",
                }
            ),
            f"{label('attachments')}: link needs delivery mode queue"
            " (links are served from the spool)",
        )
        self.assertEqual(
            error(
                {env("attachments"): "link", env("webhook-secret"): SECRET},
                {"health": "unix:/tmp/health.sock"},
            ),
            f"{label('attachments')}: link needs MAIL_LASER_PUBLIC_URL with this"
            " --health",
        )

    def test_bad_values(self) -> None:
        for option, text, reason in [
            ("attachments", "all", "'all' is not one of inline, link, metadata"),
            ("include-raw", "maybe", "'maybe' is not one of True, False"),
            ("webhook-max-body", "1000", "must be at least 65536, got '1000'"),
            ("attachment-link-ttl", "0d", "must be greater than 0, got '0d'"),
            (
                "public-url",
                "https://h/x?token=1",
                "must have no user, query or fragment",
            ),
        ]:
            with self.subTest(option=option):
                self.assertEqual(
                    error({env(option): text}), f"{label(option)}: {reason}"
                )

    def test_link_base(self) -> None:
        def base(**fields: object) -> str | None:
            return link_base(
                Config(target_emails=("a@b.c",), webhook_url="http://h/", **fields)  # type: ignore[arg-type]
            )

        self.assertEqual(base(), "http://localhost:8080")
        self.assertEqual(
            base(health_endpoint="tcp:9090:interface=10.0.0.5"), "http://10.0.0.5:9090"
        )
        self.assertEqual(
            base(health_endpoint="tcp6:9090:interface=\\:\\:1"), "http://[::1]:9090"
        )
        self.assertEqual(base(health_endpoint="unix:/x"), None)
        self.assertEqual(
            base(health_endpoint="unix:/x", public_url="https://p"), "https://p"
        )


class FetchPartTests(WorkerTestCase):
    """L{FetchPart}, from the front's C{fetch_part} to the worker's spool."""

    def test_from_the_spool(self) -> None:
        worker = self.front()
        raw = (CORPUS / "attach-related.eml").read_bytes()
        self.spool.add(message("msg_1", raw=raw))
        d = worker.fetch_part("msg_1", "1")
        self.pump()
        self.assertEqual(
            self.successResultOf(d),
            {
                "content_type": "text/plain",
                "filename": "notes.txt",
                "data": b"caf\xc3\xa9 notes",
            },
        )
        for message_id, index in [("msg_1", "2"), ("msg_2", "0")]:
            d = worker.fetch_part(message_id, index)
            self.pump()
            self.failureResultOf(d, PartNotFound)

    def test_a_payload_process_that_fails(self) -> None:
        worker = self.front()
        self.spool.add(message("msg_1", raw=b"x" * 100_000))
        [stack] = self.stacks
        stack.payloads.part = lambda raw, index: fail(ChildTimeout("late"))  # type: ignore[method-assign]
        d = worker.fetch_part("msg_1", "0")
        self.pump()
        self.failureResultOf(d, PartUnavailable)

    def test_not_ready(self) -> None:
        worker = DeliveryWorker(config(), self.reactor)
        self.failureResultOf(worker.fetch_part("msg_1", "0"), ChildError)


class MetricsTests(SynchronousTestCase):
    def test_retained_gauges(self) -> None:
        stats = SpoolStats(pending=1, retained=3, retained_bytes=4096)
        metrics = DeliveryMetrics(
            clock=Clock(), breaker_state=lambda: "closed", spool_stats=lambda: stats
        )
        self.assertEqual(
            samples(
                metrics.text(),
                "maillaser_spool_retained_messages",
                "maillaser_spool_retained_bytes",
            ),
            {
                "maillaser_spool_retained_messages": 3,
                "maillaser_spool_retained_bytes": 4096,
            },
        )
