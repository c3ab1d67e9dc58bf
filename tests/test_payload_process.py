"""
The bridge's payload process: payloads are built in a child process, which
ends with the bridge, and whose death costs a round, not a message.
"""

from __future__ import annotations

import fcntl
import os
import signal
from email.message import EmailMessage

from twisted.internet.process import Process
from twisted.trial.unittest import TestCase

from maillaser.child import PIPE_SIZE, ChildError, ChildProcess
from tests.helpers import (
    TARGET,
    dispatcher_idle,
    poll,
    simple_message,
    start_bridge,
    wait,
)


def html_only(html: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "sender@test.com"
    message["To"] = TARGET
    message["Subject"] = "html"
    message.set_content(html, subtype="html")
    return message


def process_of(child: ChildProcess) -> Process:
    """The child's transport: a real process, spawned by the reactor."""
    transport = child.transport
    # None out first: mypy takes isinstance on an Optional for never true
    assert transport is not None
    assert isinstance(transport, Process)
    return transport


class PayloadProcessTests(TestCase):
    async def test_built_in_a_child_that_ends_with_the_bridge(self) -> None:
        bridge = await start_bridge(self)
        await bridge.send(html_only("<p>small</p>"))
        [request] = await wait(bridge.receiver.wait_for(1))
        self.assertEqual(request.json()["body"], "small")
        payloads = bridge.service._payloads
        self.assertNotEqual(process_of(payloads).pid, os.getpid())
        if hasattr(fcntl, "F_GETPIPE_SZ"):  # Linux: a large message in one go
            for pipe in process_of(payloads).pipes.values():
                size = fcntl.fcntl(pipe.fileno(), fcntl.F_GETPIPE_SZ)
                self.assertEqual(size, PIPE_SIZE)

        await dispatcher_idle(bridge)
        await wait(bridge.service.stopService())
        self.assertIsNone(process_of(bridge.service._payloads).pid)  # reaped

    async def test_a_payload_process_that_dies_costs_a_round(self) -> None:
        """The round fails and goes again; a new process builds the payload."""
        bridge = await start_bridge(self)
        await bridge.send(html_only("<p>first</p>"))
        await wait(bridge.receiver.wait_for(1))
        payloads = bridge.service._payloads
        pid = process_of(payloads).pid
        assert pid is not None  # running: it built the first payload
        os.kill(pid, signal.SIGKILL)
        await poll(lambda: process_of(payloads).pid is None)  # reaped
        await bridge.send(html_only("<p>second</p>"))
        [_, second] = await wait(bridge.receiver.wait_for(2), timeout=20)
        self.assertEqual(second.json()["body"], "second")
        self.assertEqual(len(self.flushLoggedErrors(ChildError)), 1)

    async def test_small_plain_mail_goes_there_in_queue_mode_only(self) -> None:
        """In sync mode a sender waits for the payload: it is built at once."""
        for mode, started in [("queue", True), ("sync", False)]:
            bridge = await start_bridge(self, delivery_mode=mode)
            await bridge.send(simple_message())
            [request] = await wait(bridge.receiver.wait_for(1))
            self.assertEqual(request.json()["body"], "Hello!\r\n")
            transport = bridge.service._payloads.transport
            self.assertEqual(transport is not None, started, mode)
