"""
Tests for L{maillaser.config}: every setting's default, accepted values and
rejections, the precedence of the sources, the C{.env} reader, and that no
secret ever reaches an error line or the start-up description.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from maillaser.config import (
    DEFAULT_RETRY_SCHEDULE,
    SETTINGS,
    Config,
    ConfigError,
    describe,
    load_config,
    mask_url,
)
from maillaser.smtp import self_signed

TARGET = "alerts@example.com"
URL = "https://hooks.example.com/mail"
REQUIRED = {"MAIL_LASER_TARGET_EMAILS": TARGET, "MAIL_LASER_WEBHOOK_URL": URL}
FQDN = "mx.example.test"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER_SECRET = "whsec_c2Vjb25kLXNlY3JldC1rZXk="


def load(
    environ: Mapping[str, str] | None = None,
    options: Mapping[str, object] | None = None,
    dotenv_path: str | None = None,
) -> Config:
    """
    Load with the required settings present unless C{environ} overrides
    them, endpoints parsed with the global reactor, as the plugin does.
    """
    return load_config(
        options or {},
        {**REQUIRED, **(environ or {})},
        dotenv_path,
        reactor=reactor,
        getfqdn=lambda: FQDN,
    )


def error(
    environ: Mapping[str, str] | None = None,
    options: Mapping[str, object] | None = None,
    dotenv_path: str | None = None,
) -> str:
    """The message of the L{ConfigError} that loading raises."""
    try:
        load(environ, options, dotenv_path)
    except ConfigError as err:
        return str(err)
    raise AssertionError("no ConfigError raised")


def env(option: str) -> str:
    return "MAIL_LASER_" + option.upper().replace("-", "_")


def label(option: str) -> str:
    return f"{env(option)} / --{option}"


def expected(**fields: object) -> Config:
    """The configuration with only the required values and C{fields} set."""
    defaults: dict[str, object] = {
        "target_emails": (TARGET,),
        "webhook_url": URL,
        "hostname": FQDN,
    }
    return Config(**{**defaults, **fields})  # type: ignore[arg-type]


def listening_on(description: str) -> tuple[int, str]:
    """The port and interface an endpoint description would really listen on."""
    reactor = MemoryReactor()
    serverFromString(reactor, description).listen(Factory())
    [(port, _factory, _backlog, interface)] = reactor.tcpServers
    return port, interface


class SettingTestCase(SynchronousTestCase):
    """Helpers to check one setting given through the environment."""

    def assertAccepted(self, option: str, text: str, field: str, value: object) -> None:
        config = load({env(option): text})
        self.assertEqual((text, getattr(config, field)), (text, value))

    def assertRejected(self, option: str, text: str, reason: str) -> None:
        message = error({env(option): text})
        self.assertEqual(message, f"{label(option)}: {reason}")


class UpstreamConfigTests(SettingTestCase):
    """Upstream's C{config::tests}, ported to our names and messages."""

    def test_all_set(self) -> None:
        config = load(
            {
                "MAIL_LASER_TARGET_EMAILS": "test1@example.com, test2@example.com",
                "MAIL_LASER_WEBHOOK_URL": "https://webhook.example.com/hook",
                "MAIL_LASER_BIND_ADDRESS": "127.0.0.1",
                "MAIL_LASER_PORT": "3000",
                "MAIL_LASER_HEALTH_BIND_ADDRESS": "127.0.0.2",
                "MAIL_LASER_HEALTH_PORT": "9090",
                "MAIL_LASER_HEADER_PREFIX": "X-Custom, X-My-App",
                "MAIL_LASER_WEBHOOK_TIMEOUT": "15",
                "MAIL_LASER_WEBHOOK_MAX_RETRIES": "5",
                "MAIL_LASER_CIRCUIT_BREAKER_THRESHOLD": "10",
                "MAIL_LASER_CIRCUIT_BREAKER_RESET": "120",
            }
        )
        self.assertEqual(
            config,
            expected(
                target_emails=("test1@example.com", "test2@example.com"),
                webhook_url="https://webhook.example.com/hook",
                smtp_endpoints=("tcp:3000:interface=127.0.0.1",),
                health_endpoint="tcp:9090:interface=127.0.0.2",
                header_prefixes=("X-Custom", "X-My-App"),
                webhook_timeout=15.0,
                webhook_max_retries=5,
                circuit_breaker_threshold=10,
                circuit_breaker_reset=120.0,
            ),
        )

    def test_defaults(self) -> None:
        config = load()
        self.assertEqual(config, expected())
        self.assertEqual(
            (
                config.smtp_endpoints,
                config.health_endpoint,
                config.header_prefixes,
                config.webhook_timeout,
                config.webhook_max_retries,
                config.circuit_breaker_threshold,
                config.circuit_breaker_reset,
            ),
            (
                ("tcp:2525:interface=0.0.0.0",),
                "tcp:8080:interface=0.0.0.0",
                (),
                30.0,
                3,
                5,
                60.0,
            ),
        )

    def test_missing_required(self) -> None:
        self.assertEqual(
            str(self.assertRaises(ConfigError, load_config, {}, {}, None)),
            "MAIL_LASER_TARGET_EMAILS / --target-emails: must be set"
            " (or MAIL_LASER_TARGET_DOMAINS / --target-domains)",
        )
        self.assertEqual(
            str(
                self.assertRaises(
                    ConfigError,
                    load_config,
                    {},
                    {"MAIL_LASER_TARGET_EMAILS": TARGET},
                    None,
                )
            ),
            "MAIL_LASER_WEBHOOK_URL / --webhook-url: must be set",
        )

    def test_invalid_ports(self) -> None:
        self.assertRejected(
            "port",
            "not-a-number",
            "'not-a-number' is not a valid port number (0-65535)",
        )
        self.assertRejected(
            "health-port",
            "also-invalid",
            "'also-invalid' is not a valid port number (0-65535)",
        )

    def test_target_emails_parsing(self) -> None:
        self.assertAccepted(
            "target-emails",
            "single@example.com",
            "target_emails",
            ("single@example.com",),
        )
        self.assertAccepted(
            "target-emails",
            "  spaced1@example.com , spaced2@example.com  ,third@here.net",
            "target_emails",
            ("spaced1@example.com", "spaced2@example.com", "third@here.net"),
        )
        self.assertRejected("target-emails", "", "cannot be empty")
        self.assertRejected(
            "target-emails",
            " ,, , ",
            "must contain at least one address after trimming and splitting",
        )

    def test_header_prefix_parsing(self) -> None:
        self.assertAccepted(
            "header-prefix", "X-Custom", "header_prefixes", ("X-Custom",)
        )
        self.assertAccepted(
            "header-prefix",
            "  X-Custom , X-My-App  , X-Third ",
            "header_prefixes",
            ("X-Custom", "X-My-App", "X-Third"),
        )
        self.assertAccepted("header-prefix", "", "header_prefixes", ())
        self.assertAccepted("header-prefix", " ,, , ", "header_prefixes", ())
        self.assertEqual(load().header_prefixes, ())

    def test_resilience_fields(self) -> None:
        config = load(
            {
                "MAIL_LASER_WEBHOOK_TIMEOUT": "10",
                "MAIL_LASER_WEBHOOK_MAX_RETRIES": "7",
                "MAIL_LASER_CIRCUIT_BREAKER_THRESHOLD": "3",
                "MAIL_LASER_CIRCUIT_BREAKER_RESET": "90",
            }
        )
        self.assertEqual(
            (
                config.webhook_timeout,
                config.webhook_max_retries,
                config.circuit_breaker_threshold,
                config.circuit_breaker_reset,
            ),
            (10.0, 7, 3, 90.0),
        )
        self.assertRejected(
            "webhook-timeout", "soon", "'soon' is not a number of seconds"
        )
        self.assertRejected("webhook-max-retries", "abc", "'abc' is not a whole number")


class SettingsTableTests(SynchronousTestCase):
    def test_names_follow_spec(self) -> None:
        """The SPEC table's names, then those of the settings beyond it."""
        self.assertEqual(
            [(setting.env, setting.label.split(" / ")[1]) for setting in SETTINGS],
            [
                ("MAIL_LASER_TARGET_EMAILS", "--target-emails"),
                ("MAIL_LASER_WEBHOOK_URL", "--webhook-url"),
                ("MAIL_LASER_BIND_ADDRESS", "--bind-address"),
                ("MAIL_LASER_PORT", "--port"),
                ("MAIL_LASER_HEALTH_BIND_ADDRESS", "--health-bind-address"),
                ("MAIL_LASER_HEALTH_PORT", "--health-port"),
                ("MAIL_LASER_HEADER_PREFIX", "--header-prefix"),
                ("MAIL_LASER_WEBHOOK_TIMEOUT", "--webhook-timeout"),
                ("MAIL_LASER_WEBHOOK_MAX_RETRIES", "--webhook-max-retries"),
                ("MAIL_LASER_CIRCUIT_BREAKER_THRESHOLD", "--circuit-breaker-threshold"),
                ("MAIL_LASER_CIRCUIT_BREAKER_RESET", "--circuit-breaker-reset"),
                ("MAIL_LASER_DELIVERY_MODE", "--delivery-mode"),
                ("MAIL_LASER_SPOOL_DIR", "--spool-dir"),
                ("MAIL_LASER_WEBHOOK_SECRET", "--webhook-secret"),
                ("MAIL_LASER_MAX_MESSAGE_SIZE", "--max-message-size"),
                ("MAIL_LASER_MAX_RECIPIENTS", "--max-recipients"),
                ("MAIL_LASER_TLS_CERT", "--tls-cert"),
                ("MAIL_LASER_TLS_KEY", "--tls-key"),
                ("MAIL_LASER_HOSTNAME", "--hostname"),
                ("MAIL_LASER_SMTP_TIMEOUT", "--smtp-timeout"),
                ("MAIL_LASER_LOG_LEVEL", "--log-level"),
                ("MAIL_LASER_DELIVERY_CONCURRENCY", "--delivery-concurrency"),
                ("MAIL_LASER_RETRY_SCHEDULE", "--retry-schedule"),
                ("MAIL_LASER_SPOOL_MAX_MESSAGES", "--spool-max-messages"),
                ("MAIL_LASER_SPOOL_MAX_BYTES", "--spool-max-bytes"),
                ("MAIL_LASER_SHUTDOWN_GRACE", "--shutdown-grace"),
                ("MAIL_LASER_MAX_CONNECTIONS", "--max-connections"),
                ("MAIL_LASER_MAX_CONNECTIONS_PER_IP", "--max-connections-per-ip"),
                ("MAIL_LASER_WEBHOOK_CA_FILE", "--webhook-ca-file"),
                ("MAIL_LASER_WORKER_TIMEOUT", "--worker-timeout"),
                ("MAIL_LASER_PAYLOAD_TIMEOUT", "--payload-timeout"),
                ("MAIL_LASER_SMTP_BACKLOG", "--smtp-backlog"),
                ("MAIL_LASER_TARGET_DOMAINS", "--target-domains"),
                ("MAIL_LASER_PAYLOAD_HEADERS", "--payload-headers"),
                (
                    "MAIL_LASER_WEBHOOK_MAILLASER3_SIGNATURE",
                    "--webhook-maillaser3-signature",
                ),
                ("MAIL_LASER_ATTACHMENTS", "--attachments"),
                ("MAIL_LASER_ATTACHMENT_INLINE_MAX", "--attachment-inline-max"),
                ("MAIL_LASER_ATTACHMENT_LINK_TTL", "--attachment-link-ttl"),
                ("MAIL_LASER_INCLUDE_RAW", "--include-raw"),
                ("MAIL_LASER_WEBHOOK_MAX_BODY", "--webhook-max-body"),
                ("MAIL_LASER_PUBLIC_URL", "--public-url"),
                ("MAIL_LASER_MIN_DATA_RATE", "--min-data-rate"),
                ("MAIL_LASER_MAX_INFLIGHT_BYTES", "--max-inflight-bytes"),
                ("MAIL_LASER_MAX_UNKNOWN_RECIPIENTS", "--max-unknown-recipients"),
                ("MAIL_LASER_BARE_NEWLINE", "--bare-newline"),
                ("MAIL_LASER_SPOOL_URL", "--spool-url"),
                ("MAIL_LASER_SPOOL_LEASE", "--spool-lease"),
            ],
        )

    def test_documented_defaults_are_the_defaults(self) -> None:
        """What C{--help} calls the default is what an unset setting gets."""
        literal = [setting for setting in SETTINGS if setting.default_is_literal]
        self.assertEqual(len(literal), 36)
        for setting in literal:
            self.assertEqual(
                (setting.env, load({setting.env: setting.default})),
                (setting.env, load()),
            )


class TargetEmailsTests(SettingTestCase):
    def test_keeps_order_and_case_drops_duplicates(self) -> None:
        self.assertAccepted(
            "target-emails",
            "Ops@Example.com, b@example.com,ops@example.COM ,B@EXAMPLE.COM",
            "target_emails",
            ("Ops@Example.com", "b@example.com"),
        )

    def test_duplicates_are_ascii_case_only(self) -> None:
        """
        The Kelvin sign (U+212A) lower-cases to C{k} in Python; the address
        it spells is not the same target, so neither is dropped.
        """
        self.assertAccepted(
            "target-emails",
            "kim@example.com,\u212aim@example.com,KIM@example.com",
            "target_emails",
            ("kim@example.com", "\u212aim@example.com"),
        )

    def test_whitespace_only(self) -> None:
        self.assertRejected("target-emails", "   ", "cannot be empty")

    def test_not_addresses(self) -> None:
        for text in [
            "alerts",
            "a@b@example.com",
            "@example.com",
            "alerts@",
            "al erts@example.com",
            "<alerts@example.com>",
            "alerts@exa\tmple.com",
            "alerts@example.com\x00",
        ]:
            self.assertRejected(
                "target-emails",
                f"ok@example.com,{text}",
                f"{text!r} is not an email address",
            )


class WebhookUrlTests(SettingTestCase):
    def test_valid(self) -> None:
        for url in [
            "http://receiver:8000/mail",
            "https://hooks.example.com/mail?token=abc",
            "HTTPS://hooks.example.com",
            "http://[::1]:8080/hook",
            "https://user:pass@hooks.example.com/",
        ]:
            self.assertAccepted("webhook-url", url, "webhook_url", url)

    def test_invalid(self) -> None:
        for url, reason in [
            ("", "must not be empty"),
            (" https://x/", "must not contain whitespace or control characters"),
            (
                "https://exa mple.com/",
                "must not contain whitespace or control characters",
            ),
            ("https://x/\n", "must not contain whitespace or control characters"),
            ("ftp://files.example.com/", "scheme 'ftp' is not http or https"),
            ("mailto:ops@example.com", "must be an absolute http:// or https:// URL"),
            ("localhost:8080/hook", "must be an absolute http:// or https:// URL"),
            ("https:/hooks.example.com", "must be an absolute http:// or https:// URL"),
            ("/relative/path", "must be an absolute http:// or https:// URL"),
            ("//hooks.example.com/x", "must be an absolute http:// or https:// URL"),
            ("http:///path", "'http:///path' has no host"),
            ("http://:8080/", "'http://:8080/' has no host"),
            ("http://x:99999/", "is not a valid URL (check the host and port)"),
            ("http://x:port/", "is not a valid URL (check the host and port)"),
            ("http://[::1/", "is not a valid URL (check the host and port)"),
        ]:
            self.assertRejected("webhook-url", url, reason)

    def test_errors_mask_credentials_and_query(self) -> None:
        self.assertRejected(
            "webhook-url",
            "https://bob:hunter2@/hook?token=s3cret&debug#frag",
            "'https://***@/hook?token=***&***#***' has no host",
        )

    def test_errors_never_show_secrets(self) -> None:
        for url in [
            "ftp://bob:hunter2@files.example.com/?token=s3cret",
            "https://bob:hunter2@exa mple.com/?token=s3cret",
            "https://bob:hunter2@x:99999/?token=s3cret",
            "bob:hunter2@x/?token=s3cret",
            "hunter2",
        ]:
            message = error({"MAIL_LASER_WEBHOOK_URL": url})
            self.assertEqual(
                (url, [s for s in ["bob", "hunter2", "s3cret"] if s in message]),
                (url, []),
            )


class MaskUrlTests(SynchronousTestCase):
    def test_mask(self) -> None:
        for url, masked in [
            ("https://hooks.example.com/mail", "https://hooks.example.com/mail"),
            ("https://u:p@h:8443/x", "https://***@h:8443/x"),
            ("https://token@h/x", "https://***@h/x"),
            ("https://h/x?a=1&b=&c&&d=2", "https://h/x?a=***&b=&***&&d=***"),
            ("https://h/x#secret", "https://h/x#***"),
            ("http://[::1]:80/x?k=v", "http://[::1]:80/x?k=***"),
        ]:
            self.assertEqual(mask_url(url), masked)


class EndpointTests(SettingTestCase):
    def test_defaults(self) -> None:
        config = load()
        self.assertEqual(
            (config.smtp_endpoints, config.health_endpoint),
            (("tcp:2525:interface=0.0.0.0",), "tcp:8080:interface=0.0.0.0"),
        )

    def test_built_from_address_and_port(self) -> None:
        """Both pairs: IPv4, IPv6 bare or bracketed, and host names."""
        for address_option, port_option, field in [
            ("bind-address", "port", "smtp_endpoints"),
            ("health-bind-address", "health-port", "health_endpoint"),
        ]:
            for address, port, description, interface in [
                ("127.0.0.1", "25", "tcp:25:interface=127.0.0.1", "127.0.0.1"),
                ("::", "0", "tcp6:0:interface=\\:\\:", "::"),
                ("[::1]", "65535", "tcp6:65535:interface=\\:\\:1", "::1"),
                (
                    "fe80::1%eth0",
                    "2525",
                    "tcp6:2525:interface=fe80\\:\\:1%eth0",
                    "fe80::1%eth0",
                ),
                ("localhost", "00025", "tcp:25:interface=localhost", "localhost"),
            ]:
                config = load(
                    {
                        env(address_option): address,
                        env(port_option): port,
                    }
                )
                built = getattr(config, field)
                built = built[0] if isinstance(built, tuple) else built
                self.assertEqual(
                    (built, listening_on(built)), (description, (int(port), interface))
                )

    def test_invalid_ports(self) -> None:
        for option in ["port", "health-port"]:
            for text in [
                "",
                " 25",
                "25 ",
                "+25",
                "-1",
                "65536",
                "1e3",
                "2_525",
                "9" * 30,
            ]:
                self.assertRejected(
                    option, text, f"{text!r} is not a valid port number (0-65535)"
                )

    def test_invalid_addresses(self) -> None:
        for option in ["bind-address", "health-bind-address"]:
            for text in ["", "not a host", "300.1.1.1", "-bad.example", "[::1", "a..b"]:
                self.assertRejected(
                    option, text, f"{text!r} is not an IP address or host name"
                )

    def test_smtp_option_used_as_given(self) -> None:
        descriptions = ["tcp:2525:interface=127.0.0.1", "tcp6:2526:interface=\\:\\:1"]
        config = load(
            {"MAIL_LASER_PORT": "not-used", "MAIL_LASER_BIND_ADDRESS": "not used"},
            options={"smtp": descriptions},
        )
        self.assertEqual(config.smtp_endpoints, tuple(descriptions))

    def test_health_option_used_as_given(self) -> None:
        config = load(
            {"MAIL_LASER_HEALTH_PORT": "not-used"},
            options={"health": "tcp:9000:interface=127.0.0.1"},
        )
        self.assertEqual(config.health_endpoint, "tcp:9000:interface=127.0.0.1")

    def test_unusable_descriptions(self) -> None:
        missing = os.path.abspath(self.mktemp())
        for description, reason in [
            ("bogus:1", "ValueError: Unknown endpoint type: 'bogus'"),
            ("", "ValueError: Unknown endpoint type: ''"),
            ("tcp:abc", "ValueError: invalid literal for int() with base 10: 'abc'"),
            (
                "tcp:25:bogus=1",
                "TypeError: _parseTCP() got an unexpected keyword argument 'bogus'",
            ),
            (
                f"ssl:465:privateKey={missing}",
                "FileNotFoundError: No such file or directory",
            ),
        ]:
            cases: list[tuple[str, Mapping[str, object]]] = [
                ("--smtp", {"smtp": ["tcp:25", description]}),
                ("--health", {"health": description}),
            ]
            for flag, options in cases:
                self.assertEqual(
                    error(options=options),
                    f"{flag}: {description!r} is not a usable endpoint ({reason})",
                )

    def test_not_mixed_with_address_or_port_options(self) -> None:
        cases: list[tuple[Mapping[str, object], str]] = [
            (
                {"smtp": ["tcp:25"], "port": "26"},
                "--smtp: cannot be combined with --port",
            ),
            (
                {"smtp": ["tcp:25"], "bind-address": "::"},
                "--smtp: cannot be combined with --bind-address",
            ),
            (
                {"health": "tcp:25", "health-port": "26"},
                "--health: cannot be combined with --health-port",
            ),
            (
                {"health": "tcp:25", "health-bind-address": "::"},
                "--health: cannot be combined with --health-bind-address",
            ),
        ]
        for options, message in cases:
            self.assertEqual(error(options=options), message)

    def test_not_parsed_without_a_reactor(self) -> None:
        """Left to the service, which parses them with the reactor it is given."""
        config = load_config({"smtp": ["bogus:1"], "health": "bogus:2"}, REQUIRED, None)
        self.assertEqual(
            (config.smtp_endpoints, config.health_endpoint), (("bogus:1",), "bogus:2")
        )

    def test_never_imports_the_global_reactor(self) -> None:
        """
        Importing it would install the default reactor before C{twistd
        --reactor} or a composing program chose theirs.
        """
        program = (
            "import sys\n"
            "from twisted.internet.testing import MemoryReactor\n"
            "from maillaser.config import load_config\n"
            f"environ = {REQUIRED!r}\n"
            "for reactor in (None, MemoryReactor()):\n"
            "    load_config({'smtp': ['tcp:25']}, environ, None, reactor=reactor)\n"
            "print('twisted.internet.reactor' in sys.modules)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", program],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual((result.stdout, result.stderr), ("False\n", ""))


class NumberSettingsTests(SettingTestCase):
    """Every numeric setting: its default, its limits, and what is not a number."""

    def test_whole_numbers(self) -> None:
        for option, field, default, low, high in [
            ("webhook-max-retries", "webhook_max_retries", 3, 0, 10),
            ("circuit-breaker-threshold", "circuit_breaker_threshold", 5, 1, None),
            ("max-message-size", "max_message_size", 10485760, 1024, None),
            ("max-recipients", "max_recipients", 100, 1, 10000),
            ("delivery-concurrency", "delivery_concurrency", 16, 1, 1024),
            ("spool-max-messages", "spool_max_messages", 100000, 1, None),
            ("spool-max-bytes", "spool_max_bytes", 1073741824, 1, None),
            ("max-connections", "max_connections", 1000, 1, None),
            ("smtp-backlog", "smtp_backlog", 1024, 1, 65535),
            ("min-data-rate", "min_data_rate", 1000, 0, None),
            ("max-unknown-recipients", "max_unknown_recipients", 20, 0, None),
        ]:
            self.assertEqual((option, getattr(load(), field)), (option, default))
            self.assertAccepted(option, str(low), field, low)
            self.assertAccepted(option, f"0{low + 1}", field, low + 1)
            limits = f"at least {low}" if high is None else f"between {low} and {high}"
            too_small = str(low - 1) if low > 0 else None
            too_large = [str(high + 1)] if high is not None else []
            for text in [too_small, *too_large, "9" * 19]:
                if text is not None:
                    self.assertRejected(option, text, f"must be {limits}, got {text!r}")
            self.assertRejected(
                option, "9" * 250, f"must be {limits}, got {'9' * 197 + '...'!r}"
            )
            if high is not None:
                self.assertAccepted(option, str(high), field, high)
            for text in ["", "abc", "-1", "+5", " 5", "5 ", "1.5", "1e3", "1_000", "٣"]:
                self.assertRejected(option, text, f"{text!r} is not a whole number")

    def test_spool_url(self) -> None:
        url = "postgresql://ml:pa55@db/ml?sslmode=require&connect_timeout=3"
        self.assertAccepted("spool-url", url, "spool_url", url)
        self.assertAccepted(
            "spool-url", "postgres:///ml", "spool_url", "postgres:///ml"
        )
        self.assertEqual(load().spool_url, "")
        self.assertNotIn("pa55", repr(load({"MAIL_LASER_SPOOL_URL": url})))

    def test_spool_url_rejected_without_its_password(self) -> None:
        self.assertRejected(
            "spool-url",
            "mysql://ml:pa55@db/ml",
            "'mysql://***@db/ml' is not a postgresql:// URL",
        )

    def test_seconds(self) -> None:
        for option, field, default, zero_allowed in [
            ("webhook-timeout", "webhook_timeout", 30.0, False),
            ("circuit-breaker-reset", "circuit_breaker_reset", 60.0, False),
            ("smtp-timeout", "smtp_timeout", 300.0, False),
            ("shutdown-grace", "shutdown_grace", 10.0, True),
            ("worker-timeout", "worker_timeout", 10.0, False),
            ("payload-timeout", "payload_timeout", 10.0, False),
            ("spool-lease", "spool_lease", 60.0, False),
        ]:
            self.assertEqual((option, getattr(load(), field)), (option, default))
            self.assertAccepted(option, "2.5", field, 2.5)
            self.assertAccepted(option, "45", field, 45.0)
            if zero_allowed:
                self.assertAccepted(option, "0", field, 0.0)
            else:
                self.assertRejected(option, "0", "must be greater than 0, got '0'")
                self.assertRejected(option, "0.0", "must be greater than 0, got '0.0'")
            for text in ["", "abc", "-1", ".5", "5.", "1e3", "inf", "nan", " 5", "30s"]:
                self.assertRejected(
                    option, text, f"{text!r} is not a number of seconds"
                )
            self.assertRejected(
                option, "9" * 400, f"{'9' * 197 + '...'!r} is too large"
            )


class InflightBytesTests(SettingTestCase):
    def test_default_and_values(self) -> None:
        self.assertEqual(load().max_inflight_bytes, 256 * 1024 * 1024)
        self.assertAccepted(
            "max-inflight-bytes", "10485760", "max_inflight_bytes", 10485760
        )
        self.assertRejected("max-inflight-bytes", "0", "must be at least 1, got '0'")

    def test_not_less_than_one_message(self) -> None:
        """A budget smaller than one message would refuse every large one."""
        self.assertEqual(
            error(
                {
                    "MAIL_LASER_MAX_INFLIGHT_BYTES": "2048",
                    "MAIL_LASER_MAX_MESSAGE_SIZE": "4096",
                }
            ),
            f"{label('max-inflight-bytes')}: 2048 is less than"
            f" {label('max-message-size')} (4096)",
        )
        config = load(
            {
                "MAIL_LASER_MAX_INFLIGHT_BYTES": "4096",
                "MAIL_LASER_MAX_MESSAGE_SIZE": "4096",
            }
        )
        self.assertEqual(config.max_inflight_bytes, 4096)


class ChoiceSettingsTests(SettingTestCase):
    def test_bare_newline(self) -> None:
        self.assertEqual(load().bare_newline, "normalize")
        for text, value in [
            ("normalize", "normalize"),
            ("Normalise", "normalize"),
            ("REJECT", "reject"),
        ]:
            self.assertAccepted("bare-newline", text, "bare_newline", value)
        for text in ["", "strip", " reject"]:
            self.assertRejected(
                "bare-newline", text, f"{text!r} is not one of normalize, reject"
            )

    def test_delivery_mode(self) -> None:
        self.assertEqual(load().delivery_mode, "queue")
        for text, mode in [("queue", "queue"), ("sync", "sync"), ("SYNC", "sync")]:
            self.assertAccepted("delivery-mode", text, "delivery_mode", mode)
        for text in ["", "fast", " sync"]:
            self.assertRejected(
                "delivery-mode", text, f"{text!r} is not one of queue, sync"
            )

    def test_log_level(self) -> None:
        self.assertEqual(load().log_level, "info")
        for text, level in [
            ("debug", "debug"),
            ("INFO", "info"),
            ("warn", "warn"),
            ("Warning", "warn"),
            ("error", "error"),
        ]:
            self.assertAccepted("log-level", text, "log_level", level)
        for text in ["", "verbose", "critical"]:
            self.assertRejected(
                "log-level", text, f"{text!r} is not one of debug, info, warn, error"
            )


class SpoolDirTests(SettingTestCase):
    def test_spool_dir(self) -> None:
        self.assertEqual(load().spool_dir, "./maillaser-spool")
        self.assertAccepted(
            "spool-dir", "/var/spool/maillaser", "spool_dir", "/var/spool/maillaser"
        )
        self.assertRejected("spool-dir", "", "must not be empty")

    def test_not_created(self) -> None:
        path = self.mktemp()
        load({"MAIL_LASER_SPOOL_DIR": path})
        self.assertFalse(os.path.exists(path))


class WebhookSecretTests(SettingTestCase):
    def test_valid(self) -> None:
        self.assertEqual(load().webhook_secrets, ())
        self.assertAccepted("webhook-secret", SECRET, "webhook_secrets", (SECRET,))
        self.assertAccepted(
            "webhook-secret",
            f"  {SECRET}   {OTHER_SECRET} ",
            "webhook_secrets",
            (SECRET, OTHER_SECRET),
        )
        self.assertAccepted("webhook-secret", "", "webhook_secrets", ())
        self.assertAccepted("webhook-secret", "  ", "webhook_secrets", ())

    def test_invalid(self) -> None:
        for text, reason in [
            ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "secret 1 of 1"),
            ("whsec_", "secret 1 of 1"),
            ("whsec_not*base64", "secret 1 of 1"),
            (f"{SECRET} whsec_bad!", "secret 2 of 2"),
            (f"{SECRET},{OTHER_SECRET}", "secret 1 of 1"),
        ]:
            self.assertRejected(
                "webhook-secret",
                text,
                f"{reason} is not a Standard Webhooks secret"
                " (whsec_ followed by base64)",
            )

    def test_never_in_messages(self) -> None:
        for text in [f"{SECRET} whsec_bad!", f"whsec_{SECRET[6:]}!"]:
            message = error({"MAIL_LASER_WEBHOOK_SECRET": text})
            self.assertNotIn(SECRET[6:16], message)


class TlsFilesTests(SettingTestCase):
    def make_file(self, content: bytes = b"-----BEGIN CERTIFICATE-----\n") -> str:
        path: str = self.mktemp()
        with open(path, "wb") as pem:
            pem.write(content)
        return path

    def make_pair(self) -> tuple[str, str]:
        cert, key = self_signed("mx.test")
        return self.make_file(cert), self.make_file(key)

    def test_default(self) -> None:
        config = load()
        self.assertEqual((config.tls_cert, config.tls_key), (None, None))

    def test_both(self) -> None:
        cert, key = self.make_pair()
        config = load({"MAIL_LASER_TLS_CERT": cert, "MAIL_LASER_TLS_KEY": key})
        self.assertEqual((config.tls_cert, config.tls_key), (cert, key))

    def test_empty_means_unset(self) -> None:
        config = load({"MAIL_LASER_TLS_CERT": "", "MAIL_LASER_TLS_KEY": ""})
        self.assertEqual((config.tls_cert, config.tls_key), (None, None))

    def test_only_one(self) -> None:
        path = self.make_file()
        self.assertEqual(
            error({"MAIL_LASER_TLS_CERT": path}),
            "MAIL_LASER_TLS_KEY / --tls-key: must be set together with"
            " MAIL_LASER_TLS_CERT / --tls-cert",
        )
        self.assertEqual(
            error({"MAIL_LASER_TLS_KEY": path}),
            "MAIL_LASER_TLS_CERT / --tls-cert: must be set together with"
            " MAIL_LASER_TLS_KEY / --tls-key",
        )

    def test_unreadable(self) -> None:
        missing = self.mktemp()
        directory = self.mktemp()
        os.mkdir(directory)
        present = self.make_file()
        for option, other in [
            ("tls-cert", "MAIL_LASER_TLS_KEY"),
            ("tls-key", "MAIL_LASER_TLS_CERT"),
        ]:
            for path, reason in [
                (missing, "No such file or directory"),
                (directory, "Is a directory"),
            ]:
                message = error({env(option): path, other: present})
                self.assertEqual(
                    message, f"{label(option)}: cannot read {path!r}: {reason}"
                )

    def test_not_a_certificate_or_key(self) -> None:
        """Checked at start-up, not at the first STARTTLS handshake."""
        cert, key = self.make_pair()
        _, other_key = self.make_pair()
        encrypted = serialization.load_pem_private_key(
            Path(key).read_bytes(), password=None
        ).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        garbage = self.make_file(b"not PEM at all")
        for given_cert, given_key, expected in [
            (
                garbage,
                key,
                f"{label('tls-cert')}: {garbage!r} holds no PEM certificate",
            ),
            (key, key, f"{label('tls-cert')}: {key!r} holds no PEM certificate"),
            (
                cert,
                garbage,
                f"{label('tls-key')}: {garbage!r} holds no unencrypted PEM private key",
            ),
            (
                cert,
                cert,
                f"{label('tls-key')}: {cert!r} holds no unencrypted PEM private key",
            ),
            (
                cert,
                (locked := self.make_file(encrypted)),
                f"{label('tls-key')}: {locked!r} holds no unencrypted PEM private key",
            ),
            (
                cert,
                other_key,
                f"{label('tls-key')}: {other_key!r} does not belong to the first"
                " certificate in --tls-cert",
            ),
        ]:
            self.assertEqual(
                error(
                    {"MAIL_LASER_TLS_CERT": given_cert, "MAIL_LASER_TLS_KEY": given_key}
                ),
                expected,
            )


class WebhookCaFileTests(SettingTestCase):
    def write(self, content: bytes) -> str:
        path: str = self.mktemp()
        with open(path, "wb") as pem:
            pem.write(content)
        return path

    def test_default(self) -> None:
        self.assertIsNone(load().webhook_ca_file)
        self.assertAccepted("webhook-ca-file", "", "webhook_ca_file", None)

    def test_bundle(self) -> None:
        """Every certificate in the file counts; other PEM blocks are ignored."""
        first, key = self_signed("ca-one.test")
        second, _ = self_signed("ca-two.test")
        for content in [first, first + key + second, b"# comment\n" + second]:
            path = self.write(content)
            self.assertAccepted("webhook-ca-file", path, "webhook_ca_file", path)

    def test_unreadable(self) -> None:
        missing = self.mktemp()
        directory = self.mktemp()
        os.mkdir(directory)
        for path, reason in [
            (missing, "No such file or directory"),
            (directory, "Is a directory"),
        ]:
            self.assertRejected(
                "webhook-ca-file", path, f"cannot read {path!r}: {reason}"
            )

    def test_no_certificate(self) -> None:
        """A wrong file stops start-up rather than every https delivery."""
        certificate, key = self_signed("ca.test")
        broken = certificate.replace(certificate[100:140], b"A" * 40)
        for content in [b"", b"not PEM at all", key, broken]:
            path = self.write(content)
            self.assertRejected(
                "webhook-ca-file", path, f"{path!r} holds no PEM certificate"
            )


class HostnameTests(SettingTestCase):
    def test_default_is_fqdn_at_load_time(self) -> None:
        self.patch(socket, "getfqdn", lambda: "late.example.net")
        config = load_config({}, REQUIRED, None)
        self.assertEqual(config.hostname, "late.example.net")

    def test_default_invalid(self) -> None:
        self.assertEqual(
            str(
                self.assertRaises(
                    ConfigError,
                    load_config,
                    {},
                    REQUIRED,
                    None,
                    getfqdn=lambda: "my_box",
                )
            ),
            "MAIL_LASER_HOSTNAME / --hostname: not set, and this machine's name"
            " 'my_box' is not a valid host name; set one explicitly",
        )

    def test_valid(self) -> None:
        for text in [
            "mail.example.com",
            "localhost",
            "MX1.Example.COM",
            "a" * 63 + ".example",
            "[192.0.2.1]",
            "[IPv6:2001:db8::1]",
            "[ipv6:::1]",
        ]:
            self.assertAccepted("hostname", text, "hostname", text)

    def test_invalid(self) -> None:
        self.assertRejected("hostname", "", "must not be empty")
        for text in [
            "my_box",
            "-mail.example.com",
            "mail-.example.com",
            "mail..example.com",
            "mail.example.com.",
            "a" * 64 + ".example",
            "192.0.2.1",
            "2001:db8::1",
            "[300.1.1.1]",
            "[2001:db8::1]",
            "[IPv6:192.0.2.1]",
            "mail example",
        ]:
            self.assertRejected(
                "hostname",
                text,
                f"{text!r} is not a host name"
                " or an address literal like [192.0.2.1] or [IPv6:2001:db8::1]",
            )


class RetryScheduleTests(SettingTestCase):
    def test_default(self) -> None:
        self.assertEqual(load().retry_schedule, DEFAULT_RETRY_SCHEDULE)

    def test_valid(self) -> None:
        self.assertAccepted(
            "retry-schedule",
            "5s,5m,30m,2h,5h,10h,14h,20h,24h",
            "retry_schedule",
            DEFAULT_RETRY_SCHEDULE,
        )
        self.assertAccepted(
            "retry-schedule",
            " 10, 1.5m ,1d,2H,",
            "retry_schedule",
            (10.0, 90.0, 86400.0, 7200.0),
        )

    def test_invalid(self) -> None:
        for text in ["", " , ,"]:
            self.assertRejected("retry-schedule", text, "must list at least one delay")
        for piece in ["5x", "-5s", "5 s", "s", "1e3s", "5ms"]:
            self.assertRejected(
                "retry-schedule",
                f"5s,{piece},1h",
                f"{piece!r} is not a duration like 30s, 5m, 2h or 1d",
            )
        self.assertRejected(
            "retry-schedule", "5s,0m", "delays must be greater than 0, got '0m'"
        )


class ConnectionLimitTests(SettingTestCase):
    def test_per_ip_default(self) -> None:
        self.assertEqual(load().max_connections_per_ip, 50)

    def test_per_ip_default_shrinks_to_global_limit(self) -> None:
        config = load({"MAIL_LASER_MAX_CONNECTIONS": "10"})
        self.assertEqual(
            (config.max_connections, config.max_connections_per_ip), (10, 10)
        )

    def test_per_ip_valid(self) -> None:
        config = load(
            {
                "MAIL_LASER_MAX_CONNECTIONS": "10",
                "MAIL_LASER_MAX_CONNECTIONS_PER_IP": "10",
            }
        )
        self.assertEqual(config.max_connections_per_ip, 10)

    def test_per_ip_invalid(self) -> None:
        self.assertRejected(
            "max-connections-per-ip", "0", "must be at least 1, got '0'"
        )
        self.assertRejected("max-connections-per-ip", "x", "'x' is not a whole number")
        self.assertEqual(
            error(
                {
                    "MAIL_LASER_MAX_CONNECTIONS": "10",
                    "MAIL_LASER_MAX_CONNECTIONS_PER_IP": "11",
                }
            ),
            "MAIL_LASER_MAX_CONNECTIONS_PER_IP / --max-connections-per-ip: 11 is more"
            " than MAIL_LASER_MAX_CONNECTIONS / --max-connections (10)",
        )


class PrecedenceTests(SynchronousTestCase):
    def write_dotenv(self, text: str) -> str:
        path: str = self.mktemp()
        with open(path, "w", encoding="utf-8") as dotenv:
            dotenv.write(text)
        return path

    def test_option_environ_dotenv_default(self) -> None:
        dotenv = self.write_dotenv("MAIL_LASER_PORT=1001\nMAIL_LASER_SMTP_TIMEOUT=11\n")
        environ = {"MAIL_LASER_PORT": "1002", "MAIL_LASER_SMTP_TIMEOUT": "12"}
        options = {"port": "1003"}

        def effective(
            options: Mapping[str, object],
            environ: Mapping[str, str],
            dotenv: str | None,
        ) -> tuple[tuple[str, ...], float]:
            config = load_config(
                options, {**REQUIRED, **environ}, dotenv, getfqdn=lambda: FQDN
            )
            return config.smtp_endpoints, config.smtp_timeout

        self.assertEqual(
            [
                effective(options, environ, dotenv),
                effective({}, environ, dotenv),
                effective({}, {}, dotenv),
                effective({}, {}, None),
            ],
            [
                (("tcp:1003:interface=0.0.0.0",), 12.0),
                (("tcp:1002:interface=0.0.0.0",), 12.0),
                (("tcp:1001:interface=0.0.0.0",), 11.0),
                (("tcp:2525:interface=0.0.0.0",), 300.0),
            ],
        )

    def test_option_none_falls_through(self) -> None:
        config = load(
            {"MAIL_LASER_PORT": "1002"},
            options={"port": None, "smtp": [], "health": None},
        )
        self.assertEqual(config.smtp_endpoints, ("tcp:1002:interface=0.0.0.0",))

    def test_empty_option_overrides_environ(self) -> None:
        """An explicitly empty option clears a string setting from the environment."""
        config = load(
            {"MAIL_LASER_WEBHOOK_SECRET": SECRET}, options={"webhook-secret": ""}
        )
        self.assertEqual(config.webhook_secrets, ())

    def test_dotenv_never_overrides_environ(self) -> None:
        dotenv = self.write_dotenv(
            "MAIL_LASER_TARGET_EMAILS=dotenv@example.com\nMAIL_LASER_LOG_LEVEL=debug\n"
        )
        config = load_config(
            {},
            {
                "MAIL_LASER_TARGET_EMAILS": "environ@example.com",
                "MAIL_LASER_WEBHOOK_URL": URL,
            },
            dotenv,
            getfqdn=lambda: FQDN,
        )
        self.assertEqual(
            (config.target_emails, config.log_level),
            (("environ@example.com",), "debug"),
        )

    def test_dotenv_never_fills_a_set_but_empty_variable(self) -> None:
        dotenv = self.write_dotenv("MAIL_LASER_LOG_LEVEL=debug\n")
        self.assertEqual(
            str(
                self.assertRaises(
                    ConfigError,
                    load_config,
                    {},
                    {**REQUIRED, "MAIL_LASER_LOG_LEVEL": ""},
                    dotenv,
                    getfqdn=lambda: FQDN,
                )
            ),
            "MAIL_LASER_LOG_LEVEL / --log-level:"
            " '' is not one of debug, info, warn, error",
        )

    def test_required_from_dotenv(self) -> None:
        dotenv = self.write_dotenv(
            f"MAIL_LASER_TARGET_EMAILS={TARGET}\nMAIL_LASER_WEBHOOK_URL={URL}\n"
        )
        self.assertEqual(load_config({}, {}, dotenv, getfqdn=lambda: FQDN), expected())

    def test_default_dotenv_is_in_working_directory(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        with open(os.path.join(directory, ".env"), "w") as dotenv:
            dotenv.write(
                f"MAIL_LASER_TARGET_EMAILS={TARGET}\nMAIL_LASER_WEBHOOK_URL={URL}\n"
            )
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(directory)
        self.assertEqual(load_config({}, {}, getfqdn=lambda: FQDN), expected())

    def test_missing_dotenv_is_fine(self) -> None:
        self.assertEqual(load(dotenv_path=self.mktemp()), expected())


class DotenvTests(SynchronousTestCase):
    def write(self, text: str | bytes) -> str:
        path: str = self.mktemp()
        with open(path, "wb") as dotenv:
            dotenv.write(text.encode("utf-8") if isinstance(text, str) else text)
        return path

    def load_dotenv(self, text: str | bytes) -> Config:
        return load_config({}, {}, self.write(text), getfqdn=lambda: FQDN)

    def dotenv_error(self, text: str | bytes) -> str:
        """The error, with the temporary file's name replaced by C{<.env>}."""
        path = self.write(text)
        err = self.assertRaises(ConfigError, load_config, {}, {}, path)
        return str(err).replace(path, "<.env>")

    def test_syntax(self) -> None:
        config = self.load_dotenv(
            "# a comment\n"
            "\n"
            "   \n"
            f"export MAIL_LASER_TARGET_EMAILS = '{TARGET}'   # inline comment\n"
            f'MAIL_LASER_WEBHOOK_URL="{URL}"\r\n'
            "  MAIL_LASER_HEADER_PREFIX=X-A, X-B  # two prefixes\n"
            "MAIL_LASER_SPOOL_DIR=/srv/spool#not-a-comment\n"
            "MAIL_LASER_HOSTNAME=first.example\n"
            "MAIL_LASER_HOSTNAME=second.example\n"
            "MAIL_LASER_WEBHOOK_SECRET=\n"
            "UNRELATED=it's fine\n"
        )
        self.assertEqual(
            (
                config.target_emails,
                config.webhook_url,
                config.header_prefixes,
                config.spool_dir,
                config.webhook_secrets,
                config.hostname,
            ),
            (
                (TARGET,),
                URL,
                ("X-A", "X-B"),
                "/srv/spool#not-a-comment",
                (),
                "second.example",
            ),
        )

    def test_no_expansion(self) -> None:
        config = self.load_dotenv(
            f"MAIL_LASER_TARGET_EMAILS={TARGET}\nMAIL_LASER_WEBHOOK_URL={URL}\n"
            "MAIL_LASER_SPOOL_DIR=${HOME}/spool\n"
        )
        self.assertEqual(config.spool_dir, "${HOME}/spool")

    def test_byte_order_mark(self) -> None:
        config = self.load_dotenv(
            f"\ufeffMAIL_LASER_TARGET_EMAILS={TARGET}\nMAIL_LASER_WEBHOOK_URL={URL}\n"
        )
        self.assertEqual(config, expected())

    def test_malformed_lines(self) -> None:
        """Rejected without quoting the line, which may hold a secret."""
        for line in [
            "MAIL_LASER_WEBHOOK_SECRET",
            f"MAIL_LASER_WEBHOOK_SECRET='{SECRET}",
            f'MAIL_LASER_WEBHOOK_SECRET="{SECRET}',
            f"MAIL_LASER_WEBHOOK_SECRET='{SECRET}' extra",
            f'MAIL_LASER_WEBHOOK_SECRET="{SECRET}"extra',
            f"1MAIL_LASER_WEBHOOK_SECRET={SECRET}",
            f"MAIL LASER={SECRET}",
            "export MAIL_LASER_WEBHOOK_SECRET",
            f"={SECRET}",
        ]:
            self.assertEqual(
                (line, self.dotenv_error(f"# ok\nMAIL_LASER_PORT=25\n{line}\n")),
                (
                    line,
                    "<.env>, line 3: not a KEY=VALUE line"
                    " (quotes must close on the same line)",
                ),
            )

    def test_line_numbers(self) -> None:
        """Blank lines and comments before the bad line count too."""
        self.assertEqual(
            self.dotenv_error("\n\r\n# comment\n   \n\nMAIL_LASER_PORT\nA=1\n"),
            "<.env>, line 6: not a KEY=VALUE line (quotes must close on the same line)",
        )

    def test_quotes_close_on_the_same_line(self) -> None:
        """
        A missing quote must not swallow the lines up to the next one, as
        python-dotenv's multi-line values would.
        """
        for quote in "'\"":
            self.assertEqual(
                self.dotenv_error(
                    f"A=1\nMAIL_LASER_WEBHOOK_SECRET={quote}{SECRET}\n"
                    f"MAIL_LASER_PORT=25{quote}\n"
                ),
                "<.env>, line 2: not a KEY=VALUE line"
                " (quotes must close on the same line)",
            )

    def test_escapes_in_quotes(self) -> None:
        """python-dotenv's syntax: escapes in quoted values, none in bare ones."""
        required = f"MAIL_LASER_TARGET_EMAILS={TARGET}\nMAIL_LASER_WEBHOOK_URL={URL}\n"
        self.assertEqual(
            [
                self.load_dotenv(required + f"MAIL_LASER_SPOOL_DIR={value}\n").spool_dir
                for value in [
                    '"/srv/\\"quoted\\" \\\\ dir"',
                    "'/srv/\\'single\\' \\\\ \\n'",
                    "/srv/bare\\n\\\\",
                ]
            ],
            ['/srv/"quoted" \\ dir', "/srv/'single' \\ \\n", "/srv/bare\\n\\\\"],
        )

    def test_unreadable(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        self.assertEqual(
            str(self.assertRaises(ConfigError, load_config, {}, REQUIRED, directory)),
            f"{directory}: cannot read: Is a directory",
        )

    def test_not_utf8(self) -> None:
        path = self.write(b"MAIL_LASER_SPOOL_DIR=\xff\n")
        self.assertEqual(
            str(self.assertRaises(ConfigError, load_config, {}, REQUIRED, path)),
            f"{path}: cannot read: 'utf-8' codec can't decode byte 0xff in position 21:"
            " invalid start byte",
        )


class DescribeTests(SynchronousTestCase):
    def test_log_safe(self) -> None:
        config = load(
            {
                "MAIL_LASER_WEBHOOK_URL": "https://bob:hunter2@hooks.example.com/m?token=s3cret",
                "MAIL_LASER_WEBHOOK_SECRET": f"{SECRET} {OTHER_SECRET}",
                "MAIL_LASER_SPOOL_URL": "postgresql://ml:pa55@db:5432/ml?sslmode=verify-full",
            }
        )
        self.assertEqual(
            describe(config),
            {
                "target_emails": (TARGET,),
                "webhook_url": "https://***@hooks.example.com/m?token=***",
                "smtp_endpoints": ("tcp:2525:interface=0.0.0.0",),
                "health_endpoint": "tcp:8080:interface=0.0.0.0",
                "header_prefixes": (),
                "webhook_timeout": 30.0,
                "webhook_max_retries": 3,
                "circuit_breaker_threshold": 5,
                "circuit_breaker_reset": 60.0,
                "delivery_mode": "queue",
                "spool_dir": "./maillaser-spool",
                "webhook_secrets": 2,
                "max_message_size": 10485760,
                "max_recipients": 100,
                "tls_cert": None,
                "tls_key": None,
                "hostname": FQDN,
                "smtp_timeout": 300.0,
                "log_level": "info",
                "delivery_concurrency": 16,
                "retry_schedule": DEFAULT_RETRY_SCHEDULE,
                "spool_max_messages": 100000,
                "spool_max_bytes": 1073741824,
                "shutdown_grace": 10.0,
                "max_connections": 1000,
                "max_connections_per_ip": 50,
                "webhook_ca_file": None,
                "worker_timeout": 10.0,
                "payload_timeout": 10.0,
                "smtp_backlog": 1024,
                "target_domains": (),
                "payload_headers": "prefix",
                "webhook_maillaser3_signature": False,
                "attachments": "inline",
                "attachment_inline_max": 1048576,
                "attachment_link_ttl": 604800.0,
                "include_raw": False,
                "webhook_max_body": 26214400,
                "public_url": None,
                "min_data_rate": 1000,
                "max_inflight_bytes": 268435456,
                "max_unknown_recipients": 20,
                "bare_newline": "normalize",
                "spool_url": "postgresql://***@db:5432/ml?sslmode=***",
                "spool_lease": 60.0,
            },
        )
        text = repr(describe(config))
        for secret in ["hunter2", "s3cret", "pa55", SECRET[6:], OTHER_SECRET[6:]]:
            self.assertNotIn(secret, text)

    def test_secrets_not_in_config_repr(self) -> None:
        self.assertNotIn(SECRET[6:], repr(load({"MAIL_LASER_WEBHOOK_SECRET": SECRET})))


class OptionsSourceTests(SynchronousTestCase):
    def test_every_setting_from_options(self) -> None:
        """Each setting can be given as an option, named by the long option."""
        for setting in SETTINGS:
            if setting.default_is_literal:
                self.assertEqual(
                    (setting.option, load(options={setting.option: setting.default})),
                    (setting.option, load()),
                )

    def test_option_error_names_both(self) -> None:
        self.assertEqual(
            error(options={"port": "abc"}),
            "MAIL_LASER_PORT / --port: 'abc' is not a valid port number (0-65535)",
        )

    def test_first_error_in_table_order(self) -> None:
        self.assertEqual(
            error({"MAIL_LASER_PORT": "x", "MAIL_LASER_WEBHOOK_TIMEOUT": "x"}),
            "MAIL_LASER_PORT / --port: 'x' is not a valid port number (0-65535)",
        )

    def test_messages_are_one_line(self) -> None:
        for environ in [
            {"MAIL_LASER_PORT": "2\n5"},
            {"MAIL_LASER_TARGET_EMAILS": "a\n@b"},
            {"MAIL_LASER_HOSTNAME": "a\nb"},
            {"MAIL_LASER_RETRY_SCHEDULE": "1\n2"},
        ]:
            self.assertNotIn("\n", error(environ))
