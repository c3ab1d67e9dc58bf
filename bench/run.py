"""
The MailLaser benchmark: throughput, latency, stalls and memory, measured
against a bare twisted.mail server in the same run.

For each corpus message it starts a fast webhook receiver (bench/receiver.py),
a bare twisted.mail ESMTP server that discards everything (bench/bare_smtp.py,
the ceiling any Twisted bridge can reach) and, for each delivery mode, a
fresh bridge (C{python -m twisted maillaser}, i.e. C{twist}, JSON log to a
file).  Postfix's C{smtp-source} drives N messages over C parallel sessions
against both, one message per connection, in C{--repeat} interleaved rounds
(each after waiting, within limits, for an otherwise idle machine); the
fastest round of each is reported, since noise only slows a run down.
Then, unless C{--quick} or C{--no-extras}: p50/p99 latency at about half
the peak rate, and the bridge's memory with 1,000 idle SMTP connections and
10,000 spooled messages.  Results go to stdout (a table and the targets)
and to bench/results/<timestamp>.json.  C{--compare TREE} measures another
source tree's bridge in the same rounds; C{--profile DIR} records py-spy
profiles of the measured runs.

Latency is measured from the time embedded in the message id, which the
bridge takes at C{MAIL FROM} (millisecond resolution, floored), to the
receiver's arrival time: an upper bound for "end of DATA to webhook", by the
C{RCPT}/C{DATA} round trips.  In queue mode the bridge's "accepted" log event
(logged when it answers C{250}, after the spool commit) gives a lower bound
too; both are in the JSON results.

Every process it starts is stopped on the way out (also on Ctrl-C), only
loopback addresses are used, and every wait has a deadline.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import multiprocessing
import os
import platform
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import attrs

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CORPUS_DIR = ROOT / "tests" / "corpus"
RESULTS_DIR = BENCH / "results"

CORPORA = ("small-plain", "multipart-attachment", "html-only", "large-attachment")
LOADS = {
    "small-plain": (3000, 20),
    "multipart-attachment": (3000, 20),
    "html-only": (500, 20),
    "large-attachment": (500, 20),
}
"""Messages and parallel sessions per corpus file, unless given."""

QUICK_LOAD = (20, 2)

TARGET = "bench@example.com"
SENDER = "source@example.net"
HELO = "bench.example"

START_TIMEOUT = 30.0
STEP_TIMEOUT = 600.0
"""Longest any one smtp-source run, or the wait for its deliveries, may take."""
QUIET_TIMEOUT = 20.0
"""Give up waiting for deliveries when none arrived for this long."""
STOP_TIMEOUT = 30.0
PROBE_INTERVAL = 0.01

QUEUE_RATIO = 0.5
SYNC_RATIO = 0.5
HALF_LOAD_P99_MS = 20.0
RSS_LIMIT_MB = 150.0
STALL_LIMIT_MS = 50.0
RATIO_CORPORA = ("small-plain", "multipart-attachment")
STALL_CORPORA = ("html-only", "large-attachment")

IDLE_CONNECTIONS = 1000
SPOOLED_MESSAGES = 10_000
REPEAT = 3
"""Measured rounds per corpus file; the best is reported, and the median."""
QUIET_WAIT = 60.0
HALF_LOAD_MESSAGES = 1000
HALF_LOAD_SESSIONS = (1, 2, 3, 4, 6, 8)


class BenchError(Exception):
    """The benchmark could not run a step; the message says which."""


# --- processes ----------------------------------------------------------------


class Children:
    """
    Every process the benchmark starts.  Each runs in its own session, so a
    Ctrl-C reaches only the benchmark, which then stops them in order.
    """

    def __init__(self) -> None:
        self._processes: list[subprocess.Popen[bytes]] = []

    def start(self, argv: Sequence[str], **options: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(argv, start_new_session=True, **options)
        self._processes.append(process)
        return process

    def stop(
        self, process: subprocess.Popen[bytes], grace: float = STOP_TIMEOUT
    ) -> int:
        """SIGTERM, then SIGKILL if it is still there after C{grace} seconds."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if process in self._processes:
            self._processes.remove(process)
        return process.returncode

    def stop_all(self) -> None:
        for process in reversed(self._processes[:]):
            self.stop(process, grace=5)


def read_port(process: subprocess.Popen[bytes], timeout: float) -> int:
    """Wait for the C{PORT <n>} line a helper prints once it listens."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or process.poll() is not None:
            raise BenchError(f"{process.args!r} did not start (got {line!r})")
        ready, _, _ = select.select([process.stdout], [], [], remaining)
        if ready:
            line += os.read(process.stdout.fileno(), 1)
    word, port = line.split()
    if word != b"PORT":
        raise BenchError(f"{process.args!r} said {line!r}")
    return int(port)


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held together so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def proc_status(pid: int, key: str) -> int:
    """A C{kB} value from C{/proc/PID/status} (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {key} for process {pid}")


def process_tree(pid: int) -> list[int]:
    """C{pid} and its descendants: the bridge and its spool process."""
    tree = [pid]
    for member in tree:
        for task in Path(f"/proc/{member}/task").glob("*"):
            with suppress(OSError):
                tree.extend(int(c) for c in (task / "children").read_text().split())
    return tree


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User plus system CPU time of a process (or one of its threads) so far."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    with open(path) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class MachineLoad:
    """
    Where the machine's CPU went since this was made: C{busy_cores} all
    processes together, C{other_cores} what is left after the measured
    server (C{pid}), the benchmark and the children it has reaped (the
    load generator).  Noise from elsewhere shows up in the latter; near
    zero means the run had the machine to itself.
    """

    def __init__(self, *pids: int) -> None:
        self._pids = pids
        self._start = self._read()

    def _read(self) -> tuple[float, float, float]:
        with open("/proc/stat") as stat:
            fields = [int(field) for field in stat.readline().split()[1:]]
        ticks = os.sysconf("SC_CLK_TCK")
        idle = fields[3] + fields[4]  # idle, iowait
        ours = sum(cpu_seconds(pid) for pid in self._pids)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            ours += usage.ru_utime + usage.ru_stime
        return (sum(fields) - idle) / ticks, sum(fields) / ticks, ours

    def cores(self) -> dict[str, float | None]:
        busy, total, ours = self._read()
        elapsed = (total - self._start[1]) / (os.cpu_count() or 1)
        if elapsed <= 0:
            return {"busy_cores": None, "other_cores": None}
        busy -= self._start[0]
        ours -= self._start[2]
        return {
            "busy_cores": round(busy / elapsed, 2),
            "other_cores": round(max(0.0, busy - ours) / elapsed, 2),
        }


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def poll_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --- the webhook receiver -------------------------------------------------------


@attrs.define
class Receiver:
    process: subprocess.Popen[bytes]
    port: int

    @classmethod
    def start(cls, children: Children, status: int = 204) -> Receiver:
        process = children.start(
            [sys.executable, str(BENCH / "receiver.py"), "--status", str(status)],
            stdout=subprocess.PIPE,
        )
        return cls(process, read_port(process, START_TIMEOUT))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def _control(self, method: str, path: str) -> Any:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path)
            return json.loads(connection.getresponse().read())
        finally:
            connection.close()

    def received(self) -> int:
        return int(self._control("GET", "/_stats")["received"])

    def records(self) -> list[tuple[str, float]]:
        return [
            (webhook_id, at) for webhook_id, at in self._control("GET", "/_records")
        ]

    def reset(self) -> None:
        self._control("POST", "/_reset")

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)


def _post_requests(port: int, count: int, body: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        request = (
            b"POST /hook HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            b"content-type: application/json\r\nwebhook-id: msg_load\r\n"
            b"content-length: %d\r\n\r\n" % len(body)
        ) + body
        for _ in range(count):
            sock.sendall(request)
            reply = b""
            while not reply.endswith(b"\r\n\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    raise BenchError("receiver closed the connection")
                reply += chunk


def receiver_capacity(receiver: Receiver, clients: int = 4, each: int = 3000) -> float:
    """
    Requests per second the receiver answers alone, with its load clients
    competing for the same cores: a lower bound of what it can take.
    """
    body = b'{"subject":"x","body":"' + b"x" * 300 + b'"}'
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_post_requests, args=(receiver.port, each, body))
        for _ in range(clients)
    ]
    began = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(STEP_TIMEOUT)
        if worker.is_alive():
            worker.kill()
            raise BenchError("receiver load test timed out")
    elapsed = time.perf_counter() - began
    receiver.reset()
    return clients * each / elapsed


# --- the SMTP servers -----------------------------------------------------------


@attrs.define
class BareServer:
    process: subprocess.Popen[bytes]
    port: int

    @classmethod
    def start(cls, children: Children) -> BareServer:
        process = children.start(
            [sys.executable, str(BENCH / "bare_smtp.py")], stdout=subprocess.PIPE
        )
        return cls(process, read_port(process, START_TIMEOUT))


@attrs.define
class Bridge:
    process: subprocess.Popen[bytes]
    smtp_port: int
    health_port: int
    log_path: Path
    stderr_path: Path

    @classmethod
    def start(
        cls,
        children: Children,
        workdir: Path,
        name: str,
        webhook_url: str,
        mode: str,
        extra: Sequence[str] = (),
        tree: Path = ROOT,
    ) -> Bridge:
        """
        A fresh bridge with its own spool, run as a container would run it
        with JSON lines (C{twistd -n --pidfile=
        --logger=maillaser.logs.json_observer}), with the C{maillaser}
        package of C{tree} first on C{sys.path}.  The
        working directory is the bench's own, so no stray C{.env} and no
        C{MAIL_LASER_*} variable of the caller changes what is measured.
        """
        smtp_port, health_port = free_ports(2)
        log_path = workdir / f"{name}.log.json"
        stderr_path = workdir / f"{name}.stderr"
        argv = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "--logger=maillaser.logs.json_observer",
            "maillaser",
            "--smtp",
            f"tcp:{smtp_port}:interface=127.0.0.1",
            "--health",
            f"tcp:{health_port}:interface=127.0.0.1",
            "--target-emails",
            TARGET,
            "--webhook-url",
            webhook_url,
            "--spool-dir",
            str(workdir / f"{name}.spool"),
            "--delivery-mode",
            mode,
            "--hostname",
            HELO,
            "--max-connections",
            "2000",
            "--max-connections-per-ip",
            "2000",
            *extra,
        ]
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("MAIL_LASER_")
        }
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(tree), os.environ.get("PYTHONPATH")])
        )
        with open(log_path, "wb") as log, open(stderr_path, "wb") as errors:
            process = children.start(
                argv, cwd=workdir, env=environment, stdout=log, stderr=errors
            )
        bridge = cls(process, smtp_port, health_port, log_path, stderr_path)
        bridge._wait_healthy()
        return bridge

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while self.health() is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the bridge did not start:\n{self.stderr_tail()}")
            time.sleep(0.05)

    def health(self) -> dict[str, Any] | None:
        try:
            status, body = http_get(self.health_port, "/health", timeout=10)
        except OSError:
            return None
        return json.loads(body) if status == 200 else None

    def spool_depth(self) -> int:
        health = self.health()
        return -1 if health is None else int(health.get("spool_depth", 0))

    def memory_mb(self, key: str = "VmHWM") -> float:
        """The bridge's memory and its child processes', added up."""
        return sum(proc_status(pid, key) for pid in self.processes()) / 1024

    def cpu_seconds(self) -> float:
        """The bridge's CPU time and its child processes', so far."""
        return sum(cpu_seconds(pid) for pid in self.processes())

    def processes(self) -> list[int]:
        return process_tree(self.process.pid)

    def reactor_cpu_seconds(self) -> float:
        """The main thread's: the reactor's, which limits the throughput."""
        return cpu_seconds(self.process.pid, self.process.pid)

    def stderr_tail(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-2000:]

    def accepted(self, since: float) -> dict[str, float]:
        """
        Message id -> time of the bridge's "accepted" log event (its C{250},
        after the spool commit in queue mode), for events at or after C{since}.
        Reads Twisted's JSON log format and MailLaser's own.
        """
        accepted = {}
        with open(self.log_path, "rb") as log:
            for line in log:
                if b"accepted " not in line or b'"message_id"' not in line:
                    continue
                event = json.loads(line.lstrip(b"\x1e"))
                text = event.get("log_format") or event.get("text") or ""
                at = _event_time(event)
                if text.startswith("accepted ") and at is not None and at >= since:
                    accepted[event["message_id"]] = at
        return accepted


def _event_time(event: dict[str, Any]) -> float | None:
    if "log_time" in event:
        return float(event["log_time"])
    if "timestamp" in event:
        return datetime.fromisoformat(event["timestamp"]).timestamp()
    return None


# --- load and measurements ------------------------------------------------------


@attrs.define
class SourceRun:
    """One smtp-source run, as the client saw it."""

    messages: int
    sessions: int
    started: float
    finished: float
    completed: int
    """DATA transactions completed (accepted or refused), from C{-c}."""
    refused: int
    problems: list[str]
    status: int

    @property
    def elapsed(self) -> float:
        return self.finished - self.started

    @property
    def accepted(self) -> int:
        return max(0, self.completed - self.refused)


def smtp_source() -> str:
    found = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if not os.access(found, os.X_OK):
        raise BenchError("Postfix's smtp-source is not installed")
    return found


def send(
    children: Children, message: Path, port: int, messages: int, sessions: int
) -> SourceRun:
    """
    Run C{smtp-source}.  With C{-A} it carries on past refusals and warns
    about each, so that they are counted rather than ending the run.
    """
    argv = [
        smtp_source(),
        "-A",
        "-c",
        "-F",
        str(message),
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-t",
        TARGET,
        "-f",
        SENDER,
        "-M",
        HELO,
        f"127.0.0.1:{port}",
    ]
    started = time.time()
    process = children.start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = process.communicate(timeout=STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        children.stop(process, grace=1)
        raise BenchError(f"smtp-source did not finish in {STEP_TIMEOUT:.0f}s") from None
    finished = time.time()
    children.stop(process)
    counts = out.replace(b"\r", b"\n").split()
    problems = err.decode(errors="replace").splitlines()
    return SourceRun(
        messages=messages,
        sessions=sessions,
        started=started,
        finished=finished,
        completed=int(counts[-1]) if counts else 0,
        refused=sum("rejected" in line for line in problems),
        problems=problems,
        status=process.returncode,
    )


def prepared_message(name: str, workdir: Path) -> Path:
    """
    The corpus file with LF line ends: C{smtp-source -F} appends CRLF to
    every line it reads and keeps a CR already there, so a CRLF file would
    arrive as CR CR LF.
    """
    source = CORPUS_DIR / f"{name}.eml"
    if not source.is_file():
        raise BenchError(f"no corpus file {source}")
    target = workdir / f"{name}.lf.eml"
    target.write_bytes(source.read_bytes().replace(b"\r\n", b"\n"))
    return target


class StallProbe(threading.Thread):
    """
    C{NOOP} every ~10 ms over one SMTP session of its own; the slowest
    answer bounds the longest time the bridge's reactor was busy elsewhere.
    A C{NOOP} costs the bridge a few microseconds, where a twisted.web
    C{GET /health} cost it about 4% of its reactor time at this rate.
    """

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self._port = port
        self._stopping = threading.Event()
        self.samples: list[float] = []
        self.errors = 0

    def run(self) -> None:
        session: _SMTPLines | None = None
        while not self._stopping.is_set():
            began = time.perf_counter()
            try:
                if session is None:
                    session = _SMTPLines(self._port)
                session.command(b"NOOP")
            except OSError:
                self.errors += 1
                if session is not None:
                    session.close()
                session = None
            took = time.perf_counter() - began
            self.samples.append(took)
            self._stopping.wait(max(0.0, PROBE_INTERVAL - took))
        if session is not None:
            session.close()

    def stop(self) -> dict[str, Any]:
        self._stopping.set()
        self.join(35)
        samples = sorted(self.samples)
        return {
            "probes": len(samples),
            "errors": self.errors,
            "max_ms": _ms(samples[-1]) if samples else None,
            "p99_ms": _ms(percentile(samples, 0.99)),
        }


class _SMTPLines:
    """A bare SMTP client session: just enough for the stall probe."""

    def __init__(self, port: int) -> None:
        self._socket = socket.create_connection(("127.0.0.1", port), timeout=30)
        self._buffer = b""
        self._reply()  # the greeting

    def command(self, line: bytes) -> bytes:
        self._socket.sendall(line + b"\r\n")
        return self._reply()

    def _reply(self) -> bytes:
        """The last line of the next reply; OSError unless it is 2xx."""
        while True:
            line, found, rest = self._buffer.partition(b"\r\n")
            if not found:
                chunk = self._socket.recv(4096)
                if not chunk:
                    raise ConnectionError("the bridge closed the probe session")
                self._buffer += chunk
                continue
            self._buffer = rest
            if line[3:4] != b"-":
                if not line.startswith(b"2"):
                    raise ConnectionError(f"probe got {line!r}")
                return line

    def close(self) -> None:
        self._socket.close()


def _per_message(seconds: float, messages: int) -> float | None:
    return round(seconds * 1000 / messages, 3) if messages else None


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile of sorted C{values}."""
    if not values:
        return None
    return values[max(0, math.ceil(fraction * len(values)) - 1)]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def id_time(message_id: str) -> float:
    """When the bridge took C{MAIL FROM}: the id's first 12 hex digits, in ms."""
    return int(message_id[4:16], 16) / 1000


def wait_received(receiver: Receiver, expected: int) -> int:
    """Wait until C{expected} requests arrived, or none arrive for a while."""
    deadline = time.monotonic() + STEP_TIMEOUT
    last, changed = -1, time.monotonic()
    while True:
        received = receiver.received()
        now = time.monotonic()
        if received >= expected or now > deadline:
            return received
        if received != last:
            last, changed = received, now
        elif now - changed > QUIET_TIMEOUT:
            return received
        time.sleep(0.02)


def latencies(
    arrivals: dict[str, float], since: dict[str, float]
) -> dict[str, float | None]:
    delays = sorted(
        at - since[message_id]
        for message_id, at in arrivals.items()
        if message_id in since
    )
    return {
        "p50_ms": _ms(percentile(delays, 0.50)),
        "p99_ms": _ms(percentile(delays, 0.99)),
        "max_ms": _ms(delays[-1]) if delays else None,
    }


def warm_up_size(messages: int, sessions: int) -> int:
    return max(sessions, min(200, messages // 10))


def warm_up(
    children: Children,
    bridge: Bridge,
    receiver: Receiver,
    message: Path,
    messages: int,
    sessions: int,
) -> None:
    """A first round, so the measured one starts with warm caches and imports."""
    count = warm_up_size(messages, sessions)
    source = send(children, message, bridge.smtp_port, count, sessions)
    wait_received(receiver, source.accepted)
    poll_until(lambda: bridge.spool_depth() <= 0, QUIET_TIMEOUT, "an empty spool")
    receiver.reset()


def drive(
    children: Children,
    bridge: Bridge,
    receiver: Receiver,
    message: Path,
    messages: int,
    sessions: int,
    mode: str,
) -> dict[str, Any]:
    """One measured run against a running, warmed-up bridge."""
    receiver.reset()
    bridge_cpu, receiver_cpu = bridge.cpu_seconds(), receiver.cpu_seconds()
    reactor_cpu = bridge.reactor_cpu_seconds()
    load = MachineLoad(*bridge.processes(), receiver.process.pid)
    probe = StallProbe(bridge.smtp_port)
    probe.start()
    try:
        source = send(children, message, bridge.smtp_port, messages, sessions)
        accepted = bridge.accepted(since=source.started)
        sent = len(accepted) if accepted or source.accepted == 0 else source.accepted
        wait_received(receiver, sent)
        if mode == "queue":
            with suppress(BenchError):
                poll_until(lambda: bridge.spool_depth() == 0, QUIET_TIMEOUT, "spool")
    finally:
        stalls = probe.stop()
    records = receiver.records()
    arrivals: dict[str, float] = {}
    for message_id, at in records:
        arrivals.setdefault(message_id, at)
    if accepted:
        lost = len(accepted.keys() - arrivals.keys())
    else:
        lost = max(0, sent - len(arrivals))
    finished = max(arrivals.values(), default=source.finished)
    elapsed = finished - source.started
    return {
        "messages": messages,
        "sessions": sessions,
        "sent": sent,
        "failed": messages - sent,
        "smtp_source_status": source.status,
        "smtp_source_problems": source.problems[:5],
        "received": len(arrivals),
        "duplicates": len(records) - len(arrivals),
        "lost": lost,
        "elapsed_s": round(elapsed, 3),
        "rate": round(len(arrivals) / elapsed, 1) if elapsed > 0 else None,
        "latency_from_mail_from": latencies(
            arrivals, {message_id: id_time(message_id) for message_id in arrivals}
        ),
        "latency_from_250": latencies(arrivals, accepted) if mode == "queue" else None,
        "stall": stalls,
        "bridge_cpu": round((bridge.cpu_seconds() - bridge_cpu) / elapsed, 2),
        "reactor_cpu_ms_per_message": _per_message(
            bridge.reactor_cpu_seconds() - reactor_cpu, len(arrivals)
        ),
        "receiver_cpu": round((receiver.cpu_seconds() - receiver_cpu) / elapsed, 2),
        "machine": load.cores(),
        "spool_depth_after": bridge.spool_depth() if mode == "queue" else None,
    }


def measure_bare(
    children: Children,
    bare: BareServer,
    message: Path,
    load: tuple[int, int],
    warm: bool,
) -> dict[str, Any]:
    """The ceiling, measured like the bridge: from start until smtp-source ends."""
    messages, sessions = load
    if warm:
        send(children, message, bare.port, warm_up_size(messages, sessions), sessions)
    machine = MachineLoad(bare.process.pid)
    cpu = cpu_seconds(bare.process.pid)
    source = send(children, message, bare.port, messages, sessions)
    cpu = cpu_seconds(bare.process.pid) - cpu
    return {
        "messages": messages,
        "sessions": sessions,
        "sent": source.accepted,
        "elapsed_s": round(source.elapsed, 3),
        "rate": round(source.accepted / source.elapsed, 1),
        "cpu_ms_per_message": _per_message(cpu, source.accepted),
        "smtp_source_status": source.status,
        "machine": machine.cores(),
    }


@contextmanager
def running_bridge(
    children: Children,
    workdir: Path,
    name: str,
    webhook_url: str,
    mode: str,
    extra: Sequence[str] = (),
    tree: Path = ROOT,
) -> Iterator[Bridge]:
    bridge = Bridge.start(children, workdir, name, webhook_url, mode, extra, tree)
    try:
        yield bridge
    finally:
        status = children.stop(bridge.process)
        if status not in (0, -signal.SIGTERM):  # twistd re-raises the signal
            print(f"(bridge {name} exited with status {status})", file=sys.stderr)


@attrs.frozen
class Variant:
    """A bridge to measure: a delivery mode, from this tree or another one."""

    mode: str
    tree: Path = ROOT
    label: str = ""

    @property
    def name(self) -> str:
        return f"{self.mode}/{self.label}" if self.label else self.mode


def measure_corpus(
    children: Children,
    workdir: Path,
    servers: tuple[Receiver, BareServer],
    corpus: str,
    load: tuple[int, int],
    variants: Sequence[Variant],
    options: argparse.Namespace,
) -> list[dict[str, Any]]:
    """
    Bare server and one fresh bridge per variant, measured in turn
    C{options.repeat} times, so that whatever else loads the machine
    meanwhile affects them alike.
    """
    receiver, bare = servers
    message = prepared_message(corpus, workdir)
    ceilings: list[dict[str, Any]] = []
    runs: dict[Variant, list[dict[str, Any]]] = {variant: [] for variant in variants}
    with ExitStack() as stack:
        bridges = {
            variant: stack.enter_context(
                running_bridge(
                    children,
                    workdir,
                    f"{corpus}-{variant.name.replace('/', '-')}",
                    receiver.url,
                    variant.mode,
                    tree=variant.tree,
                )
            )
            for variant in variants
        }
        for bridge in bridges.values():
            warm_up(children, bridge, receiver, message, *load)
        for round_ in range(options.repeat):
            quiet = wait_for_quiet(options.quiet_wait)
            ceiling = measure_bare(children, bare, message, load, round_ == 0)
            ceilings.append(dict(ceiling, quiet=quiet))
            for variant, bridge in bridges.items():
                output = options.profile and (
                    options.profile
                    / f"{corpus}-{variant.name.replace('/', '-')}-{round_}.txt"
                )
                quiet = wait_for_quiet(options.quiet_wait)
                with profiling(children, bridge, output):
                    run = drive(
                        children, bridge, receiver, message, *load, variant.mode
                    )
                runs[variant].append(dict(run, quiet=quiet))
        peaks = {
            variant: bridge.memory_mb("VmHWM") for variant, bridge in bridges.items()
        }
    return [
        summarise(corpus, variant, runs[variant], ceilings, peaks[variant])
        for variant in variants
    ]


def shared_round(
    children: Children,
    bridges: Sequence[Bridge],
    receiver: Receiver,
    message: Path,
    messages: int,
    sessions: int,
) -> dict[str, Any]:
    """
    One run against bridges on one spool: the messages and sessions split
    evenly across them, one smtp-source each, all at once; the rate is
    messages delivered per second, from the first send to the last arrival.
    """
    receiver.reset()
    load = MachineLoad(
        *(pid for bridge in bridges for pid in bridge.processes()),
        receiver.process.pid,
    )
    share, spread = messages // len(bridges), max(1, sessions // len(bridges))
    sources: list[SourceRun] = []
    threads = [
        threading.Thread(
            target=lambda port=bridge.smtp_port: sources.append(
                send(children, message, port, share, spread)
            )
        )
        for bridge in bridges
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(STEP_TIMEOUT)
    sent = sum(source.accepted for source in sources)
    wait_received(receiver, sent)
    records = receiver.records()
    arrivals: dict[str, float] = {}
    for message_id, at in records:
        arrivals.setdefault(message_id, at)
    started = min(source.started for source in sources)
    elapsed = max(arrivals.values(), default=time.time()) - started
    return {
        "bridges": len(bridges),
        "messages": share * len(bridges),
        "sent": sent,
        "received": len(arrivals),
        "duplicates": len(records) - len(arrivals),
        "lost": max(0, sent - len(arrivals)),
        "failed": share * len(bridges) - sent,
        "elapsed_s": round(elapsed, 3),
        "rate": round(len(arrivals) / elapsed, 1) if elapsed > 0 else None,
        "machine": load.cores(),
    }


def measure_shared(
    children: Children,
    workdir: Path,
    receiver: Receiver,
    load: tuple[int, int],
    options: argparse.Namespace,
) -> list[dict[str, Any]]:
    """
    Queue mode on the shared spool at C{options.spool_url}: one SQLite
    bridge (the reference), then 1, 2, ... C{options.bridges} bridges on
    PostgreSQL, in C{options.repeat} interleaved rounds; the fastest round
    of each is kept.
    """
    message = prepared_message("small-plain", workdir)
    counts = ["sqlite", *range(1, options.bridges + 1)]
    rounds: dict[str | int, list[dict[str, Any]]] = {count: [] for count in counts}
    with ExitStack() as stack:
        groups: dict[str | int, list[Bridge]] = {}
        for count in counts:
            extra = () if count == "sqlite" else ("--spool-url", options.spool_url)
            groups[count] = [
                stack.enter_context(
                    running_bridge(
                        children,
                        workdir,
                        f"shared-{count}-{n}",
                        receiver.url,
                        "queue",
                        extra,
                    )
                )
                for n in range(1 if count == "sqlite" else int(count))
            ]
            shared_round(children, groups[count], receiver, message, *load)
        for _ in range(options.repeat):
            for count in counts:
                wait_for_quiet(options.quiet_wait)
                run = shared_round(children, groups[count], receiver, message, *load)
                rounds[count].append(run)
    results = []
    for count in counts:
        best = max(rounds[count], key=lambda run: run["rate"] or 0.0)
        results.append(
            dict(
                best,
                spool="sqlite" if count == "sqlite" else "postgresql",
                rates=[run["rate"] for run in rounds[count]],
                lost=sum(run["lost"] for run in rounds[count]),
                failed=sum(run["failed"] for run in rounds[count]),
                duplicates=sum(run["duplicates"] for run in rounds[count]),
            )
        )
    return results


def shared_targets(runs: list[dict[str, Any]]) -> list[str]:
    """Issue 14's targets, as lines."""
    sqlite = runs[0]["rate"] or 0.0
    by_count = {run["bridges"]: run["rate"] or 0.0 for run in runs[1:]}
    lines = [
        f"one bridge on PostgreSQL / on SQLite: {by_count[1] / sqlite:.2f}"
        f" (target >= 0.70): {'met' if by_count[1] >= 0.7 * sqlite else 'MISSED'}"
    ]
    if 2 in by_count:
        lines.append(
            f"two bridges / one: {by_count[2] / by_count[1]:.2f} (target > 1):"
            f" {'met' if by_count[2] > by_count[1] else 'MISSED'}"
        )
    return lines


def wait_for_quiet(timeout: float, threshold: float = 0.3) -> dict[str, Any]:
    """
    Wait (at most C{timeout} seconds) for half a second in which the machine is
    nearly idle, so that a round does not start while something else, such
    as another test suite, holds the CPU.  Returns what was seen.
    """
    began = time.monotonic()
    busy = None
    while True:
        load = MachineLoad()
        time.sleep(0.5 if timeout > 0 else 0.0)
        busy = load.cores()["busy_cores"]
        waited = time.monotonic() - began
        if timeout <= 0 or (busy is not None and busy < threshold) or waited > timeout:
            return {"waited_s": round(waited, 1), "busy_cores": busy}


def summarise(
    corpus: str,
    variant: Variant,
    runs: list[dict[str, Any]],
    ceilings: list[dict[str, Any]],
    peak_rss_mb: float,
) -> dict[str, Any]:
    """
    The fastest run, for the bridge and the ceiling alike: on a shared
    machine noise only ever slows a run down.  Medians are kept too, and
    the counts that must hold for every run (lost, failed) are summed.
    """
    best = max(runs, key=lambda run: run["rate"] or 0.0)
    ceiling = max(ceilings, key=lambda ceiling: ceiling["rate"])
    summary = dict(best)
    summary.update(
        corpus=corpus,
        mode=variant.mode,
        variant=variant.name,
        tree=str(variant.tree),
        repeat=len(runs),
        rates=[run["rate"] for run in runs],
        median_rate=_median([run["rate"] or 0.0 for run in runs]),
        bare_rate=ceiling["rate"],
        bare_rates=[each["rate"] for each in ceilings],
        bare_machine=[each["machine"] for each in ceilings],
        bare_quiet=[each["quiet"] for each in ceilings],
        ratio=round((best["rate"] or 0.0) / ceiling["rate"], 3),
        bare_cpu_ms_per_message=min(
            each["cpu_ms_per_message"] or 0 for each in ceilings
        ),
        cpu_ratio=_cpu_ratio(runs, ceilings),
        max_stall_ms=max((run["stall"]["max_ms"] or 0.0) for run in runs),
        peak_rss_mb=round(peak_rss_mb, 1),
        lost=sum(run["lost"] for run in runs),
        failed=sum(run["failed"] for run in runs),
        duplicates=sum(run["duplicates"] for run in runs),
    )
    return summary


def _cpu_ratio(
    runs: list[dict[str, Any]], ceilings: list[dict[str, Any]]
) -> float | None:
    """
    Bare CPU per message over the bridge's reactor CPU per message (best of
    each): what the throughput ratio would be if both were held back by
    their one core only, and far less disturbed by other load than rates.
    """
    bridge: list[float | None] = [run["reactor_cpu_ms_per_message"] for run in runs]
    bare: list[float | None] = [each["cpu_ms_per_message"] for each in ceilings]
    bridge_best = min((value for value in bridge if value), default=None)
    bare_best = min((value for value in bare if value), default=None)
    if bridge_best is None or bare_best is None:
        return None
    return round(bare_best / bridge_best, 3)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


@contextmanager
def profiling(
    children: Children, bridge: Bridge, output: Path | None
) -> Iterator[None]:
    """
    Sample the bridge with py-spy while the block runs: collapsed stacks of
    whichever thread holds the GIL, since one core's worth of Python is what
    limits the bridge.  Sampling pauses the bridge, so a profiled run's
    numbers are for attribution only.
    """
    if output is None:
        yield
        return
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    output.parent.mkdir(parents=True, exist_ok=True)
    argv = [py_spy, "record", "--pid", str(bridge.process.pid), "--rate", "250"]
    argv += ["--gil", "--threads", "--format", "raw", "--output", str(output)]
    recorder = children.start(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)  # py-spy attaches asynchronously
        yield
    finally:
        recorder.send_signal(signal.SIGINT)
        try:
            recorder.wait(STOP_TIMEOUT)
        finally:
            children.stop(recorder, grace=1)


def measure_half_load(
    children: Children,
    workdir: Path,
    receiver: Receiver,
    message: Path,
    mode: str,
    peak: float,
) -> dict[str, Any]:
    """
    smtp-source cannot pace below one message per second per session, so
    the rate is set by the number of sessions: from one upwards until the
    rate reaches half the peak; the run closest to half is the answer.
    """
    runs = []
    with running_bridge(
        children, workdir, f"half-load-{mode}", receiver.url, mode
    ) as bridge:
        warm_up(children, bridge, receiver, message, HALF_LOAD_MESSAGES, 1)
        for sessions in HALF_LOAD_SESSIONS:
            run = drive(
                children, bridge, receiver, message, HALF_LOAD_MESSAGES, sessions, mode
            )
            runs.append(run)
            if (run["rate"] or 0) >= 0.5 * peak:
                break
    chosen = min(runs, key=lambda run: abs((run["rate"] or 0) - 0.5 * peak))
    return {"mode": mode, "peak": peak, "chosen": chosen, "tried": runs}


@contextmanager
def idle_connections(port: int, count: int) -> Iterator[int]:
    """C{count} SMTP connections that read the greeting and then say nothing."""
    _raise_file_limit(count + 256)
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sockets.append(sock)
            greeting = _read_line(sock)
            if not greeting.startswith(b"220"):
                raise BenchError(f"idle connection {len(sockets)} got {greeting!r}")
        yield len(sockets)
    finally:
        for sock in sockets:
            sock.close()


def _read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(512)
        if not chunk:
            break
        line += chunk
    return line


def _raise_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def measure_footprint(
    children: Children, workdir: Path, message: Path, idle: int, spooled: int
) -> dict[str, Any]:
    """
    Memory with C{idle} idle connections, then also C{spooled} messages
    waiting in the spool: the webhook is a port that refuses connections
    (bound, never listening), so the breaker opens and stays open.
    """
    _raise_file_limit(idle + 256)  # the bridge inherits the limit
    with socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{refusing.getsockname()[1]}/hook"
        extra = ("--circuit-breaker-reset", "3600")
        with running_bridge(children, workdir, "footprint", url, "queue", extra) as (
            bridge
        ):
            result: dict[str, Any] = {"baseline_rss_mb": bridge.memory_mb("VmRSS")}
            with idle_connections(bridge.smtp_port, idle) as opened:
                bridge.health()  # the reactor has handled every connection by now
                result["idle_connections"] = opened
                result["idle_rss_mb"] = bridge.memory_mb("VmRSS")
                source = send(children, message, bridge.smtp_port, spooled, 20)
                poll_until(
                    lambda: bridge.spool_depth() >= source.accepted,
                    QUIET_TIMEOUT,
                    "the spool to fill",
                )
                result["spooled"] = bridge.spool_depth()
                result["smtp_source_failed"] = spooled - source.accepted
                result["idle_and_spooled_rss_mb"] = bridge.memory_mb("VmRSS")
                result["peak_rss_mb"] = bridge.memory_mb("VmHWM")
    return {
        key: round(value, 1) if isinstance(value, float) else value
        for key, value in result.items()
    }


# --- reporting ------------------------------------------------------------------


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu": _first_value("/proc/cpuinfo", "model name"),
        "memory_gb": None,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    total = _first_value("/proc/meminfo", "MemTotal")
    if total:
        info["memory_gb"] = round(int(total.split()[0]) / 1024 / 1024, 1)
    with suppress(ImportError):
        import twisted

        info["twisted"] = twisted.__version__
    with suppress(OSError, subprocess.SubprocessError):
        info["commit"] = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    return info


def _first_value(path: str, key: str) -> str | None:
    with suppress(OSError), open(path) as lines:
        for line in lines:
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    return None


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue 12, with the measured value and whether it is met."""
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, limit: float, at_least: bool) -> None:
        met = None if value is None else value >= limit if at_least else value <= limit
        checks.append({"target": name, "value": value, "limit": limit, "met": met})

    for run in results["runs"]:
        corpus, mode = run["corpus"], run["mode"]
        if run["variant"] != mode:
            continue  # a --compare tree
        if corpus in RATIO_CORPORA:
            limit = QUEUE_RATIO if mode == "queue" else SYNC_RATIO
            check(f"{mode} {corpus}: ratio to bare", run["ratio"], limit, True)
        if corpus in STALL_CORPORA:
            stall = run["max_stall_ms"]
            check(f"{mode} {corpus}: max stall ms", stall, STALL_LIMIT_MS, False)
    for half in results.get("half_load", []):
        p99 = half["chosen"]["latency_from_mail_from"]["p99_ms"]
        check(f"{half['mode']} p99 ms at half of peak", p99, HALF_LOAD_P99_MS, False)
    footprint = results.get("footprint")
    if footprint:
        check(
            "peak RSS MB, idle + spooled", footprint["peak_rss_mb"], RSS_LIMIT_MB, False
        )
    return checks


COLUMNS = (
    ("corpus", 21),
    ("mode", 7),
    ("N", 5),
    ("C", 3),
    ("msg/s", 7),
    ("bare", 7),
    ("ratio", 5),
    ("cpu r", 5),
    ("p50ms", 7),
    ("p99ms", 7),
    ("stall", 6),
    ("RSS MB", 6),
    ("cpu", 4),
    ("lost", 4),
    ("fail", 4),
)
"""
The table's columns: messages per second for the bridge and the bare server
and their ratio; "cpu r", the ratio of their CPU time per message (reactor
thread only for the bridge); p50/p99 from MAIL FROM to the webhook; the
longest /health answer in ms; the bridge's peak RSS and its CPU use in cores.
"""


def _line(cells: Sequence[str]) -> str:
    return " ".join(
        cell.ljust(width) if position < 2 else cell.rjust(width)
        for position, (cell, (_, width)) in enumerate(zip(cells, COLUMNS, strict=True))
    )


def _row(run: dict[str, Any]) -> list[str]:
    latency = run["latency_from_mail_from"]
    return [
        run["corpus"],
        run["variant"],
        str(run["messages"]),
        str(run["sessions"]),
        _number(run["rate"]),
        _number(run["bare_rate"]),
        _number(run["ratio"], 2),
        _number(run["cpu_ratio"], 2),
        _number(latency["p50_ms"]),
        _number(latency["p99_ms"]),
        _number(run["max_stall_ms"], 0),
        _number(run["peak_rss_mb"]),
        _number(run["bridge_cpu"], 2),
        str(run["lost"]),
        str(run["failed"]),
    ]


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: dict[str, Any]) -> str:
    header = _line([name for name, _ in COLUMNS])
    lines = [header, "-" * len(header)]
    lines += [_line(_row(run)) for run in results["runs"]]
    for half in results.get("half_load", []):
        chosen = half["chosen"]
        latency = chosen["latency_from_mail_from"]
        lines.append(
            f"half load ({half['mode']}): {chosen['rate']} msg/s with"
            f" {chosen['sessions']} session(s) (peak {half['peak']}):"
            f" p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms,"
            f" lost {chosen['lost']}"
        )
    footprint = results.get("footprint")
    if footprint:
        lines.append(
            f"memory: {footprint['baseline_rss_mb']} MB at start,"
            f" {footprint['idle_rss_mb']} MB with {footprint['idle_connections']}"
            f" idle connections, {footprint['idle_and_spooled_rss_mb']} MB with"
            f" {footprint['spooled']} spooled as well;"
            f" peak {footprint['peak_rss_mb']} MB"
        )
    if "receiver_capacity" in results:
        lines.append(
            f"receiver alone: {results['receiver_capacity']:.0f} requests/s"
            " (its load clients on the same cores)"
        )
    for check in results["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[check["met"]]
        lines.append(
            f"target {check['target']}: {check['value']} (limit {check['limit']})"
            f" {verdict}"
        )
    lost = sum(run["lost"] for run in results["runs"])
    failed = sum(run["failed"] for run in results["runs"])
    lines.append(f"messages lost: {lost}; smtp-source failures: {failed}")
    return "\n".join(lines)


# --- the command line -----------------------------------------------------------


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark MailLaser against a bare twisted.mail server."
    )
    parser.add_argument("--messages", "-N", type=int, help="messages per run")
    parser.add_argument("--sessions", "-C", type=int, help="parallel SMTP sessions")
    parser.add_argument(
        "--corpus", nargs="+", choices=CORPORA, help="corpus files (default: all)"
    )
    parser.add_argument(
        "--mode",
        choices=("queue", "sync", "both"),
        help="delivery mode (default: both; queue with --quick)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="20 messages, 2 sessions, small only"
    )
    parser.add_argument(
        "--no-extras",
        action="store_true",
        help="skip the half-load latency, memory and receiver checks",
    )
    parser.add_argument(
        "--repeat", type=int, help=f"rounds per corpus file (default {REPEAT}, 1 quick)"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        metavar="SECONDS",
        help=f"before each round, wait up to this long for an idle machine"
        f" (default {QUIET_WAIT:.0f}; 0 with --quick)",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="TREE",
        help="also measure the bridge of another source tree, in the same rounds",
    )
    parser.add_argument("--idle", type=int, default=IDLE_CONNECTIONS)
    parser.add_argument("--spooled", type=int, default=SPOOLED_MESSAGES)
    parser.add_argument(
        "--output", type=Path, help="JSON results (default: bench/results/<time>.json)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs, spools)"
    )
    parser.add_argument(
        "--spool-url",
        metavar="URL",
        help="measure instead queue mode on this shared PostgreSQL spool (an"
        " empty database or schema), against one SQLite bridge",
    )
    parser.add_argument(
        "--bridges",
        type=int,
        default=3,
        metavar="N",
        help="with --spool-url: measure 1 to N bridges on it (default 3)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record each measured bridge run with py-spy into DIR (collapsed stacks)",
    )
    return parser.parse_args(argv)


def run(arguments: argparse.Namespace, workdir: Path, out: IO[str]) -> dict[str, Any]:
    quick = arguments.quick
    corpora = arguments.corpus or (["small-plain"] if quick else list(CORPORA))
    mode = arguments.mode or ("queue" if quick else "both")
    modes = ["queue", "sync"] if mode == "both" else [mode]
    variants = [Variant(each) for each in modes]
    if arguments.compare:
        variants += [Variant(each, arguments.compare.resolve(), "B") for each in modes]
    if arguments.repeat is None:
        arguments.repeat = 1 if quick else REPEAT
    if arguments.quiet_wait is None:
        arguments.quiet_wait = 0.0 if quick else QUIET_WAIT
    extras = not (quick or arguments.no_extras)
    results: dict[str, Any] = {"machine": machine(), "runs": []}
    print(f"machine: {results['machine']}", file=out, flush=True)
    children = Children()
    if arguments.spool_url:
        return run_shared(arguments, workdir, out, children, results)
    try:
        receiver = Receiver.start(children)
        bare = BareServer.start(children)
        if extras:
            results["receiver_capacity"] = round(receiver_capacity(receiver))
        for corpus in corpora:
            messages, sessions = QUICK_LOAD if quick else LOADS[corpus]
            load = (arguments.messages or messages, arguments.sessions or sessions)
            measured = measure_corpus(
                children, workdir, (receiver, bare), corpus, load, variants, arguments
            )
            for summary in measured:
                print(
                    f"{corpus} {summary['variant']}: {summary['rate']} msg/s"
                    f" (bare {summary['bare_rate']}), ratio {summary['ratio']},"
                    f" lost {summary['lost']}",
                    file=out,
                    flush=True,
                )
            results["runs"] += measured
        if extras:
            small = prepared_message("small-plain", workdir)
            results["half_load"] = [
                measure_half_load(
                    children, workdir, receiver, small, run["mode"], run["rate"]
                )
                for run in results["runs"]
                if run["corpus"] == "small-plain" and run["variant"] == run["mode"]
            ]
            results["footprint"] = measure_footprint(
                children, workdir, small, arguments.idle, arguments.spooled
            )
    finally:
        children.stop_all()
    results["targets"] = targets(results)
    return results


def run_shared(
    arguments: argparse.Namespace,
    workdir: Path,
    out: IO[str],
    children: Children,
    results: dict[str, Any],
) -> dict[str, Any]:
    """C{--spool-url}: throughput of 1..N bridges on one PostgreSQL spool."""
    messages, sessions = QUICK_LOAD if arguments.quick else LOADS["small-plain"]
    load = (arguments.messages or messages, arguments.sessions or sessions)
    try:
        receiver = Receiver.start(children)
        results["shared"] = measure_shared(children, workdir, receiver, load, arguments)
    finally:
        children.stop_all()
    for each in results["shared"]:
        print(
            f"{each['spool']} x{each['bridges']}: {each['rate']} msg/s"
            f" (rounds {each['rates']}), lost {each['lost']},"
            f" duplicates {each['duplicates']}, busy cores"
            f" {each['machine']['busy_cores']} (others"
            f" {each['machine']['other_cores']})",
            file=out,
            flush=True,
        )
    results["targets"] = []
    results["shared_targets"] = shared_targets(results["shared"])
    for line in results["shared_targets"]:
        print(line, file=out, flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    # Even when started with SIGINT ignored (in the background), Ctrl-C and
    # SIGTERM unwind through the clean-up code.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workdir = Path(tempfile.mkdtemp(prefix="maillaser-bench-"))
    try:
        results = run(arguments, workdir, sys.stdout)
    except BenchError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    finally:
        if not arguments.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if "shared" not in results:
        print(table(results))
    output = arguments.output or RESULTS_DIR / time.strftime(
        "%Y%m%d-%H%M%S.json", time.gmtime()
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {output}")
    runs = results.get("shared", results["runs"])
    troubles = sum(run["lost"] + run["failed"] for run in runs)
    return 1 if troubles else 0


if __name__ == "__main__":
    sys.exit(main())
