"""Fixtures every test module may use."""

from tests.postgres import postgres_cluster, postgres_server, postgres_url

__all__ = ["postgres_cluster", "postgres_server", "postgres_url"]
