"""
The ``twistd maillaser`` / ``twist maillaser`` command line.

A thin adapter: it only collects option strings and hands them, with the
environment, to L{maillaser.config.load_config}, which owns every default
and every check.  Nothing here is needed to compose MailLaser into another
program; that goes through L{maillaser.service.makeService} and a
L{maillaser.config.Config}.
"""

from __future__ import annotations

import gc
import os
import resource
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import attrs
from twisted.application.service import IService, MultiService
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from maillaser.config import (
    HEALTH_ENDPOINT_HELP,
    SETTINGS,
    SMTP_ENDPOINT_HELP,
    Config,
    ConfigError,
    load_config,
)
from maillaser.logs import observer, set_level

_log = Logger(observer=observer)


class Options(usage.Options):
    """
    Options for the MailLaser plugin; after parsing, C{self["config"]}.

    Every parameter defaults to C{None} so that L{load_config} can tell "not
    given" apart from "given", which the precedence over the environment
    and the C{.env} file needs.
    """

    synopsis = "--target-emails ADDRESSES --webhook-url URL [options]"
    longdesc = (
        "Accept mail over SMTP for the target addresses and deliver each"
        " message as one signed JSON POST to the webhook URL.  Every option"
        " can also be set by the environment variable shown, or in a .env"
        " file in the working directory; the command line wins, then the"
        " environment, then .env."
    )
    optParameters = [
        [setting.option, None, None, setting.help] for setting in SETTINGS
    ] + [["health", None, None, HEALTH_ENDPOINT_HELP]]

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        dotenv_path: str | os.PathLike[str] | None = ".env",
        reactor: Any = None,
    ) -> None:
        """
        @param environ: the environment to read; C{os.environ} by default,
            injectable so that tests never mutate the real one.
        @param dotenv_path: the C{.env} file to read, or C{None} for none.
        @param reactor: the reactor the endpoint descriptions are parsed
            with; the global one by default, imported only once the options
            are parsed.
        """
        super().__init__()
        self["smtp"] = []
        self._environ = os.environ if environ is None else environ
        self._dotenv_path = dotenv_path
        self._reactor = reactor

    def opt_smtp(self, description: str) -> None:
        self["smtp"].append(description)

    opt_smtp.__doc__ = SMTP_ENDPOINT_HELP

    def opt_version(self) -> None:
        """
        Display MailLaser's version and Twisted's, and exit.
        """
        from maillaser import __version__
        from twisted import copyright

        print(f"MailLaser version: {__version__}")
        print(f"Twisted version: {copyright.version}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        """
        Load the configuration, or stop with one line and status 1.

        Not a L{usage.UsageError}: C{twistd} answers one by printing this
        plugin's whole C{--help} before the message, and C{twist} does the
        same on stderr with status 64.  A bad value, perhaps from the
        environment, deserves one line naming it, so this raises
        L{SystemExit} with the message, which Python prints to stderr
        before exiting with status 1 under both runners.

        The endpoint descriptions are parsed with the global reactor, which
        is imported only now: C{twistd --reactor} and C{twist --reactor}
        come before the plugin's name on the command line and install the
        chosen reactor as soon as they are parsed, before these options;
        without them, the default one is what the runner would install.
        """
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        try:
            self["config"] = load_config(
                self, self._environ, self._dotenv_path, reactor=reactor
            )
        except ConfigError as err:
            raise SystemExit(f"maillaser: {err}") from None
        set_level(self["config"].log_level)


def makeService(options: Options) -> IService:
    """
    Build the service from parsed options.

    C{maillaser.service} is imported here, not at the top, so that
    C{twistd --help} and option errors do not pay for (or depend on) the
    whole application being importable.
    """
    from maillaser.service import makeService as makeMailLaserService

    config = fit_open_files(options["config"], resource.getrlimit, resource.setrlimit)
    runner = _OwnProcess()
    makeMailLaserService(config).setServiceParent(runner)
    return runner


SPOOL_FILES = 16
"""Descriptors the spool may hold: the database, its WAL and shared memory."""
MARGIN = 128
"""
Descriptors besides connections and the spool: listeners, C{/health}
clients, the pipes to the worker and payload processes, the log, the
reactor's own.
"""


def open_files_needed(config: Config) -> int:
    """
    The C{RLIMIT_NOFILE} the bridge asks for: C{max-connections +
    delivery-concurrency + SPOOL_FILES + MARGIN} (1,160 with the defaults).

    The SMTP front holds the connections and the worker (which inherits the
    limit) holds the webhook pool and the spool; one sum covers both.
    """
    return config.max_connections + config.delivery_concurrency + SPOOL_FILES + MARGIN


def fit_open_files(
    config: Config,
    getrlimit: Callable[[int], tuple[int, int]],
    setrlimit: Callable[[int, tuple[int, int]], None],
) -> Config:
    """
    Raise the soft C{RLIMIT_NOFILE} as far as L{open_files_needed}, within
    the hard limit; if that is not enough, lower C{max-connections} to what
    fits, with one warning.

    systemd's default soft limit is 1,024: with the default 1,000 SMTP
    connections open, nothing was left to accept C{/health} with.  Once
    connections are capped to fit, the bridge answers C{421} past the cap
    rather than failing to accept at all.

    @param getrlimit: L{resource.getrlimit}, injected for tests.
    @param setrlimit: L{resource.setrlimit}, likewise.
    @return: C{config}, or a copy with the lower connection caps.
    """
    needed = open_files_needed(config)
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if _at_least(soft, needed):
        return config
    wanted = needed if _at_least(hard, needed) else hard
    try:
        setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (OSError, ValueError):
        pass
    else:
        soft = wanted
    if soft >= needed:
        _log.info(
            "raised the open files limit to {limit} (needed: {needed})",
            limit=soft,
            needed=needed,
        )
        return config
    cap = max(1, config.max_connections - (needed - soft))
    _log.warn(
        "open files limit {soft} (hard limit {hard}) is below the {needed} needed:"
        " accepting at most {cap} SMTP connections instead of {max_connections};"
        " raise it (systemd: LimitNOFILE=) to lift that",
        soft=soft,
        hard=hard,
        needed=needed,
        cap=cap,
        max_connections=config.max_connections,
    )
    return attrs.evolve(
        config,
        max_connections=cap,
        max_connections_per_ip=min(config.max_connections_per_ip, cap),
    )


def _at_least(limit: int, needed: int) -> bool:
    return limit == resource.RLIM_INFINITY or limit >= needed


class _OwnProcess(MultiService):
    """
    The bridge when it owns the process, under twistd and twist: what a
    program composing it with C{makeService} decides for itself.

    A spool that cannot be opened (corrupt, not ours, unwritable) or an
    address that cannot be listened on stops start-up with one line and
    status 1, like a bad setting; a composing program gets the exception.
    """

    def privilegedStartService(self) -> None:
        """Under twistd: the ports are bound here, before privileges are dropped."""
        with _start_up_errors_in_one_line():
            super().privilegedStartService()

    def startService(self) -> None:
        """
        Under twist, where nothing was started before, the same errors
        can surface here.  Once started, move everything start-up made
        (modules, Twisted, the configuration) out of the garbage collector's
        sight: a full collection otherwise walks those objects too, and
        pauses the reactor for that long under load.
        """
        with _start_up_errors_in_one_line():
            super().startService()
        gc.collect()
        gc.freeze()


class _StartUpFailed(SystemExit, Exception):
    """
    A start-up error that ends the process with one line, however it runs.

    Python prints a L{SystemExit}'s code (C{"maillaser: reason"}) to stderr
    and exits with status 1: that is all the foreground runners (C{twistd
    -n}, C{twist}) do with it.  A daemonising C{twistd} needs an
    L{Exception}: only one makes its C{postApplication} remove the pidfile
    and write the reason to the status pipe, on which the parent waits
    before it prints it and exits 1 (a bare L{SystemExit} skips both, and
    the parent waited forever).  The parent prints at most 98 bytes of the
    child's C{traceback.format_exception_only} line, C{"module.Class:
    str"}, so the class passes for a built-in named C{maillaser} and its
    C{str} is the bare reason: the line reads C{maillaser: reason}, as in
    the foreground.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"maillaser: {reason}")
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


_StartUpFailed.__module__ = "builtins"
_StartUpFailed.__qualname__ = "maillaser"


@contextmanager
def _start_up_errors_in_one_line() -> Iterator[None]:
    try:
        yield
    except Exception as error:
        if _is_start_up_error(error):
            raise _StartUpFailed(str(error)) from None
        raise


def _is_start_up_error(error: Exception) -> bool:
    """
    An address that cannot be listened on, or an unusable spool.  The spool
    package is imported only if something went wrong: the SMTP front may
    well have no other use for it.
    """
    if isinstance(error, CannotListenError):
        return True
    from maillaser.spool import SpoolError

    return isinstance(error, SpoolError)
