# The Helm chart (charts/commandnet; docs/helm-chart.md). Tools from `make tools`.

.PHONY: chart-lint chart-unittest chart-test

CHART      := charts/commandnet
HELM_ENV   := HELM_PLUGINS=$(CURDIR)/.tools/helm-plugins PATH=$(CURDIR)/.tools/bin:$$PATH

# helm lint --strict with the defaults (plus the Secret they require) and the full values.
chart-lint: tools
	$(HELM_ENV) helm lint --strict $(CHART) --set connection.existingSecret=commandnet-connection
	$(HELM_ENV) helm lint --strict $(CHART) -f $(CHART)/ci/full-values.yaml

# The helm-unittest suites in charts/commandnet/tests/.
chart-unittest: tools
	$(HELM_ENV) helm unittest $(CHART)

# Everything: lint, unittest, schema, drift checks (CRD, RBAC, webhooks) and the server-side
# dry-run under Pod Security "restricted" on the local control plane (tests/test_chart.py).
chart-test: $(STAMP) tools
	$(PY) -m pytest -q tests/test_chart.py
