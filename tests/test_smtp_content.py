"""
Where a message's content waits in the front (issue 15, item 3): a large
one on disk while DATA arrives, and whole messages in memory only a few
at a time, as the hand-over gate lets them.
"""

from __future__ import annotations

import os
import tracemalloc

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from maillaser.message import Envelope, Refusal
from maillaser.smtp._content import SPILL_AT, HandOverGate, MessageContent
from maillaser.smtp._message import AcceptedMessage
from tests.test_smtp import SlowSink


class MessageContentTests(SynchronousTestCase):
    def test_a_large_message_waits_on_disk(self) -> None:
        """
        5 MB written in 64 KiB pieces: memory grows by no more than the
        spill threshold, the directory shows no file (it is unlinked), and
        the content reads back whole, once.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        content = MessageContent(directory)
        piece = b"x" * 65534 + b"\r\n"
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(80):
            content.write(piece)
        self.assertLess(tracemalloc.get_traced_memory()[0] - before, 2 * SPILL_AT)
        self.assertEqual(os.listdir(directory), [])
        self.assertEqual(content.size, 80 * len(piece))
        self.assertEqual(content.read(), piece * 80)
        self.assertEqual(content.read(), b"")

    def test_a_discarded_message_is_empty(self) -> None:
        content = MessageContent()
        content.write(b"Subject: x\r\n")
        content.discard()
        content.write(b"more\r\n")
        self.assertEqual((content.size, content.read()), (0, b""))


class HandOverGateTests(SynchronousTestCase):
    def test_bytes_under_the_limit_in_order(self) -> None:
        gate = HandOverGate(limit=100)
        first, second, third = gate.acquire(60), gate.acquire(60), gate.acquire(10)
        self.successResultOf(first)
        self.assertNoResult(second)
        self.assertNoResult(third)  # first come, first served
        gate.release(60)
        self.successResultOf(second)
        self.successResultOf(third)
        self.assertEqual(gate.held, 70)

    def test_one_message_always_goes(self) -> None:
        gate = HandOverGate(limit=100)
        self.successResultOf(gate.acquire(500))
        waiting = gate.acquire(1)
        self.assertNoResult(waiting)
        gate.release(500)
        self.successResultOf(waiting)


class AcceptedMessageGateTests(SynchronousTestCase):
    def test_messages_wait_for_the_gate_before_they_are_read(self) -> None:
        sink, gate = SlowSink(), HandOverGate(limit=15)
        messages = [
            AcceptedMessage(
                sink=sink,
                message_id=f"msg_{n}",
                envelope=Envelope("a@b.test", ("x@y.test",)),
                clock=Clock(),
                gate=gate,
            )
            for n in range(3)
        ]
        for message in messages:
            message.write(b"0123456789")
        replies = [message.eomReceived() for message in messages]
        self.assertEqual([m.id for m in sink.messages], ["msg_0"])
        sink.waiting[0].callback(None)
        self.successResultOf(replies[0])
        self.assertEqual([m.id for m in sink.messages], ["msg_0", "msg_1"])
        sink.waiting[1].errback(Refusal(451, "4.3.0", "Could not store"))
        self.failureResultOf(replies[1])
        self.assertEqual(len(sink.messages), 3)
        sink.waiting[2].callback(None)
        self.successResultOf(replies[2])
        self.assertEqual(gate.held, 0)
