"""
Helpers for tests that use real sockets: smtplib as the client (in a
thread, since it blocks), a raw SMTP client that sends exactly the bytes it
is given, and waits that are event-driven and bounded.  The helpers that
run a whole bridge are in L{tests.bridge}.
"""

from __future__ import annotations

import re
import smtplib
import ssl
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any, TypeVar

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

TARGET = "target@example.com"

PAYLOAD_KEYS = (
    "sender",
    "sender_name",
    "recipient",
    "recipients",
    "subject",
    "body",
    "html_body",
    "headers",
    "message_id",
    "from",
    "to",
    "cc",
    "reply_to",
    "date",
    "in_reply_to",
    "references",
    "envelope",
    "header_list",
    "attachments",
    "raw",
    "raw_url",
    "parse_error",
)
"""Every key a payload may have, in the order the bridge sends them."""

SPEC_KEYS = (*PAYLOAD_KEYS[:9], "parse_error")
"""
The payload keys of SPEC §4 (and C{parse_error}), which tests written
before issue 13 assert exactly; the newer keys are asserted on their own.
"""


def spec_keys(payload: dict[str, Any]) -> dict[str, Any]:
    """C{payload} without the keys issue 13 added, in its order."""
    return {key: value for key, value in payload.items() if key in SPEC_KEYS}


LOOPBACK = "tcp:0:interface=127.0.0.1"

_T = TypeVar("_T")
_E = TypeVar("_E", bound=BaseException)

REPLY_LINE = re.compile(
    rb"^(?:"
    rb"220 mx\.test ESMTP MailLaser"  # the greeting
    rb"|250[ -](?:mx\.test|PIPELINING|SIZE [0-9]+|8BITMIME|SMTPUTF8"
    rb"|ENHANCEDSTATUSCODES|STARTTLS)"  # HELO and EHLO
    rb"|354 [\x20-\x7e]*"
    rb"|([245])[0-9][0-9][ -]\1\.[0-9]{1,3}\.[0-9]{1,3} [\x20-\x7e]*"
    rb")$"
)
"""
A well-formed reply line from a bridge named mx.test: every 2xx, 4xx and
5xx reply carries an enhanced status code of its own class (RFC 2034), but
for the greeting and the HELO/EHLO replies, which RFC 2034 exempts.
"""


def simple_message(
    subject: str = "Integration Test", body: str = "Hello!\n"
) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Sender Name <sender@test.com>"
    message["To"] = TARGET
    message["Subject"] = subject
    message.set_content(body)
    return message


def send_mail(
    port: int,
    message: EmailMessage | bytes,
    sender: str = "sender@test.com",
    recipients: tuple[str, ...] = (TARGET,),
    starttls: bool = False,
) -> dict[str, Any]:
    """
    Send one message with smtplib; return what the server answered.

    Returns C{{"code": int, "reply": bytes, "refused": dict}}; a refused
    DATA is reported, not raised, so tests can assert on the exact reply.
    """
    with smtplib.SMTP(
        "127.0.0.1", port, local_hostname="client.test", timeout=30
    ) as client:
        client.ehlo()
        if starttls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            client.starttls(context=context)
            client.ehlo()
        raw = message if isinstance(message, bytes) else message.as_bytes(policy=SMTP)
        code, reply = client.mail(sender)
        if code != 250:
            return {"code": code, "reply": reply, "refused": {}}
        refused = {}
        for recipient in recipients:
            rcode, rreply = client.rcpt(recipient)
            if rcode != 250:
                refused[recipient] = (rcode, rreply)
        if len(refused) == len(recipients):
            client.rset()
            return {"code": 554, "reply": b"all recipients refused", "refused": refused}
        code, reply = client.data(raw)
        return {"code": code, "reply": reply, "refused": refused}


async def poll(
    condition: Callable[[], bool], timeout: float = 10.0, step: float = 0.02
) -> None:
    """Wait until C{condition()} holds, or fail after C{timeout} seconds."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await deferLater(reactor, step)


async def wait(d: Awaitable[_T], timeout: float = 10.0) -> _T:
    """Await C{d}, failing the test if it takes longer than C{timeout}."""
    deferred = Deferred.fromCoroutine(_await(d)).addTimeout(timeout, reactor)
    return await deferred


async def _await(d: Awaitable[_T]) -> _T:
    return await d


async def failure_of(test: TestCase, d: Deferred[Any], expected: type[_E]) -> _E:
    """
    Await C{test.assertFailure(d, expected)}: the exception C{d} failed with.

    Twisted annotates what assertFailure fires with as C{d}'s result type,
    but it is the exception; this says so, and checks it.
    """
    error: object = await test.assertFailure(d, expected)
    assert isinstance(error, expected)
    return error


# Raw SMTP over loopback, for the hostile and interop tests (issue 4): a
# client that writes exactly the bytes a test gives it, which no client
# library would, and records every byte the server answers.


class RawClient(Protocol):
    """
    Bytes out exactly as given, bytes in as they come.

    Waits are event-driven and bounded: C{wait_for_replies} fails at once if
    the server closes first, and after C{timeout} seconds otherwise.
    """

    def __init__(self) -> None:
        self.received = bytearray()
        self.is_closed = False
        self._closed: Deferred[None] = Deferred()
        self._waiters: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._wake()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.is_closed = True
        self._wake()
        self._closed.callback(None)

    def lines(self) -> list[bytes]:
        """Every complete reply line so far, continuation lines included."""
        return bytes(self.received).split(b"\r\n")[:-1]

    def replies(self) -> list[bytes]:
        """Complete replies so far: the last line of each."""
        return [line for line in self.lines() if line[3:4] != b"-"]

    def send(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def wait_for_replies(
        self, count: int, timeout: float = 10.0
    ) -> Deferred[list[bytes]]:
        """Fires with C{replies()} once there are C{count} of them."""
        d = self._until(lambda: len(self.replies()) >= count, timeout)
        return d.addCallback(lambda _: self.replies())

    def wait_for_bytes(self, count: int, timeout: float = 10.0) -> Deferred[None]:
        return self._until(lambda: len(self.received) >= count, timeout)

    def wait_closed(self, timeout: float = 10.0) -> Deferred[None]:
        return self._until(lambda: self.is_closed, timeout)

    def abort(self) -> Deferred[None]:
        """Vanish (RST) unless already closed; fires once the socket is gone."""
        if not self.is_closed and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        return self.wait_closed()

    def _until(self, condition: Callable[[], bool], timeout: float) -> Deferred[None]:
        if condition():
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append((condition, d))
        d.addTimeout(timeout, reactor)
        d.addErrback(self._explain, timeout)
        self._wake()
        return d

    def _explain(self, failure: Failure, timeout: float) -> None:
        failure.trap(CancelledError, TimeoutError)
        raise AssertionError(
            f"no such reply within {timeout}s; got {bytes(self.received)[-2000:]!r}"
        )

    def _wake(self) -> None:
        for condition, d in list(self._waiters):
            if d.called:
                self._waiters.remove((condition, d))
            elif condition():
                self._waiters.remove((condition, d))
                d.callback(None)
            elif self.is_closed:
                self._waiters.remove((condition, d))
                d.errback(
                    AssertionError(
                        "server closed the connection first; got"
                        f" {bytes(self.received)[-2000:]!r}"
                    )
                )


async def connect_raw(
    test: Any, port: int, source: str = "127.0.0.1", greeting: bool = True
) -> RawClient:
    """
    Connect from C{source} (any 127/8 address works on Linux, which is how
    tests act as several clients); aborted when the test ends.  Waits for
    the greeting unless told not to.
    """
    endpoint = TCP4ClientEndpoint(
        reactor, "127.0.0.1", port, timeout=5, bindAddress=(source, 0)
    )
    client: RawClient = await wait(connectProtocol(endpoint, RawClient()))
    test.addCleanup(client.abort)
    if greeting:
        await client.wait_for_replies(1)
    return client
