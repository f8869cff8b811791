# The operator's generated manifests (operator/commandnet_operator/crd.py). The Agent CRD is
# generated from the Pydantic models in operator/commandnet_operator/resource.py; tests/test_crd.py
# fails when crds/agents.commandnet.io.yaml is stale.

.PHONY: crds crds-check bench-operator

# The chart renders the CRD from its own copy (a chart cannot read files outside itself);
# `make crds` writes both, and tests/test_chart.py checks they are equal.
CHART_CRD := charts/commandnet/files/crds/agents.commandnet.io.yaml

# Regenerate the Agent CRD (written atomically: a failed run leaves the old file).
crds: $(STAMP)
	$(PY) -m commandnet_operator.crd --output crds/agents.commandnet.io.yaml
	$(PY) -m commandnet_operator.crd --output $(CHART_CRD)

# Exit 1, saying to run `make crds`, when the committed CRD (or the chart's copy) is stale.
crds-check: $(STAMP)
	$(PY) -m commandnet_operator.crd --check crds/agents.commandnet.io.yaml
	$(PY) -m commandnet_operator.crd --check $(CHART_CRD)

# The operator's benchmark (bench/operator.py): apply -> Succeeded, status lag, API-server writes
# per Agent, on a control plane, PostgreSQL, NATS and workers of its own (all stopped at the
# end). Prints a table; writes the figures under "operator" in bench/results.json.
bench-operator: $(STAMP) tools
	$(PY) -m bench.operator
