"""
Tests for the settings of issue 13: MailLaser 3's variable names as
aliases, target domains, the payload's header list and MailLaser 3's
signature.
"""

from __future__ import annotations

import base64

from twisted.trial.unittest import SynchronousTestCase

from maillaser.config import Config, ConfigError, load_config
from maillaser.config._settings import ALIASES, BY_OPTION
from maillaser.webhook import parse_secret
from tests.test_config import FQDN, REQUIRED, SECRET, error, expected, load

URL = REQUIRED["MAIL_LASER_WEBHOOK_URL"]


class AliasTests(SynchronousTestCase):
    def test_every_alias_names_a_setting(self) -> None:
        for alias in ALIASES:
            self.assertIn(alias.option, BY_OPTION)
            self.assertNotEqual(alias.env, BY_OPTION[alias.option].env)

    def test_signing_secret(self) -> None:
        """
        MailLaser 3's secret is any text, its UTF-8 bytes the HMAC key: the
        same key signs both schemes.
        """
        config = load({"MAIL_LASER_WEBHOOK_SIGNING_SECRET": "s3cret ünï"})
        [secret] = config.webhook_secrets
        self.assertEqual(parse_secret(secret), "s3cret ünï".encode())
        self.assertEqual(
            secret, "whsec_" + base64.b64encode("s3cret ünï".encode()).decode()
        )

    def test_same_value_under_both_names(self) -> None:
        equivalent = "whsec_" + base64.b64encode(b"hunter2").decode()
        config = load(
            {
                "MAIL_LASER_WEBHOOK_SIGNING_SECRET": "hunter2",
                "MAIL_LASER_WEBHOOK_SECRET": equivalent,
            }
        )
        self.assertEqual(config.webhook_secrets, (equivalent,))

    def test_both_names_differ(self) -> None:
        """One line naming both, the values never shown."""
        message = error(
            {
                "MAIL_LASER_WEBHOOK_SIGNING_SECRET": "hunter2",
                "MAIL_LASER_WEBHOOK_SECRET": SECRET,
            }
        )
        self.assertEqual(
            message,
            "MAIL_LASER_WEBHOOK_SIGNING_SECRET (MailLaser 3's name) and"
            " MAIL_LASER_WEBHOOK_SECRET are both set, to different values;"
            " set only one",
        )
        self.assertNotIn("hunter2", message)
        self.assertNotIn("\n", message)

    def test_empty_signing_secret(self) -> None:
        self.assertEqual(
            error({"MAIL_LASER_WEBHOOK_SIGNING_SECRET": ""}),
            "MAIL_LASER_WEBHOOK_SIGNING_SECRET: cannot be empty",
        )

    def test_option_wins_over_both(self) -> None:
        config = load(
            {"MAIL_LASER_MAX_CONCURRENT_PER_IP": "7"},
            {"max-connections-per-ip": "9"},
        )
        self.assertEqual(config.max_connections_per_ip, 9)

    def test_per_ip_cap(self) -> None:
        config = load({"MAIL_LASER_MAX_CONCURRENT_PER_IP": "7"})
        self.assertEqual(config.max_connections_per_ip, 7)

    def test_per_ip_zero_means_no_cap_of_its_own(self) -> None:
        """MailLaser 3's 0 disables its cap; the global one still holds."""
        config = load(
            {
                "MAIL_LASER_MAX_CONCURRENT_PER_IP": "0",
                "MAIL_LASER_MAX_CONNECTIONS": "300",
            }
        )
        self.assertEqual(config.max_connections_per_ip, 300)

    def test_our_zero_is_still_refused(self) -> None:
        self.assertEqual(
            error({"MAIL_LASER_MAX_CONNECTIONS_PER_IP": "0"}),
            "MAIL_LASER_MAX_CONNECTIONS_PER_IP / --max-connections-per-ip:"
            " must be at least 1, got '0'",
        )

    def test_per_ip_both_names_differ(self) -> None:
        self.assertEqual(
            error(
                {
                    "MAIL_LASER_MAX_CONCURRENT_PER_IP": "10",
                    "MAIL_LASER_MAX_CONNECTIONS_PER_IP": "20",
                }
            ),
            "MAIL_LASER_MAX_CONCURRENT_PER_IP (MailLaser 3's name) and"
            " MAIL_LASER_MAX_CONNECTIONS_PER_IP are both set, to different values;"
            " set only one",
        )

    def test_from_the_dotenv_file(self) -> None:
        path = self.mktemp()
        with open(path, "w") as dotenv:
            dotenv.write("MAIL_LASER_MAX_CONCURRENT_PER_IP=4\n")
        self.assertEqual(load({}, None, path).max_connections_per_ip, 4)


class TargetDomainsTests(SynchronousTestCase):
    def test_domains_alone(self) -> None:
        config = load(
            {
                "MAIL_LASER_TARGET_EMAILS": "",
                "MAIL_LASER_TARGET_DOMAINS": "Mail.Example.com, @b.example,"
                " mail.example.COM, [192.0.2.1], bücher.example",
            }
        )
        self.assertEqual(
            config,
            expected(
                target_emails=(),
                target_domains=(
                    "Mail.Example.com",
                    "b.example",
                    "[192.0.2.1]",
                    "bücher.example",
                ),
            ),
        )

    def test_duplicates_are_ascii_case_only(self) -> None:
        """
        The Kelvin sign (U+212A) lower-cases to C{k} in Python, but SMTP
        matches domains by ASCII case only: it is another domain, kept.
        """
        config = load(
            {"MAIL_LASER_TARGET_DOMAINS": "kelvin.example,\u212aelvin.example"}
        )
        self.assertEqual(
            config.target_domains, ("kelvin.example", "\u212aelvin.example")
        )

    def test_domains_only_without_emails_variable(self) -> None:
        config = load_without_emails({"MAIL_LASER_TARGET_DOMAINS": "example.com"})
        self.assertEqual(
            (config.target_emails, config.target_domains), ((), ("example.com",))
        )

    def test_with_emails(self) -> None:
        config = load({"MAIL_LASER_TARGET_DOMAINS": "example.net"})
        self.assertEqual(
            (config.target_emails, config.target_domains),
            (("alerts@example.com",), ("example.net",)),
        )

    def test_one_of_the_two_is_required(self) -> None:
        self.assertEqual(
            str(self.assertRaises(ConfigError, load_without_emails, {})),
            "MAIL_LASER_TARGET_EMAILS / --target-emails: must be set"
            " (or MAIL_LASER_TARGET_DOMAINS / --target-domains)",
        )

    def test_not_domains(self) -> None:
        for text in ["a@example.com", "exa mple.com", "-bad.example", "x..y", "<x>"]:
            self.assertEqual(
                error({"MAIL_LASER_TARGET_DOMAINS": f"ok.example,{text}"}),
                f"MAIL_LASER_TARGET_DOMAINS / --target-domains: {text!r} is not"
                " a domain",
            )


def load_without_emails(environ: dict[str, str]) -> Config:
    return load_config(
        {},
        {"MAIL_LASER_WEBHOOK_URL": URL, **environ},
        None,
        getfqdn=lambda: FQDN,
    )


class PayloadSettingsTests(SynchronousTestCase):
    def test_payload_headers(self) -> None:
        self.assertEqual(load().payload_headers, "prefix")
        self.assertEqual(
            load({"MAIL_LASER_PAYLOAD_HEADERS": "all"}).payload_headers, "all"
        )
        self.assertIn(
            "MAIL_LASER_PAYLOAD_HEADERS / --payload-headers:",
            error({"MAIL_LASER_PAYLOAD_HEADERS": "some"}),
        )

    def test_maillaser3_signature(self) -> None:
        self.assertFalse(load().webhook_maillaser3_signature)
        config = load({"MAIL_LASER_WEBHOOK_MAILLASER3_SIGNATURE": "true"})
        self.assertTrue(config.webhook_maillaser3_signature)
        self.assertIn(
            "--webhook-maillaser3-signature:",
            error({"MAIL_LASER_WEBHOOK_MAILLASER3_SIGNATURE": "yes please"}),
        )

    def test_config_crosses_to_the_worker(self) -> None:
        config = load(
            {
                "MAIL_LASER_TARGET_DOMAINS": "example.net",
                "MAIL_LASER_PAYLOAD_HEADERS": "all",
                "MAIL_LASER_WEBHOOK_MAILLASER3_SIGNATURE": "true",
            }
        )
        self.assertEqual(type(config).from_json(config.to_json()), config)
