# Benchmarks beyond `make bench` (figures in bench/results.json, one key per benchmark).

.PHONY: bench-scale

# 100,000 agents of a 3-step chain in flight on 2 `commandnet worker` processes, against a
# durable PostgreSQL and NATS (file storage) of its own (bench/scale.py): worker RSS over time,
# table and index sizes, every history exact, re-publishes by the repair loops. Writes the
# figures under "scale" in bench/results.json and bench/scale_rss.png. A few minutes on 2 cores.
bench-scale: $(STAMP)
	$(PY) -m bench.scale
