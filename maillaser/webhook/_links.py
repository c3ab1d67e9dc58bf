"""
Signed links to a message's parts, served by the bridge itself.

A link is C{<base>/attachments/<message id>/<index>?expires=<unix
time>&signature=<hex>}, where the signature is HMAC-SHA256 over the
message id, the index and the expiry.  Whoever holds the webhook secret
made it (or was given it), so the bridge can serve the bytes to anyone
presenting it, until it expires, with no state per link and no object
store.  The index is a part's position in the payload's C{attachments}
(L{maillaser.webhook.attachment_parts} numbers them), or C{raw} for the
message as received.

The key is derived from the first webhook secret rather than being the
secret itself, so that a link's signature can never be replayed as a
webhook signature or the other way round.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from urllib.parse import quote

import attrs

from maillaser.config import Config, link_base
from maillaser.webhook._signing import parse_secret

RAW = "raw"
"""The index naming the whole message as received."""

_PURPOSE = b"maillaser attachment links v1"
_INDEX = re.compile(r"raw|0|[1-9][0-9]{0,5}")
_MESSAGE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_EXPIRES = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")


class LinkRefused(Exception):
    """Not a link we made, or one that expired: the answer is C{403}."""


@attrs.frozen
class LinkSigner:
    """Makes and checks links; L{from_secrets} builds one from the configuration."""

    key: bytes = attrs.field(repr=False)
    base: str
    """The URL the health endpoint is reached at, without a trailing slash."""

    @classmethod
    def from_secrets(
        cls, secrets: Sequence[str], base: str | None
    ) -> LinkSigner | None:
        """The signer for the first secret, or C{None} when links cannot be made."""
        if not secrets or base is None:
            return None
        key = hmac.new(parse_secret(secrets[0]), _PURPOSE, hashlib.sha256).digest()
        return cls(key, base.rstrip("/"))

    @classmethod
    def for_config(cls, config: Config) -> LinkSigner | None:
        """
        Links are made (and served) only with a secret to sign them and a
        spool to serve them from: sync mode keeps no message.
        """
        if config.delivery_mode != "queue":
            return None
        return cls.from_secrets(config.webhook_secrets, link_base(config))

    def signature(self, message_id: str, index: str, expires: int) -> str:
        content = f"{message_id}.{index}.{expires}".encode("ascii")
        return hmac.new(self.key, content, hashlib.sha256).hexdigest()

    def url(self, message_id: str, index: str, expires: int) -> str:
        signature = self.signature(message_id, index, expires)
        return (
            f"{self.base}/attachments/{quote(message_id, safe='')}/{index}"
            f"?expires={expires}&signature={signature}"
        )

    def check(
        self, message_id: str, index: str, expires: str, signature: str, now: float
    ) -> None:
        """
        @raise LinkRefused: the link was not made with our key, or has
            expired.  Malformed parts are refused the same way: nothing
            about a link that is not ours is worth telling apart.
        """
        if not (
            _MESSAGE_ID.fullmatch(message_id)
            and _INDEX.fullmatch(index)
            and _EXPIRES.fullmatch(expires)
            and _SIGNATURE.fullmatch(signature)
        ):
            raise LinkRefused("malformed link")
        expected = self.signature(message_id, index, int(expires))
        if not hmac.compare_digest(expected, signature):
            raise LinkRefused("bad signature")
        if int(expires) <= now:
            raise LinkRefused("expired")


__all__ = ["RAW", "LinkRefused", "LinkSigner"]
