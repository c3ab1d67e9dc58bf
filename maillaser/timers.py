"""
A deadline that a Deferred can end early.
"""

from __future__ import annotations

from typing import TypeVar

from twisted.internet.interfaces import IDelayedCall

_T = TypeVar("_T")


def cancel_timer(result: _T, timer: IDelayedCall) -> _T:
    """
    For C{addBoth}: the Deferred fired, so C{timer}, which was to act had
    it not, is no longer needed; C{result} passes on unchanged.
    """
    if timer.active():
        timer.cancel()
    return result


__all__ = ["cancel_timer"]
