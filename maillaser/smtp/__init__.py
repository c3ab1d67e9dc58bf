"""
The SMTP front: C{twisted.mail}'s ESMTP, with MailLaser's IMessageDelivery.

(Filled in by the smtp work: protocol, factory, delivery, message.)
"""
