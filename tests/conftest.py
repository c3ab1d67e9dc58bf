"""
Every test runs in a directory of its own under pytest's C{tmp_path}.

Trial's C{mktemp} (used throughout, in C{TestCase}s) makes its directories
under the working directory, and a C{twistd} started without C{--logfile}
or C{--pidfile=} writes there too: run from a clone, the suite used to
leave C{tests.test_*} folders in the tree.  The session also fails if the
tree has gained such a folder anyway.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.postgres import postgres_cluster, postgres_server, postgres_url

__all__ = ["postgres_cluster", "postgres_server", "postgres_url"]

ROOT = Path(__file__).resolve().parent.parent
LITTER = ("tests.test_*", "_trial_temp*")


def litter() -> set[Path]:
    """What a test run must not leave in the tree."""
    return {path for pattern in LITTER for path in ROOT.glob(pattern)}


@pytest.fixture(autouse=True)
def _in_own_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


_BEFORE: set[Path] = set()


def pytest_sessionstart(session: pytest.Session) -> None:
    _BEFORE.update(litter())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = sorted(str(path) for path in litter() - _BEFORE)
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nthe test run left these in the tree: {', '.join(left)}")
