"""
From an accepted message to the webhook: payload, signing, circuit
breaker, delivery rounds and the treq poster.
"""

from maillaser.message import WebhookResponse
from maillaser.webhook._attachments import (
    Part,
    PartOptions,
    attachment_parts,
    built_payload,
    find_part,
    leaf_parts,
)
from maillaser.webhook._breaker import (
    BreakerState,
    CircuitBreaker,
    SharedBreaker,
    webhook_key,
)
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
from maillaser.webhook._links import RAW, LinkRefused, LinkSigner
from maillaser.webhook._payload import (
    build_payload,
    encode_payload,
    encoded_payload,
    fallback_payload,
)
from maillaser.webhook._poster import WebhookPoster, trust_root
from maillaser.webhook._signing import (
    VerificationError,
    maillaser3_headers,
    parse_secret,
    request_headers,
    sign,
    verify,
)

__all__ = [
    "RAW",
    "BreakerState",
    "CircuitBreaker",
    "Delivered",
    "Deliverer",
    "Failed",
    "LinkRefused",
    "LinkSigner",
    "Outcome",
    "Part",
    "PartOptions",
    "SharedBreaker",
    "VerificationError",
    "WebhookPoster",
    "WebhookResponse",
    "attachment_parts",
    "build_payload",
    "built_payload",
    "describe_error",
    "encode_payload",
    "encoded_payload",
    "fallback_payload",
    "find_part",
    "is_transient",
    "leaf_parts",
    "maillaser3_headers",
    "parse_secret",
    "quick_backoff",
    "request_headers",
    "settlement",
    "sign",
    "trust_root",
    "verify",
    "webhook_key",
]
