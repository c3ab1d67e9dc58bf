"""
The delivery worker: a child process of the SMTP front that owns the spool,
the dispatcher, payload building, the webhook poster and the breaker, and
the AMP protocol (L{maillaser.worker._commands}) between the two.
"""
