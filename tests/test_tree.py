"""
A test run leaves nothing in the tree (see L{tests.conftest}).
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent


class TreeTests(SynchronousTestCase):
    def test_mktemp_is_outside_the_tree(self) -> None:
        """Trial's temporary paths, relative to the working directory."""
        made = Path(self.mktemp()).resolve()
        self.assertFalse(made.is_relative_to(ROOT), made)

    def test_working_directory_is_outside_the_tree(self) -> None:
        """Where a runner started without --logfile or --pidfile= writes."""
        self.assertFalse(Path(os.getcwd()).resolve().is_relative_to(ROOT))
