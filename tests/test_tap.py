"""
Tests for L{maillaser.tap}: the options C{twistd}/C{twist} parse, how a bad
value stops start-up, and the hand-over to C{maillaser.service}; and the
plugin under the real C{twistd} and C{twist}, with a stand-in service.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import traceback
import types
from collections.abc import Mapping, Sequence
from unittest import mock

from twisted.application.service import IService, MultiService, Service
from twisted.internet.error import CannotListenError
from twisted.logger import LogLevel
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from maillaser import logs
from maillaser.config import SETTINGS, Config, load_config
from maillaser.tap import Options, makeService
from tests.process import clean_environment

TARGET = "alerts@example.com"
URL = "https://hooks.example.com/mail"
REQUIRED = {"MAIL_LASER_TARGET_EMAILS": TARGET, "MAIL_LASER_WEBHOOK_URL": URL}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import runpy, sys, types
from twisted.application.service import Service
from twisted.logger import Logger, LogLevel
from maillaser.logs import observer

class Probe(Service):
    log = Logger(observer=observer)

    def startService(self):
        super().startService()
        from twisted.internet import reactor
        for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error):
            self.log.emit(level, "probe at {level_name}", level_name=level.name)
        self.log.error("reactor {name}", name=type(reactor).__name__)
        reactor.callLater(0, reactor.stop)

service = types.ModuleType("maillaser.service")
service.makeService = lambda config: Probe()
sys.modules["maillaser.service"] = service
runner, *arguments = sys.argv[1:]
sys.argv = [runner, *arguments]
if runner == "twistd":
    from twisted.scripts.twistd import run
    run()
else:
    runpy.run_module("twisted", run_name="__main__")
"""
"""
The C{maillaser} plugin under a real runner, with C{maillaser.service}
standing in: once started, the service logs one event per level through
MailLaser's loggers, then the name of the reactor, and stops the reactor.
"""


def run_plugin(
    runner: Sequence[str],
    plugin: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """
    Run C{runner} (C{"twistd"} or C{"twist"} and its options) with the
    C{maillaser} plugin and its options C{plugin}, in a fresh process.
    """
    environment = {
        **REQUIRED,
        "MAIL_LASER_HOSTNAME": "mx.test",
        **(environ or {}),
        "PYTHONPATH": ROOT,
    }
    return subprocess.run(
        [sys.executable, "-c", PROBE, *runner, "maillaser", *plugin],
        env=environment,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


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


class ParsingTestCase(SynchronousTestCase):
    """Parsing the options sets the process's log level: put it back after."""

    def setUp(self) -> None:
        self.addCleanup(logs.set_level, logs.level_set())


class OptionsTests(ParsingTestCase):
    def test_every_setting_is_an_option(self) -> None:
        """Same names as the environment variables, plus the two endpoints."""
        names = [parameter[0] for parameter in Options.optParameters]
        self.assertEqual(names, [setting.option for setting in SETTINGS] + ["health"])
        self.assertEqual({parameter[2] for parameter in Options.optParameters}, {None})

    def test_readme_lists_every_setting(self) -> None:
        """README's configuration table: each variable and its option."""
        with open(os.path.join(ROOT, "README.rst")) as readme:
            text = readme.read()
        table = text.split("   * - Environment variable\n", 1)[1].split("\n\n", 1)[0]
        for setting in SETTINGS:
            self.assertIn(f"``{setting.env}``", table)
            self.assertIn(f"``--{setting.option}``", table)

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


class BadValueTests(ParsingTestCase):
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
            "maillaser: MAIL_LASER_TARGET_EMAILS / --target-emails: must be set"
            " (or MAIL_LASER_TARGET_DOMAINS / --target-domains)",
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

    def test_unusable_endpoint(self) -> None:
        self.assertEqual(
            self.exit_message(["--smtp", "tcp:25", "--smtp", "bogus:1"], REQUIRED),
            "maillaser: --smtp: 'bogus:1' is not a usable endpoint"
            " (ValueError: Unknown endpoint type: 'bogus')",
        )

    def test_unknown_option_is_a_usage_error(self) -> None:
        """Mistakes in the command line itself keep Twisted's usual handling."""
        err = self.assertRaises(usage.UsageError, parse, ["--no-such-option"])
        self.assertEqual(str(err), "option --no-such-option not recognized")


class LevelTests(ParsingTestCase):
    def test_sets_the_level(self) -> None:
        """MailLaser's events are filtered at the configured level from now on."""
        parse(["--log-level", "error"], {**REQUIRED, "MAIL_LASER_LOG_LEVEL": "debug"})
        self.assertIs(logs.current_level(), LogLevel.error)

    def test_not_on_a_bad_value(self) -> None:
        logs.set_level(LogLevel.info)
        self.assertRaises(SystemExit, parse, ["--log-level", "warn", "--port", "x"])
        self.assertIs(logs.current_level(), LogLevel.info)


class MakeServiceTests(ParsingTestCase):
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


class _Failing(Service):
    """Fails to start the way a listener or the spool would."""

    def __init__(self, error: Exception, privileged: bool) -> None:
        self.error = error
        self.privileged = privileged

    def privilegedStartService(self) -> None:
        if self.privileged:
            raise self.error

    def startService(self) -> None:
        raise self.error


class StartUpErrorTests(ParsingTestCase):
    """
    An address that cannot be listened on, or an unusable spool, stops
    start-up with one line and status 1, whether it shows when twistd
    binds (before dropping privileges) or when twist starts the service.
    """

    def runner(self, error: Exception, privileged: bool) -> IService:
        fake = types.ModuleType("maillaser.service")
        fake.makeService = lambda config: _Failing(  # type: ignore[attr-defined]
            error, privileged
        )
        with mock.patch.dict(sys.modules, {"maillaser.service": fake}):
            return makeService(parse([]))

    def start(self, runner: IService, privileged: bool) -> None:
        if privileged:
            runner.privilegedStartService()
        else:
            runner.startService()

    def test_cannot_listen(self) -> None:
        error = CannotListenError("127.0.0.1", 25, OSError(98, "Address in use"))
        for privileged in (True, False):
            runner = self.runner(error, privileged)
            stopped = self.assertRaises(SystemExit, self.start, runner, privileged)
            self.assertEqual(stopped.code, f"maillaser: {error}")

    def test_unusable_spool(self) -> None:
        from maillaser.spool import SpoolError

        error = SpoolError("spool.sqlite3 is not a MailLaser spool")
        for privileged in (True, False):
            runner = self.runner(error, privileged)
            stopped = self.assertRaises(SystemExit, self.start, runner, privileged)
            self.assertEqual(
                stopped.code, "maillaser: spool.sqlite3 is not a MailLaser spool"
            )

    def test_reason_for_the_daemon_parent(self) -> None:
        """
        An L{Exception} too, which twistd's daemon child reports on its
        status pipe as its one C{format_exception_only} line: that line is
        the same as the foreground's.
        """
        error = CannotListenError("127.0.0.1", 25, OSError(98, "Address in use"))
        stopped = self.assertRaises(
            SystemExit, self.start, self.runner(error, True), True
        )
        self.assertIsInstance(stopped, Exception)
        self.assertEqual(
            traceback.format_exception_only(type(stopped), stopped),
            [f"maillaser: {error}\n"],
        )

    def test_other_errors_unchanged(self) -> None:
        """A bug is not a start-up error: its traceback is worth having."""
        for privileged in (True, False):
            error = RuntimeError("bug")
            runner = self.runner(error, privileged)
            self.assertIs(
                self.assertRaises(RuntimeError, self.start, runner, privileged),
                error,
            )

    def test_composed_service_unchanged(self) -> None:
        """Only the plugin's own process turns errors into an exit."""
        parent = MultiService()
        _Failing(CannotListenError("", 25, None), True).setServiceParent(parent)
        self.assertRaises(CannotListenError, parent.privilegedStartService)


class RunnerTests(SynchronousTestCase):
    """The plugin under the real C{twistd} and C{twist}."""

    def test_plugin_is_import_light(self) -> None:
        """
        Found by every C{getPlugins} (C{twistd --help}, C{trial}), it
        imports neither MailLaser nor the reactor, which C{--reactor} must
        be free to choose.
        """
        program = (
            "import sys\n"
            "from twisted.application.service import IServiceMaker\n"
            "from twisted.plugin import getPlugins\n"
            "names = [plugin.tapname for plugin in getPlugins(IServiceMaker)]\n"
            "loaded = [name for name in sys.modules if name.startswith('maillaser')]\n"
            "print('maillaser' in names, loaded,\n"
            "      'twisted.internet.reactor' in sys.modules)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", program],
            env={"PYTHONPATH": ROOT},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual((result.stdout, result.stderr), ("True [] False\n", ""))

    def test_bad_value_in_one_line(self) -> None:
        """Status 1, one line on standard error, nothing else."""
        for runner in (["twistd", "--nodaemon", "--pidfile="], ["twist"]):
            result = run_plugin(runner, ["--port", "abc"])
            self.assertEqual(
                (result.returncode, result.stderr, result.stdout),
                (
                    1,
                    "maillaser: MAIL_LASER_PORT / --port: 'abc' is not a valid port"
                    " number (0-65535)\n",
                    "",
                ),
                runner,
            )

    def test_readme_configuration_error(self) -> None:
        """
        The example in README's Configuration section, run as shown, prints
        what it shows, with status 1.
        """
        with open(os.path.join(ROOT, "README.rst")) as readme:
            text = readme.read()
        example = text.split("and the exit status is 1::\n\n", 1)[1]
        command, output = example.splitlines()[:2]
        self.assertTrue(command.startswith("    $ "), command)
        environment = clean_environment()
        bin_directory = os.path.dirname(sys.executable)
        environment["PATH"] = bin_directory + os.pathsep + environment["PATH"]
        result = subprocess.run(
            ["sh", "-c", command.removeprefix("    $ ")],
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(
            (result.returncode, result.stdout, result.stderr),
            (1, "", output.removeprefix("    ") + "\n"),
        )

    def test_version(self) -> None:
        """MailLaser's version, then Twisted's, under both runners."""
        from maillaser import __version__
        from twisted import copyright

        for runner in (["twistd"], ["twist"]):
            result = run_plugin(runner, ["--version"], environ={})
            self.assertEqual(
                (result.returncode, result.stdout, result.stderr),
                (
                    0,
                    f"MailLaser version: {__version__}\n"
                    f"Twisted version: {copyright.version}\n",
                    "",
                ),
                runner,
            )

    def test_bad_endpoint_in_one_line(self) -> None:
        for runner in (["twistd", "--nodaemon", "--pidfile="], ["twist"]):
            result = run_plugin(runner, ["--health", "tcp:port"])
            self.assertEqual(
                (result.returncode, result.stderr),
                (
                    1,
                    "maillaser: --health: 'tcp:port' is not a usable endpoint"
                    " (ValueError: invalid literal for int() with base 10:"
                    " 'port')\n",
                ),
                runner,
            )

    def test_chosen_reactor(self) -> None:
        """
        The options parse the endpoints with the reactor that C{--reactor}
        installed, and do not install another one first.
        """
        for runner in (
            ["twistd", "--nodaemon", "--pidfile=", "--reactor=poll"],
            ["twist", "--reactor=poll", "--log-format=text"],
        ):
            result = run_plugin(runner, ["--smtp", "tcp:0:interface=127.0.0.1"])
            self.assertEqual((result.returncode, result.stderr), (0, ""), runner)
            self.assertIn("] reactor PollReactor\n", result.stdout, runner)
