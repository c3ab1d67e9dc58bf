"""
``maillaser-spool``: look into the spool and replay dead letters.

The bridge keeps every message it could not deliver; this is how an operator
sees them and sends them again once the receiver is fixed.  It works on the
database directly, with no reactor, and is safe while the bridge runs.  It
never creates a spool: a mistyped path is an error, not a new empty spool.

Exit status: 0 success, 1 operational error (no spool, database error),
2 usage error, 3 no such message (or not in the state the command needs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import redirect_stderr, redirect_stdout
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import TextIO

import attrs

from maillaser.config import Config
from maillaser.spool import (
    MessageNotFound,
    SpoolDatabase,
    SpoolEntry,
    SpoolError,
    State,
)

PROG = "maillaser-spool"
DEFAULT_SPOOL_DIR = str(attrs.fields(Config).spool_dir.default)
LAST_ERROR_WIDTH = 40

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NOT_FOUND = 3

_FOLD = re.compile(r"\r?\n(?=[ \t])")


def main(argv: list[str] | None = None) -> int:
    """The console script: C{sys.argv}, the real streams, the real time."""
    return run(
        sys.argv[1:] if argv is None else argv,
        out=sys.stdout,
        err=sys.stderr,
        now=time.time(),
        environ=os.environ,
    )


def run(
    argv: Sequence[str],
    *,
    out: TextIO,
    err: TextIO,
    now: float,
    environ: Mapping[str, str],
) -> int:
    """Run one command; everything it depends on is passed in, for tests."""
    parser = _parser(environ.get("MAIL_LASER_SPOOL_DIR") or DEFAULT_SPOOL_DIR)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            arguments = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    command: Callable[[SpoolDatabase, argparse.Namespace, TextIO, float], int]
    command = arguments.command
    try:
        database = SpoolDatabase.open(arguments.spool_dir, create=False)
        try:
            return command(database, arguments, out, now)
        finally:
            database.close()
    except SpoolError as e:
        err.write(f"{PROG}: error: {e}\n")
        return EXIT_ERROR
    except MessageNotFound as e:
        err.write(f"{PROG}: {e}\n")
        return EXIT_NOT_FOUND


def _parser(default_spool_dir: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect and replay the MailLaser spool."
    )
    parser.add_argument(
        "--spool-dir",
        default=default_spool_dir,
        help="the spool directory (default: $MAIL_LASER_SPOOL_DIR or %(default)s)",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    listing = commands.add_parser("list", help="list spooled messages")
    which = listing.add_mutually_exclusive_group()
    for state in ("pending", "dead"):
        which.add_argument(
            f"--{state}",
            dest="state",
            action="store_const",
            const=state,
            help=f"only {state} messages",
        )
    which.add_argument(
        "--all", dest="state", action="store_const", const=None, help="every message"
    )
    listing.add_argument("--json", action="store_true", help="one JSON object a line")
    listing.set_defaults(command=_list, state=None)

    show = commands.add_parser("show", help="show one message")
    show.add_argument("id")
    show.add_argument(
        "--raw",
        action="store_true",
        help="write the exact message bytes, body included",
    )
    show.set_defaults(command=_show)

    requeue = commands.add_parser("requeue", help="deliver dead messages again")
    target = requeue.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?", help="the dead message to requeue")
    target.add_argument("--all-dead", action="store_true", help="every dead message")
    requeue.set_defaults(command=_requeue)

    stats = commands.add_parser(
        "stats", help="count messages: pending, dead, and kept for their links"
    )
    stats.add_argument("--json", action="store_true", help="one JSON object")
    stats.set_defaults(command=_stats)

    purge = commands.add_parser("purge", help="delete one dead message for good")
    purge.add_argument("id")
    purge.set_defaults(command=_purge)
    return parser


def _list(
    database: SpoolDatabase, arguments: argparse.Namespace, out: TextIO, now: float
) -> int:
    state: State | None = arguments.state
    entries = database.entries(state)
    if arguments.json:
        for entry in entries:
            out.write(json.dumps(_as_json(entry), ensure_ascii=False) + "\n")
    elif entries:
        _write_table(out, [_row(entry, now) for entry in entries])
    else:
        out.write(f"no {f'{state} ' if state else ''}messages in the spool\n")
    return EXIT_OK


def _stats(
    database: SpoolDatabase, arguments: argparse.Namespace, out: TextIO, now: float
) -> int:
    """
    What the spool holds; C{retained} are delivered messages kept until
    the attachment links of their payloads expire.
    """
    counts = database.counts()
    if arguments.json:
        out.write(json.dumps(attrs.asdict(counts)) + "\n")
        return EXIT_OK
    out.write(
        f"pending   {counts.pending} ({format_size(counts.bytes)})\n"
        f"dead      {counts.dead}\n"
        f"retained  {counts.retained} ({format_size(counts.retained_bytes)})\n"
    )
    return EXIT_OK


def _as_json(entry: SpoolEntry) -> dict[str, object]:
    return {
        "id": entry.id,
        "state": entry.state,
        "sender": entry.envelope.sender,
        "recipients": list(entry.envelope.recipients),
        "helo": entry.envelope.helo,
        "peer": entry.envelope.peer,
        "size": entry.size,
        "received_at": entry.received_at,
        "rounds": entry.rounds,
        "attempts": entry.attempts,
        "next_attempt_at": entry.next_attempt_at,
        "last_error": entry.last_error,
        "dead_at": entry.dead_at,
    }


_COLUMNS = ("ID", "STATE", "AGE", "ATTEMPTS", "SIZE", "NEXT", "LAST ERROR")
_RIGHT_ALIGNED = frozenset({"ATTEMPTS", "SIZE"})


def _row(entry: SpoolEntry, now: float) -> tuple[str, ...]:
    return (
        entry.id,
        entry.state,
        format_duration(now - entry.received_at),
        str(entry.attempts),
        format_size(entry.size),
        _next(entry, now),
        _truncate(_printable(" ".join(entry.last_error.split())), LAST_ERROR_WIDTH),
    )


def _write_table(out: TextIO, rows: list[tuple[str, ...]]) -> None:
    widths = [
        max(len(cell) for cell in column)
        for column in zip(_COLUMNS, *rows, strict=True)
    ]
    for row in (_COLUMNS, *rows):
        cells = [
            cell.rjust(width) if name in _RIGHT_ALIGNED else cell.ljust(width)
            for name, cell, width in zip(_COLUMNS, row, widths, strict=True)
        ]
        out.write("  ".join(cells).rstrip() + "\n")


def _next(entry: SpoolEntry, now: float) -> str:
    if entry.next_attempt_at is None:
        return "-"
    if entry.next_attempt_at <= now:
        return "due"
    return f"in {format_duration(entry.next_attempt_at - now)}"


def format_duration(seconds: float) -> str:
    """Two units at most, like C{3m12s}, C{2h05m} or C{4d1h}."""
    total = max(0, int(seconds))
    for big, big_name, small, small_name, width in (
        (86400, "d", 3600, "h", 1),
        (3600, "h", 60, "m", 2),
        (60, "m", 1, "s", 2),
    ):
        if total >= big:
            high, rest = divmod(total, big)
            low = rest // small
            return (
                f"{high}{big_name}{low:0{width}d}{small_name}"
                if low
                else f"{high}{big_name}"
            )
    return f"{total}s"


def format_size(size: int) -> str:
    """Bytes as C{512B}, C{1.2K}, C{3.4M}."""
    if size < 1024:
        return f"{size}B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f}K"
    return f"{size / (1024 * 1024):.1f}M"


def _truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _printable(text: str) -> str:
    """
    Escape control characters: senders, headers and errors come from the
    network, and must not drive the operator's terminal.
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _timestamp(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _show(
    database: SpoolDatabase, arguments: argparse.Namespace, out: TextIO, now: float
) -> int:
    if arguments.raw:
        raw = database.raw(arguments.id)
        out.flush()
        out.buffer.write(raw)
        out.buffer.flush()
        return EXIT_OK
    entry = database.entry(arguments.id)
    envelope = entry.envelope
    fields = [
        ("id", entry.id),
        ("state", entry.state),
        ("sender", f"<{envelope.sender}>"),
        ("recipients", ", ".join(envelope.recipients)),
        ("helo", envelope.helo),
        ("peer", envelope.peer),
        (
            "received",
            f"{_timestamp(entry.received_at)}"
            f" ({format_duration(now - entry.received_at)} ago)",
        ),
        ("size", f"{entry.size} bytes"),
        ("rounds", str(entry.rounds)),
        ("attempts", str(entry.attempts)),
        (
            ("dead since", _timestamp(entry.dead_at))
            if entry.dead_at is not None
            else ("next attempt", _next(entry, now))
        ),
        ("last error", entry.last_error),
    ]
    for name, value in fields:
        out.write(f"{name + ':':<14}{_printable(value)}".rstrip() + "\n")
    out.write("\nheaders:\n")
    headers = BytesHeaderParser(policy=compat32).parsebytes(database.raw(entry.id))
    for name, value in headers.raw_items():
        out.write(
            f"  {_printable(_header_text(name))}: {_printable(_header_text(value))}\n"
        )
    attempts = database.attempts(entry.id)
    out.write("\nrecorded attempts:\n" if attempts else "\nrecorded attempts: none\n")
    for attempt in attempts:
        status = "-" if attempt.status is None else str(attempt.status)
        out.write(
            f"  {_timestamp(attempt.at)}  {status:>3}  {_printable(attempt.error)}\n"
        )
    return EXIT_OK


def _header_text(text: str) -> str:
    """
    Unfold a header and decode the 8-bit bytes compat32 kept as surrogates,
    for display only.
    """
    unfolded = _FOLD.sub("", text).rstrip("\r\n")
    return unfolded.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _requeue(
    database: SpoolDatabase, arguments: argparse.Namespace, out: TextIO, now: float
) -> int:
    with database.transaction():
        count = database.requeue(None if arguments.all_dead else arguments.id, now)
    if arguments.all_dead:
        out.write(f"requeued {count} dead messages\n")
    else:
        out.write(f"requeued {arguments.id}\n")
    return EXIT_OK


def _purge(
    database: SpoolDatabase, arguments: argparse.Namespace, out: TextIO, now: float
) -> int:
    with database.transaction():
        database.delete(arguments.id, "dead")
    out.write(f"purged {arguments.id}\n")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
