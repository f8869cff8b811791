"""Persistence and bus implementations. Each module imports its driver lazily, on use.

- ``commandnet.adapters.memory``: in-memory store and bus, for tests (yours too).
- ``commandnet.adapters.sqlite``: SQLite store, the embedded default (standard library only).
- ``commandnet.adapters.postgres``: PostgreSQL store (extra ``postgres``: asyncpg).
- ``commandnet.adapters.nats``: NATS JetStream bus (extra ``nats``: nats-py).
"""
