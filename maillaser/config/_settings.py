"""
The settings table: every setting's name, meaning and documented default.

The table is what an operator sees: C{--help}, the environment variables
and the label of every error line all come from it, so they cannot drift
apart.  How a value is checked is in L{maillaser.config._parsers}; how the
sources are combined, in L{maillaser.config._load}.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Setting:
    """
    One configurable value, as the operator sees it.

    The option name is the single source of truth: the environment variable
    and the label in every error message are derived from it.
    """

    option: str
    meaning: str
    default: str
    default_is_literal: bool = True
    """C{False} when L{default} is prose ("required") rather than a value."""

    @property
    def env(self) -> str:
        return "MAIL_LASER_" + self.option.upper().replace("-", "_")

    @property
    def label(self) -> str:
        return f"{self.env} / --{self.option}"

    @property
    def help(self) -> str:
        return f"{self.meaning} [env {self.env}; default: {self.default}]"


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "target-emails",
        "Comma-separated recipients to accept.",
        "required unless --target-domains",
        False,
    ),
    Setting("webhook-url", "Absolute http:// or https:// URL.", "required", False),
    Setting("bind-address", "SMTP interface (not with --smtp).", "0.0.0.0"),
    Setting("port", "SMTP port (not with --smtp).", "2525"),
    Setting("health-bind-address", "Health interface (not with --health).", "0.0.0.0"),
    Setting("health-port", "Health/metrics port (not with --health).", "8080"),
    Setting("header-prefix", "Comma-separated header prefixes to pass.", "none", False),
    Setting("webhook-timeout", "Seconds per webhook attempt.", "30"),
    Setting("webhook-max-retries", "Quick retries after the first attempt.", "3"),
    Setting("circuit-breaker-threshold", "Failed deliveries that open it.", "5"),
    Setting("circuit-breaker-reset", "Seconds open before one probe.", "60"),
    Setting("delivery-mode", "queue or sync.", "queue"),
    Setting("spool-dir", "Directory of the durable spool.", "./maillaser-spool"),
    Setting("webhook-secret", "Space-separated whsec_ secrets.", "none", False),
    Setting("max-message-size", "Bytes, advertised as SIZE.", "10485760"),
    Setting("max-recipients", "Recipients per message.", "100"),
    Setting("tls-cert", "PEM certificate for STARTTLS.", "self-signed", False),
    Setting("tls-key", "PEM private key for STARTTLS.", "self-signed", False),
    Setting("hostname", "Name in the greeting.", "the machine's FQDN", False),
    Setting("smtp-timeout", "Idle seconds before 421 and close.", "300"),
    Setting("log-level", "debug, info, warn or error.", "info"),
    Setting("delivery-concurrency", "Deliveries in flight at once.", "16"),
    Setting(
        "retry-schedule",
        "Delays between long retries; units s, m, h, d.",
        "5s,5m,30m,2h,5h,10h,14h,20h,24h",
    ),
    Setting("spool-max-messages", "Spooled messages before 452.", "100000"),
    Setting("spool-max-bytes", "Spooled bytes before 452.", "1073741824"),
    Setting("shutdown-grace", "Seconds to let work finish.", "10"),
    Setting("max-connections", "Concurrent SMTP connections.", "1000"),
    Setting("max-connections-per-ip", "Connections per client address.", "50"),
    Setting(
        "webhook-ca-file",
        "PEM bundle of the CAs trusted for an https webhook.",
        "the system's trust store",
        False,
    ),
    Setting("worker-timeout", "Seconds to wait for the delivery worker.", "10"),
    Setting("payload-timeout", "Seconds to build one payload.", "10"),
    Setting("smtp-backlog", "Listen backlog of tcp and ssl SMTP endpoints.", "1024"),
    Setting(
        "target-domains",
        "Comma-separated domains: every recipient there is accepted.",
        "none",
        False,
    ),
    Setting("payload-headers", "prefix, or all to add header_list.", "prefix"),
    Setting(
        "webhook-maillaser3-signature",
        "Also sign as MailLaser 3 does (X-MailLaser-Signature-256).",
        "false",
    ),
    Setting("attachments", "inline, link or metadata.", "inline"),
    Setting("attachment-inline-max", "Decoded bytes sent inline, at most.", "1048576"),
    Setting("attachment-link-ttl", "Lifetime of a link; units s, m, h, d.", "7d"),
    Setting("include-raw", "Add the raw message (true or false).", "false"),
    Setting("webhook-max-body", "Bytes of a webhook request body.", "26214400"),
    Setting(
        "public-url",
        "Base URL of the health endpoint, as receivers reach it (for links).",
        "built from --health-bind-address and --health-port",
        False,
    ),
    Setting("min-data-rate", "Bytes per second DATA must average.", "1000"),
    Setting("max-inflight-bytes", "Message bytes held by all sessions.", "268435456"),
    Setting("max-unknown-recipients", "Refused recipients before 421.", "20"),
    Setting(
        "bare-newline", "normalize or reject a bare CR or LF in DATA.", "normalize"
    ),
    Setting(
        "spool-url",
        "postgresql:// URL of a spool shared by several bridges (libpq).",
        "none: SQLite in --spool-dir",
        False,
    ),
    Setting("spool-lease", "Seconds a bridge holds a shared message.", "60"),
)

BY_OPTION: dict[str, Setting] = {setting.option: setting for setting in SETTINGS}


@attrs.frozen
class Alias:
    """
    Another environment variable for a setting: the name MailLaser 3
    (Govcraft/mail-laser) gives a setting that means the same, so that its
    users' environment keeps working.
    """

    env: str
    option: str
    note: str
    """How the value is read, when not as the setting's own is."""


ALIASES: tuple[Alias, ...] = (
    Alias(
        "MAIL_LASER_WEBHOOK_SIGNING_SECRET",
        "webhook-secret",
        "one secret, any text; its UTF-8 bytes are the HMAC key",
    ),
    Alias(
        "MAIL_LASER_MAX_CONCURRENT_PER_IP",
        "max-connections-per-ip",
        "0 means no limit but --max-connections",
    ),
)

ALIAS_OF: dict[str, Alias] = {alias.option: alias for alias in ALIASES}

SMTP_ENDPOINT_HELP = (
    "Twisted endpoint for SMTP, e.g. tcp:2525:interface=127.0.0.1 or"
    " ssl:465:privateKey=key.pem:certKey=cert.pem; repeatable"
    " [default: built from --bind-address and --port]"
)
HEALTH_ENDPOINT_HELP = (
    "Twisted endpoint for /health and /metrics"
    " [default: built from --health-bind-address and --health-port]"
)

__all__ = [
    "ALIASES",
    "ALIAS_OF",
    "BY_OPTION",
    "HEALTH_ENDPOINT_HELP",
    "SETTINGS",
    "SMTP_ENDPOINT_HELP",
    "Alias",
    "Setting",
]
