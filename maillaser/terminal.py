"""
Text from the network, made safe to print on an operator's terminal.

The command-line tools print what senders and receivers chose (headers,
errors, request bodies); an escape sequence among them must not drive the
terminal.
"""

from __future__ import annotations


def printable(text: str, keep: str = "") -> str:
    """Control characters (but those in C{keep}) escaped as Python writes them."""
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)


__all__ = ["printable"]
