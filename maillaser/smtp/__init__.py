"""
The SMTP front: C{twisted.mail}'s ESMTP, with MailLaser's IMessageDelivery.
"""

from maillaser.smtp._tls import UnusableCertificate, load_pem_pair, tls_context

__all__ = ["UnusableCertificate", "load_pem_pair", "tls_context"]
