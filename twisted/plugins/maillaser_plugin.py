"""
The ``twistd maillaser`` / ``twist maillaser`` plugin.

Deliberately import-light: Twisted imports every plugin module whenever it
rebuilds its plugin cache, so nothing here may touch the reactor or read
configuration.  ``ServiceMaker`` imports ``maillaser.tap`` only when the
plugin is actually used.
"""

from twisted.application.service import ServiceMaker

maillaser = ServiceMaker(
    "MailLaser",
    "maillaser.tap",
    "SMTP-to-webhook bridge: accepts mail and POSTs it as signed JSON.",
    "maillaser",
)
