"""
The SMTP front: C{twisted.mail}'s ESMTP, with MailLaser's IMessageDelivery.

A session (L{MailLaserESMTP}, made by L{MailLaserSMTPFactory}) asks the
factory's L{MailLaserDeliveryFactory} for one L{MailLaserDelivery} per
transaction; it validates the sender and recipients, and makes the
transaction's L{AcceptedMessage}, which hands the finished message to an
L{maillaser.interfaces.IMessageSink} once, whatever the number of
recipients.  Each half works with plain C{twisted.mail} on the other side.
"""

from maillaser.smtp._delivery import MailLaserDelivery, MailLaserDeliveryFactory
from maillaser.smtp._factory import MailLaserSMTPFactory
from maillaser.smtp._message import AcceptedMessage
from maillaser.smtp._protocol import MailLaserESMTP
from maillaser.smtp._tls import (
    UnusableCertificate,
    load_pem_pair,
    self_signed,
    session_tls,
    tls_context,
)

__all__ = [
    "AcceptedMessage",
    "MailLaserDelivery",
    "MailLaserDeliveryFactory",
    "MailLaserESMTP",
    "MailLaserSMTPFactory",
    "UnusableCertificate",
    "load_pem_pair",
    "self_signed",
    "session_tls",
    "tls_context",
]
