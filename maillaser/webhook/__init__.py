"""
From an accepted message to the webhook: payload, signing, circuit
breaker, delivery rounds and the treq poster.
"""

from maillaser.webhook._breaker import BreakerState, CircuitBreaker
from maillaser.webhook._delivery import (
    Delivered,
    Deliverer,
    Failed,
    Outcome,
    describe_error,
    is_transient,
    quick_backoff,
    settlement,
)
from maillaser.webhook._signing import VerificationError, request_headers, verify

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "Delivered",
    "Deliverer",
    "Failed",
    "Outcome",
    "VerificationError",
    "describe_error",
    "is_transient",
    "quick_backoff",
    "request_headers",
    "settlement",
    "verify",
]
