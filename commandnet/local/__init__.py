"""Local servers started on demand for the demo, benchmarks and tests (PostgreSQL, nats-server)."""
