"""
The ceiling: a bare C{twisted.mail} ESMTP server that accepts every
recipient and throws the message away.

Any bridge built on Twisted's reactor pays at least this much per message
(connection set-up, the command dialogue, DATA handled one Python call per
line as C{twisted.mail.smtp.SMTP} does), so the benchmark reports the
bridge's throughput as a fraction of this server's, measured on the same
machine in the same run.

Run as C{python bench/bare_smtp.py [PORT]}; it prints C{PORT <n>} once it
listens on 127.0.0.1 (port 0, the default, picks a free one).
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.mail import smtp
from zope.interface import implementer


@implementer(smtp.IMessage)
class DiscardedMessage:
    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> Deferred[None]:
        return succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(smtp.IMessageDelivery)
class AcceptEverything:
    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> type[DiscardedMessage]:
        return DiscardedMessage


class DiscardFactory(smtp.SMTPFactory):
    protocol = smtp.ESMTP
    noisy = False

    def buildProtocol(self, addr: Any) -> smtp.ESMTP:
        protocol: smtp.ESMTP = super().buildProtocol(addr)
        protocol.delivery = AcceptEverything()
        return protocol


def main(argv: list[str]) -> None:
    from twisted.internet import reactor

    port = int(argv[1]) if len(argv) > 1 else 0
    listening = reactor.listenTCP(port, DiscardFactory(), interface="127.0.0.1")
    print(f"PORT {getattr(listening.getHost(), 'port', 0)}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
