"""
Run MailLaser from a .tac file: ``twistd -ny maillaser.tac``.

The settings come from MAIL_LASER_* environment variables and ./.env, as
for ``twistd maillaser``; build a maillaser.config.Config by hand instead
to configure it in code.
"""

import os

from twisted.application.service import Application

from maillaser.config import load_config
from maillaser.service import makeService

application = Application("maillaser")
makeService(load_config({}, os.environ)).setServiceParent(application)
