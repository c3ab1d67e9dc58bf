"""
Loading: one L{Config} from the command line, the environment, a C{.env}
file and the defaults, in that order of precedence.

Everything is checked before any socket is opened, so a typo stops
start-up with one line naming the setting instead of surfacing as a failed
delivery hours later.
"""

from __future__ import annotations

import io
import os
import re
import socket
from collections import ChainMap
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs
from dotenv.parser import Binding, parse_stream
from twisted.internet.endpoints import quoteStringArgument, serverFromString

from maillaser.config import _parsers as parsers
from maillaser.config._config import Config, ConfigError
from maillaser.config._settings import ALIAS_OF, BY_OPTION

_DEFAULTS = Config(target_emails=(), webhook_url="")
_DEFAULT_INTERFACE = "0.0.0.0"
_DEFAULT_PORT = 2525
_DEFAULT_HEALTH_PORT = 8080

_T = TypeVar("_T")


def load_config(
    options: Mapping[str, object],
    environ: Mapping[str, str],
    dotenv_path: str | os.PathLike[str] | None = ".env",
    *,
    reactor: Any = None,
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
    @param reactor: the reactor the bridge will listen with.  Each endpoint
        description is parsed with it (parsing opens no socket), so that a
        typo stops start-up here.  C{None} leaves them unparsed until the
        service is built: this function never imports the global reactor,
        which would install the default one before C{twistd --reactor} or a
        composing program could choose.
    @param getfqdn: the machine's name, asked only if no hostname is set;
        L{socket.getfqdn} by default, looked up when called.
    @raise ConfigError: naming the first bad setting, in table order.
    """
    source = _Source(options, ChainMap(dict(environ), _read_dotenv(dotenv_path)))
    endpoints = _Endpoints(source, reactor)
    default = attrs.asdict(_DEFAULTS, recurse=False)

    def value(option: str, parse: Callable[[str], _T]) -> _T:
        result: _T = source.value(option, parse, default[option.replace("-", "_")])
        return result

    positive_seconds = parsers.seconds(allow_zero=False)
    # Keyword order is evaluation order: as upstream, the error reported is
    # the first one in the settings table.
    config = Config(
        target_emails=_target_emails(source),
        webhook_url=source.required("webhook-url", parsers.webhook_url),
        smtp_endpoints=endpoints.smtp(),
        health_endpoint=endpoints.health(),
        header_prefixes=source.value("header-prefix", parsers.header_prefixes, ()),
        webhook_timeout=value("webhook-timeout", positive_seconds),
        webhook_max_retries=value("webhook-max-retries", parsers.integer(0, 10)),
        circuit_breaker_threshold=value(
            "circuit-breaker-threshold", parsers.integer(1)
        ),
        circuit_breaker_reset=value("circuit-breaker-reset", positive_seconds),
        delivery_mode=value("delivery-mode", parsers.choice(parsers.DELIVERY_MODES)),
        spool_dir=value("spool-dir", parsers.non_empty),
        webhook_secrets=source.value("webhook-secret", parsers.webhook_secrets, ()),
        max_message_size=value("max-message-size", parsers.integer(1024)),
        max_recipients=value("max-recipients", parsers.integer(1, 10_000)),
        tls_cert=value("tls-cert", parsers.readable_file),
        tls_key=value("tls-key", parsers.readable_file),
        hostname=_hostname(source, getfqdn or socket.getfqdn),
        smtp_timeout=value("smtp-timeout", positive_seconds),
        log_level=value("log-level", parsers.choice(parsers.LOG_LEVELS)),
        delivery_concurrency=value("delivery-concurrency", parsers.integer(1, 1024)),
        retry_schedule=value("retry-schedule", parsers.retry_schedule),
        spool_max_messages=value("spool-max-messages", parsers.integer(1)),
        spool_max_bytes=value("spool-max-bytes", parsers.integer(1)),
        shutdown_grace=value("shutdown-grace", parsers.seconds(allow_zero=True)),
        max_connections=(
            max_connections := value("max-connections", parsers.integer(1))
        ),
        max_connections_per_ip=_per_ip_limit(source, max_connections),
        webhook_ca_file=value("webhook-ca-file", parsers.certificate_bundle),
        worker_timeout=value("worker-timeout", positive_seconds),
        payload_timeout=value("payload-timeout", positive_seconds),
        smtp_backlog=value("smtp-backlog", parsers.integer(1, 65535)),
        target_domains=value("target-domains", parsers.target_domains),
        payload_headers=value(
            "payload-headers", parsers.choice(parsers.PAYLOAD_HEADERS)
        ),
        webhook_maillaser3_signature=value(
            "webhook-maillaser3-signature", parsers.choice(parsers.BOOLEANS)
        ),
        attachments=value("attachments", parsers.choice(parsers.ATTACHMENT_MODES)),
        attachment_inline_max=value("attachment-inline-max", parsers.integer(0)),
        attachment_link_ttl=value("attachment-link-ttl", parsers.duration),
        include_raw=value("include-raw", parsers.choice(parsers.BOOLEANS)),
        webhook_max_body=value("webhook-max-body", parsers.integer(64 * 1024)),
        public_url=value("public-url", parsers.public_url),
        min_data_rate=value("min-data-rate", parsers.integer(0)),
        max_inflight_bytes=value("max-inflight-bytes", parsers.integer(1)),
        max_unknown_recipients=value("max-unknown-recipients", parsers.integer(0)),
        bare_newline=value("bare-newline", parsers.choice(parsers.BARE_NEWLINES)),
        spool_url=value("spool-url", parsers.spool_url),
        spool_lease=value("spool-lease", parsers.seconds(allow_zero=False)),
    )
    _check_tls_pair(config)
    _check_links(config)
    _check_inflight(config)
    return config


def describe(config: Config) -> dict[str, object]:
    """
    The effective configuration, safe to log at start-up.

    Credentials and query in the webhook URL are masked and signing secrets
    are replaced by their count: a log line is read by more people, and kept
    longer, than the secrets' owner would like.
    """
    fields = attrs.asdict(config)
    fields["webhook_url"] = parsers.mask_url(config.webhook_url)
    fields["webhook_secrets"] = len(config.webhook_secrets)
    fields["spool_url"] = parsers.mask_url(config.spool_url)
    return fields


@attrs.frozen
class _Source:
    """Where a setting's text comes from: the command line, else the environment."""

    options: Mapping[str, object]
    environ: Mapping[str, str]

    def raw(self, option: str) -> str | None:
        """
        The setting's text: the option, else our variable, else MailLaser
        3's name for it (L{ALIAS_OF}), read as MailLaser 3 reads it.  Both
        variables set to different values is a mistake, reported rather
        than guessed at.
        """
        given = self.options.get(option)
        if given is not None:
            return str(given)
        ours = self.environ.get(BY_OPTION[option].env)
        theirs = self.from_alias(option)
        if ours is not None and theirs is not None and ours != theirs:
            raise ConfigError(
                f"{ALIAS_OF[option].env} (MailLaser 3's name) and"
                f" {BY_OPTION[option].env} are both set, to different values;"
                " set only one"
            )
        return theirs if ours is None else ours

    def from_alias(self, option: str) -> str | None:
        """
        The alias's value in our setting's syntax, or C{None} when unset.
        Only the signing secret is written differently.
        """
        alias = ALIAS_OF.get(option)
        text = None if alias is None else self.environ.get(alias.env)
        if text is None or option != "webhook-secret":
            return text
        try:
            return parsers.maillaser3_secret(text)
        except parsers.Invalid as reason:
            raise ConfigError(f"{ALIAS_OF[option].env}: {reason}") from None

    def value(self, option: str, parse: Callable[[str], _T], default: _T) -> _T:
        text = self.raw(option)
        return default if text is None else self.parse(option, parse, text)

    def required(self, option: str, parse: Callable[[str], _T]) -> _T:
        text = self.raw(option)
        if text is None:
            raise ConfigError(f"{BY_OPTION[option].label}: must be set")
        return self.parse(option, parse, text)

    @staticmethod
    def parse(option: str, parse: Callable[[str], _T], text: str) -> _T:
        try:
            return parse(text)
        except parsers.Invalid as reason:
            raise ConfigError(f"{BY_OPTION[option].label}: {reason}") from None


# --- the .env file ---------------------------------------------------------

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NEWLINE = re.compile(r"\r\n|\n|\r")


def _read_dotenv(path: str | os.PathLike[str] | None) -> dict[str, str]:
    """
    C{KEY=VALUE} lines, in python-dotenv's syntax, read strictly.

    Read without variable expansion.  A line dotenv cannot parse, a name
    that is not an environment variable's, a name without a value and a
    quoted value running over several lines are errors rather than skipped
    (as C{dotenv_values} would, with a warning), because a skipped line is a
    setting silently ignored.  The offending line is never quoted back: it
    may hold a secret.
    """
    if path is None:
        return {}
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8-sig") as dotenv:
            text = dotenv.read()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{name}: cannot read: {parsers.one_line(err)}") from None
    values: dict[str, str] = {}
    for binding in parse_stream(io.StringIO(text)):
        if binding.key is None and not binding.error:
            continue  # blank lines and comments
        line, acceptable = _where(binding)
        key, value = binding.key, binding.value
        if not acceptable or key is None or value is None or not _KEY.fullmatch(key):
            raise ConfigError(
                f"{name}, line {line}: not a KEY=VALUE line"
                " (quotes must close on the same line)"
            )
        values[key] = value
    return values


def _where(binding: Binding) -> tuple[int, bool]:
    """
    The line a binding starts on, and whether it keeps to that line.

    dotenv counts from the blank lines before a binding, which it reads
    with it, and lets a quoted value run over several lines.
    """
    text = binding.original.string
    rest = text.lstrip()
    line = binding.original.line + len(_NEWLINE.findall(text[: len(text) - len(rest)]))
    return line, not binding.error and not _NEWLINE.search(rest.rstrip("\r\n"))


# --- settings that combine several values -----------------------------------


@attrs.frozen
class _Endpoints:
    """The SMTP and health endpoint descriptions, given or built."""

    source: _Source
    reactor: Any

    def smtp(self) -> tuple[str, ...]:
        given = self.source.options.get("smtp") or ()
        if not isinstance(given, list | tuple):
            raise ConfigError("--smtp: expected a list of endpoint descriptions")
        if not given:
            return (self._built("bind-address", "port", _DEFAULT_PORT),)
        self._refuse_mixing("--smtp", "bind-address", "port")
        return tuple(self._checked("--smtp", str(each)) for each in given)

    def health(self) -> str:
        given = self.source.options.get("health")
        if given is None:
            return self._built(
                "health-bind-address", "health-port", _DEFAULT_HEALTH_PORT
            )
        self._refuse_mixing("--health", "health-bind-address", "health-port")
        return self._checked("--health", str(given))

    def _refuse_mixing(self, flag: str, *options: str) -> None:
        """Both on one command line is a mistake, better reported than guessed at."""
        for option in options:
            if self.source.options.get(option) is not None:
                raise ConfigError(f"{flag}: cannot be combined with --{option}")

    def _built(self, interface_option: str, port_option: str, port: int) -> str:
        """A TCP endpoint description, IPv6 literals escaped for the strports syntax."""
        interface = self.source.value(
            interface_option, parsers.interface, _DEFAULT_INTERFACE
        )
        port = self.source.value(port_option, parsers.port, port)
        kind = "tcp6" if ":" in interface else "tcp"
        return f"{kind}:{port}:interface={quoteStringArgument(interface)}"

    def _checked(self, flag: str, description: str) -> str:
        """
        C{description}, parsed with the reactor the bridge will use (which
        also loads the certificate files an C{ssl:} endpoint names).
        Endpoint parsers, third-party plugins included, fail with all kinds
        of exceptions, hence the broad C{except}: whatever the parser says,
        it is this setting that is wrong.
        """
        if self.reactor is None:
            return description
        try:
            serverFromString(self.reactor, description)
        except Exception as err:
            raise ConfigError(
                f"{flag}: {parsers.show(description)} is not a usable endpoint"
                f" ({type(err).__name__}: {parsers.one_line(err)})"
            ) from None
        return description


def _hostname(source: _Source, getfqdn: Callable[[], str]) -> str:
    text = source.raw("hostname")
    if text is not None:
        return source.parse("hostname", parsers.hostname, text)
    name = getfqdn()
    try:
        return parsers.hostname(name)
    except parsers.Invalid:
        raise ConfigError(
            f"{BY_OPTION['hostname'].label}: not set, and this machine's name"
            f" {parsers.show(name)} is not a valid host name; set one explicitly"
        ) from None


def _target_emails(source: _Source) -> tuple[str, ...]:
    """
    The target addresses: required unless target domains are set (then
    they may be empty), so that a bridge always serves somebody.
    """
    emails = source.raw("target-emails")
    no_domains: tuple[str, ...] = ()
    domains = source.value("target-domains", parsers.target_domains, no_domains)
    if domains and not (emails or "").strip():
        return ()  # MailLaser 3 forks leave the addresses empty beside domains
    if emails is None:
        raise ConfigError(
            f"{BY_OPTION['target-emails'].label}: must be set"
            f" (or {BY_OPTION['target-domains'].label})"
        )
    return source.parse("target-emails", parsers.targets, emails)


def _per_ip_limit(source: _Source, max_connections: int) -> int:
    """
    The per-address cap, never above the global one.

    Unset, its default shrinks to fit, so that lowering only the global cap
    is not an error.  MailLaser 3's C{0} ("no limit") leaves the global cap.
    """
    option = "max-connections-per-ip"
    text = source.raw(option)
    if text is None:
        return min(_DEFAULTS.max_connections_per_ip, max_connections)
    if text.strip() == "0" and source.from_alias(option) == text:
        return max_connections
    limit = source.parse(option, parsers.integer(1), text)
    if limit > max_connections:
        raise ConfigError(
            f"{BY_OPTION[option].label}: {limit} is more than"
            f" {BY_OPTION['max-connections'].label} ({max_connections})"
        )
    return limit


def _check_links(config: Config) -> None:
    """
    C{link} mode needs what every link needs: a secret to sign it with, a
    spool to keep the message in, and an address receivers can reach.
    """
    if config.attachments != "link":
        return
    label = BY_OPTION["attachments"].label
    if not config.webhook_secrets:
        raise ConfigError(
            f"{label}: link needs {BY_OPTION['webhook-secret'].env} (links are signed)"
        )
    if config.delivery_mode != "queue":
        raise ConfigError(
            f"{label}: link needs delivery mode queue (links are served from the spool)"
        )
    if link_base(config) is None:
        raise ConfigError(
            f"{label}: link needs {BY_OPTION['public-url'].env} with this --health"
        )


_TCP_PORT = re.compile(
    r"tcp6?:(?P<port>[0-9]+)(?::(?:.*:)?interface=(?P<host>(?:\\.|[^:\\])*))?"
)
"""A plain TCP endpoint description: its port, and its interface if given."""
_ESCAPE = re.compile(r"\\(.)")


def link_base(config: Config) -> str | None:
    """
    Where receivers reach attachment links: C{public_url}, or else
    C{http://} and the health endpoint's address and port, with the
    bridge's host name for an endpoint on every interface (no receiver can
    reach C{0.0.0.0}).  C{None} when the health endpoint is not plain TCP.
    """
    if config.public_url is not None:
        return config.public_url
    match = _TCP_PORT.fullmatch(config.health_endpoint)
    if match is None:
        return None
    host = _ESCAPE.sub(r"\1", match["host"] or "")
    if host in ("", "0.0.0.0", "::"):
        host = config.hostname
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{match['port']}"


def _check_inflight(config: Config) -> None:
    """A budget smaller than one message would refuse every large one."""
    if config.max_inflight_bytes < config.max_message_size:
        raise ConfigError(
            f"{BY_OPTION['max-inflight-bytes'].label}: {config.max_inflight_bytes}"
            f" is less than {BY_OPTION['max-message-size'].label}"
            f" ({config.max_message_size})"
        )


def _check_tls_pair(config: Config) -> None:
    if config.tls_cert is not None and config.tls_key is not None:
        _check_pem_files(config.tls_cert, config.tls_key)
    if (config.tls_cert is None) == (config.tls_key is None):
        return
    missing, given = ("tls-key", "tls-cert")
    if config.tls_cert is None:
        missing, given = given, missing
    raise ConfigError(
        f"{BY_OPTION[missing].label}: must be set together with"
        f" {BY_OPTION[given].label}"
    )


def _check_pem_files(cert_path: str, key_path: str) -> None:
    from maillaser.smtp import UnusableCertificate, load_pem_pair

    try:
        with open(cert_path, "rb") as cert, open(key_path, "rb") as key:
            load_pem_pair(cert.read(), key.read())
    except UnusableCertificate as error:
        path = cert_path if error.setting == "tls-cert" else key_path
        raise ConfigError(
            f"{BY_OPTION[error.setting].label}: {parsers.show(path)} {error.reason}"
        ) from None


__all__ = ["describe", "link_base", "load_config"]
