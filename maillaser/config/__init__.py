"""
Configuration: one validated, immutable L{Config} built once at start-up.

Every setting comes from, in order of precedence, a command-line option, the
environment, a ``.env`` file in the working directory (which never overrides
the environment), or its default.  Everything is checked before any socket
is opened, so a typo stops start-up with one line naming the setting.

The settings table is L{SETTINGS}; L{load_config} reads the sources and
checks every value; L{describe} is what may be logged of the result.
"""

from maillaser.config._config import (
    DEFAULT_RETRY_SCHEDULE,
    AttachmentMode,
    BareNewline,
    Config,
    ConfigError,
    DeliveryMode,
    LogLevel,
)
from maillaser.config._load import describe, link_base, load_config
from maillaser.config._parsers import mask_url
from maillaser.config._settings import (
    HEALTH_ENDPOINT_HELP,
    SETTINGS,
    SMTP_ENDPOINT_HELP,
    Setting,
)

__all__ = [
    "DEFAULT_RETRY_SCHEDULE",
    "HEALTH_ENDPOINT_HELP",
    "SETTINGS",
    "SMTP_ENDPOINT_HELP",
    "AttachmentMode",
    "BareNewline",
    "Config",
    "ConfigError",
    "DeliveryMode",
    "LogLevel",
    "Setting",
    "describe",
    "link_base",
    "load_config",
    "mask_url",
]
