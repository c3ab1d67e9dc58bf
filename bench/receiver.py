"""
A webhook receiver that is never the bottleneck.

A minimal HTTP/1.1 server on asyncio's protocol layer (no streams, no
framework): it reads each request's head and C{Content-Length} body, notes
the C{webhook-id} header and the arrival time (C{time.time()}, the clock the
bridge's message ids are taken from), and answers with a fixed status on
the same keep-alive connection.  It parses nothing it does not need, so a
request costs it a few tens of microseconds, a small fraction of what the
bridge spends on producing one.

Control requests from the benchmark share the port:

- C{GET /_stats}: C{{"received": n, "requests": n}} as JSON;
- C{GET /_records}: C{[[webhook_id, arrival_time], ...]} as JSON;
- C{POST /_reset}: forget everything recorded so far.

Run as C{python bench/receiver.py [--status 204] [--port 0]}; it prints
C{PORT <n>} once it listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from http import HTTPStatus

MAX_HEAD = 64 * 1024


class Recorder:
    """What every connection shares: the fixed reply and what arrived."""

    def __init__(self, status: int) -> None:
        reason = HTTPStatus(status).phrase
        self.reply = f"HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\n\r\n".encode()
        self.records: list[tuple[str, float]] = []
        self.requests = 0

    def control(self, method: bytes, path: bytes) -> bytes:
        if method == b"GET" and path == b"/_stats":
            body: object = {"received": len(self.records), "requests": self.requests}
        elif method == b"GET" and path == b"/_records":
            body = self.records
        elif method == b"POST" and path == b"/_reset":
            self.records = []
            self.requests = 0
            body = {}
        else:
            return _response(404, b"{}")
        return _response(200, json.dumps(body).encode())


def _response(status: int, body: bytes) -> bytes:
    reason = HTTPStatus(status).phrase
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


class Connection(asyncio.Protocol):
    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder
        self._buffer = bytearray()
        self._head: tuple[bytes, bytes, dict[bytes, bytes]] | None = None
        self._length = 0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        replies = []
        while (reply := self._next_request()) is not None:
            replies.append(reply)
        if replies and self._transport is not None:
            self._transport.write(b"".join(replies))

    def _next_request(self) -> bytes | None:
        if self._head is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD:
                    self._fail()
                return None
            self._head = _parse_head(bytes(self._buffer[:end]))
            del self._buffer[: end + 4]
            headers = self._head[2]
            if b"transfer-encoding" in headers:
                self._fail()  # the bridge always sends a length
                return None
            self._length = int(headers.get(b"content-length", b"0"))
        if len(self._buffer) < self._length:
            return None
        del self._buffer[: self._length]
        method, path, headers = self._head
        self._head = None
        if path.startswith(b"/_"):
            return self._recorder.control(method, path)
        self._recorder.requests += 1
        webhook_id = headers.get(b"webhook-id")
        if webhook_id is not None:
            self._recorder.records.append((webhook_id.decode(), time.time()))
        return self._recorder.reply

    def _fail(self) -> None:
        self._buffer.clear()
        if self._transport is not None:
            self._transport.write(_response(400, b"{}"))
            self._transport.close()


def _parse_head(head: bytes) -> tuple[bytes, bytes, dict[bytes, bytes]]:
    request_line, *lines = head.split(b"\r\n")
    method, path, _ = request_line.split(b" ", 2)
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return method, path, headers


async def serve(status: int, port: int) -> None:
    loop = asyncio.get_running_loop()
    recorder = Recorder(status)
    server = await loop.create_server(
        lambda: Connection(recorder), "127.0.0.1", port, backlog=1024
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--status", type=int, default=204)
    parser.add_argument("--port", type=int, default=0)
    arguments = parser.parse_args()
    asyncio.run(serve(arguments.status, arguments.port))


if __name__ == "__main__":
    main()
