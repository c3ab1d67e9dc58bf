"""
Tests for L{maillaser.receive}, the C{maillaser-receive} program: as
installed, in front of a real bridge, and in process for the details.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from pathlib import Path

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from maillaser.receive import listen, parse_arguments
from maillaser.testing import WebhookReceiver
from maillaser.webhook import request_headers
from tests.bridge import Bridge, spool_empty, start_service
from tests.helpers import TARGET, poll, simple_message, wait
from tests.process import clean_environment

SECRET = "whsec_" + base64.b64encode(b"the receiver's secret, 32 bytes.").decode()
OTHER = "whsec_" + base64.b64encode(b"somebody else's secret, 32 bytes").decode()


class ReceiverProcess(ProcessProtocol):
    """The installed C{maillaser-receive}, its output collected."""

    def __init__(self) -> None:
        self.out = ""
        self.err = ""
        self.ended: Deferred[int] = Deferred()
        self.pid = 0

    @classmethod
    def start(cls, *args: str) -> ReceiverProcess:
        command = Path(sys.executable).with_name("maillaser-receive")
        if not command.exists():
            raise SkipTest(f"maillaser-receive is not installed at {command}")
        process = cls()
        transport = reactor.spawnProcess(
            process,
            str(command),
            [str(command), *args],
            env=clean_environment(),
        )
        process.pid = transport.pid
        return process

    def outReceived(self, data: bytes) -> None:
        self.out += data.decode("utf-8")

    def errReceived(self, data: bytes) -> None:
        self.err += data.decode("utf-8")

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        if reason.check(ProcessDone):
            self.ended.callback(0)
        elif isinstance(value, ProcessTerminated):
            self.ended.callback(
                value.exitCode if value.exitCode is not None else -value.signal
            )

    async def url(self) -> str:
        await poll(lambda: "\n\n" in self.out or self.ended.called, 30)
        first = self.out.split("\n", 1)[0]
        prefix = "maillaser-receive: listening on "
        assert first.startswith(prefix), (self.out, self.err)
        return first.removeprefix(prefix).split()[0]

    async def stop(self, signal: str = "INT") -> int:
        if not self.ended.called:
            os.kill(self.pid, getattr(__import__("signal"), f"SIG{signal}"))
        return await wait(self.ended, 30)


def requests_printed(out: str) -> list[list[str]]:
    """The printed requests: each a list of lines, the JSON as one item."""
    blocks = out.split("\n\n")[1:]  # the first is the listening line
    printed = []
    for block in blocks:
        if block.startswith("POST"):
            lines = block.split("\n", 3)
            printed.append(lines)
    return printed


class InstalledReceiverTests(TestCase):
    async def run_bridge_into(self, *receiver_args: str) -> tuple[str, str]:
        """
        Start the installed receiver and a bridge signing with C{SECRET}
        that posts to it; send one message with smtplib; return what the
        receiver printed of it and the message id, once it is delivered.
        """
        receiver = ReceiverProcess.start("--port", "0", *receiver_args)
        self.addCleanup(receiver.stop, "KILL")
        url = await receiver.url()
        # The installed program receives; this receiver never listens.
        bridge = Bridge(
            await start_service(self, url, webhook_secrets=(SECRET,)),
            WebhookReceiver(),
        )
        sent = await bridge.send(simple_message("first minute"))
        self.assertEqual(sent["code"], 250)
        await poll(lambda: len(requests_printed(receiver.out)) == 1, 30)
        status = await spool_empty(bridge)
        self.assertEqual(status["dead"], 0)  # the 204 was taken as delivered
        self.assertEqual((await receiver.stop(), receiver.err), (0, ""))
        [printed] = requests_printed(receiver.out)
        return "\n".join(printed), printed[2].removeprefix("webhook-id: ")

    async def test_right_secret(self) -> None:
        """The payload arrives, verified, printed as indented JSON."""
        printed, message_id = await self.run_bridge_into("--secret", SECRET)
        method, verdict, webhook_id, body = printed.split("\n", 3)
        self.assertEqual(
            (method, verdict, webhook_id),
            ("POST /hook", "signature: valid", f"webhook-id: {message_id}"),
        )
        self.assertRegex(message_id, "^msg_[0-9a-f]{28}$")
        payload = json.loads(body)
        self.assertEqual(
            (payload["subject"], payload["sender"], payload["recipient"]),
            ("first minute", "sender@test.com", TARGET),
        )
        self.assertEqual(body, json.dumps(payload, indent=2, ensure_ascii=False))

    async def test_wrong_secret(self) -> None:
        """A secret the bridge does not sign with: INVALID, and why."""
        printed, _ = await self.run_bridge_into("--secret", OTHER)
        self.assertEqual(
            printed.split("\n")[1], "signature: INVALID (no matching signature)"
        )

    async def test_sigterm(self) -> None:
        receiver = ReceiverProcess.start("--port", "0")
        self.addCleanup(receiver.stop, "KILL")
        await receiver.url()
        self.assertEqual((await receiver.stop("TERM"), receiver.err), (0, ""))

    async def test_port_in_use(self) -> None:
        """One line on stderr and status 1, no traceback."""
        first = ReceiverProcess.start("--port", "0")
        self.addCleanup(first.stop, "KILL")
        port = (await first.url()).rsplit(":", 1)[1].split("/")[0]
        second = ReceiverProcess.start("--port", port)
        self.assertEqual(await wait(second.ended, 30), 1)
        self.assertEqual(
            (second.out, second.err),
            (
                "",
                f"maillaser-receive: error: Couldn't listen on 127.0.0.1:{port}:"
                " [Errno 98] Address already in use.\n",
            ),
        )


class ReceiverTests(TestCase):
    """The receiver in this process, posted to with treq."""

    async def post(
        self, body: bytes, headers: dict[bytes, bytes], *args: str
    ) -> tuple[int, str]:
        out = io.StringIO()
        receiver = await listen(reactor, parse_arguments(["--port", "0", *args]), out)
        self.addCleanup(receiver.stop)
        response = await treq.post(
            receiver.url,
            data=body,
            headers=Headers({name: [value] for name, value in headers.items()}),
            persistent=False,
        )
        await treq.content(response)
        return response.code, out.getvalue().split("\n", 2)[2]

    async def test_not_checked(self) -> None:
        body = b'{"subject": "x"}'
        headers = request_headers([], "msg_1", int(reactor.seconds()), body)
        self.assertEqual(
            await self.post(body, headers),
            (
                204,
                "POST /hook\nsignature: not checked (no --secret)\n"
                'webhook-id: msg_1\n{\n  "subject": "x"\n}\n\n',
            ),
        )

    async def test_valid_rotation_and_status(self) -> None:
        """Any of several secrets verifies; --status answers what it says."""
        body = b"[1]"
        headers = request_headers([OTHER], "msg_2", int(reactor.seconds()), body)
        code, out = await self.post(
            body, headers, "--secret", f"{SECRET} {OTHER}", "--status", "503"
        )
        self.assertEqual(
            (code, out.splitlines()[1:3]),
            (503, ["signature: valid", "webhook-id: msg_2"]),
        )

    async def test_stale_and_unsigned(self) -> None:
        body = b"{}"
        stale = request_headers([SECRET], "msg_3", int(reactor.seconds()) - 3600, body)
        _, out = await self.post(body, stale, "--secret", SECRET)
        # Whole seconds: 3600 s, or 3601 once the clock passes a second.
        self.assertRegex(
            out.splitlines()[1],
            r"^signature: INVALID \(webhook-timestamp is too old \(360[01] s\)\)$",
        )
        _, out = await self.post(body, {}, "--secret", SECRET)
        self.assertEqual(
            out.splitlines()[1:3],
            [
                "signature: INVALID (missing header: webhook-id, webhook-timestamp,"
                " webhook-signature)",
                "webhook-id: (none)",
            ],
        )

    async def test_not_json_escaped(self) -> None:
        """A body that is not JSON is shown as text, control characters escaped."""
        _, out = await self.post(b"plain \x1b[31mred\ttab\nline", {})
        self.assertEqual(out.splitlines()[3:5], ["plain \\x1b[31mred\ttab", "line"])


class ArgumentTests(SynchronousTestCase):
    def test_errors(self) -> None:
        for argv, error in (
            (["--secret", "whsec_!!"], "webhook secret is not valid base64"),
            (["--port", "70000"], "--port 70000 is not a TCP port"),
            (["--status", "99"], "--status 99 is not an HTTP status"),
        ):
            err = io.StringIO()
            self.patch(sys, "stderr", err)
            with self.assertRaises(SystemExit) as raised:
                parse_arguments(argv)
            self.assertEqual(raised.exception.code, 2)
            self.assertIn(f"maillaser-receive: error: {error}", err.getvalue())

    def test_defaults(self) -> None:
        arguments = parse_arguments([])
        self.assertEqual(
            (arguments.port, arguments.host, arguments.secret, arguments.status),
            (9000, "127.0.0.1", [], 204),
        )
