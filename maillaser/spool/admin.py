"""
``maillaser-spool``: look into the spool, hurry pending messages along and
replay dead letters.

The bridge keeps every message it has not delivered yet, and every one it
gave up on; this is how an operator sees them and sends them again once the
receiver is fixed.  It works on the database directly, with no reactor, and
is safe while the bridge runs: the bridge's delivery worker looks at the
spool at least every few seconds (L{maillaser.spool.Dispatcher}'s
C{POLL_INTERVAL}), so what this tool makes due is delivered within that
time, as the circuit breaker allows.  It never creates a spool: a mistyped
path is an error, not a new empty spool.

Two ways to send a message again, by its state:

  - C{retry} takes I{pending} messages: they are due now instead of at
    their scheduled time, and keep their rounds, so their retry schedule
    goes on where it was (and still ends among the dead letters);
  - C{requeue} takes I{dead} messages: they are pending again, due now,
    with a fresh retry schedule.

The commands that only read (C{list}, C{show}, C{stats}) open the spool
read-only, so they work for a user who may read the spool but not write it.

Exit status: 0 success, 1 operational error (no spool, permission denied,
database error), 2 usage error, 3 no such message (or not in the state the
command needs), 141 (as for SIGPIPE) when the reader of the output went
away, as in C{list | head -1}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import redirect_stderr, redirect_stdout
from datetime import UTC, datetime
from typing import Any, TextIO, cast

import attrs

from maillaser.config import Config
from maillaser.spool import (
    MessageNotFound,
    PostgresDatabase,
    SpoolDatabase,
    SpoolEntry,
    SpoolError,
    State,
)
from maillaser.terminal import printable

PROG = "maillaser-spool"
DEFAULT_SPOOL_DIR = str(attrs.fields(Config).spool_dir.default)
LAST_ERROR_WIDTH = 40

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NOT_FOUND = 3
EXIT_PIPE = 128 + signal.SIGPIPE
"""What a shell reports for a program killed by C{SIGPIPE}, as C{yes | head}."""

Command = Callable[[SpoolDatabase, argparse.Namespace, TextIO, float], int]


def main(argv: list[str] | None = None) -> int:
    """The console script: C{sys.argv}, the real streams, the real time."""
    try:
        code = run(
            sys.argv[1:] if argv is None else argv,
            out=sys.stdout,
            err=sys.stderr,
            now=time.time(),
            environ=os.environ,
        )
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``list | head -1``): stop quietly, as Unix
        # tools do.  Standard output now goes nowhere, so the interpreter's
        # last flush at exit cannot fail again and print a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_PIPE
    return code


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
    parser.set_defaults(spool_url=environ.get("MAIL_LASER_SPOOL_URL") or None)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            arguments = parser.parse_args(argv)
            if arguments.json and not arguments.has_json:
                arguments.parser.error("--json applies to list, show and stats only")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    command: Command = arguments.command
    try:
        database = open_spool(arguments)
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


def open_spool(arguments: argparse.Namespace) -> SpoolDatabase:
    """
    The spool the options name: the one place that opens it, read-only for
    the commands that only read.  A shared spool's URL wins over the
    directory; the commands call the same methods on either database.
    """
    if arguments.spool_url:
        shared: Any = PostgresDatabase.open(arguments.spool_url, create=False)
        return cast(SpoolDatabase, shared)
    return SpoolDatabase.open(
        arguments.spool_dir, create=False, read_only=arguments.read_only
    )


def _common_options(
    parser: argparse.ArgumentParser, default_spool_dir: str | None
) -> None:
    """
    The options every command takes, before or after its name.  After it
    (C{default_spool_dir} is C{None}) they have no default, so they cannot
    undo the same option given before.
    """
    before = default_spool_dir is not None
    parser.add_argument(
        "--spool-dir",
        default=default_spool_dir if before else argparse.SUPPRESS,
        help="the spool directory (default: $MAIL_LASER_SPOOL_DIR or"
        f" {default_spool_dir if before else 'as given before the command'})",
    )
    parser.add_argument(
        "--spool-url",
        default=None if before else argparse.SUPPRESS,
        help="the shared spool's postgresql:// URL, instead of a directory"
        " (default: $MAIL_LASER_SPOOL_URL)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if before else argparse.SUPPRESS,
        help="JSON output (list: one object a line; show, stats: one object)",
    )


def _parser(default_spool_dir: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect, retry and replay the MailLaser spool."
    )
    _common_options(parser, default_spool_dir)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(
        name: str,
        run: Command,
        help: str,
        *,
        read_only: bool = False,
        json: bool = False,
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        _common_options(sub, None)
        sub.set_defaults(command=run, read_only=read_only, has_json=json, parser=sub)
        return sub

    listing = command("list", _list, "list spooled messages", read_only=True, json=True)
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
    listing.set_defaults(state=None)

    show = command("show", _show, "show one message", read_only=True, json=True)
    show.add_argument("id")
    show.add_argument(
        "--raw",
        action="store_true",
        help="write the exact message bytes, body included",
    )

    command(
        "stats",
        _stats,
        "count pending, dead and kept messages",
        read_only=True,
        json=True,
    )

    retry = command(
        "retry",
        _retry,
        "make pending messages due now; they keep their retry schedule",
    )
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "ids", nargs="*", default=[], metavar="ID", help="a pending message"
    )
    target.add_argument("--all", action="store_true", help="every pending message")

    requeue = command(
        "requeue",
        _requeue,
        "make dead messages pending and due now, with a fresh retry schedule",
    )
    target = requeue.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?", help="the dead message to requeue")
    target.add_argument("--all-dead", action="store_true", help="every dead message")

    purge = command("purge", _purge, "delete one dead message for good")
    purge.add_argument("id")
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


def _as_json(entry: SpoolEntry) -> dict[str, object]:
    return {
        "id": entry.id,
        "state": entry.state,
        "sender": entry.envelope.sender,
        "recipients": list(entry.envelope.recipients),
        "helo": entry.envelope.helo,
        "peer": entry.envelope.peer,
        **_tls_json(entry),
        "size": entry.size,
        "received_at": entry.received_at,
        "rounds": entry.rounds,
        "attempts": entry.attempts,
        "next_attempt_at": entry.next_attempt_at,
        "last_error": entry.last_error,
        "dead_at": entry.dead_at,
    }


def _tls_json(entry: SpoolEntry) -> dict[str, object]:
    """The session's TLS, only when it had one: cleartext adds no key."""
    tls = entry.envelope.tls
    if tls is None:
        return {}
    return {"tls": {"version": tls.version, "cipher": tls.cipher}}


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
        _truncate(printable(" ".join(entry.last_error.split())), LAST_ERROR_WIDTH),
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
    headers = unfolded_headers(database.raw(entry.id))
    attempts = database.attempts(entry.id)
    if arguments.json:
        shown = {
            **_as_json(entry),
            "headers": headers,
            "recorded_attempts": [
                {"at": a.at, "status": a.status, "error": a.error} for a in attempts
            ],
        }
        out.write(json.dumps(shown, ensure_ascii=False, indent=2) + "\n")
        return EXIT_OK
    envelope = entry.envelope
    fields = [
        ("id", entry.id),
        ("state", entry.state),
        ("sender", f"<{envelope.sender}>"),
        ("recipients", ", ".join(envelope.recipients)),
        ("helo", envelope.helo),
        ("peer", envelope.peer),
        *(
            [("tls", f"{envelope.tls.version} {envelope.tls.cipher}")]
            if envelope.tls is not None
            else []
        ),
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
        out.write(f"{name + ':':<14}{printable(value)}".rstrip() + "\n")
    out.write("\nheaders:\n")
    for header in headers:
        # A tab is how many senders fold (Received:): it stays a tab.
        out.write(f"  {printable(header, keep=chr(9))}\n")
    out.write("\nrecorded attempts:\n" if attempts else "\nrecorded attempts: none\n")
    for attempt in attempts:
        status = "-" if attempt.status is None else str(attempt.status)
        out.write(
            f"  {_timestamp(attempt.at)}  {status:>3}  {printable(attempt.error)}\n"
        )
    return EXIT_OK


def unfolded_headers(raw: bytes) -> list[str]:
    """
    The header lines of a message as received, each unfolded onto one line
    (RFC 5322 2.2.3: a line end followed by a space or tab is removed, the
    space or tab kept), 8-bit bytes decoded as UTF-8 where they can be.

    The lines are the received text itself, not a parser's reading of it:
    an operator looking at a message that went wrong wants to see what came.
    """
    lines: list[bytes] = []
    start = 0
    while start < len(raw):
        end = raw.find(b"\n", start)
        line = raw[start : len(raw) if end < 0 else end].removesuffix(b"\r")
        start = len(raw) if end < 0 else end + 1
        if not line:
            break  # the blank line that ends the headers
        if lines and line[:1] in (b" ", b"\t"):
            lines[-1] += line
        else:
            lines.append(line)
    return [line.decode("utf-8", "replace") for line in lines]


def _stats(
    database: SpoolDatabase, arguments: argparse.Namespace, out: TextIO, now: float
) -> int:
    """
    What the spool holds; C{retained} are delivered messages kept until
    the attachment links of their payloads expire.
    """
    pending = database.entries("pending")
    counts = database.counts()
    due = sum(1 for e in pending if (e.next_attempt_at or 0) <= now)
    oldest = min((e.received_at for e in pending), default=None)
    if arguments.json:
        stats = {
            "pending": counts.pending,
            "due": due,
            "dead": counts.dead,
            "bytes": counts.bytes,
            "oldest_pending_received_at": oldest,
            "retained": counts.retained,
            "retained_bytes": counts.retained_bytes,
        }
        out.write(json.dumps(stats) + "\n")
        return EXIT_OK
    age = "-" if oldest is None else format_duration(now - oldest)
    out.write(
        f"pending: {counts.pending} ({due} due now), {format_size(counts.bytes)}\n"
        f"oldest pending: {age}\n"
        f"dead: {counts.dead}\n"
        f"retained: {counts.retained} (kept for attachment links),"
        f" {format_size(counts.retained_bytes)}\n"
    )
    return EXIT_OK


def _retry(
    database: SpoolDatabase, arguments: argparse.Namespace, out: TextIO, now: float
) -> int:
    if arguments.all:
        with database.transaction():
            count = database.retry(None, now)
        out.write(f"retried {_messages(count)}: due now\n")
        return EXIT_OK
    # Each id on its own: one delivered (or buried) meanwhile must not keep
    # the others waiting.
    missing: list[MessageNotFound] = []
    with database.transaction():
        for message_id in arguments.ids:
            try:
                database.retry(message_id, now)
            except MessageNotFound as e:
                missing.append(e)
    retried = len(arguments.ids) - len(missing)
    out.write(f"retried {_messages(retried)}: due now\n")
    if missing:
        raise MessageNotFound("; ".join(str(e) for e in missing))
    return EXIT_OK


def _messages(count: int) -> str:
    return f"{count} pending message{'' if count == 1 else 's'}"


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
