"""
The benchmark is not a test, but it must not rot: run it with tiny N
(``bench/run.py --quick``) and check that it ran end to end and lost nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120.0
"""A quick run takes a few seconds; this only keeps a hung run from hanging CI."""


def smtp_source() -> str | None:
    found = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    return found if os.access(found, os.X_OK) else None


class QuickBenchmarkTests(SynchronousTestCase):
    def test_quick_run_loses_nothing(self) -> None:
        if smtp_source() is None:
            raise SkipTest("smtp-source is not installed (Debian package postfix)")
        output = Path(self.mktemp()).with_suffix(".json")
        script = ROOT / "bench" / "run.py"
        finished = subprocess.run(
            [sys.executable, str(script), "--quick", "--output", str(output)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        self.assertEqual(finished.returncode, 0, finished.stdout + finished.stderr)
        self.assertIn("messages lost: 0; smtp-source failures: 0\n", finished.stdout)
        [run] = json.loads(output.read_text())["runs"]
        self.assertEqual(
            {key: run[key] for key in ("corpus", "mode", "messages", "sessions")},
            {"corpus": "small-plain", "mode": "queue", "messages": 20, "sessions": 2},
        )
        self.assertEqual(
            {key: run[key] for key in ("sent", "received", "lost", "failed")},
            {"sent": 20, "received": 20, "lost": 0, "failed": 0},
        )
        self.assertEqual(run["spool_depth_after"], 0)
        # The stall probe held its own SMTP session throughout.
        self.assertGreater(run["stall"]["probes"], 0)
        self.assertEqual(run["stall"]["errors"], 0)
