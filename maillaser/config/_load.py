"""
Configuration: one validated, immutable value built once at start-up.

Every setting comes from, in order of precedence, a command-line option, the
environment, a ``.env`` file in the working directory (which never overrides
the environment), or its default.  Everything is checked before any socket
is opened, so a typo stops start-up with one line naming the setting instead
of surfacing as a failed delivery hours later.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import os
import re
import socket
from collections import ChainMap
from collections.abc import Callable, Mapping
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import attrs
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.testing import MemoryReactor

from maillaser.config._config import (
    DEFAULT_RETRY_SCHEDULE,
    Config,
    ConfigError,
    DeliveryMode,
    LogLevel,
)

@attrs.frozen
class Setting:
    """
    One configurable value, as the operator sees it.

    The option name is the single source of truth: the environment variable
    and the label in every error message are derived from it, so they cannot
    drift apart.
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
)

SMTP_ENDPOINT_HELP = (
    "Twisted endpoint for SMTP, e.g. tcp:2525:interface=127.0.0.1 or"
    " ssl:465:privateKey=key.pem:certKey=cert.pem; repeatable"
    " [default: built from --bind-address and --port]"
)
HEALTH_ENDPOINT_HELP = (
    "Twisted endpoint for /health and /metrics"
    " [default: built from --health-bind-address and --health-port]"
)

_BY_OPTION = {setting.option: setting for setting in SETTINGS}
_DEFAULTS = Config(target_emails=(), webhook_url="")
_DEFAULT_INTERFACE = "0.0.0.0"
_DEFAULT_PORT = 2525
_DEFAULT_HEALTH_PORT = 8080

_T = TypeVar("_T")


class _Invalid(Exception):
    """A parser's reason for rejecting a value; the loader adds the label."""


def load_config(
    options: Mapping[str, object],
    environ: Mapping[str, str],
    dotenv_path: str | os.PathLike[str] | None = ".env",
    *,
    getfqdn: Callable[[], str] | None = None,
) -> Config:
    """
    Build the one L{Config} from every source, or say what is wrong.

    @param options: command-line values by long option name; C{None} (or an
        empty list for C{"smtp"}) when not given.
    @param environ: the process environment, injected so that tests never
        touch C{os.environ}.
    @param dotenv_path: a C{.env} file consulted for names missing from
        C{environ}, or C{None} for none.  A missing file is fine.
    @param getfqdn: the machine's name, asked only if no hostname is set;
        L{socket.getfqdn} by default, looked up when called.
    @raise ConfigError: naming the first bad setting, in table order.
    """
    source = _Source(options, ChainMap(dict(environ), _read_dotenv(dotenv_path)))
    # Keyword order is evaluation order: as upstream, the error reported is
    # the first one in the settings table.
    config = Config(
        target_emails=source.required("target-emails", _parse_targets),
        webhook_url=source.required("webhook-url", _parse_url),
        smtp_endpoints=_smtp_endpoints(source),
        health_endpoint=_health_endpoint(source),
        header_prefixes=source.value("header-prefix", _parse_prefixes, ()),
        webhook_timeout=source.value(
            "webhook-timeout", _seconds(allow_zero=False), _DEFAULTS.webhook_timeout
        ),
        webhook_max_retries=source.value(
            "webhook-max-retries", _integer(0, 10), _DEFAULTS.webhook_max_retries
        ),
        circuit_breaker_threshold=source.value(
            "circuit-breaker-threshold",
            _integer(1),
            _DEFAULTS.circuit_breaker_threshold,
        ),
        circuit_breaker_reset=source.value(
            "circuit-breaker-reset",
            _seconds(allow_zero=False),
            _DEFAULTS.circuit_breaker_reset,
        ),
        delivery_mode=source.value(
            "delivery-mode", _choice(_DELIVERY_MODES), _DEFAULTS.delivery_mode
        ),
        spool_dir=source.value("spool-dir", _non_empty, _DEFAULTS.spool_dir),
        webhook_secrets=source.value("webhook-secret", _parse_secrets, ()),
        max_message_size=source.value(
            "max-message-size", _integer(1024), _DEFAULTS.max_message_size
        ),
        max_recipients=source.value(
            "max-recipients", _integer(1, 10_000), _DEFAULTS.max_recipients
        ),
        tls_cert=source.value("tls-cert", _readable_file, None),
        tls_key=source.value("tls-key", _readable_file, None),
        hostname=_hostname(source, getfqdn or socket.getfqdn),
        smtp_timeout=source.value(
            "smtp-timeout", _seconds(allow_zero=False), _DEFAULTS.smtp_timeout
        ),
        log_level=source.value("log-level", _choice(_LOG_LEVELS), _DEFAULTS.log_level),
        delivery_concurrency=source.value(
            "delivery-concurrency", _integer(1, 1024), _DEFAULTS.delivery_concurrency
        ),
        retry_schedule=source.value(
            "retry-schedule", _parse_schedule, _DEFAULTS.retry_schedule
        ),
        spool_max_messages=source.value(
            "spool-max-messages", _integer(1), _DEFAULTS.spool_max_messages
        ),
        spool_max_bytes=source.value(
            "spool-max-bytes", _integer(1), _DEFAULTS.spool_max_bytes
        ),
        shutdown_grace=source.value(
            "shutdown-grace", _seconds(allow_zero=True), _DEFAULTS.shutdown_grace
        ),
        max_connections=(
            max_connections := source.value(
                "max-connections", _integer(1), _DEFAULTS.max_connections
            )
        ),
        max_connections_per_ip=_per_ip_limit(source, max_connections),
    )
    _check_tls_pair(config)
    return config


def describe(config: Config) -> dict[str, object]:
    """
    The effective configuration, safe to log at start-up.

    Credentials and query in the webhook URL are masked and signing secrets
    are replaced by their count: a log line is read by more people, and kept
    longer, than the secrets' owner would like.
    """
    fields = attrs.asdict(config)
    fields["webhook_url"] = mask_url(config.webhook_url)
    fields["webhook_secrets"] = len(config.webhook_secrets)
    return fields


def mask_url(url: str) -> str:
    """
    C{url} with its userinfo, query values and fragment replaced by C{***}.

    Scheme, host, port and path stay readable so that an operator can still
    tell which receiver is meant; query parameter names stay for the same
    reason.
    """
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"***@{host}" if "@" in parts.netloc else host
    query = "&".join(_mask_parameter(p) for p in parts.query.split("&"))
    fragment = "***" if parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def _mask_parameter(parameter: str) -> str:
    name, equals, value = parameter.partition("=")
    if equals:
        return f"{name}=***" if value else parameter
    return "***" if parameter else ""


@attrs.frozen
class _Source:
    """Where a setting's text comes from: the command line, else the environment."""

    options: Mapping[str, object]
    environ: Mapping[str, str]

    def raw(self, option: str) -> str | None:
        given = self.options.get(option)
        if given is not None:
            return str(given)
        return self.environ.get(_BY_OPTION[option].env)

    def value(self, option: str, parse: Callable[[str], _T], default: _T) -> _T:
        text = self.raw(option)
        return default if text is None else self.parse(option, parse, text)

    def required(self, option: str, parse: Callable[[str], _T]) -> _T:
        text = self.raw(option)
        if text is None:
            raise ConfigError(f"{_BY_OPTION[option].label}: must be set")
        return self.parse(option, parse, text)

    @staticmethod
    def parse(option: str, parse: Callable[[str], _T], text: str) -> _T:
        try:
            return parse(text)
        except _Invalid as reason:
            raise ConfigError(f"{_BY_OPTION[option].label}: {reason}") from None


# --- the .env file ---------------------------------------------------------

_DOTENV_LINE = re.compile(
    r"""
    \s*(?:export\s+)?
    (?P<key>[A-Za-z_][A-Za-z0-9_]*)
    \s*=[ \t]*
    (?:
        '(?P<single>[^']*)'
      | "(?P<double>[^"]*)"
      | (?P<bare>[^\s'"\#]\S*(?:[ \t]+[^\s\#]\S*)*)
    )?
    \s*(?:\#.*)?
    """,
    re.VERBOSE,
)


def _read_dotenv(path: str | os.PathLike[str] | None) -> dict[str, str]:
    """
    Read C{KEY=VALUE} lines, strictly.

    Deliberately small: no variable expansion, no escapes, no multi-line
    values.  A line it does not understand is an error rather than skipped,
    because a skipped line is a setting silently ignored.  The offending
    line is never quoted back: it may hold a secret.
    """
    if path is None:
        return {}
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8-sig") as dotenv:
            lines = dotenv.read().splitlines()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{name}: cannot read: {_reason(err)}") from None
    values: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _DOTENV_LINE.fullmatch(line)
        if match is None:
            raise ConfigError(
                f"{name}, line {number}: not a KEY=VALUE line"
                " (quotes must close on the same line)"
            )
        values[match["key"]] = match["single"] or match["double"] or match["bare"] or ""
    return values


def _reason(err: Exception) -> str:
    """An exception's text, on one line."""
    return " ".join(str(getattr(err, "strerror", None) or err).split())


# --- small parsers: each returns the value or raises _Invalid ---------------

_INTEGER = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)", re.IGNORECASE)
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_ADDRESS = re.compile(r"[^@\s<>\x00-\x1f\x7f]+@[^@\s<>\x00-\x1f\x7f]+")
_HEADER_PREFIX = re.compile(r"[!-9;-~]+")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")
_DELIVERY_MODES: dict[str, DeliveryMode] = {"queue": "queue", "sync": "sync"}
_LOG_LEVELS: dict[str, LogLevel] = {
    "debug": "debug",
    "info": "info",
    "warn": "warn",
    "warning": "warn",
    "error": "error",
}
_SECRET_PREFIX = "whsec_"
_MAX_DIGITS = 18
_MAX_SHOWN = 200


def _show(text: str) -> str:
    """A value quoted for an error line, cut short if it is long."""
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 3] + "..."
    return repr(text)


def _split(text: str) -> list[str]:
    return [piece.strip() for piece in text.split(",") if piece.strip()]


def _whole_number(text: str) -> int | None:
    """C{text} as an int, C{None} if too long to be any sane setting."""
    if not _INTEGER.fullmatch(text):
        raise _Invalid(f"{_show(text)} is not a whole number")
    return int(text) if len(text.lstrip("0")) <= _MAX_DIGITS else None


def _integer(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        number = _whole_number(text)
        if number is None or number < low or (high is not None and number > high):
            limits = f"at least {low}" if high is None else f"between {low} and {high}"
            raise _Invalid(f"must be {limits}, got {_show(text)}")
        return number

    return parse


def _seconds(*, allow_zero: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        if not _DECIMAL.fullmatch(text):
            raise _Invalid(f"{_show(text)} is not a number of seconds")
        seconds = float(text)
        if not math.isfinite(seconds):
            raise _Invalid(f"{_show(text)} is too large")
        if seconds == 0 and not allow_zero:
            raise _Invalid(f"must be greater than 0, got {_show(text)}")
        return seconds

    return parse


def _choice(choices: Mapping[str, _T]) -> Callable[[str], _T]:
    def parse(text: str) -> _T:
        try:
            return choices[text.lower()]
        except KeyError:
            names = ", ".join(dict.fromkeys(map(str, choices.values())))
            raise _Invalid(f"{_show(text)} is not one of {names}") from None

    return parse


def _non_empty(text: str) -> str:
    if not text:
        raise _Invalid("must not be empty")
    return text


def _parse_targets(text: str) -> tuple[str, ...]:
    if not text.strip():
        raise _Invalid("cannot be empty")
    addresses = _split(text)
    if not addresses:
        raise _Invalid("must contain at least one address after trimming and splitting")
    unique: dict[str, str] = {}
    for address in addresses:
        if not _ADDRESS.fullmatch(address):
            raise _Invalid(f"{_show(address)} is not an email address")
        unique.setdefault(address.lower(), address)
    return tuple(unique.values())


def _parse_url(text: str) -> str:
    """
    Accept an absolute http(s) URL, never echoing its secrets back.

    Webhook URLs often carry a token in the userinfo or the query, so a
    rejected value is shown only through L{mask_url}, and not at all unless
    it has a scheme and a C{//} authority: C{user:password@host} would
    otherwise pass its user name off as a scheme.
    """
    if not text:
        raise _Invalid("must not be empty")
    if _SPACE_OR_CONTROL.search(text):
        raise _Invalid("must not contain whitespace or control characters")
    try:
        parts = urlsplit(text)
        _ = parts.port  # urlsplit checks the port only when asked
    except ValueError:
        raise _Invalid("is not a valid URL (check the host and port)") from None
    if not (parts.scheme and text[len(parts.scheme) + 1 :].startswith("//")):
        raise _Invalid("must be an absolute http:// or https:// URL")
    if parts.scheme not in ("http", "https"):
        raise _Invalid(f"scheme {_show(parts.scheme)} is not http or https")
    if not parts.hostname:
        raise _Invalid(f"{_show(mask_url(text))} has no host")
    return text


def _parse_prefixes(text: str) -> tuple[str, ...]:
    prefixes = _split(text)
    for prefix in prefixes:
        if not _HEADER_PREFIX.fullmatch(prefix):
            raise _Invalid(f"{_show(prefix)} cannot start a header name")
    return tuple(prefixes)


def _parse_secrets(text: str) -> tuple[str, ...]:
    secrets = text.split()
    for position, secret in enumerate(secrets, start=1):
        if not _is_webhook_secret(secret):
            raise _Invalid(
                f"secret {position} of {len(secrets)} is not a Standard Webhooks"
                f" secret ({_SECRET_PREFIX} followed by base64)"
            )
    return tuple(secrets)


def _is_webhook_secret(secret: str) -> bool:
    if not secret.startswith(_SECRET_PREFIX):
        return False
    try:
        key = base64.b64decode(secret.removeprefix(_SECRET_PREFIX), validate=True)
    except binascii.Error:
        return False
    return bool(key)


def _readable_file(text: str) -> str | None:
    """A path that can be opened now; empty means "none", like other lists."""
    if not text:
        return None
    try:
        with open(text, "rb"):
            pass
    except OSError as err:
        raise _Invalid(f"cannot read {_show(text)}: {_reason(err)}") from None
    return text


def _parse_schedule(text: str) -> tuple[float, ...]:
    delays = []
    for piece in _split(text):
        match = _DURATION.fullmatch(piece)
        if match is None:
            raise _Invalid(f"{_show(piece)} is not a duration like 30s, 5m, 2h or 1d")
        seconds = float(match[1]) * _UNIT_SECONDS[match[2].lower()]
        if not 0 < seconds < math.inf:
            raise _Invalid(f"delays must be greater than 0, got {_show(piece)}")
        delays.append(seconds)
    if not delays:
        raise _Invalid("must list at least one delay")
    return tuple(delays)


def _parse_port(text: str) -> int:
    if _INTEGER.fullmatch(text) and len(text.lstrip("0")) <= 5 and int(text) <= 65535:
        return int(text)
    raise _Invalid(f"{_show(text)} is not a valid port number (0-65535)")


def _parse_interface(text: str) -> str:
    """An IP literal (IPv6 bare or in brackets, as upstream wanted) or a host name."""
    address = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if _is_ip(address) or _is_hostname(address):
        return address
    raise _Invalid(f"{_show(text)} is not an IP address or host name")


def _parse_hostname(text: str) -> str:
    if not text:
        raise _Invalid("must not be empty")
    if _is_hostname(text) or _is_address_literal(text):
        return text
    raise _Invalid(
        f"{_show(text)} is not a host name or an address literal"
        " like [192.0.2.1] or [IPv6:2001:db8::1]"
    )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_hostname(text: str) -> bool:
    """RFC 1123 syntax; an all-numeric last label would be a mistyped address."""
    labels = text.split(".")
    return (
        len(text) <= 253
        and all(_HOST_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


def _is_address_literal(text: str) -> bool:
    """RFC 5321 section 4.1.3: C{[IPv4]} or C{[IPv6:...]}."""
    if not (text.startswith("[") and text.endswith("]")):
        return False
    inner = text[1:-1]
    parse: Callable[[str], object] = ipaddress.IPv4Address
    if inner[:5].lower() == "ipv6:":
        inner, parse = inner[5:], ipaddress.IPv6Address
    try:
        parse(inner)
    except ValueError:
        return False
    return True


# --- settings that combine several values -----------------------------------


def _smtp_endpoints(source: _Source) -> tuple[str, ...]:
    given = source.options.get("smtp") or ()
    if not isinstance(given, list | tuple):
        raise ConfigError("--smtp: expected a list of endpoint descriptions")
    if not given:
        return (_built_endpoint(source, "bind-address", "port", _DEFAULT_PORT),)
    _refuse_mixing(source, "--smtp", "bind-address", "port")
    return tuple(_check_endpoint("--smtp", str(description)) for description in given)


def _health_endpoint(source: _Source) -> str:
    given = source.options.get("health")
    if given is None:
        return _built_endpoint(
            source, "health-bind-address", "health-port", _DEFAULT_HEALTH_PORT
        )
    _refuse_mixing(source, "--health", "health-bind-address", "health-port")
    return _check_endpoint("--health", str(given))


def _refuse_mixing(source: _Source, flag: str, *options: str) -> None:
    """Both on one command line is a mistake, better reported than guessed at."""
    for option in options:
        if source.options.get(option) is not None:
            raise ConfigError(f"{flag}: cannot be combined with --{option}")


def _built_endpoint(
    source: _Source, interface_option: str, port_option: str, default_port: int
) -> str:
    """A TCP endpoint description, IPv6 literals escaped for the strports syntax."""
    interface = source.value(interface_option, _parse_interface, _DEFAULT_INTERFACE)
    port = source.value(port_option, _parse_port, default_port)
    kind = "tcp6" if ":" in interface else "tcp"
    return f"{kind}:{port}:interface={quoteStringArgument(interface)}"


def _check_endpoint(flag: str, description: str) -> str:
    """
    Parse C{description} now, so a typo stops start-up before any socket opens.

    C{serverFromString} with a L{MemoryReactor} parses (and loads any
    certificate files) without listening.  Endpoint parsers, third-party
    plugins included, fail with all kinds of exceptions, hence the broad
    C{except}: whatever the parser says, it is this setting that is wrong.
    """
    try:
        serverFromString(MemoryReactor(), description)
    except Exception as err:
        raise ConfigError(
            f"{flag}: {_show(description)} is not a usable endpoint"
            f" ({type(err).__name__}: {_reason(err)})"
        ) from None
    return description


def _hostname(source: _Source, getfqdn: Callable[[], str]) -> str:
    text = source.raw("hostname")
    if text is not None:
        return source.parse("hostname", _parse_hostname, text)
    name = getfqdn()
    try:
        return _parse_hostname(name)
    except _Invalid:
        raise ConfigError(
            f"{_BY_OPTION['hostname'].label}: not set, and this machine's name"
            f" {_show(name)} is not a valid host name; set one explicitly"
        ) from None


def _per_ip_limit(source: _Source, max_connections: int) -> int:
    """
    The per-address cap, never above the global one.

    Unset, its default shrinks to fit, so that lowering only the global cap
    is not an error.
    """
    option = "max-connections-per-ip"
    text = source.raw(option)
    if text is None:
        return min(_DEFAULTS.max_connections_per_ip, max_connections)
    limit = source.parse(option, _integer(1), text)
    if limit > max_connections:
        raise ConfigError(
            f"{_BY_OPTION[option].label}: {limit} is more than"
            f" {_BY_OPTION['max-connections'].label} ({max_connections})"
        )
    return limit


def _check_pem_files(cert_path: str, key_path: str) -> None:
    from maillaser.tls import UnusableCertificate, load_pem_pair

    try:
        with open(cert_path, "rb") as cert, open(key_path, "rb") as key:
            load_pem_pair(cert.read(), key.read())
    except UnusableCertificate as error:
        path = cert_path if error.setting == "tls-cert" else key_path
        raise ConfigError(
            f"{_BY_OPTION[error.setting].label}: {_show(path)} {error.reason}"
        ) from None


def _check_tls_pair(config: Config) -> None:
    if config.tls_cert is not None and config.tls_key is not None:
        _check_pem_files(config.tls_cert, config.tls_key)
    if (config.tls_cert is None) == (config.tls_key is None):
        return
    missing, given = ("tls-key", "tls-cert")
    if config.tls_cert is None:
        missing, given = given, missing
    raise ConfigError(
        f"{_BY_OPTION[missing].label}: must be set together with"
        f" {_BY_OPTION[given].label}"
    )
