"""
Tests for L{maillaser.tap}: the options C{twistd}/C{twist} parse, how a bad
value stops start-up, and the hand-over to C{maillaser.service}.
"""

from __future__ import annotations

import gc
import os
import sys
import types
from collections.abc import Mapping
from unittest import mock

from twisted.application.service import Service
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from maillaser.config import SETTINGS, Config, load_config
from maillaser.tap import Options, makeService

TARGET = "alerts@example.com"
URL = "https://hooks.example.com/mail"
REQUIRED = {"MAIL_LASER_TARGET_EMAILS": TARGET, "MAIL_LASER_WEBHOOK_URL": URL}


def parse(
    arguments: list[str],
    environ: Mapping[str, str] | None = None,
    dotenv_path: str | None = None,
) -> Options:
    options = Options(
        environ=REQUIRED if environ is None else environ, dotenv_path=dotenv_path
    )
    options.parseOptions(arguments)
    return options


def loaded(environ: Mapping[str, str], **options: object) -> Config:
    """What L{load_config} makes of the same sources, for comparison."""
    return load_config({"smtp": [], **options}, environ, None)


class OptionsTests(SynchronousTestCase):
    def test_every_setting_is_an_option(self) -> None:
        """Same names as the environment variables, plus the two endpoints."""
        names = [parameter[0] for parameter in Options.optParameters]
        self.assertEqual(names, [setting.option for setting in SETTINGS] + ["health"])
        self.assertEqual({parameter[2] for parameter in Options.optParameters}, {None})

    def test_help_names_environment_and_default(self) -> None:
        text = Options(environ={}).getUsage(width=1000)
        for setting in SETTINGS:
            self.assertIn(f"--{setting.option}=", text)
            self.assertIn(f"[env {setting.env}; default: {setting.default}]", text)
        self.assertIn("--smtp=", text)
        self.assertIn("--health=", text)

    def test_no_options(self) -> None:
        options = parse([])
        self.assertEqual(options["config"], loaded(REQUIRED))

    def test_options(self) -> None:
        options = parse(
            [
                "--target-emails=a@example.com,b@example.com",
                "--webhook-url",
                "http://receiver:8000/mail",
                "--port",
                "25",
                "--bind-address",
                "::1",
                "--health-port=9000",
                "--webhook-max-retries=0",
                "--delivery-mode=SYNC",
                "--retry-schedule=1m,1h",
            ],
            environ={},
        )
        config = options["config"]
        self.assertEqual(
            (
                config.target_emails,
                config.webhook_url,
                config.smtp_endpoints,
                config.health_endpoint,
                config.webhook_max_retries,
                config.delivery_mode,
                config.retry_schedule,
            ),
            (
                ("a@example.com", "b@example.com"),
                "http://receiver:8000/mail",
                ("tcp6:25:interface=\\:\\:1",),
                "tcp:9000:interface=0.0.0.0",
                0,
                "sync",
                (60.0, 3600.0),
            ),
        )

    def test_every_setting_through_the_command_line(self) -> None:
        """Each option reaches its setting: the documented default changes nothing."""
        for setting in SETTINGS:
            if setting.default_is_literal:
                options = parse([f"--{setting.option}", setting.default])
                self.assertEqual(
                    (setting.option, options["config"]),
                    (setting.option, loaded(REQUIRED)),
                )

    def test_option_beats_environment(self) -> None:
        options = parse(
            ["--port", "26", "--log-level", "debug"],
            environ={
                **REQUIRED,
                "MAIL_LASER_PORT": "25",
                "MAIL_LASER_LOG_LEVEL": "error",
            },
        )
        self.assertEqual(
            (options["config"].smtp_endpoints, options["config"].log_level),
            (("tcp:26:interface=0.0.0.0",), "debug"),
        )

    def test_dotenv(self) -> None:
        path = self.mktemp()
        with open(path, "w") as dotenv:
            dotenv.write(f"MAIL_LASER_TARGET_EMAILS={TARGET}\nMAIL_LASER_PORT=27\n")
        options = parse([], environ={"MAIL_LASER_WEBHOOK_URL": URL}, dotenv_path=path)
        self.assertEqual(
            options["config"].smtp_endpoints, ("tcp:27:interface=0.0.0.0",)
        )

    def test_smtp_repeatable(self) -> None:
        options = parse(
            [
                "--smtp",
                "tcp:2525:interface=127.0.0.1",
                "--smtp=tcp6:2525:interface=\\:\\:1",
                "--health",
                "tcp:8081:interface=127.0.0.1",
            ]
        )
        self.assertEqual(
            (
                options["smtp"],
                options["config"].smtp_endpoints,
                options["config"].health_endpoint,
            ),
            (
                ["tcp:2525:interface=127.0.0.1", "tcp6:2525:interface=\\:\\:1"],
                ("tcp:2525:interface=127.0.0.1", "tcp6:2525:interface=\\:\\:1"),
                "tcp:8081:interface=127.0.0.1",
            ),
        )

    def test_smtp_not_shared(self) -> None:
        """Each instance starts with its own empty list."""
        parse(["--smtp", "tcp:2525"])
        self.assertEqual(Options(environ={})["smtp"], [])

    def test_environ_defaults_to_process_environment(self) -> None:
        self.patch(os, "environ", {**REQUIRED, "MAIL_LASER_PORT": "28"})
        options = Options(dotenv_path=None)
        options.parseOptions([])
        self.assertEqual(
            options["config"].smtp_endpoints, ("tcp:28:interface=0.0.0.0",)
        )


class BadValueTests(SynchronousTestCase):
    """
    A bad value stops start-up with one line and status 1.

    Python prints a L{SystemExit}'s message to stderr and exits with status
    1; a L{usage.UsageError} would make C{twistd} and C{twist} print the
    whole C{--help} as well (and C{twist} exit with 64).
    """

    def exit_message(self, arguments: list[str], environ: Mapping[str, str]) -> object:
        return self.assertRaises(SystemExit, parse, arguments, environ).code

    def test_bad_option(self) -> None:
        self.assertEqual(
            self.exit_message(["--port", "abc"], REQUIRED),
            "maillaser: MAIL_LASER_PORT / --port: 'abc' is not a valid port number"
            " (0-65535)",
        )

    def test_bad_environment(self) -> None:
        self.assertEqual(
            self.exit_message([], {**REQUIRED, "MAIL_LASER_WEBHOOK_TIMEOUT": "0"}),
            "maillaser: MAIL_LASER_WEBHOOK_TIMEOUT / --webhook-timeout: must be greater"
            " than 0, got '0'",
        )

    def test_missing_required(self) -> None:
        self.assertEqual(
            self.exit_message([], {}),
            "maillaser: MAIL_LASER_TARGET_EMAILS / --target-emails: must be set",
        )

    def test_secret_not_echoed(self) -> None:
        message = self.exit_message(
            ["--webhook-url", "ftp://bob:hunter2@example.com/?token=s3cret"], REQUIRED
        )
        self.assertEqual(
            message,
            "maillaser: MAIL_LASER_WEBHOOK_URL / --webhook-url: scheme 'ftp' is not"
            " http or https",
        )

    def test_unknown_option_is_a_usage_error(self) -> None:
        """Mistakes in the command line itself keep Twisted's usual handling."""
        err = self.assertRaises(usage.UsageError, parse, ["--no-such-option"])
        self.assertEqual(str(err), "option --no-such-option not recognized")


class MakeServiceTests(SynchronousTestCase):
    def test_builds_from_config(self) -> None:
        """The service module is imported only now, and given the C{Config}."""
        built = Service()
        calls: list[Config] = []

        def fake_make_service(config: Config) -> Service:
            calls.append(config)
            return built

        fake = types.ModuleType("maillaser.service")
        fake.makeService = fake_make_service  # type: ignore[attr-defined]
        options = parse([])
        with mock.patch.dict(sys.modules, {"maillaser.service": fake}):
            runner = makeService(options)
        self.assertEqual(list(runner), [built])  # type: ignore[call-overload]
        self.assertEqual(calls, [options["config"]])

    def test_start_freezes_start_up_objects(self) -> None:
        """
        Once the plugin's service has started, what start-up made is out of
        the collector's sight (a full collection walking it paused the
        reactor under load); objects made later are still collected.
        """
        fake = types.ModuleType("maillaser.service")
        fake.makeService = lambda config: Service()  # type: ignore[attr-defined]
        with mock.patch.dict(sys.modules, {"maillaser.service": fake}):
            runner = makeService(parse([]))
        self.addCleanup(gc.unfreeze)
        gc.unfreeze()
        made_before: list[object] = []
        runner.startService()
        self.addCleanup(runner.stopService)
        made_after: list[object] = []
        tracked = gc.get_objects()
        self.assertGreater(gc.get_freeze_count(), 0)
        self.assertFalse(any(each is made_before for each in tracked))
        self.assertTrue(any(each is made_after for each in tracked))
