"""Fixture plugins shared by tests/ and e2e/ (each plugin module owns one kind of server)."""

pytest_plugins = ["tests.fixtures.postgres", "tests.fixtures.nats", "e2e.fixtures"]
