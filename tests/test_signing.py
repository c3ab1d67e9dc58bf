"""
Tests for L{maillaser.webhook}'s signing, checked against the reference
C{standardwebhooks} package in both directions.
"""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from twisted.trial.unittest import SynchronousTestCase

from maillaser.webhook import (
    VerificationError,
    parse_secret,
    request_headers,
    sign,
    verify,
)

# The test vector of the Standard Webhooks reference libraries.
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

OLD = "whsec_" + base64.b64encode(b"old secret, 24 bytes long").decode()
NEW = "whsec_" + base64.b64encode(b"new secret, also 24 bytes").decode()
BODY = '{"subject":"Caf\u00e9","body":"hi"}'.encode()
MSG_ID = "msg_0193f0c0ffee00112233445566"


def text_headers(headers: dict[bytes, bytes]) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in headers.items()}


class SignTests(SynchronousTestCase):
    def test_vector(self) -> None:
        self.assertEqual(
            sign([VECTOR_SECRET], VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY),
            VECTOR_SIGNATURE,
        )

    def test_rotation(self) -> None:
        """One C{v1} entry per secret, in order, space-separated."""
        both = sign([OLD, NEW], MSG_ID, 1700000000, BODY)
        self.assertEqual(
            both,
            sign([OLD], MSG_ID, 1700000000, BODY)
            + " "
            + sign([NEW], MSG_ID, 1700000000, BODY),
        )
        self.assertEqual([entry[:3] for entry in both.split(" ")], ["v1,", "v1,"])

    def test_request_headers(self) -> None:
        self.assertEqual(
            request_headers([VECTOR_SECRET], VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY),
            {
                b"webhook-id": VECTOR_ID.encode(),
                b"webhook-timestamp": b"1614265330",
                b"webhook-signature": VECTOR_SIGNATURE.encode(),
            },
        )

    def test_request_headers_unsigned(self) -> None:
        self.assertEqual(
            request_headers([], VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY),
            {b"webhook-id": VECTOR_ID.encode(), b"webhook-timestamp": b"1614265330"},
        )


class ParseSecretTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """With or without the prefix, with or without padding."""
        key = b"\x00\x01secret key\xff"
        encoded = base64.b64encode(key).decode()
        self.assertEqual(encoded[-1], "=")
        for secret in [
            "whsec_" + encoded,
            encoded,
            "whsec_" + encoded.rstrip("="),
        ]:
            self.assertEqual(parse_secret(secret), key, secret)

    def test_malformed(self) -> None:
        """Clear messages, and never the secret itself."""
        cases = [
            ("", "webhook secret is empty (expected whsec_<base64>)"),
            ("whsec_", "webhook secret is empty (expected whsec_<base64>)"),
            ("whsec_=", "webhook secret is not valid base64 (expected whsec_<base64>)"),
            (
                "whsec_abc*def",
                "webhook secret is not valid base64 (expected whsec_<base64>)",
            ),
            (
                "whsec_ab-_cd",
                "webhook secret is not valid base64 (expected whsec_<base64>)",
            ),
            (
                "whsec_abcde",
                "webhook secret is not valid base64 (expected whsec_<base64>)",
            ),
            (
                "whsec_s\u00e9cret",
                "webhook secret is not valid base64 (expected whsec_<base64>)",
            ),
        ]
        for secret, message in cases:
            with self.assertRaises(ValueError) as raised:
                parse_secret(secret)
            self.assertEqual(str(raised.exception), message, secret)


class InteroperabilityTests(SynchronousTestCase):
    """The reference library and ours agree, both ways."""

    def test_ours_verified_by_reference(self) -> None:
        headers = request_headers([NEW], MSG_ID, int(time.time()), BODY)
        self.assertEqual(
            Webhook(NEW).verify(BODY, text_headers(headers)),
            {"subject": "Caf\u00e9", "body": "hi"},
        )

    def test_reference_verified_by_ours(self) -> None:
        timestamp = 1700000000
        signature = Webhook(NEW).sign(
            MSG_ID, datetime.fromtimestamp(timestamp, tz=UTC), BODY.decode()
        )
        headers = {
            "webhook-id": MSG_ID,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature,
        }
        verify(NEW, headers, BODY, now=timestamp)

    def test_rotation(self) -> None:
        """Signed with both secrets: either secret alone verifies, in both libraries."""
        timestamp = int(time.time())
        headers = text_headers(request_headers([OLD, NEW], MSG_ID, timestamp, BODY))
        for secret in (OLD, NEW):
            Webhook(secret).verify(BODY, headers)
            verify(secret, headers, BODY, now=timestamp)
        verify(
            [NEW, OLD],
            text_headers(request_headers([NEW], MSG_ID, timestamp, BODY)),
            BODY,
            now=timestamp,
        )

    def test_reference_rejects_tampering(self) -> None:
        headers = text_headers(request_headers([NEW], MSG_ID, int(time.time()), BODY))
        with self.assertRaises(WebhookVerificationError):
            Webhook(NEW).verify(BODY + b" ", headers)


class VerifyTests(SynchronousTestCase):
    timestamp = 1700000000

    def headers(self, secrets: list[str] | None = None) -> dict[str, str]:
        return text_headers(
            request_headers(secrets or [NEW], MSG_ID, self.timestamp, BODY)
        )

    def rejected(
        self,
        headers: dict[str, str],
        *,
        secret: str = NEW,
        body: bytes = BODY,
        now: float | None = None,
    ) -> str:
        with self.assertRaises(VerificationError) as raised:
            verify(
                secret,
                headers,
                body,
                now=self.timestamp if now is None else now,
            )
        return str(raised.exception)

    def test_valid(self) -> None:
        verify(NEW, self.headers(), BODY, now=self.timestamp)

    def test_tolerance_edges(self) -> None:
        for now in (self.timestamp - 300, self.timestamp + 300):
            verify(NEW, self.headers(), BODY, now=now)
        verify(NEW, self.headers(), BODY, now=self.timestamp + 10, tolerance=10)

    def test_tampered_body(self) -> None:
        self.assertEqual(
            self.rejected(self.headers(), body=BODY.replace(b"hi", b"ho")),
            "no matching signature",
        )

    def test_wrong_secret(self) -> None:
        self.assertEqual(
            self.rejected(self.headers(), secret=OLD), "no matching signature"
        )

    def test_tampered_id_or_timestamp(self) -> None:
        headers = self.headers()
        self.assertEqual(
            self.rejected({**headers, "webhook-id": "msg_other"}),
            "no matching signature",
        )
        self.assertEqual(
            self.rejected({**headers, "webhook-timestamp": str(self.timestamp + 1)}),
            "no matching signature",
        )

    def test_stale(self) -> None:
        self.assertEqual(
            self.rejected(self.headers(), now=self.timestamp + 301),
            "webhook-timestamp is too old (301 s)",
        )

    def test_future(self) -> None:
        self.assertEqual(
            self.rejected(self.headers(), now=self.timestamp - 301),
            "webhook-timestamp is in the future (301 s)",
        )

    def test_default_clock(self) -> None:
        """Without C{now}, the wall clock: a 2023 timestamp is stale."""
        with self.assertRaises(VerificationError) as raised:
            verify(NEW, self.headers(), BODY)
        self.assertTrue(
            str(raised.exception).startswith("webhook-timestamp is too old")
        )

    def test_missing_headers(self) -> None:
        headers = self.headers()
        for name in headers:
            without = {key: value for key, value in headers.items() if key != name}
            self.assertEqual(self.rejected(without), f"missing header: {name}")
        self.assertEqual(
            self.rejected({**headers, "webhook-signature": ""}),
            "missing header: webhook-signature",
        )
        self.assertEqual(
            self.rejected({}),
            "missing header: webhook-id, webhook-timestamp, webhook-signature",
        )

    def test_bad_timestamp(self) -> None:
        headers = self.headers()
        for bad in [
            "1700000000.5",
            "-1",
            " 1700000000",
            "soon",
            "9" * 30,
            "\u0661\u0662",
        ]:
            self.assertEqual(
                self.rejected({**headers, "webhook-timestamp": bad}),
                "webhook-timestamp is not a Unix time in seconds",
                bad,
            )

    def test_header_names_any_case_and_bytes(self) -> None:
        headers = self.headers()
        upper = {name.upper(): value for name, value in headers.items()}
        verify(NEW, upper, BODY, now=self.timestamp)
        as_bytes = {
            name.title().encode(): value.encode() for name, value in headers.items()
        }
        verify(NEW, as_bytes, BODY, now=self.timestamp)

    def test_odd_signature_entries(self) -> None:
        """Unknown versions and malformed entries are skipped, not fatal."""
        good = self.headers()["webhook-signature"]
        headers = {
            **self.headers(),
            "webhook-signature": f"v2,abc v1,!!! garbage v1 v1,\u00e9  {good}",
        }
        verify(NEW, headers, BODY, now=self.timestamp)
        headers["webhook-signature"] = "v2," + good[3:]
        self.assertEqual(self.rejected(headers), "no matching signature")

    def test_several_secrets(self) -> None:
        verify([OLD, NEW], self.headers([NEW]), BODY, now=self.timestamp)
        verify((OLD, NEW), self.headers([OLD]), BODY, now=self.timestamp)

    def test_receiver_misconfigured(self) -> None:
        """A bad secret on the receiver's side is a ValueError, not a bad request."""
        with self.assertRaises(ValueError):
            verify("whsec_!!", self.headers(), BODY, now=self.timestamp)
        with self.assertRaises(ValueError) as raised:
            verify([], self.headers(), BODY, now=self.timestamp)
        self.assertEqual(str(raised.exception), "no webhook secret to verify with")
