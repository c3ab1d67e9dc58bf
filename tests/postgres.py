"""
A PostgreSQL server for the shared-spool tests, found or started once per
session, and an empty schema of it for each test.

If C{MAILLASER_TEST_POSTGRES_URL} is set, that server is used.  Else, if
the PostgreSQL server programs are installed, a throwaway cluster is made
with C{initdb} in a temporary directory and started with C{pg_ctl} on a
free loopback port, and stopped at the end of the session.  Else the tests
skip, saying why, except in CI (C{CI} set), where they fail instead.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest

URL_VARIABLE = "MAILLASER_TEST_POSTGRES_URL"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def _program(name: str) -> str | None:
    found = shutil.which(name)
    if found is None:
        candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
        found = candidates[-1] if candidates else None
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Cluster:
    """A throwaway cluster; the server refuses to run as root, so then it
    runs as the C{postgres} user (the Debian package's)."""

    def __init__(self, initdb: str, pg_ctl: str) -> None:
        self.directory = tempfile.mkdtemp(prefix="maillaser-pg-")
        self.data = os.path.join(self.directory, "data")
        self.port = _free_port()
        self.pg_ctl = pg_ctl
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.directory, user.pw_uid, user.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self._run(initdb, "-D", self.data, "-A", "trust", "-U", "maillaser")
        self.start()

    def _run(self, *argv: str) -> None:
        subprocess.run(
            [*self.prefix, *argv], check=True, capture_output=True, timeout=120
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c max_connections=200"
        )
        log = os.path.join(self.directory, "log")
        self._run(self.pg_ctl, "-D", self.data, "-o", options, "-l", log, "-w", "start")

    def stop(self) -> None:
        self._run(self.pg_ctl, "-D", self.data, "-m", "fast", "-w", "stop")

    @property
    def url(self) -> str:
        return f"postgresql://maillaser@127.0.0.1:{self.port}/postgres"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[tuple[str, Cluster | None]]:
    """The server's URL, and the cluster if this session started it."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg is not installed: pip install 'maillaser[postgresql]'")
    given = os.environ.get(URL_VARIABLE)
    if given:
        yield given, None
        return
    initdb, pg_ctl = _program("initdb"), _program("pg_ctl")
    if initdb is None or pg_ctl is None:
        _unavailable(f"no initdb/pg_ctl found and {URL_VARIABLE} is not set")
        return
    cluster = Cluster(initdb, pg_ctl)
    try:
        yield cluster.url, cluster
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(cluster.directory, ignore_errors=True)


def schema_url(server: str, schema: str) -> str:
    """C{server}'s URL, with C{schema} the only one on the search path."""
    separator = "&" if "?" in server else "?"
    return f"{server}{separator}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture
def postgres_url(
    request: pytest.FixtureRequest, postgres_server: tuple[str, Cluster | None]
) -> Iterator[str]:
    """
    A URL whose tables live in a new, empty schema, dropped after the test:
    tests never see each other's messages.  Set as C{postgres_url} on a
    test case instance too.
    """
    import psycopg

    server, _ = postgres_server
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    url = schema_url(server, schema)
    if request.instance is not None:
        request.instance.postgres_url = url
    try:
        yield url
    finally:
        with psycopg.connect(server, autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def postgres_cluster(postgres_server: tuple[str, Cluster | None]) -> Cluster:
    """The cluster this session started, for tests that stop and start it."""
    _, cluster = postgres_server
    if cluster is None:
        _unavailable(f"the server at {URL_VARIABLE} cannot be stopped by a test")
    assert cluster is not None
    return cluster


__all__ = ["Cluster", "postgres_cluster", "postgres_server", "postgres_url"]
