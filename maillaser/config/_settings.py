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
        "target-emails", "Comma-separated recipients to accept.", "required", False
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
    Setting("min-data-rate", "Bytes per second DATA must average.", "1000"),
    Setting("max-inflight-bytes", "Message bytes held by all sessions.", "268435456"),
    Setting("max-unknown-recipients", "Refused recipients before 421.", "20"),
    Setting(
        "bare-newline", "normalize or reject a bare CR or LF in DATA.", "normalize"
    ),
)

BY_OPTION: dict[str, Setting] = {setting.option: setting for setting in SETTINGS}

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
    "BY_OPTION",
    "HEALTH_ENDPOINT_HELP",
    "SETTINGS",
    "SMTP_ENDPOINT_HELP",
    "Setting",
]
