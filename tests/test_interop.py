"""
Real SMTP peers against a real bridge on loopback: swaks (pipelined,
STARTTLS, implicit TLS), Postfix's smtp-source (parallel bursts, several
messages per connection), smtplib over implicit TLS, and Python's ssl as the
TLS client for the RFC 3207 corner cases.  Every message must arrive exactly
once, with exactly what was sent.
"""

from __future__ import annotations

import functools
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import quoteStringArgument
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from maillaser.smtp import self_signed
from tests.bridge import Bridge, count_admissions, settled, start_bridge
from tests.helpers import LOOPBACK, TARGET, poll, simple_message, spec_keys, wait

SECOND = "second@example.com"
EHLO_AFTER_TLS = (
    b"mx.test\nPIPELINING\nSIZE 10485760\n8BITMIME\nSMTPUTF8\nENHANCEDSTATUSCODES"
)
TIMEOUT = 30.0
"""Seconds any one client program or socket may take before the test fails."""


def find_program(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


SWAKS = find_program("swaks")
SMTP_SOURCE = find_program("smtp-source")


@functools.cache
def swaks_speaks_tls() -> bool:
    """swaks needs Net::SSLeay (Debian: libnet-ssleay-perl) for TLS."""
    assert SWAKS is not None
    support = subprocess.run(
        [SWAKS, "--support"], capture_output=True, timeout=TIMEOUT, check=False
    )
    return b"=== TLS supported" in support.stdout + support.stderr


def need_swaks(tls: bool = False) -> str:
    if SWAKS is None:
        raise SkipTest("swaks is not installed (Debian package swaks)")
    if tls and not swaks_speaks_tls():
        raise SkipTest("swaks cannot do TLS: install libnet-ssleay-perl")
    return SWAKS


def need_smtp_source() -> str:
    if SMTP_SOURCE is None:
        raise SkipTest("smtp-source is not installed (Debian package postfix)")
    return SMTP_SOURCE


async def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run a client program in a thread, so the reactor serves it meanwhile."""
    return await wait(
        deferToThread(
            subprocess.run, args, capture_output=True, timeout=TIMEOUT, check=False
        ),
        TIMEOUT + 5,
    )


def unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def write_certificate(test: TestCase) -> tuple[bytes, str, str]:
    """A self-signed certificate for localhost: its PEM and the two paths."""
    cert_pem, key_pem = self_signed("localhost")
    directory = Path(test.mktemp())
    directory.mkdir()
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    return cert_pem, str(cert), str(key)


def der(cert_pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert_pem.decode("ascii"))


SWAKS_MESSAGE = (
    "From: Swaks Sender <sender@test.com>\n"
    "To: target@example.com\n"
    "Subject: swaks {mode}\n"
    "Message-ID: <swaks-{mode}@test.com>\n"
    "\n"
    "line one\n"
    ".leading dot\n"
    "last line"
)
"""swaks turns LF into CRLF, stuffs the dot and adds CRLF . CRLF itself."""


class SwaksTests(TestCase):
    async def swaks(self, mode: str, *options: str, port: int | None = None) -> None:
        """Send with swaks in C{mode}; check its exit status and the payload."""
        program = need_swaks(tls=mode != "pipelined")
        bridge = await start_bridge(self)
        data = Path(self.mktemp())
        data.write_text(SWAKS_MESSAGE.format(mode=mode))
        result = await run(
            program,
            *("--server", "127.0.0.1", "--port", str(port or bridge.smtp_port)),
            *("--from", "sender@test.com", "--to", f"{TARGET},{SECOND}"),
            *("--helo", "client.test", "--data", f"@{data}", "--timeout", "20"),
            *options,
        )
        transcript = result.stdout.decode("utf-8", "replace")
        self.assertEqual(result.returncode, 0, transcript + result.stderr.decode())
        # "<~" marks a reply read over TLS, "<-" one in cleartext.
        arrow = "<-" if mode == "pipelined" else "<~"
        queued = re.search(
            rf"^{arrow}  250 2\.0\.0 Ok: queued as (msg_[0-9a-f]{{28}})$",
            transcript,
            re.MULTILINE,
        )
        self.assertIsNotNone(queued, transcript)
        assert queued is not None
        [request] = await settled(bridge, 1, TIMEOUT)
        self.assertEqual(request.headers["webhook-id"], queued.group(1))
        self.assertEqual(
            spec_keys(request.json()),
            {
                "sender": "sender@test.com",
                "sender_name": "Swaks Sender",
                "recipient": TARGET,
                "recipients": [TARGET, SECOND],
                "subject": f"swaks {mode}",
                "body": "line one\n.leading dot\nlast line\n",
                "message_id": f"<swaks-{mode}@test.com>",
            },
        )
        envelope = request.json()["envelope"]
        self.assertEqual(
            (envelope["helo"], envelope["client_ip"], envelope["rcpt_to"]),
            ("client.test", "127.0.0.1", [TARGET, SECOND]),
        )
        if mode == "pipelined":
            self.assertNotIn("tls", envelope)
        else:
            self.assertRegex(envelope["tls"]["version"], r"^TLSv1\.[23]$")

    async def test_plain_and_pipelined(self) -> None:
        await self.swaks("pipelined", "--pipeline")

    async def test_starttls(self) -> None:
        await self.swaks("starttls", "--tls")


class SmtpSourceTests(TestCase):
    async def burst(self, *options: str, messages: int) -> tuple[Bridge, list[Any]]:
        program = need_smtp_source()
        bridge = await start_bridge(self)
        connections = count_admissions(bridge.service.smtp_factory)
        result = await run(
            program,
            *("-m", str(messages), "-f", "sender@test.com", "-t", TARGET),
            *("-M", "client.test", *options, f"127.0.0.1:{bridge.smtp_port}"),
        )
        self.assertEqual(result.returncode, 0, result.stderr.decode())
        requests = await settled(bridge, messages, TIMEOUT)
        self.assertEqual(len({r.headers["webhook-id"] for r in requests}), messages)
        payloads = [r.json() for r in requests]
        self.assertEqual(len({p["message_id"] for p in payloads}), messages)
        for payload in payloads:
            self.assertEqual(payload["sender"], "sender@test.com")
            self.assertEqual(payload["recipients"], [TARGET])
        return bridge, connections

    async def test_parallel_sessions(self) -> None:
        """Ten sessions in parallel, 200 messages, one connection each."""
        bridge, connections = await self.burst("-s", "10", "-S", "burst", messages=200)
        self.assertEqual(len(connections), 200)
        subjects = {r.json()["subject"] for r in bridge.receiver.requests}
        self.assertEqual(subjects, {"burst"})

    async def test_several_messages_per_connection(self) -> None:
        """-d keeps each of four sessions open for message after message."""
        bridge, connections = await self.burst(
            "-d", "-s", "4", "-l", "2000", messages=100
        )
        self.assertEqual(len(connections), 4)
        bodies = {r.json()["body"] for r in bridge.receiver.requests}
        self.assertEqual(len(bodies), 1)
        # -l counts bytes on the wire, where lines end in CRLF.
        self.assertGreaterEqual(len(bodies.pop().replace("\n", "\r\n")), 2000)


class ImplicitTLSTests(TestCase):
    """An ssl: endpoint next to the plain one: TLS from the first byte."""

    # Trial awaits what setUp returns; unittest's stub says it returns None.
    async def setUp(self) -> None:  # type: ignore[override]
        self.cert_pem, cert, key = write_certificate(self)
        key, cert = quoteStringArgument(key), quoteStringArgument(cert)
        implicit = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        self.bridge = await start_bridge(self, smtp_endpoints=(LOOPBACK, implicit))
        port = self.bridge.service.smtp_listeners[1].port
        assert port is not None
        address = port.getHost()
        assert isinstance(address, IPv4Address)  # ssl: over TCP on 127.0.0.1
        self.port = address.port

    async def test_smtplib_over_implicit_tls(self) -> None:
        def converse() -> dict[str, Any]:
            with smtplib.SMTP_SSL(
                "127.0.0.1",
                self.port,
                local_hostname="client.test",
                context=unverified(),
                timeout=TIMEOUT,
            ) as client:
                ehlo = client.ehlo()
                sock: Any = client.sock
                refused = client.send_message(
                    simple_message(subject="implicit"), "sender@test.com", [TARGET]
                )
                return {
                    "ehlo": ehlo,
                    "starttls": client.has_extn("starttls"),
                    "cert": sock.getpeercert(binary_form=True),
                    "refused": refused,
                }

        result = await wait(deferToThread(converse), TIMEOUT)
        self.assertEqual(result["ehlo"], (250, EHLO_AFTER_TLS))
        self.assertFalse(result["starttls"])
        self.assertEqual(result["cert"], der(self.cert_pem))
        self.assertEqual(result["refused"], {})
        [request] = await settled(self.bridge, 1, TIMEOUT)
        self.assertEqual(request.json()["subject"], "implicit")

    async def test_quit_closes_at_once(self) -> None:
        def quit_over_tls() -> tuple[bytes, bytes, bool]:
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
            with unverified().wrap_socket(raw) as tls:
                greeting = read_until(tls, b"\r\n")
                return (greeting, *quit_and_read_to_end(tls))

        greeting, received, closed = await wait(deferToThread(quit_over_tls), TIMEOUT)
        self.assertEqual(greeting, b"220 mx.test ESMTP MailLaser\r\n")
        self.assertEqual(received, b"221 2.0.0 Bye\r\n")
        self.assertTrue(closed)

    async def test_plain_port_still_offers_starttls(self) -> None:
        def ehlo() -> bool:
            with smtplib.SMTP(
                "127.0.0.1", self.bridge.smtp_port, "client.test", timeout=TIMEOUT
            ) as client:
                client.ehlo()
                return client.has_extn("starttls")

        self.assertTrue(await wait(deferToThread(ehlo), TIMEOUT))

    async def test_swaks_over_implicit_tls(self) -> None:
        program = need_swaks(tls=True)
        result = await run(
            program,
            *("--server", "127.0.0.1", "--port", str(self.port), "--tlsc"),
            *("--from", "sender@test.com", "--to", TARGET, "--helo", "client.test"),
            *("--header", "Subject: swaks implicit", "--timeout", "20"),
        )
        transcript = result.stdout.decode("utf-8", "replace")
        self.assertEqual(result.returncode, 0, transcript + result.stderr.decode())
        self.assertNotIn("STARTTLS", transcript)
        [request] = await settled(self.bridge, 1, TIMEOUT)
        self.assertEqual(request.json()["subject"], "swaks implicit")


class StartTLSTests(TestCase):
    """RFC 3207 with a real TLS client (Python's ssl) on loopback."""

    async def converse(self, conversation: Any, **overrides: Any) -> Any:
        bridge = await start_bridge(self, **overrides)
        self.bridge = bridge

        def run_it() -> Any:
            with smtplib.SMTP(
                "127.0.0.1", bridge.smtp_port, "client.test", timeout=TIMEOUT
            ) as client:
                return conversation(client)

        return await wait(deferToThread(run_it), TIMEOUT)

    async def test_ehlo_after_tls_no_longer_offers_starttls(self) -> None:
        def conversation(client: smtplib.SMTP) -> Any:
            client.ehlo()
            before = client.has_extn("starttls")
            started = client.starttls(context=unverified())
            return before, started, client.ehlo()

        before, started, ehlo = await self.converse(conversation)
        self.assertTrue(before)
        self.assertEqual(started, (220, b"2.0.0 Ready to start TLS"))
        self.assertEqual(ehlo, (250, EHLO_AFTER_TLS))

    async def test_helo_and_sender_are_forgotten_after_the_handshake(self) -> None:
        def conversation(client: smtplib.SMTP) -> Any:
            client.ehlo()
            mail = client.mail("sender@test.com")
            client.starttls(context=unverified())
            # Straight after the handshake, before any EHLO: RCPT would
            # ride on the cleartext MAIL, MAIL on the cleartext EHLO.
            no_mail = client.rcpt(TARGET)
            no_helo = client.mail("sender@test.com")
            return mail, no_mail, no_helo

        mail, no_mail, no_helo = await self.converse(conversation)
        self.assertEqual(mail, (250, b"2.1.0 Sender OK"))
        self.assertEqual(no_mail, (503, b"5.5.1 Need MAIL command first"))
        self.assertEqual(no_helo, (503, b"5.5.1 Send HELO/EHLO first"))

    async def test_second_starttls_is_503(self) -> None:
        def conversation(client: smtplib.SMTP) -> Any:
            client.ehlo()
            client.starttls(context=unverified())
            client.ehlo()
            again = client.docmd("STARTTLS")
            still = client.noop()
            refused = client.send_message(
                simple_message(subject="after 503"), "sender@test.com", [TARGET]
            )
            return again, still, refused

        again, still, refused = await self.converse(conversation)
        self.assertEqual(again, (503, b"5.5.1 TLS already active"))
        self.assertEqual(still, (250, b"2.0.0 OK"))
        self.assertEqual(refused, {})
        [request] = await settled(self.bridge, 1, TIMEOUT)
        self.assertEqual(request.json()["subject"], "after 503")

    async def test_cleartext_pipelined_after_starttls_is_never_run(self) -> None:
        """
        CVE-2011-0411's attack: commands in the same packet as STARTTLS.
        The server must not answer them, in cleartext or after TLS.
        """
        bridge = await start_bridge(self)

        def inject() -> tuple[bytes, bytes, bool]:
            with socket.create_connection(
                ("127.0.0.1", bridge.smtp_port), timeout=TIMEOUT
            ) as sock:
                before = ehlo(sock)
                sock.sendall(b"STARTTLS\r\nNOOP\r\n")
                sock.settimeout(5)  # the server either closes or stays silent
                after, closed = read_to_end(sock)
                return before, after, closed

        before, after, closed = await wait(deferToThread(inject), TIMEOUT)
        self.assertTrue(before.endswith(b"250 STARTTLS\r\n"), before)
        self.assertNotIn(b"250", after)
        self.assertTrue(closed)
        await poll(lambda: not bridge.service.smtp_factory.sessions)
        result = await bridge.send(simple_message(subject="after"), starttls=True)
        self.assertEqual(result["code"], 250)
        await settled(bridge, 1, TIMEOUT)

    async def test_quit_over_tls_closes_at_once(self) -> None:
        """
        After 221 the server closes, over TLS as in cleartext.  A TLS
        transport does not close while a producer is registered on it
        (ITransport.loseConnection), so the session must unregister itself
        first, or the connection and its slot are held until a timer cuts it.
        """
        bridge = await start_bridge(self)

        def quit_over_tls() -> tuple[bytes, bool]:
            with socket.create_connection(
                ("127.0.0.1", bridge.smtp_port), timeout=TIMEOUT
            ) as sock:
                ehlo(sock)
                sock.sendall(b"STARTTLS\r\n")
                read_until(sock, b"\r\n")
                with unverified().wrap_socket(sock) as tls:
                    return quit_and_read_to_end(tls)

        received, closed = await wait(deferToThread(quit_over_tls), TIMEOUT)
        self.assertEqual(received, b"221 2.0.0 Bye\r\n")
        self.assertTrue(closed)
        await poll(lambda: not bridge.service.smtp_factory.sessions, 3)

    async def test_configured_certificate_is_presented(self) -> None:
        cert_pem, cert, key = write_certificate(self)

        def conversation(client: smtplib.SMTP) -> bytes:
            client.ehlo()
            # Verify for real: the configured certificate is the only trust
            # anchor, and it names localhost.
            context = ssl.create_default_context(cafile=cert)
            client._host = "localhost"  # type: ignore[attr-defined]
            client.starttls(context=context)
            sock: Any = client.sock
            return bytes(sock.getpeercert(binary_form=True))

        presented = await self.converse(conversation, tls_cert=cert, tls_key=key)
        self.assertEqual(presented, der(cert_pem))


def read_until(sock: socket.socket, end: bytes) -> bytes:
    received = b""
    while not received.endswith(end):
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received


def ehlo(sock: socket.socket) -> bytes:
    """Greeting and EHLO on a fresh connection; what the server said."""
    greeting = read_until(sock, b"\r\n")
    sock.sendall(b"EHLO client.test\r\n")
    return greeting + read_until(sock, b"250 STARTTLS\r\n")


def quit_and_read_to_end(sock: socket.socket) -> tuple[bytes, bool]:
    """QUIT, then the reply and whether the server closed within 3 s."""
    sock.sendall(b"QUIT\r\n")
    sock.settimeout(3)
    return read_to_end(sock)


def read_to_end(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything until the server closes (or resets); whether it did."""
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except (ConnectionResetError, ssl.SSLEOFError):
        pass
    except TimeoutError:
        return received, False
    return received, True
