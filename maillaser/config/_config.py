"""
The one configuration value: validated once at start-up, immutable after.

The SMTP front builds it (L{maillaser.config.load_config}) and hands it to
the delivery worker as JSON (L{Config.to_json}), so both processes run with
exactly the same settings.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import attrs

DeliveryMode = Literal["queue", "sync"]
PayloadHeaders = Literal["prefix", "all"]
LogLevel = Literal["debug", "info", "warn", "error"]
AttachmentMode = Literal["inline", "link", "metadata"]
BareNewline = Literal["normalize", "reject"]

DEFAULT_RETRY_SCHEDULE: tuple[float, ...] = (
    5.0,
    5 * 60.0,
    30 * 60.0,
    2 * 3600.0,
    5 * 3600.0,
    10 * 3600.0,
    14 * 3600.0,
    20 * 3600.0,
    24 * 3600.0,
)


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names it and is one line."""


@attrs.frozen
class Config:
    """Everything the bridge needs to run.  Build it with L{load_config}."""

    target_emails: tuple[str, ...]
    webhook_url: str
    smtp_endpoints: tuple[str, ...] = ("tcp:2525:interface=0.0.0.0",)
    health_endpoint: str = "tcp:8080:interface=0.0.0.0"
    header_prefixes: tuple[str, ...] = ()
    webhook_timeout: float = 30.0
    webhook_max_retries: int = 3
    circuit_breaker_threshold: int = 5
    circuit_breaker_reset: float = 60.0
    delivery_mode: DeliveryMode = "queue"
    spool_dir: str = "./maillaser-spool"
    webhook_secrets: tuple[str, ...] = attrs.field(default=(), repr=False)
    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 100
    tls_cert: str | None = None
    tls_key: str | None = None
    hostname: str = "localhost"
    smtp_timeout: float = 300.0
    log_level: LogLevel = "info"
    # Beyond upstream's settings: the knobs the durable spool, the hardened
    # SMTP server and the process split need.  Each has an env variable and
    # an option too.
    delivery_concurrency: int = 16
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    spool_max_messages: int = 100_000
    spool_max_bytes: int = 1024 * 1024 * 1024
    shutdown_grace: float = 10.0
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    webhook_ca_file: str | None = None
    """PEM bundle of the authorities trusted for an https webhook, instead
    of the system's (a receiver on a private CA)."""
    worker_timeout: float = 10.0
    """Seconds the SMTP front waits for any answer of the delivery worker
    (a spool commit, a status) before it answers 451 and restarts it."""
    payload_timeout: float = 10.0
    """Seconds building one payload may take before the message is
    delivered with what could be read and a C{parse_error}."""
    smtp_backlog: int = 1024
    """Connections the kernel queues for an SMTP listener before it accepts
    them (Twisted's default is 50: a burst of connects waited for SYN
    retries); given to every C{tcp}, C{tcp6} and C{ssl} SMTP endpoint that
    names no C{backlog=} of its own."""
    target_domains: tuple[str, ...] = ()
    """Domains every recipient at which is accepted, besides L{target_emails}."""
    payload_headers: PayloadHeaders = "prefix"
    """C{"all"} adds C{header_list}, every top-level field, to the payload."""
    webhook_maillaser3_signature: bool = False
    """Also sign as MailLaser 3 does, for receivers written for it."""
    attachments: AttachmentMode = "inline"
    """What an attachment carries: C{content} up to L{attachment_inline_max}
    bytes and a C{url} past it, a C{url} always, or neither."""
    attachment_inline_max: int = 1024 * 1024
    attachment_link_ttl: float = 7 * 86400.0
    include_raw: bool = False
    webhook_max_body: int = 25 * 1024 * 1024
    public_url: str | None = None
    """The base of attachment links (C{/attachments/...} on the health
    endpoint); C{None}: no links can be made."""
    min_data_rate: int = 1000
    """Bytes per second a DATA transfer must average (after a grace), so a
    trickle cannot hold a connection slot for ever."""
    max_inflight_bytes: int = 256 * 1024 * 1024
    """Message bytes the front holds at once, over all sessions: past it, a
    new DATA is answered C{452}."""
    max_unknown_recipients: int = 20
    """Refused recipients a session may try before it is closed."""
    bare_newline: BareNewline = "normalize"
    """What a bare CR or LF in DATA gets: made a CRLF, or C{550}."""
    spool_url: str = attrs.field(default="", repr=False)
    """A libpq URL: the spool lives in PostgreSQL, shared by every bridge
    given the same URL; empty for the SQLite spool in L{spool_dir}."""
    spool_lease: float = 60.0
    """Seconds a bridge's claim on a shared message lasts unless renewed."""

    def to_json(self) -> bytes:
        """The whole configuration, secrets included, for the worker's pipe."""
        return json.dumps(attrs.asdict(self)).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Config:
        """The inverse of L{to_json}: JSON arrays become tuples again."""
        fields: dict[str, Any] = json.loads(data)
        arguments: dict[str, Any] = {
            name: tuple(value) if isinstance(value, list) else value
            for name, value in fields.items()
        }
        return cls(**arguments)


__all__ = [
    "DEFAULT_RETRY_SCHEDULE",
    "AttachmentMode",
    "BareNewline",
    "Config",
    "ConfigError",
    "DeliveryMode",
    "LogLevel",
    "PayloadHeaders",
]
