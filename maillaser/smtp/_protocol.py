"""
The SMTP session: RFC 5321 / RFC 3207 on the wire, ending in an accepted
L{Message} handed to an L{IMessageSink}.

This is a purpose-built protocol rather than a subclass of
C{twisted.mail.smtp.ESMTP}.  That class answers C{550} to every end-of-data
failure, executes cleartext pipelined after C{STARTTLS}, runs the rest of a
body as commands after an over-long line, lets an unterminated line grow
without bound, and handles DATA one Python call per line.  Fixing each of
those means overriding its private methods; owning the session costs about
as much code and gives us every reply, every limit and DATA in bulk.

Replies are collected while a received chunk is processed and written
together, and commands are answered strictly in order: the only asynchronous
step is the end of DATA, during which input is paused.  That is what makes
advertising C{PIPELINING} honest.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from email.utils import formatdate
from functools import lru_cache
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IReactorTime,
    ISSLTransport,
    ITLSTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from maillaser.interfaces import IMessageSink
from maillaser.message import Envelope, Message, Refusal, new_message_id
from maillaser.timers import cancel_timer
from maillaser.wire import write_now

MAX_COMMAND_LINE = 512
"""RFC 5321 section 4.5.3.1.4, including the CRLF."""

MAX_DATA_LINE = 64 * 1024
"""Far above RFC 5321's 1000 octets, which real mail exceeds, yet bounded."""

MAX_ERRORS = 20
"""
Protocol errors (unknown commands, bad syntax, commands out of order)
tolerated since the last accepted message before we hang up: the mark of a
scanner or a broken client.  Refusals of well-formed commands, such as a
recipient we do not serve, are answers, not errors, and do not count.
"""

_PROTOCOL_ERRORS = frozenset({500, 501, 502, 503, 504, 555})

MAX_INPUT_BACKLOG = 64 * 1024
"""Unprocessed input kept while the client does not read our replies."""

CLOSE_GRACE = 10.0
"""Seconds a closing connection has to take its last reply before it is cut."""

FLUSH_EVERY = 64
"""Replies written at once while pipelined input is processed, so that a full
send buffer pauses us within one received chunk."""

_END_OF_DATA = b"\r\n.\r\n"
_LINE_START = b"\r\n"

_PATH = re.compile(
    r"""\s*(?:<(?P<bracketed>[^<>]*)>|(?P<bare>[^\s<>]+))(?P<params>(?:\s.*)?)$""",
    re.DOTALL,
)
_ATOM = r"[^\s@<>()\[\],;:\\\".]+"
# Dots only separate atoms, so matching is linear: an atom class that also
# admitted dots would try every split of "a.a.a...a" (2**n steps).
_ADDRESS = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@[^\s@<>]+")
_QUOTED_LOCAL_ADDRESS = re.compile(r'"(?:[^"\\]|\\.)*"@[^\s@<>]+')
_HELO_DOMAIN = re.compile(r"[\x21-\x7e]{1,255}")
_PARAM = re.compile(r"(?P<key>[A-Za-z0-9][A-Za-z0-9-]*)(?:=(?P<value>[^\s=]+))?$")


class _Reply(Exception):
    """A reply that ends the handling of a command early."""

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(code, status, text)
        self.code = code
        self.line = _format(code, status, text)


@lru_cache(maxsize=1)
def _date(second: int) -> str:
    """The RFC 5322 date of C{second}, made once for all messages in it."""
    return formatdate(second)


def _format(code: int, status: str, text: str) -> bytes:
    return f"{code} {status} {text}".encode("utf-8", "replace")


def _parse_path(argument: str, keyword: str) -> tuple[str, dict[str, str | None]]:
    """
    Split C{FROM:<path> params} into the address and its ESMTP parameters.

    Liberal where it costs nothing (case, spaces after the colon, a missing
    pair of angle brackets, source routes), strict where an error would
    route mail wrongly (the address syntax itself).
    """
    head, colon, rest = argument.partition(":")
    if not colon or head.strip().upper() != keyword:
        raise _Reply(501, "5.5.4", f"Syntax: {keyword}:<address>")
    match = _PATH.match(rest)
    if match is None:
        raise _Reply(501, "5.5.4", f"Syntax: {keyword}:<address>")
    address = match["bracketed"] if match["bracketed"] is not None else match["bare"]
    if address.startswith("@") and ":" in address:
        address = address.split(":", 1)[1]  # RFC 5321 4.1.2 source route
    params: dict[str, str | None] = {}
    for token in match["params"].split():
        param = _PARAM.match(token)
        if param is None:
            raise _Reply(501, "5.5.4", "Malformed parameter")
        params[param["key"].upper()] = param["value"]
    return address, params


def _valid_address(address: str) -> bool:
    return bool(_ADDRESS.fullmatch(address) or _QUOTED_LOCAL_ADDRESS.fullmatch(address))


class SMTPSession(Protocol, TimeoutMixin):
    """
    One SMTP connection.

    Input is kept as bytes until a command line is complete; message
    content is never decoded here.
    """

    _log = Logger()
    factory: SMTPServerFactory
    # The transaction, set by _reset_transaction.
    _sender: str | None
    _recipients: list[str]
    _recipient_keys: set[str]
    _message_id: str
    _utf8: bool
    """The client asked for SMTPUTF8 (RFC 6531): UTF-8 in addresses and headers."""

    def __init__(self) -> None:
        self._buffer = b""
        self._replies: list[bytes] = []
        self._discarding_line = False
        self._in_data = False
        self._data = bytearray()
        self._data_error: _Reply | None = None
        self._data_line_length = 0
        self._waiting = False
        self._write_blocked = False
        self._input_paused = False
        self._producing = False
        self._abort_timer: IDelayedCall | None = None
        self._processing = False
        self._closing = False
        self._errors = 0
        self._tls = False
        self._peer = ""
        self._helo: str | None = None
        self._reset_transaction()

    # Twisted's Protocol interface

    def connectionMade(self) -> None:
        self._peer = _host_of(self._wire.getPeer())
        self._tls = ISSLTransport.providedBy(self._wire)
        refusal = self.factory.admit(self)
        if refusal is not None:
            self._send(refusal)
            self._close()
            return
        self._wire.registerProducer(self, True)
        self._producing = True
        self.setTimeout(self.factory.timeout)
        self._send(b"220 " + self.factory.hostname.encode("idna") + b" ESMTP MailLaser")
        self._flush()

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.resetTimeout()
        self._buffer += data
        if self._write_blocked:
            self._hold_input()
        self._process()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        self._closing = True
        if self._abort_timer is not None and self._abort_timer.active():
            self._abort_timer.cancel()
        self.factory.release(self)

    # IPushProducer, towards our own transport: a client that sends commands
    # but never reads the replies fills the send buffer; stop reading (as
    # while a sink decides) instead of buffering replies without bound.

    def pauseProducing(self) -> None:
        self._write_blocked = True
        self._hold_input()

    def resumeProducing(self) -> None:
        self._write_blocked = False
        self._hold_input()
        self._process()

    def stopProducing(self) -> None:
        pass  # connectionLost follows

    def _hold_input(self) -> None:
        """
        Read from the client only while nothing makes us wait.

        A full send buffer stops the processing at once, but the reading
        only once input piles up: during a TLS handshake the TLS layer
        pauses us too, and it must go on reading to finish the handshake.
        """
        backlog = self._write_blocked and len(self._buffer) >= MAX_INPUT_BACKLOG
        paused = self._waiting or backlog
        if paused != self._input_paused and not self._closing:
            self._input_paused = paused
            if paused:
                self._wire.pauseProducing()
            else:
                self._wire.resumeProducing()

    def timeoutConnection(self) -> None:
        self._log.info("idle timeout for {peer}", peer=self._peer)
        self._send(
            _format(421, "4.4.2", f"{self.factory.hostname} Idle timeout, closing")
        )
        self._close()

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        """TimeoutMixin's clock: the factory's, so tests drive it."""
        return self.factory.clock.callLater(period, func)

    @property
    def _wire(self) -> Any:
        """
        The transport: TCP or TLS, a producer, maybe able to start TLS.
        Twisted's C{Protocol.transport} is typed as a bare ITransport.
        """
        return self.transport

    # What the factory needs to know

    @property
    def peer_host(self) -> str:
        return self._peer

    @property
    def busy(self) -> bool:
        """A transaction has reached DATA; shutdown lets it finish."""
        return self._in_data or self._waiting

    def shut_down(self) -> None:
        """The server is stopping: tell the client and hang up (RFC 5321 3.8)."""
        if not self._closing:
            self._send(
                _format(421, "4.3.2", f"{self.factory.hostname} Service shutting down")
            )
            self._close()

    # Input processing

    def _process(self) -> None:
        if self._processing:
            return  # a synchronous sink answered; the outer loop carries on
        self._processing = True
        try:
            while self._ready() and self._step():
                if len(self._replies) >= FLUSH_EVERY:
                    self._flush()  # may pause us: see pauseProducing
        finally:
            self._processing = False
        self._flush()

    def _ready(self) -> bool:
        return not (self._waiting or self._closing or self._write_blocked)

    def _step(self) -> bool:
        """Handle what the buffer holds next; C{False} when more input is needed."""
        if not self._buffer:
            return False
        if self._in_data:
            self._receive_data()
        elif self._discarding_line:
            self._skip_long_line()
        else:
            return self._receive_command()
        return True

    def _receive_command(self) -> bool:
        end = self._buffer.find(b"\n", 0, MAX_COMMAND_LINE)
        if end < 0:
            if len(self._buffer) < MAX_COMMAND_LINE:
                return False
            self._line_too_long()
            return True
        line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
        if line.endswith(b"\r"):
            line = line[:-1]
        self._command(line)
        return True

    def _line_too_long(self) -> None:
        self._discarding_line = True
        self._error(_Reply(500, "5.5.2", "Line too long"))

    def _skip_long_line(self) -> None:
        end = self._buffer.find(b"\n")
        if end < 0:
            self._buffer = b""
        else:
            self._buffer = self._buffer[end + 1 :]
            self._discarding_line = False

    def _command(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        verb, _, argument = text.partition(" ")
        handler = self._handlers.get(verb.upper())
        try:
            if handler is None:
                raise _Reply(500, "5.5.2", "Command not recognized")
            if self.factory.draining and verb.upper() not in ("QUIT", "NOOP", "RSET"):
                self.shut_down()
                return
            handler(self, argument)
        except _Reply as reply:
            self._error(reply)

    def _error(self, reply: _Reply) -> None:
        self._send(reply.line)
        if reply.code not in _PROTOCOL_ERRORS:
            return
        self._errors += 1
        if self._errors >= MAX_ERRORS:
            self._send(_format(421, "4.7.0", "Too many errors, closing"))
            self._close()

    # Commands

    def _do_HELO(self, argument: str) -> None:
        self._greet(argument)
        self._send(b"250 " + self.factory.hostname.encode("ascii", "replace"))

    def _do_EHLO(self, argument: str) -> None:
        self._greet(argument)
        lines = [self.factory.hostname, *self._extensions()]
        for line in lines[:-1]:
            self._send(b"250-" + line.encode("ascii", "replace"))
        self._send(b"250 " + lines[-1].encode("ascii", "replace"))

    def _greet(self, argument: str) -> None:
        domain = argument.strip()
        if not _HELO_DOMAIN.fullmatch(domain):
            raise _Reply(501, "5.5.4", "Syntax: EHLO hostname")
        self._reset_transaction()
        self._helo = domain

    def _extensions(self) -> Iterable[str]:
        yield "PIPELINING"
        yield f"SIZE {self.factory.max_message_size}"
        yield "8BITMIME"
        yield "SMTPUTF8"
        yield "ENHANCEDSTATUSCODES"
        if self._can_start_tls():
            yield "STARTTLS"

    def _do_MAIL(self, argument: str) -> None:
        if self._helo is None:
            raise _Reply(503, "5.5.1", "Send HELO/EHLO first")
        if self._sender is not None:
            raise _Reply(503, "5.5.1", "Nested MAIL command")
        address, params = _parse_path(argument, "FROM")
        if address and not _valid_address(address):
            raise _Reply(501, "5.1.7", "Bad sender address syntax")
        self._check_mail_params(params)
        try:
            self.factory.sink.check_capacity()
        except Refusal as refusal:
            raise _Reply(refusal.code, refusal.status, refusal.text) from None
        self._utf8 = "SMTPUTF8" in params
        self._sender = address
        self._message_id = new_message_id(self.factory.clock.seconds())
        self._send(_format(250, "2.1.0", "Sender OK"))

    def _check_mail_params(self, params: dict[str, str | None]) -> None:
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    raise _Reply(501, "5.5.4", "Bad SIZE parameter")
                if int(value) > self.factory.max_message_size:
                    raise _Reply(552, "5.3.4", "Message size exceeds fixed maximum")
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    raise _Reply(555, "5.5.4", "Unsupported BODY type")
            elif key == "SMTPUTF8":
                if value is not None:
                    raise _Reply(501, "5.5.4", "SMTPUTF8 takes no value")
            else:
                raise _Reply(555, "5.5.4", f"Unsupported parameter {key}")

    def _do_RCPT(self, argument: str) -> None:
        if self._sender is None:
            raise _Reply(503, "5.5.1", "Need MAIL command first")
        address, params = _parse_path(argument, "TO")
        if params:
            raise _Reply(555, "5.5.4", "Unsupported parameter")
        if not _valid_address(address):
            raise _Reply(501, "5.1.3", "Bad recipient address syntax")
        if address.casefold() not in self.factory.targets:
            raise _Reply(550, "5.1.1", "No such user here")
        if address.casefold() not in self._recipient_keys:
            if len(self._recipients) >= self.factory.max_recipients:
                self._send(_format(452, "4.5.3", "Too many recipients"))
                return
            self._recipients.append(address)
            self._recipient_keys.add(address.casefold())
        self._send(_format(250, "2.1.5", "Recipient OK"))

    def _do_DATA(self, argument: str) -> None:
        if argument.strip():
            raise _Reply(501, "5.5.4", "DATA takes no arguments")
        if self._sender is None:
            raise _Reply(503, "5.5.1", "Need MAIL command first")
        if not self._recipients:
            raise _Reply(503, "5.5.1", "No valid recipients")
        self._in_data = True
        self._data = bytearray(_LINE_START)
        self._data_error = None
        self._data_line_length = 0
        self._send(b"354 End data with <CR><LF>.<CR><LF>")

    def _do_RSET(self, argument: str) -> None:
        self._reset_transaction()
        self._send(_format(250, "2.0.0", "OK"))

    def _do_NOOP(self, argument: str) -> None:
        self._send(_format(250, "2.0.0", "OK"))

    def _do_HELP(self, argument: str) -> None:
        self._send(
            _format(
                214,
                "2.0.0",
                "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY STARTTLS",
            )
        )

    def _do_VRFY(self, argument: str) -> None:
        self._send(_format(252, "2.5.2", "Cannot VRFY user, send mail to find out"))

    def _do_EXPN(self, argument: str) -> None:
        raise _Reply(502, "5.5.1", "EXPN not supported")

    def _do_unimplemented(self, argument: str) -> None:
        raise _Reply(502, "5.5.1", "Command not implemented")

    def _do_QUIT(self, argument: str) -> None:
        self._send(_format(221, "2.0.0", "Bye"))
        self._close()

    def _do_STARTTLS(self, argument: str) -> None:
        if argument.strip():
            raise _Reply(501, "5.5.4", "STARTTLS takes no arguments")
        if self._tls:
            raise _Reply(503, "5.5.1", "TLS already active")
        if not self._can_start_tls():
            raise _Reply(454, "4.7.0", "TLS not available")
        if self._buffer:
            # Cleartext pipelined after STARTTLS (CVE-2011-0411's class of
            # attack): never execute it, not even after the handshake.
            self._log.warn("cleartext after STARTTLS from {peer}", peer=self._peer)
            self._closing = True
            self._wire.abortConnection()
            return
        self._send(_format(220, "2.0.0", "Ready to start TLS"))
        self._flush()
        self._wire.startTLS(self.factory.tls_context)
        self._tls = True
        self._helo = None  # RFC 3207 4.2: forget everything learnt in cleartext
        self._reset_transaction()

    def _can_start_tls(self) -> bool:
        return (
            not self._tls
            and self.factory.tls_context is not None
            and ITLSTransport.providedBy(self._wire)
        )

    _handlers: dict[str, Callable[[SMTPSession, str], None]] = {
        "HELO": _do_HELO,
        "EHLO": _do_EHLO,
        "MAIL": _do_MAIL,
        "RCPT": _do_RCPT,
        "DATA": _do_DATA,
        "RSET": _do_RSET,
        "NOOP": _do_NOOP,
        "HELP": _do_HELP,
        "VRFY": _do_VRFY,
        "EXPN": _do_EXPN,
        "QUIT": _do_QUIT,
        "STARTTLS": _do_STARTTLS,
        "AUTH": _do_unimplemented,
        "BDAT": _do_unimplemented,
        "TURN": _do_unimplemented,
        "ETRN": _do_unimplemented,
    }

    # DATA, in bulk

    def _receive_data(self) -> None:
        """
        Take message content from the buffer, up to CRLF.CRLF.

        Works per received chunk, not per line: the end marker is found with
        C{bytes.find} and dot-stuffing is undone with C{bytes.replace}.  Only
        CRLF.CRLF ends the message (no smuggling with bare LF), and the
        size and line limits are enforced while the data streams in, so
        an oversized message is discarded as it arrives.
        """
        chunk, self._buffer = self._buffer, b""
        searched = len(self._data)
        self._data += chunk
        end = self._data.find(_END_OF_DATA, max(0, searched - len(_END_OF_DATA) + 1))
        if end >= 0:
            stop = end + len(_END_OF_DATA)
            self._buffer = bytes(self._data[stop:])  # pipelined commands
            del self._data[stop:]
            chunk = chunk[: len(chunk) - len(self._buffer)]
        self._check_data_limits(chunk)
        if end < 0:
            if self._data_error is not None:
                del self._data[: -len(_END_OF_DATA)]  # keep only what the marker needs
            return
        data, self._data = self._data, bytearray()
        del data[end + len(_LINE_START) :]  # the end marker, but for its first CRLF
        self._in_data = False
        self._end_of_data(data)

    def _check_data_limits(self, chunk: bytes) -> None:
        if self._data_error is not None:
            return
        if len(self._data) > self.factory.max_message_size + 2 * len(_END_OF_DATA):
            self._data_error = _Reply(
                552, "5.3.4", "Message size exceeds fixed maximum"
            )
            return
        first = chunk.find(b"\n")
        if first < 0:
            self._data_line_length += len(chunk)
            longest = self._data_line_length
        else:
            longest = max(self._data_line_length + first, _longest_line(chunk, first))
            self._data_line_length = len(chunk) - chunk.rfind(b"\n") - 1
            longest = max(longest, self._data_line_length)
        if longest > MAX_DATA_LINE + 1:  # the CR belongs to the line ending
            self._data_error = _Reply(500, "5.5.2", "Line too long")

    def _end_of_data(self, data: bytearray) -> None:
        """
        C{data} is the content as sent, after a CRLF that makes its first
        line like the others for undoing dot-stuffing.  Two copies of it are
        made (a megabyte takes about a millisecond each): the unstuffed
        content, and the message with its trace header.
        """
        if self._data_error is not None:
            self._send(self._data_error.line)
            self._reset_transaction()
            return
        unstuffed = data.replace(b"\r\n.", b"\r\n")
        if len(unstuffed) - len(_LINE_START) > self.factory.max_message_size:
            self._send(_format(552, "5.3.4", "Message size exceeds fixed maximum"))
            self._reset_transaction()
            return
        message = self._message(memoryview(unstuffed)[len(_LINE_START) :])
        self._reset_transaction()
        self._waiting = True
        self.setTimeout(None)
        self._hold_input()
        d = maybeDeferred(self.factory.sink.receive, message)
        d.addCallbacks(
            self._accepted,
            self._not_accepted,
            callbackArgs=(message,),
            errbackArgs=(message,),
        )
        d.addBoth(self._resume)

    def _message(self, content: memoryview) -> Message:
        now = self.factory.clock.seconds()
        envelope = Envelope(
            sender=self._sender or "",
            recipients=tuple(self._recipients),
            helo=self._helo or "",
            peer=self._peer,
        )
        trace = self._received_header(envelope, now)
        return Message(self._message_id, envelope, b"".join((trace, content)), now)

    def _received_header(self, envelope: Envelope, now: float) -> bytes:
        """RFC 5321 4.4: the receiving server adds trace information."""
        recipient = (
            f"\r\n\tfor <{envelope.recipients[0]}>"
            if len(envelope.recipients) == 1
            else ""
        )
        protocol = ("UTF8SMTP" if self._utf8 else "ESMTP") + ("S" if self._tls else "")
        return (
            f"Received: from {envelope.helo} ([{envelope.peer}])\r\n"
            f"\tby {self.factory.hostname} (MailLaser) with {protocol}"
            f" id {self._message_id}{recipient};\r\n\t{_date(int(now))}\r\n"
        ).encode("utf-8", "replace")

    def _accepted(self, result: object, message: Message) -> None:
        self._log.info(
            "accepted {message_id} from {peer}: {size} bytes for {count} recipient(s)",
            message_id=message.id,
            peer=self._peer,
            size=len(message.raw),
            count=len(message.envelope.recipients),
        )
        self._send(_format(250, "2.0.0", f"Ok: queued as {message.id}"))
        self.factory.on_reply(250)
        self._errors = 0

    def _not_accepted(self, failure: Failure, message: Message) -> None:
        if failure.check(Refusal):
            refusal: Any = failure.value
            self._log.info(
                "refused {message_id} from {peer}: {code} {reason}",
                message_id=message.id,
                peer=self._peer,
                code=refusal.code,
                reason=refusal.text,
            )
            self._send(_format(refusal.code, refusal.status, refusal.text))
        else:
            # Never Twisted's 550: whatever broke, the sender should retry.
            self._log.failure(
                "could not accept {message_id}", failure, message_id=message.id
            )
            self._send(
                _format(451, "4.3.0", "Temporary failure, please try again later")
            )

    def _resume(self, ignored: object) -> None:
        self._waiting = False
        if self._closing:
            return
        self.setTimeout(self.factory.timeout)
        self._hold_input()
        if self.factory.draining:
            self._flush()
            self.shut_down()
            return
        self._process()

    # Output and state

    def _send(self, line: bytes) -> None:
        if line[:1] in (b"4", b"5"):
            self.factory.on_reply(int(line[:3]))
        self._replies.append(line + b"\r\n")

    def _flush(self) -> None:
        if self._replies:
            replies, self._replies = self._replies, []
            write_now(self._wire, b"".join(replies))

    def _close(self) -> None:
        self._flush()
        self._closing = True
        self._buffer = b""
        if self._write_blocked:
            # The client is not reading; it would never take the last reply,
            # and a polite close would hold the connection slot for ever.
            self._wire.abortConnection()
            return
        if self._producing:
            # A TLS transport closes only once no producer is registered
            # (ITransport.loseConnection); TCP happens not to wait.
            self._producing = False
            self._wire.unregisterProducer()
        self._wire.loseConnection()
        self._abort_timer = self.callLater(CLOSE_GRACE, self._wire.abortConnection)

    def _reset_transaction(self) -> None:
        self._sender = None
        self._recipients = []
        self._recipient_keys = set()
        self._message_id = ""
        self._utf8 = False


def _longest_line(chunk: bytes, first_newline: int) -> int:
    """The longest line that starts and ends inside C{chunk}."""
    if len(chunk) - first_newline <= MAX_DATA_LINE:
        return 0  # cannot exceed the limit; skip the split on the hot path
    return max(map(len, chunk[first_newline + 1 :].split(b"\n")[:-1]), default=0)


def _host_of(address: IAddress) -> str:
    return str(getattr(address, "host", ""))


class SMTPServerFactory(Factory[SMTPSession]):
    """
    Shared state of all sessions: policy, limits, and the connections open.

    The connection caps are enforced here because only the factory sees
    every session; refusing with C{421} (rather than not accepting) tells a
    legitimate MTA to come back later.
    """

    protocol = SMTPSession
    noisy = False
    _log = Logger()

    def __init__(
        self,
        *,
        sink: IMessageSink,
        clock: IReactorTime,
        hostname: str,
        targets: Iterable[str],
        max_message_size: int,
        max_recipients: int,
        timeout: float,
        tls_context: Any = None,
        max_connections: int = 1000,
        max_connections_per_ip: int = 50,
        on_reply: Callable[[int], object] = lambda code: None,
    ) -> None:
        self.sink = sink
        self.clock = clock
        self.hostname = hostname
        self.targets = frozenset(target.casefold() for target in targets)
        self.max_message_size = max_message_size
        self.max_recipients = max_recipients
        self.timeout = timeout
        self.tls_context = tls_context
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.on_reply = on_reply  # told 250 at the end of DATA, and every 4xx/5xx
        self.draining = False
        self.sessions: set[SMTPSession] = set()
        self._per_host: Counter[str] = Counter()
        self._idle_waiters: list[Deferred[None]] = []

    def admit(self, session: SMTPSession) -> bytes | None:
        """Register a new session, or return the C{421} that turns it away."""
        host = session.peer_host
        if self.draining:
            return _format(421, "4.3.2", f"{self.hostname} Service shutting down")
        if len(self.sessions) >= self.max_connections:
            self._log.warn("connection limit reached, refusing {peer}", peer=host)
            return _format(
                421, "4.7.0", f"{self.hostname} Too many connections, try later"
            )
        if self._per_host[host] >= self.max_connections_per_ip:
            self._log.warn("per-address connection limit reached for {peer}", peer=host)
            return _format(
                421, "4.7.0", f"{self.hostname} Too many connections from you"
            )
        self.sessions.add(session)
        self._per_host[host] += 1
        return None

    def release(self, session: SMTPSession) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self._per_host[session.peer_host] -= 1
            if not self._per_host[session.peer_host]:
                del self._per_host[session.peer_host]
        self._notify_if_idle()

    def drain(self, grace: float) -> Deferred[None]:
        """
        Stop taking new transactions and let those in DATA finish.

        Idle sessions are told C{421} at once; busy ones get until C{grace}
        seconds have passed, then C{421} too (they were not answered C{250},
        so the client still holds the message and will retry).
        """
        self.draining = True
        for session in list(self.sessions):
            if not session.busy:
                session.shut_down()
        if not self._busy():
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        timer: IDelayedCall = self.clock.callLater(grace, self._give_up, waiter)
        waiter.addBoth(cancel_timer, timer)
        return waiter

    def _busy(self) -> bool:
        return any(session.busy for session in self.sessions)

    def _notify_if_idle(self) -> None:
        if self._idle_waiters and not self._busy():
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _give_up(self, waiter: Deferred[None]) -> None:
        busy = [session for session in self.sessions if session.busy]
        self._log.warn(
            "grace period over, closing {count} busy session(s)", count=len(busy)
        )
        for session in busy:
            session.shut_down()
        if waiter in self._idle_waiters:
            self._idle_waiters.remove(waiter)
            waiter.callback(None)
