"""
The durable spool: accepted messages live in SQLite until the webhook has
them, and the dispatcher that takes them out when they are due.
"""
