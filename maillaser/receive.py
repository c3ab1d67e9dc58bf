"""
``maillaser-receive``: a webhook receiver to try the bridge with.

A new user's first question is what MailLaser sends; this answers it in the
first minute, with no code and no third-party service: point the bridge at
it, send a message, and the payload is printed, with whether its Standard
Webhooks signature verifies against the secret given (so a secret can be
checked before the real receiver is written).  It is
L{maillaser.testing.WebhookReceiver}, the receiver of MailLaser's own tests,
run as a program.

It is for trying things out on a trusted network: it answers every request
(C{204} by default; C{--status} makes it fail on purpose, to watch the
bridge retry), keeps nothing, and prints whatever it is sent.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import react

from maillaser.terminal import printable
from maillaser.testing import ReceivedRequest, Reply, WebhookReceiver
from maillaser.webhook import VerificationError, parse_secret, verify

PROG = "maillaser-receive"


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: runs until Ctrl-C or SIGTERM, then exits 0."""
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    react(lambda reactor: Deferred.fromCoroutine(_run(reactor, arguments)))


async def _run(reactor: Any, arguments: argparse.Namespace) -> None:
    # react() calls us before the reactor runs, and the reactor installs its
    # SIGTERM handler only then: listen (and say so) once it runs, so that a
    # SIGTERM sent right after the listening line ends us cleanly.
    running: Deferred[None] = Deferred()
    reactor.callWhenRunning(running.callback, None)
    await running
    try:
        receiver = await listen(reactor, arguments, sys.stdout)
    except CannotListenError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        raise SystemExit(1) from None
    reactor.addSystemEventTrigger("before", "shutdown", receiver.stop)
    await Deferred()  # until the reactor stops: Ctrl-C or SIGTERM


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Print the webhook requests MailLaser sends, and whether"
        " their signatures verify.",
    )
    parser.add_argument(
        "--port", type=int, default=9000, help="port to listen on (0: any free port)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (%(default)s)"
    )
    parser.add_argument(
        "--secret",
        action="append",
        default=[],
        help="whsec_ secret to verify signatures with; repeatable, as during"
        " a rotation (default: signatures are not checked)",
    )
    parser.add_argument(
        "--status",
        type=int,
        default=204,
        help="HTTP status to answer, e.g. 503 to watch the bridge retry (%(default)s)",
    )
    arguments = parser.parse_args(argv)
    arguments.secret = [s for value in arguments.secret for s in value.split()]
    for secret in arguments.secret:
        try:
            parse_secret(secret)
        except ValueError as e:
            parser.error(str(e))
    if not 0 <= arguments.port <= 65535:
        parser.error(f"--port {arguments.port} is not a TCP port")
    if not 200 <= arguments.status <= 599:
        parser.error(f"--status {arguments.status} is not an HTTP status")
    return arguments


async def listen(
    reactor: Any, arguments: argparse.Namespace, out: TextIO
) -> WebhookReceiver:
    """Start printing every request to C{out}; returns the receiver, to stop it."""
    receiver = WebhookReceiver(
        Reply(arguments.status),
        on_request=lambda request: print_request(
            out, request, arguments.secret, reactor
        ),
        record=False,
    )
    host = arguments.host.replace(":", "\\:")
    await receiver.listen(reactor, f"tcp:{arguments.port}:interface={host}")
    checking = "verifying signatures" if arguments.secret else "no --secret"
    out.write(f"{PROG}: listening on {receiver.url} ({checking}); Ctrl-C stops\n\n")
    out.flush()
    return receiver


def print_request(
    out: TextIO, request: ReceivedRequest, secrets: Sequence[str], clock: IReactorTime
) -> None:
    """One request: the signature's verdict, its id and its body, then a blank line."""
    lines = [
        f"{request.method} {request.path}",
        f"signature: {signature_verdict(request, secrets, clock)}",
        f"webhook-id: {request.headers.get('webhook-id', '(none)')}",
        pretty_body(request.body),
    ]
    out.write("".join(printable(line, keep="\n\t") + "\n" for line in lines) + "\n")
    out.flush()


def signature_verdict(
    request: ReceivedRequest, secrets: Sequence[str], clock: IReactorTime
) -> str:
    if not secrets:
        return "not checked (no --secret)"
    try:
        verify(secrets, request.headers, request.body, now=clock.seconds())
    except VerificationError as e:
        return f"INVALID ({e})"
    return "valid"


def pretty_body(body: bytes) -> str:
    """The JSON indented, as MailLaser sends it; anything else as text."""
    try:
        return json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except ValueError:
        return body.decode("utf-8", "replace")


if __name__ == "__main__":
    main()
