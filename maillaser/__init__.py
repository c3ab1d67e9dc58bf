"""
MailLaser: an SMTP-to-webhook bridge.

A message travels through one module per stage, and reading them in this
order follows it from the socket to the webhook:

``smtp`` (session) -> ``message`` (the accepted value) -> ``spool``
(durable queue) -> ``dispatch`` (scheduling, circuit breaker) ->
``delivery`` (attempts and retries) -> ``payload`` (parsing, JSON) and
``signing`` -> ``webhook`` (the HTTP request).  ``child`` runs the spool's
SQLite and the payload building in child processes; ``config``, ``tls``,
``wire``, ``web`` and ``service`` assemble and observe those parts; ``tap``
and ``twisted/plugins`` expose them to ``twistd``.
"""

__version__ = "0.1.0"
