"""
The SMTP front on loopback with a real client: smtplib over plain TCP,
STARTTLS and implicit TLS, against the factory and a recording sink.
"""

from __future__ import annotations

import smtplib
import ssl
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from maillaser.smtp import tls_context
from tests.helpers import TARGET, connect_raw, poll, send_mail, simple_message
from tests.test_smtp_helpers import Listening, RecordingSink, listen, make_factory


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def send(port: int, **kwargs: Any) -> dict[str, Any]:
    result: dict[str, Any] = await deferToThread(
        send_mail, port, kwargs.pop("message", simple_message()), **kwargs
    )
    return result


class PlainTests(TestCase):
    async def test_message_with_smtplib(self) -> None:
        server = await listen(self)
        result = await send(server.port)
        self.assertEqual(result["code"], 250)
        [message] = server.sink.messages
        self.assertEqual(result["reply"], f"2.0.0 Ok: queued as {message.id}".encode())
        self.assertEqual(message.envelope.sender, "sender@test.com")
        self.assertEqual(message.envelope.recipients, (TARGET,))
        self.assertEqual(message.envelope.helo, "client.test")
        self.assertEqual(message.envelope.peer, "127.0.0.1")
        self.assertIn(b"\r\nSubject: Integration Test\r\n", message.raw)
        self.assertIn(b" with ESMTP id " + message.id.encode(), message.raw)
        await server.sessions_gone()

    async def test_several_recipients_one_message(self) -> None:
        server = await listen(self)
        recipients = (TARGET, "nobody@example.com", "Second@Example.com")
        result = await send(server.port, recipients=recipients)
        self.assertEqual(result["code"], 250)
        self.assertEqual(list(result["refused"]), ["nobody@example.com"])
        [message] = server.sink.messages
        self.assertEqual(message.envelope.recipients, (TARGET, "Second@Example.com"))

    async def test_no_recipient_we_serve(self) -> None:
        server = await listen(self)
        result = await send(server.port, recipients=("nobody@example.com",))
        self.assertEqual(
            result["refused"],
            {"nobody@example.com": (550, b"5.1.1 No such user here")},
        )
        self.assertEqual(server.sink.messages, [])


class StartTLSTests(TestCase):
    async def test_message_over_starttls(self) -> None:
        server = await listen(self, tls_context=tls_context(None, None, "mx.test"))
        result = await send(server.port, starttls=True)
        self.assertEqual(result["code"], 250)
        [message] = server.sink.messages
        self.assertIn(b" with ESMTPS id ", message.raw)
        await poll(lambda: not server.factory.sessions, timeout=3)  # QUIT closed it

    async def test_session_starts_afresh_after_the_handshake(self) -> None:
        server = await listen(self, tls_context=tls_context(None, None, "mx.test"))

        def session() -> list[tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
                client.ehlo("client.test")
                replies = [client.docmd("MAIL", "FROM:<a@b.test>")]
                client.starttls(context=client_context())
                replies.append(client.docmd("RCPT", f"TO:<{TARGET}>"))
                replies.append(client.docmd("MAIL", "FROM:<a@b.test>"))
                replies.append(client.ehlo("client.test"))
                replies.append(client.docmd("STARTTLS"))
                replies.append(client.docmd("MAIL", "FROM:<a@b.test>"))
                return replies

        replies = await deferToThread(session)
        self.assertEqual(
            [(code, text.split(b"\n")[-1]) for code, text in replies],
            [
                (250, b"2.1.0 Sender OK"),
                (503, b"5.5.1 Need MAIL command first"),
                (503, b"5.5.1 Send HELO/EHLO first"),
                (250, b"ENHANCEDSTATUSCODES"),  # STARTTLS no longer offered
                (503, b"5.5.1 TLS already active"),
                (250, b"2.1.0 Sender OK"),
            ],
        )

    async def test_cleartext_pipelined_after_starttls_drops_the_connection(
        self,
    ) -> None:
        server = await listen(self, tls_context=tls_context(None, None, "mx.test"))
        client = await connect_raw(self, server.port)
        client.send(b"EHLO c\r\n")
        await client.wait_for_replies(2)
        client.send(b"STARTTLS\r\nMAIL FROM:<a@b.test>\r\n")
        await client.wait_closed()
        self.assertEqual(client.replies()[-1], b"250 STARTTLS")
        await server.sessions_gone()


class ImplicitTLSTests(TestCase):
    async def test_tls_listener(self) -> None:
        """A TLS port: nothing to STARTTLS, and the trace header says ESMTPS."""
        sink = RecordingSink()
        factory = make_factory(
            sink, reactor, max_connections=10, max_connections_per_ip=10
        )
        endpoint = SSL4ServerEndpoint(
            reactor, 0, tls_context(None, None, "mx.test"), interface="127.0.0.1"
        )
        port = await endpoint.listen(factory)
        server = Listening(factory, sink, port)
        self.addCleanup(port.stopListening)

        def session() -> tuple[bool, tuple[int, bytes]]:
            with smtplib.SMTP_SSL(
                "127.0.0.1", server.port, context=client_context(), timeout=30
            ) as client:
                client.ehlo("client.test")
                offered = client.has_extn("starttls")
                reply = client.sendmail(
                    "a@b.test", [TARGET], simple_message().as_bytes()
                )
                assert reply == {}, reply
                return offered, client.noop()

        offered, noop = await deferToThread(session)
        self.assertFalse(offered)
        self.assertEqual(noop, (250, b"2.0.0 OK"))
        [message] = sink.messages
        self.assertIn(b" with ESMTPS id ", message.raw)
        await server.sessions_gone()
