"""
Payloads in the worker (L{PayloadBuilder}): cheap ones at once, the rest
in a payload process under a deadline, with a C{Clock} and a payload
process in memory; then a real payload process on a pathological message.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ProcessTerminated
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from maillaser.interfaces import IPayloadBuilder
from maillaser.message import Envelope, Message, Payload
from maillaser.webhook import encoded_payload, fallback_payload
from maillaser.worker import PayloadBuilder, payload_program
from maillaser.worker._commands import BuildPayload
from maillaser.worker._payloads import (
    INLINE_BOUNDARIES,
    INLINE_LINES,
    INLINE_SIZE,
    is_cheap,
)
from maillaser.worker._stdio import ChildProtocol
from tests.helpers import wait
from tests.test_worker_child import FakeReactor

PREFIXES = ("X-",)


def message(raw: bytes, n: int = 1) -> Message:
    envelope = Envelope("a@example.net", ("target@example.com",))
    return Message(f"msg_{n}", envelope, raw, 1.0)


def html(n: int = 1) -> Message:
    raw = (
        b"From: Someone <a@example.net>\r\nSubject: html %d\r\nX-Tag: t\r\n"
        b"Content-Type: text/html\r\n\r\n<p>hello <b>there</b></p>\r\n" % n
    )
    return message(raw, n)


def nested(depth: int, lines: int) -> Message:
    """
    Multiparts nested C{depth} deep, each with its own boundary, around
    C{lines} lines: the standard library's parser tests each line against
    every enclosing boundary.
    """
    raw = b"From: Someone <a@example.net>\r\nSubject: deep\r\nX-Tag: t\r\n"
    for level in range(depth):
        raw += b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (
            level,
            level,
        )
    raw += b"Content-Type: text/plain\r\n\r\n" + b"x\r\n" * lines
    for level in reversed(range(depth)):
        raw += b"\r\n--b%d--\r\n" % level
    return message(raw, 99)


class FakePayloadProcess(ChildProtocol):
    """A payload process in memory: answers wait for the test."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[dict[str, Any], Deferred[dict[str, Any]]]] = []

    @BuildPayload.responder
    def build(self, **arguments: Any) -> Deferred[dict[str, Any]]:
        self.asked.append((arguments, Deferred()))
        return self.asked[-1][1]


class PayloadBuilderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor(FakePayloadProcess)
        self.builder = PayloadBuilder(
            self.reactor, PREFIXES, 2.0, payload_program("info")
        )

    def process(self, index: int = -1) -> FakePayloadProcess:
        self.reactor.processes[index].pump()
        child = self.reactor.processes[index].child
        assert isinstance(child, FakePayloadProcess)
        return child

    def test_an_ipayloadbuilder(self) -> None:
        self.assertTrue(verifyObject(IPayloadBuilder, self.builder))

    def test_what_is_cheap(self) -> None:
        self.assertTrue(is_cheap(b"x" * INLINE_SIZE))
        self.assertFalse(is_cheap(b"x" * (INLINE_SIZE + 1)))
        self.assertTrue(is_cheap(b"x\n" * INLINE_LINES))
        self.assertFalse(is_cheap(b"x\n" * (INLINE_LINES + 1)))
        self.assertTrue(is_cheap(b"boundary=x\n" * INLINE_BOUNDARIES))
        self.assertFalse(is_cheap(b"Boundary=x\n" * (INLINE_BOUNDARIES + 1)))
        self.assertFalse(is_cheap(b"Content-Type: TEXT/HTML\r\n\r\n"))
        alternative = b"Content-Type: text/plain\r\n...Content-Type: text/html\r\n"
        self.assertTrue(is_cheap(alternative))

    def test_cheap_ones_at_once(self) -> None:
        plain = message(b"Subject: hi\r\nX-Tag: t\r\n\r\nhello\r\n")
        body = self.successResultOf(self.builder.build(plain)).body
        self.assertEqual(body, encoded_payload(plain, PREFIXES))
        self.assertEqual(self.reactor.processes, [])

    def test_the_rest_in_a_payload_process(self) -> None:
        d = self.builder.build(html())
        [(arguments, answer)] = self.process().asked
        self.assertEqual(
            arguments,
            {
                "message": html(),
                "header_prefixes": ["X-"],
                "header_list": False,
                "parts": b"",
            },
        )
        answer.callback({"body": b'{"built":"there"}'})
        self.reactor.processes[-1].pump()
        self.assertEqual(self.successResultOf(d), Payload(b'{"built":"there"}'))

    def test_late_is_delivered_with_a_parse_error(self) -> None:
        d = self.builder.build(html())
        self.process()
        self.reactor.advance(2.0)
        reason = "payload not built within 2s"
        body = self.successResultOf(d).body
        self.assertEqual(body, fallback_payload(html(), PREFIXES, reason))
        self.assertEqual(json.loads(body)["parse_error"], reason)
        self.assertEqual(self.reactor.processes[0].signals, ["KILL"])

    def test_others_killed_with_a_late_one_try_again(self) -> None:
        """They were only waiting behind it: a new process builds them."""
        late = self.builder.build(html(1))
        self.reactor.advance(0.5)
        behind = self.builder.build(html(2))
        self.assertEqual(len(self.process().asked), 2)
        self.reactor.advance(1.5)
        self.successResultOf(late)  # its fallback
        self.assertNoResult(behind)
        self.reactor.processes[0].exit(ProcessTerminated(signal=9))
        self.reactor.advance(0)  # a second since the last start
        [(arguments, answer)] = self.process(1).asked
        self.assertEqual(arguments["message"].id, "msg_2")
        answer.callback({"body": b"{}"})
        self.reactor.processes[1].pump()
        self.assertEqual(self.successResultOf(behind), Payload(b"{}"))

    def test_twice_killed(self) -> None:
        d = self.builder.build(html(2))
        self.process()
        for index in range(2):
            self.reactor.processes[index].exit(ProcessTerminated(exitCode=1))
            self.reactor.advance(1.0)
        body = json.loads(self.successResultOf(d).body)
        self.assertTrue(
            body["parse_error"].startswith("payload not built: payload process ended")
        )

    def test_cancelled_with_its_round(self) -> None:
        d = self.builder.build(html())
        self.process()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.reactor.advance(10)
        self.assertEqual(self.reactor.processes[0].signals, [])


class RealPayloadProcessTests(TestCase):
    def builder(self, timeout: float) -> PayloadBuilder:
        builder = PayloadBuilder(reactor, PREFIXES, timeout, payload_program("info"))
        self.addCleanup(builder.stop, 5.0)
        return builder

    async def test_built_there(self) -> None:
        builder = self.builder(10.0)
        payload = await wait(builder.build(html()))
        self.assertEqual(payload.body, encoded_payload(html(), PREFIXES))
        self.assertIsNotNone(builder.process.pid)

    async def test_a_pathological_message_is_cut_short(self) -> None:
        """
        Killed at the deadline.  The message behind it, killed with it, is
        built by a new process.
        """
        builder = self.builder(2.0)
        await wait(builder.build(html(1)))  # the process is up
        first = builder.process.pid
        started = reactor.seconds()
        deep = builder.build(nested(300, 300_000))
        behind = builder.build(html(2))
        body = json.loads((await wait(deep)).body)
        self.assertLess(reactor.seconds() - started, 3.0)
        self.assertEqual(body["parse_error"], "payload not built within 2s")
        self.assertEqual((body["subject"], body["headers"]), ("deep", {"X-Tag": "t"}))
        self.assertEqual((await wait(behind)).body, encoded_payload(html(2), PREFIXES))
        self.assertNotEqual(builder.process.pid, first)
