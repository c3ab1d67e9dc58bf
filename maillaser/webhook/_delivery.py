"""
One delivery round: the first attempt plus the quick retries.

A round turns a message into a payload once, then signs and sends it with a
fresh C{webhook-timestamp} per attempt and the same C{webhook-id} (the
message id) every time, across rounds, restarts and replays.  What happens
between rounds (the long schedule, dead letters) is the dispatcher's
business; what the SMTP client hears in sync mode is the sink's.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from OpenSSL import SSL
from service_identity import VerificationError as CertificateNotForHost
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)

from maillaser.interfaces import IPayloadBuilder, IWebhookPoster
from maillaser.logs import debugging, observer
from maillaser.message import Attempt, Message, WebhookResponse
from maillaser.webhook._breaker import CircuitBreaker
from maillaser.webhook._signing import maillaser3_headers, request_headers

QUICK_BACKOFF = 0.1
"""Seconds before the first quick retry; doubled for each one after."""


@attrs.frozen
class Delivered:
    attempts: tuple[Attempt, ...]
    keep_until: float | None = None
    """Until when the payload's links must be served (C{None}: it had none)."""


@attrs.frozen
class Failed:
    attempts: tuple[Attempt, ...]
    permanent: bool
    """The receiver refused this message for good (a 4xx other than 408/429)."""
    retry_after: float | None = None
    reason: str = ""


Outcome = Delivered | Failed


def quick_backoff(retry: int) -> float:
    """100 ms x 2^(n-1) before quick retry C{n} (1-based), as upstream."""
    return QUICK_BACKOFF * float(2 ** (retry - 1))


def settlement(outcome: Outcome) -> str:
    """How a round ended, for metrics: delivered, rejected, or retry (later)."""
    if isinstance(outcome, Delivered):
        return "delivered"
    return "rejected" if outcome.permanent else "retry"


def is_transient(status: int) -> bool:
    """Statuses worth retrying: server errors, 408 and 429.  3xx is a failure too."""
    return status >= 500 or status in (408, 429) or 300 <= status < 400


@attrs.define
class Deliverer:
    """Runs delivery rounds and reports each outcome to the circuit breaker."""

    poster: IWebhookPoster
    payloads: IPayloadBuilder
    """
    Builds each request body once per round: it decides where (payloads
    can be costly to build) and it never fails because of the message.
    """
    clock: IReactorTime
    breaker: CircuitBreaker
    max_retries: int
    secrets: Sequence[str] = attrs.field(default=(), repr=False)
    maillaser3_signature: bool = False
    """Also sign as MailLaser 3 does (L{maillaser3_headers})."""
    _log = Logger(observer=observer)

    def deliver(self, message: Message) -> Deferred[Outcome]:
        """Run one round; the caller must have acquired the breaker."""
        return Deferred.fromCoroutine(self._round(message))

    async def _round(self, message: Message) -> Outcome:
        """
        Always an outcome, even when our own code breaks: the caller must
        settle the message (or it would stay claimed, never tried again),
        and the breaker must hear of the round (or a probe would never end).
        """
        try:
            outcome = await self._attempts(message)
        except CancelledError:
            raise  # the round was cancelled, at shutdown
        except Exception as error:
            self._log.failure(
                "delivery round for {message_id} broke; counted as failed",
                message_id=message.id,
            )
            reason = f"internal error: {describe_error(error)}"
            outcome = Failed(
                (Attempt(self.clock.seconds(), None, reason),),
                permanent=False,
                reason=reason,
            )
        self._record(message, outcome)
        return outcome

    async def _attempts(self, message: Message) -> Outcome:
        payload = await self.payloads.build(message)
        attempts: list[Attempt] = []
        outcome: Outcome | None = None
        for retry in range(self.max_retries + 1):
            if retry:
                await deferLater(self.clock, quick_backoff(retry))
            outcome = await self._attempt(message, payload.body, attempts)
            if not isinstance(outcome, Failed) or outcome.permanent:
                break
            if outcome.retry_after is not None and (
                retry == self.max_retries
                or outcome.retry_after > quick_backoff(retry + 1)
            ):
                break  # the receiver asked for more patience than a quick retry has
        assert outcome is not None
        if isinstance(outcome, Delivered) and payload.keep_until is not None:
            return attrs.evolve(outcome, keep_until=payload.keep_until)
        return outcome

    async def _attempt(
        self, message: Message, body: bytes, attempts: list[Attempt]
    ) -> Outcome:
        now = self.clock.seconds()
        headers = request_headers(self.secrets, message.id, int(now), body)
        if self.maillaser3_signature and self.secrets:
            headers.update(maillaser3_headers(self.secrets[0], int(now), body))
        try:
            response: WebhookResponse = await self.poster.post(body, headers)
        except CancelledError:
            raise  # the round was cancelled, at shutdown: stop, do not retry
        except Exception as error:  # every transport failure is transient
            self._log_request(message, now, describe_error(error))
            attempts.append(Attempt(now, None, describe_error(error)))
            self._log_attempt(message, attempts)
            return Failed(tuple(attempts), permanent=False, reason=attempts[-1].error)
        self._log_request(message, now, response.status)
        if 200 <= response.status < 300:
            attempts.append(Attempt(now, response.status))
            return Delivered(tuple(attempts))
        problem = f"HTTP {response.status}" + (
            f": {response.reason}" if response.reason else ""
        )
        attempts.append(Attempt(now, response.status, problem))
        self._log_attempt(message, attempts)
        return Failed(
            tuple(attempts),
            permanent=not is_transient(response.status),
            retry_after=response.retry_after,
            reason=response.reason,
        )

    def _log_request(self, message: Message, sent_at: float, status: object) -> None:
        if debugging():
            self._log.debug(
                "webhook request for {message_id}: {status} in {elapsed:.3f}s",
                message_id=message.id,
                status=status,
                elapsed=self.clock.seconds() - sent_at,
            )

    def _log_attempt(self, message: Message, attempts: list[Attempt]) -> None:
        self._log.warn(
            "webhook attempt {attempt} for {message_id} failed: {error}",
            attempt=len(attempts),
            message_id=message.id,
            error=attempts[-1].error,
        )

    def _record(self, message: Message, outcome: Outcome) -> None:
        if isinstance(outcome, Delivered):
            self._log.info(
                "delivered {message_id} after {attempts} attempt(s)",
                message_id=message.id,
                attempts=len(outcome.attempts),
            )
            self.breaker.succeeded()
        elif outcome.permanent:
            self.breaker.succeeded()
        else:
            self.breaker.failed()


def describe_error(error: BaseException) -> str:
    """A short, log-safe description of why no response arrived."""
    if isinstance(error, DeferredTimeoutError):
        return "timed out"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, DNSLookupError):
        return "DNS lookup failed"
    if isinstance(error, ConnectError):
        return f"connection failed: {error.__class__.__name__}"
    if isinstance(error, SSL.Error):
        return f"TLS failed: {error}"[:200]
    if isinstance(error, CertificateNotForHost):
        return "TLS failed: the certificate is not for the webhook's host"
    if isinstance(error, _WRAPPERS) and error.reasons:
        # Agent wraps what went wrong on the connection (a TLS failure, a
        # connection lost mid-response): that is the reason worth telling.
        return describe_error(error.reasons[0].value)
    return f"{error.__class__.__name__}: {error}"[:200]


_WRAPPERS = (ResponseNeverReceived, RequestTransmissionFailed, ResponseFailed)
