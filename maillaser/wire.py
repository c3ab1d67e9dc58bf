"""
Writing a short message to a TCP connection at once.

Twisted's C{transport.write} only buffers: it registers the socket for
writability and sends on the reactor's next turn, then unregisters it.
For a reply of a few bytes that is two C{epoll_ctl} calls and a trip
through the reactor loop, several times per mail (each SMTP reply, each
webhook request), which profiling showed to be about a tenth of the
bridge's reactor time.  L{write_now} sends directly when nothing is
queued ahead, and leaves everything else to Twisted.
"""

from __future__ import annotations

from twisted.internet import tcp
from twisted.internet.interfaces import ITransport


def write_now(transport: ITransport, data: bytes) -> None:
    """
    Send C{data} now if C{transport} is plain TCP with nothing buffered;
    whatever the socket does not take, and any other transport, goes
    through C{transport.write} as usual, in order.
    """
    if _idle_tcp(transport):
        assert isinstance(transport, tcp.Connection)
        try:
            sent = transport.socket.send(data)
        except OSError:
            # Full (EAGAIN) or broken: the transport finds out which when
            # it writes, and reports a broken connection the usual way.
            sent = 0
        data = data[sent:]
    if data:
        transport.write(data)


def _idle_tcp(transport: ITransport) -> bool:
    """
    Plain TCP, open for writing, with no bytes waiting in Twisted's own
    buffers (private to C{FileDescriptor}, hence the careful look: if they
    are ever renamed this says no, and writes take Twisted's way).
    """
    return (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and bool(transport.connected)
        and not transport.disconnecting
        and not getattr(transport, "_writeDisconnecting", True)
        and getattr(transport, "_tempDataLen", None) == 0
        and transport.offset == len(transport.dataBuffer)
    )


__all__ = ["write_now"]
