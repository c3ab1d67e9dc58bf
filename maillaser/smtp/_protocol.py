"""
The SMTP session: Twisted's L{smtp.ESMTP}, with MailLaser's replies and
limits, and the smallest overrides that fix Twisted's defects.

Twisted's L{smtp.SMTP} is a L{basic.LineOnlyReceiver}, which can neither
pause between lines nor take raw data.  L{basic.LineReceiver} is its
documented superset with both, so it comes first in the bases: its
C{dataReceived}, C{setRawMode} and C{pauseProducing} are the ones used.
Pausing is what makes C{PIPELINING} honest (a command waits until the one
before it is answered), and raw mode is what lets DATA be taken in bulk.

Commands follow Twisted's flow: C{do_MAIL} and C{do_RCPT} end in Twisted's
C{validateFrom}/C{validateTo}, which ask the transaction's
L{IMessageDelivery} (from the factory's L{IMessageDeliveryFactory}), and
the end of DATA goes through Twisted's C{dataLineReceived}, which calls
every message's C{eomReceived}.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, ISSLTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageSMTP
from twisted.protocols import basic
from twisted.python.failure import Failure
from zope.interface import implementer

from maillaser.logs import debugging, observer
from maillaser.smtp._address import Mailbox, Recipient, parse_path, valid_address
from maillaser.smtp._data import (
    BARE_NEWLINE,
    TOO_BIG,
    BulkData,
    has_bare_newline,
    normalize_newlines,
)
from maillaser.smtp._delivery import MailLaserDelivery
from maillaser.smtp._replies import with_status

if TYPE_CHECKING:
    from maillaser.smtp._factory import MailLaserSMTPFactory

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
"""Input kept while the client does not read our replies."""

CLOSE_GRACE = 10.0
"""Seconds a closing connection has to take its last reply before it is cut."""

DATA_RATE_GRACE = 10.0
"""
Seconds of DATA not judged by the minimum rate: a small message may come
in one late packet, and a slow start (TCP's, a busy client) is no attack.
After it, the bytes received must keep up with the rate from the start.
"""

HANDSHAKE_TIMEOUT = 30.0
"""Seconds a TLS handshake (STARTTLS or implicit TLS) may take."""

_HELO_DOMAIN = re.compile(rb"[\x21-\x7e]{1,255}")

_SECRET_VERBS = (b"AUTH",)
"""Commands whose arguments are credentials: never logged."""


def loggable_command(line: bytes) -> str:
    """A command line for the debug log: printable, credentials masked."""
    verb, space, _ = line.partition(b" ")
    if verb.upper() in _SECRET_VERBS:
        line = verb + space + b"****" if space else verb
    return line.decode("ascii", "backslashreplace")


@implementer(IHandshakeListener)
class MailLaserESMTP(basic.LineReceiver, smtp.ESMTP):
    """
    One SMTP connection, built by L{maillaser.smtp.MailLaserSMTPFactory}.

    Input is kept as bytes; message content is never decoded here.
    """

    bulk_data = True
    """
    Take DATA in bulk (raw mode) for MailLaser's own messages; any other
    L{IMessageSMTP} always gets its lines through Twisted's own DATA path.
    Set it to C{False} to measure the difference.
    """

    max_data_line = MAX_DATA_LINE
    """The longest DATA line, CRLF excluded."""

    data_rate_grace = DATA_RATE_GRACE
    handshake_timeout = HANDSHAKE_TIMEOUT

    noisy = False  # else Twisted logs every envelope at DATA
    smtputf8 = False
    """The client asked for SMTPUTF8 (RFC 6531) in this transaction."""

    _log = Logger(observer=observer)
    factory: MailLaserSMTPFactory
    timeout: float  # type: ignore[assignment]  # seconds, not only whole ones
    _helo: tuple[Any, Any]
    """Twisted's: the HELO argument (C{None} before HELO) and the peer."""

    def __init__(self, chal: Any = None, context_factory: Any = None) -> None:
        super().__init__(chal, context_factory)
        self.peer_host = ""
        self._peer = b""
        self._closing = False
        self._producing = False
        self._reading = True
        self._awaiting_reply = False
        self._write_blocked = False
        self._held = 0
        self._replies = 0
        self._errors = 0
        self._skipping: bytes | None = None
        self._after_long_line = b""
        self._messages: list[IMessageSMTP] = []
        self._data_size = 0
        self._reader: BulkData | None = None
        self._abort_timer: IDelayedCall | None = None
        self._unconsumed = 0
        """Bytes of a command line begun but not ended (or held)."""
        self._deadline: IDelayedCall | None = None
        """The DATA rate check, or the TLS handshake's deadline."""
        self._data_started = 0.0
        self._data_received = 0
        self._unknown_recipients = 0
        self._reserved = 0
        """Bytes of the budget this session holds for its message."""
        self._content = 0
        """Bytes of the current message written so far."""
        self._answering_data = False
        """The end of DATA came; its reply releases the reservation."""
        self._declared_size = 0
        """The transaction's C{SIZE=}, reserved at DATA (RFC 1870)."""

    # The connection

    def connectionMade(self) -> None:
        self.peer_host = str(getattr(self._transport.getPeer(), "host", ""))
        self._peer = self.peer_host.encode("utf-8")
        refusal = self.factory.admit(self)
        if refusal is not None:
            self._reply(421, refusal)
            self._close()
            return
        # A client that sends commands but never reads the replies fills the
        # send buffer: the transport pauses us (see pauseProducing).
        self._transport.registerProducer(self, True)
        self._producing = True
        super().connectionMade()
        self.startedTLS = ISSLTransport.providedBy(self.transport)
        if self.startedTLS:
            self._start_handshake_deadline()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closing = True
        self.paused = True
        if self._abort_timer is not None and self._abort_timer.active():
            self._abort_timer.cancel()
        self._cancel_deadline()
        super().connectionLost(reason)
        self._release_reservation()
        self.factory.release(self)

    def greeting(self) -> bytes:
        host: bytes = self.host
        return host + b" ESMTP MailLaser"

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        """TimeoutMixin's clock: the factory's, so tests can drive it."""
        return self.factory.clock.callLater(period, func)

    def timeoutConnection(self) -> None:
        """
        Idle too long, or a command line not ended within the timeout of
        its first byte: our reply, and a close that works with TLS.
        """
        self._time_out("idle timeout", b"Idle timeout, closing")

    def _time_out(self, why: str, text: bytes) -> None:
        self._log.info("{why} for {peer}", why=why, peer=self.peer_host)
        self._reply(421, b"4.4.2 " + self.host + b" " + text)
        self._close()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _start_handshake_deadline(self) -> None:
        self._cancel_deadline()
        self._deadline = self.callLater(
            self.handshake_timeout, self._handshake_too_slow
        )

    def _handshake_too_slow(self) -> None:
        self._deadline = None
        self._time_out("TLS handshake timeout", b"TLS handshake timeout, closing")
        if not self._write_blocked:
            # Nothing reaches a client whose handshake did not finish.
            self._transport.abortConnection()

    def handshakeCompleted(self) -> None:
        """L{IHandshakeListener}: the TLS layer finished its handshake."""
        self._cancel_deadline()

    def _start_data_rate_check(self) -> None:
        self._data_started = self.factory.clock.seconds()
        self._data_received = 0
        self._content = 0
        if self.factory.min_data_rate > 0:
            self._deadline = self.callLater(self.data_rate_grace, self._check_data_rate)

    def _check_data_rate(self) -> None:
        """
        The bytes received must average C{min_data_rate} since DATA began
        (less the grace): a client trickling its message would otherwise
        hold a connection slot for as long as it likes.  The next check is
        when what was received stops being enough.
        """
        self._deadline = None
        rate = self.factory.min_data_rate
        elapsed = (
            self.factory.clock.seconds() - self._data_started - self.data_rate_grace
        )
        if self._data_received < rate * elapsed:
            self._time_out("data rate too low", b"Data rate too low, closing")
            return
        due = self._data_received / rate - elapsed
        self._deadline = self.callLater(max(due, 1.0), self._check_data_rate)

    @property
    def busy(self) -> bool:
        """A transaction has reached DATA or waits for a reply; draining lets
        it finish."""
        return self.mode == smtp.DATA or self._awaiting_reply

    def shut_down(self) -> None:
        """The server is stopping: tell the client and hang up (RFC 5321 3.8)."""
        if not self._closing:
            self._reply(421, b"4.3.2 " + self.host + b" Service shutting down")
            self._close()

    @property
    def _transport(self) -> Any:
        """
        The transport: TCP or TLS, a consumer, maybe able to start TLS.
        Twisted's C{Protocol.transport} is typed as a bare ITransport.
        """
        return self.transport

    def _close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.paused = True
        self.setTimeout(None)
        if self._write_blocked:
            # The client is not reading; it would never take the last reply,
            # and a polite close would hold the connection slot for ever.
            self._transport.abortConnection()
            return
        if self._producing:
            # ITransport.loseConnection waits for the producer to go: TLS
            # does, TCP happens not to.
            self._producing = False
            self._transport.unregisterProducer()
        self._transport.loseConnection()
        self._abort_timer = self.callLater(CLOSE_GRACE, self._transport.abortConnection)

    # Input: lines, paused while a reply is pending or the client not reading

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self.paused:
            self._held += len(data)
            self._update_reading()
        if self._skipping is not None:
            data = self._skip_long_line(data)
            if self._skipping is not None:
                return
        self._feed(data)
        while self._after_long_line:
            rest, self._after_long_line = self._after_long_line, b""
            self._feed(rest)
        if not self.paused:  # all handled but an incomplete line
            self._held = 0
            self._update_reading()

    def _feed(self, data: bytes) -> None:
        """
        Hand C{data} to the line parser.  The timeout runs from the first
        byte of a line, not from the last: Twisted resets it when a line
        ends, and here when a line begins, but never for the bytes between.
        """
        if self.line_mode and data:
            if not self._unconsumed:
                self.resetTimeout()
            self._unconsumed += len(data)
        super().dataReceived(data)

    def setLineMode(self, extra: bytes = b"") -> Any:
        self._unconsumed = 0
        return super().setLineMode(extra)

    def lineReceived(self, line: bytes) -> None:
        self._unconsumed = max(0, self._unconsumed - len(line) - 2)
        if self.mode == smtp.DATA:
            self._data_received += len(line) + 2
        elif debugging():
            self._log.debug(
                "{peer} sent: {command}",
                peer=self.peer_host,
                command=loggable_command(line),
                **self._log_ids(),
            )
        expects_reply = self.mode != smtp.DATA or line == b"."
        if self.mode == smtp.DATA and line == b".":
            self._cancel_deadline()
            self._answering_data = True
        replies = self._replies
        smtp.ESMTP.lineReceived(self, line)
        if expects_reply and self._replies == replies and not self._closing:
            # twisted#8126: SMTP runs pipelined commands while a validator's
            # or eomReceived's Deferred is pending, so replies come out of
            # order (DATA gets 503 before RCPT's 250).  Read no further
            # until the reply is sent (see _reply).
            self._awaiting_reply = True
            self.setTimeout(None)  # the sink answers within a bounded time
            self._update_flow()
        elif self.factory.draining and not self.busy:
            self.shut_down()

    @property
    def MAX_LENGTH(self) -> int:  # type: ignore[override]
        """LineReceiver's line limit (CRLF excluded), by mode."""
        return self.max_data_line if self.mode == smtp.DATA else MAX_COMMAND_LINE - 2

    def lineLengthExceeded(self, line: bytes) -> None:
        # twisted: SMTP.lineLengthExceeded ends DATA and runs the rest of the
        # body as commands, LineReceiver drops what followed the long line,
        # and LineOnlyReceiver's unterminated line grows without bound.
        # Refuse the line, skip to its end, and go on from there.
        if self.mode == smtp.DATA:
            self._fail_data(500, b"5.5.2 Line too long")
        else:
            self._reply(500, b"5.5.2 Line too long")
        _, crlf, rest = line.partition(b"\r\n")
        self._unconsumed = 0
        if crlf:
            self._after_long_line = rest
        else:
            self._skipping = b"\r" if line.endswith(b"\r") else b""

    def _skip_long_line(self, data: bytes) -> bytes:
        """Drop input up to the CRLF that ends a line already refused."""
        assert self._skipping is not None
        data = self._skipping + data
        end = data.find(b"\r\n")
        if end < 0:
            self._skipping = data[-1:] if data.endswith(b"\r") else b""
            return b""
        self._skipping = None
        return data[end + 2 :]

    def pauseProducing(self) -> None:
        """The transport's send buffer is full: stop answering."""
        self._write_blocked = True
        self._update_flow()

    def resumeProducing(self) -> None:
        self._write_blocked = False
        self._update_flow()

    def stopProducing(self) -> None:
        """The transport is going away; connectionLost follows."""
        self._closing = True
        self.paused = True

    def _update_flow(self) -> None:
        """Handle input only while nothing makes us wait."""
        waiting = self._awaiting_reply or self._write_blocked or self._closing
        resumed = self.paused and not waiting
        self.paused = waiting
        if resumed:
            self.dataReceived(b"")  # what waited; it may pause us again
        self._update_reading()

    def _update_reading(self) -> None:
        """
        Read while no reply is awaited and what waits to be handled is small.

        A full send buffer stops the handling at once (L{pauseProducing}),
        but the reading only once input piles up: during a TLS handshake
        the TLS layer pauses us too, and it must go on reading to finish
        the handshake.  C{_held} counts what arrived since the handling
        last caught up; the handling may have stopped within one more read.
        """
        if self._closing:
            return
        reading = not (self._awaiting_reply or self._held >= MAX_INPUT_BACKLOG)
        if reading != self._reading:
            self._reading = reading
            if reading:
                self._transport.resumeProducing()
            else:
                self._transport.pauseProducing()

    # Replies

    def sendCode(self, code: int, message: bytes | str = b"") -> None:
        """
        Every reply but the greeting and HELO/EHLO's carries an enhanced
        status code (ENHANCEDSTATUSCODES); Twisted's own have none.  A
        C{str} text (an L{smtp.SMTPServerError} raised with one) is taken
        too, where Twisted would raise C{TypeError} and answer nothing.
        """
        if isinstance(message, str):
            message = message.encode("utf-8", "replace")
        self._reply(*with_status(code, message))

    def _reply(self, code: int, message: bytes) -> None:
        """Send a finished reply; count it; go on if it was awaited."""
        smtp.ESMTP.sendCode(self, code, message)
        if debugging():
            self._log.debug(
                "{peer} got: {code} {reply}",
                peer=self.peer_host,
                code=code,
                reply=message.decode("ascii", "backslashreplace"),
                **self._log_ids(),
            )
        self._replies += 1
        if self._answering_data:
            self._answering_data = False
            self._release_reservation()
        if code >= 400:
            self.factory.on_reply(code)
        if code in _PROTOCOL_ERRORS and not self._closing:
            self._errors += 1
            if self._errors >= MAX_ERRORS:
                self._reply(421, b"4.7.0 Too many errors, closing")
                self._close()
        if self._awaiting_reply and not self._closing:
            self._awaiting_reply = False
            if self.factory.draining:
                self.shut_down()
                return
            self.setTimeout(self.timeout)
            self._update_flow()

    def _log_ids(self) -> dict[str, str]:
        """The transaction's message id, once MAIL FROM has made one."""
        delivery = self.delivery
        if isinstance(delivery, MailLaserDelivery) and delivery.message_id:
            return {"message_id": delivery.message_id}
        return {}

    def _messageHandled(self, results: list[tuple[bool, Any]]) -> None:
        # twisted#4904: SMTP._messageHandled answers 550 to every failure,
        # even an SMTPServerError(451), so a temporary problem would bounce
        # the mail.  Answer the error's own reply, else 451.
        failures = [result for ok, result in results if not ok]
        for failure in failures:
            if failure.check(smtp.SMTPServerError):
                self.sendCode(failure.value.code, failure.value.resp)
                return
        for failure in failures:
            self._log.failure("message not accepted", failure)
        if failures:
            self._reply(451, b"4.3.0 Temporary failure, please try again later")
            return
        self._errors = 0
        self.factory.on_reply(250)
        texts = [result for _, result in results if isinstance(result, bytes)]
        self.sendCode(250, texts[0] if texts else b"Message accepted")

    # Commands

    def do_HELO(self, rest: bytes) -> None:
        if self._greet(rest):
            self._reply(250, self.host)

    def do_EHLO(self, rest: bytes) -> None:
        if self._greet(rest):
            self._reply(250, self.host + b"\n" + self.listExtensions())

    def _greet(self, rest: bytes) -> bool:
        """HELO and EHLO: a domain (or address literal) is required."""
        domain = rest.strip()
        if not _HELO_DOMAIN.fullmatch(domain):
            self._reply(501, b"5.5.4 Syntax: EHLO hostname")
            return False
        self._helo = (domain, self._peer)
        self._from = None
        self._to = []
        return True

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        return {
            b"PIPELINING": None,
            b"SIZE": [b"%d" % self.factory.max_message_size],
            b"8BITMIME": None,
            b"SMTPUTF8": None,
            b"ENHANCEDSTATUSCODES": None,
            **super().extensions(),
        }

    def do_MAIL(self, rest: bytes) -> None:
        # twisted#8128: SMTP.do_MAIL parses the ESMTP parameters and throws
        # them away (SIZE=, BODY= unchecked), and its Address is ASCII only,
        # so SMTPUTF8 addresses get 553.  Parse both here, then validate as
        # Twisted does.
        if self._helo[0] is None:
            self._reply(503, b"5.5.1 Send HELO/EHLO first")
        elif self._from is not None:
            self._reply(503, b"5.5.1 Nested MAIL command")
        else:
            try:
                address, params = parse_path(rest, "FROM")
                if address and not valid_address(address):
                    raise smtp.SMTPServerError(501, b"5.1.7 Bad sender address syntax")
                self._check_mail_parameters(params)
            except smtp.SMTPServerError as error:
                self._reply(error.code, error.resp)
                return
            self._to = []
            self.smtputf8 = "SMTPUTF8" in params
            self._declared_size = int(params.get("SIZE") or 0)
            validated = maybeDeferred(self.validateFrom, self._helo, Mailbox(address))
            validated.addCallbacks(self._cbFromValidate, self._ebFromValidate)

    def _check_mail_parameters(self, params: dict[str, str | None]) -> None:
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    raise smtp.SMTPServerError(501, b"5.5.4 Bad SIZE parameter")
                if int(value) > self.factory.max_message_size:
                    raise smtp.SMTPServerError(*TOO_BIG)
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    raise smtp.SMTPServerError(555, b"5.5.4 Unsupported BODY type")
            elif key == "SMTPUTF8":
                if value is not None:
                    raise smtp.SMTPServerError(501, b"5.5.4 SMTPUTF8 takes no value")
            else:
                raise smtp.SMTPServerError(
                    555, b"5.5.4 Unsupported parameter " + key.encode()
                )

    def do_RCPT(self, rest: bytes) -> None:
        """Twisted's C{do_RCPT}, but for UTF-8 addresses (see L{do_MAIL})."""
        if self._from is None:
            self._reply(503, b"5.5.1 Need MAIL command first")
            return
        try:
            address, params = parse_path(rest, "TO")
            if params:
                raise smtp.SMTPServerError(555, b"5.5.4 Unsupported parameter")
            if not valid_address(address):
                raise smtp.SMTPServerError(501, b"5.1.3 Bad recipient address syntax")
        except smtp.SMTPServerError as error:
            self._reply(error.code, error.resp)
            return
        user = Recipient(Mailbox(address), self._helo, self, self._from)
        validated = maybeDeferred(self.validateTo, user)
        validated.addCallbacks(
            self._cbToValidate, self._ebToValidate, callbackArgs=(user,)
        )

    def _ebToValidate(self, failure: Failure) -> None:
        """
        Twisted's refusal, counted: a session trying recipient after
        recipient (a directory harvest) is ended past the limit.
        """
        super()._ebToValidate(failure)
        if failure.check(smtp.SMTPBadRcpt) and not self._closing:
            self._unknown_recipients += 1
            if self._unknown_recipients > self.factory.max_unknown_recipients:
                self._log.info(
                    "too many unknown recipients from {peer}", peer=self.peer_host
                )
                self._reply(421, b"4.7.0 Too many unknown recipients, closing")
                self._close()

    def validateTo(self, user: smtp.User) -> Any:
        """
        Twisted's, noting each message it makes at DATA, so that a message
        refused for a limit is told C{connectionLost} as Twisted does for
        the ones it refuses itself.
        """
        made = super().validateTo(user)
        if isinstance(made, Deferred):
            return made.addCallback(self._noted)
        return self._noted(made)

    def _noted(self, make: Callable[[], IMessageSMTP]) -> Callable[[], IMessageSMTP]:
        def noted() -> IMessageSMTP:
            message = make()
            self._messages.append(message)
            return message

        return noted

    def do_DATA(self, rest: bytes) -> None:
        if self.clearLineBuffer():
            # RFC 2920 3.1: DATA ends a pipelined group; the content may
            # only follow its 354.  Content sent ahead would run as commands
            # if DATA were refused.  Postfix's "improper command pipelining".
            self._log.info("data before 354 from {peer}", peer=self.peer_host)
            self._reply(554, b"5.5.0 Improper command pipelining after DATA")
            self._close()
        elif rest.strip():
            self._reply(501, b"5.5.4 DATA takes no arguments")
        elif self._from is None:
            self._reply(503, b"5.5.1 Need MAIL command first")
        elif not self._to:
            self._reply(503, b"5.5.1 No valid recipients")
        elif not self._reserve(min(self._declared_size, self.factory.max_message_size)):
            self._log.info(
                "in-flight message bytes at their limit, DATA refused for {peer}",
                peer=self.peer_host,
            )
            self._reply(452, b"4.3.1 Insufficient system storage, try again later")
        else:
            self._messages = []
            self._data_size = 0
            super().do_DATA(rest)
            if self.mode == smtp.DATA:
                self._start_data_rate_check()
                self._maybe_take_data_in_bulk()
            else:
                self._release_reservation()

    def _reserve(self, size: int) -> bool:
        """Take C{size} more bytes of the front's in-flight budget (at least one)."""
        if not self.factory.reserve(max(size, 1)):
            return False
        self._reserved += max(size, 1)
        return True

    def _release_reservation(self) -> None:
        reserved, self._reserved = self._reserved, 0
        self.factory.unreserve(reserved)

    def _count_content(self, size: int) -> None:
        """
        C{size} more bytes of the message are held: past what was reserved
        (a client that declared no SIZE, or too small a one), take more of
        the budget, or refuse the message and drop what it held.
        """
        self._content += size
        if self._content > self._reserved and not self._reserve(
            self._content - self._reserved
        ):
            self._fail_data(452, b"4.3.1 Insufficient system storage, try again later")

    def _counted(self, write: Callable[[bytes], object]) -> Callable[[bytes], None]:
        def counted(data: bytes) -> None:
            if self.datafailed is None:  # a refused message holds nothing
                self._count_content(len(data))
            if self.datafailed is None:
                write(data)

        return counted

    def _maybe_take_data_in_bulk(self) -> None:
        delivery = self.delivery
        if (
            self.bulk_data
            and self.mode == smtp.DATA
            and isinstance(delivery, MailLaserDelivery)
            and delivery.message is not None
        ):
            self._reader = BulkData(
                self._counted(delivery.message.write),
                max_size=self.factory.max_message_size,
                max_line=self.max_data_line,
                bare_newline=self.factory.bare_newline,
            )
            self.setRawMode()

    def state_DATA(self, line: bytes) -> None:
        """
        Twisted's DATA line, with the size limit Twisted does not have
        (SIZE is ours: twisted#8128), counted as RFC 1870 does.
        """
        if line != b"." and self.datafailed is None:
            self._data_size += len(line) + 2 - line.startswith(b".")
            if self._data_size > self.factory.max_message_size:
                self._fail_data(*TOO_BIG)
            elif has_bare_newline(line):
                if self.factory.bare_newline == "reject":
                    self._fail_data(*BARE_NEWLINE)
                else:
                    line = normalize_newlines(line)
            if self.datafailed is None:
                self._count_content(len(line) + 2)
        smtp.SMTP.dataLineReceived(self, line)

    def rawDataReceived(self, data: bytes) -> None:
        """DATA in bulk: see L{BulkData}; the end goes Twisted's way."""
        assert self._reader is not None
        self.resetTimeout()  # DATA_RATE_GRACE and the rate bound a trickle
        self._data_received += len(data)
        rest = self._reader.feed(data)
        if self._reader.error is not None:
            self._fail_data(*self._reader.error)
        if rest is not None:
            self._reader = None
            self.lineReceived(b".")
            self.setLineMode(rest)

    def _fail_data(self, code: int, resp: bytes) -> None:
        """Refuse the message at the final dot, as Twisted does when a
        message's lineReceived raises."""
        if self.datafailed is None:
            self.datafailed = smtp.SMTPServerError(code, resp)
            for message in self._messages:
                message.connectionLost()
            self._release_reservation()

    def ext_STARTTLS(self, rest: bytes) -> None:
        if rest.strip():
            self._reply(501, b"5.5.4 STARTTLS takes no arguments")
            return
        starting = self.canStartTLS and not self.startedTLS
        if starting and self.clearLineBuffer():
            # CVE-2011-0411's class (no Twisted ticket found): ESMTP's
            # ext_STARTTLS leaves cleartext pipelined after STARTTLS in the
            # buffer, to be run as commands inside TLS.  Never run it.
            self._log.warn("cleartext after STARTTLS from {peer}", peer=self.peer_host)
            self._closing = True
            self.paused = True
            self._transport.abortConnection()
            return
        super().ext_STARTTLS(rest)
        if starting and self.startedTLS:
            self._start_handshake_deadline()
        if starting:
            # RFC 3207 4.2 (no Twisted ticket found): ESMTP keeps what it
            # learnt in cleartext (HELO, sender, recipients) across the
            # handshake; forget it, so the client must EHLO again.
            self._helo = (None, self._peer)
            self._from = None
            self._to = []

    def lookupMethod(self, command: bytes) -> Callable[[bytes], None] | None:
        # twisted: ESMTP.lookupMethod decodes the verb as ASCII, so a verb
        # with any other byte raises UnicodeDecodeError out of dataReceived
        # and the connection is dropped with a traceback logged.
        try:
            method: Callable[[bytes], None] | None = super().lookupMethod(command)
        except UnicodeError:
            return None
        return method

    def do_QUIT(self, rest: bytes) -> None:
        self._reply(221, b"2.0.0 Bye")
        self._close()

    def do_NOOP(self, rest: bytes) -> None:
        self._reply(250, b"2.0.0 OK")

    def do_HELP(self, rest: bytes) -> None:
        self._reply(
            214,
            b"2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY"
            b" STARTTLS",
        )

    def do_VRFY(self, rest: bytes) -> None:
        self._reply(252, b"2.5.2 Cannot VRFY user, send mail to find out")

    def do_EXPN(self, rest: bytes) -> None:
        self._reply(502, b"5.5.1 EXPN not supported")

    def do_AUTH(self, rest: bytes) -> None:
        self._reply(502, b"5.5.1 Command not implemented")

    do_BDAT = do_TURN = do_ETRN = do_AUTH
