"""
C{/attachments/<message id>/<index>}: the bytes a payload's signed link
names, served by the SMTP front on the health endpoint.

The front checks the link itself (signature, then expiry) and refuses
with C{403} without asking anyone; only a link it made, still valid, costs
a request to the delivery worker, which reads the message from the spool
and extracts the part.  What is served is mail from strangers, so it is
never rendered by a browser on this origin: always a download
(C{Content-Disposition: attachment}), never sniffed, sandboxed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from maillaser.logs import observer
from maillaser.webhook import LinkRefused, LinkSigner

MAX_FETCHES = 4
"""
Parts being fetched or sent at once: each holds its bytes until the
client has read them, so past this many a request gets C{503} and
C{Retry-After}.
"""

SEND_DEADLINE = 600.0
"""
Seconds a client has to read a part (25 MB at 350 kbit/s): past it the
connection is aborted, and its place freed for the next.
"""

Fetch = Callable[[str, str], Deferred[dict[str, Any]]]
"""C{fetch(message_id, index)}: the worker's L{FetchPart} answer."""

_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._ -]")


class AttachmentResource(Resource):
    """The parts that signed links name; C{404} for all when links are off."""

    isLeaf = True
    _log = Logger(observer=observer)

    def __init__(
        self,
        signer: LinkSigner | None,
        fetch: Fetch,
        *,
        clock: IReactorTime,
        not_found: tuple[type[BaseException], ...],
        unavailable: tuple[type[BaseException], ...],
        limit: int = MAX_FETCHES,
    ) -> None:
        """
        @param not_found: the errors of C{fetch} that mean no such part
            (C{404}); C{unavailable}, those that mean the worker cannot
            answer now (C{503}).
        """
        super().__init__()
        self._signer = signer
        self._fetch = fetch
        self._clock = clock
        self._not_found = not_found
        self._unavailable = unavailable
        self._limit = limit
        self.fetching = 0

    def render_GET(self, request: Request) -> bytes | int:
        request.setHeader(b"cache-control", b"private, no-store")
        path, query = request.postpath or [], request.args or {}
        if self._signer is None or len(path) != 2:
            return _plain(request, 404, b"Not Found")
        try:
            message_id, index = (part.decode("ascii") for part in path)
            expires, signature = (
                query.get(name, [b""])[0].decode("ascii")
                for name in (b"expires", b"signature")
            )
            self._signer.check(
                message_id, index, expires, signature, self._clock.seconds()
            )
        except (LinkRefused, UnicodeDecodeError):
            return _plain(request, 403, b"Forbidden")
        if self.fetching >= self._limit:
            request.setHeader(b"retry-after", b"1")
            return _plain(request, 503, b"Busy, try again")
        self.fetching += 1
        finished = request.notifyFinish()
        finished.addErrback(lambda failure: None)  # the client went away
        fetched = self._fetch(message_id, index)
        fetched.addCallbacks(
            self._send,
            self._failed,
            callbackArgs=(request, finished),
            errbackArgs=(request, finished),
        )
        fetched.addBoth(self._done)
        return NOT_DONE_YET

    def _done(self, result: object) -> None:
        self.fetching -= 1
        if isinstance(result, Failure):
            self._log.failure("cannot send an attachment", result)

    def _send(
        self, answer: dict[str, Any], request: Request, finished: Deferred[None]
    ) -> Deferred[None] | None:
        """
        Sent as the client reads it (a producer, not one write into the
        transport's buffer), within L{SEND_DEADLINE}; its place is held
        until then.
        """
        if finished.called:
            return None
        data: bytes = answer["data"]
        request.setHeader(b"content-type", answer["content_type"].encode("ascii"))
        request.setHeader(b"content-disposition", disposition(answer["filename"]))
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", b"sandbox")
        request.setHeader(b"content-length", b"%d" % len(data))
        timer = self._clock.callLater(SEND_DEADLINE, _abort, request)
        sender = _PartSender(data, request)
        # Gone before the end: not every transport stops its producer.
        finished.addCallback(lambda ignored: sender.stopProducing())
        request.registerProducer(sender, False)
        return sender.done.addBoth(
            lambda ignored: timer.cancel() if timer.active() else None
        )

    def _failed(
        self, failure: Failure, request: Request, finished: Deferred[None]
    ) -> None:
        if failure.check(*self._not_found):
            code, text = 404, b"Not Found"
        elif failure.check(*self._unavailable):
            code, text = 503, b"Delivery worker unavailable, try again"
            request.setHeader(b"retry-after", b"5")
        else:
            self._log.failure("cannot serve an attachment link", failure)
            code, text = 500, b"Internal Server Error"
        if not finished.called:
            request.write(_plain(request, code, text))
            request.finish()


@implementer(IPullProducer)
class _PartSender:
    """
    A part's bytes, a chunk each time the client has read the last.

    Not C{FileSender}: once stopped, it still writes when resumed, and
    unregisters itself from a request whose connection is gone, which
    raises.  This one does nothing once stopped.
    """

    CHUNK = 64 * 1024

    def __init__(self, data: bytes, request: Request) -> None:
        self._data = memoryview(data)
        self._request = request
        self._offset = 0
        self.done: Deferred[None] = Deferred()

    def resumeProducing(self) -> None:
        if self.done.called:
            return
        chunk = self._data[self._offset : self._offset + self.CHUNK]
        if chunk:
            self._offset += len(chunk)
            self._request.write(bytes(chunk))
            return
        self._request.unregisterProducer()
        self.done.callback(None)
        self._request.finish()

    def stopProducing(self) -> None:
        if not self.done.called:
            self.done.callback(None)


def _abort(request: Request) -> None:
    transport = getattr(request, "transport", None)
    if transport is not None:
        transport.abortConnection()


def disposition(filename: str) -> bytes:
    """
    C{attachment}, with the name as RFC 6266 has it: an ASCII stand-in for
    old clients, and the exact name percent-encoded as UTF-8 (RFC 5987).
    Nothing of the name can reach the header unquoted.
    """
    if not filename:
        return b"attachment"
    fallback = _UNSAFE_FILENAME.sub("_", filename)
    exact = quote(filename, safe="")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{exact}".encode(
        "ascii"
    )


def _plain(request: Request, code: int, text: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain")
    return text


__all__ = ["MAX_FETCHES", "SEND_DEADLINE", "AttachmentResource", "Fetch", "disposition"]
