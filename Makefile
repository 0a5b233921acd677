# aidc — `make run` (everything, end to end) and `make test` (the whole suite) are the quick start.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PY       := .venv/bin/python
CLUSTER  := PYTHONPATH=operator $(PY) hack/cluster/localcluster.py
STATE    ?= $(CURDIR)/.state/cluster
export PYTHONPATH := operator:trainer:server:hack/cluster
export PYTHONUNBUFFERED := 1

.PHONY: help venv cluster-build cluster-up cluster-down cluster-status gateway-api crds lint format test test-unit \
        run bench helm-lint images plots clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

venv: ## create the cached virtualenv (.venv -> ~/.cache/aidc/venv-<hash>)
	@bash hack/venv.sh

cluster-build: venv ## build etcd, kube-*, kubectl, kwok, helm, kueue, metrics-server, prometheus(-adapter) from pinned Go modules (cached; AIDC_KUEUE=0: no kueue)
	@$(CLUSTER) build

cluster-up: cluster-build ## start the local control plane with kwok GPU nodes (STATE=dir for a second one)
	@$(CLUSTER) up --state-dir $(STATE)

cluster-down: ## stop the local control plane started from STATE
	@if [ -x $(PY) ]; then $(CLUSTER) down --state-dir $(STATE); else echo "nothing to stop"; fi

gateway-api: venv ## install the Gateway API CRDs (hack/gateway-api/go.mod pin) into the cluster at STATE
	@$(PY) hack/cluster/gateway_api.py --kubeconfig $(STATE)/kubeconfig

cluster-status: ## show the local control plane's processes
	@$(CLUSTER) status --state-dir $(STATE)

crds: venv ## regenerate crds/ from the pydantic API models
	@$(PY) hack/gen_crds.py

lint: venv ## ruff + generated files up to date
	@$(PY) -m ruff check .
	@$(PY) -m ruff format --check .
	@$(PY) hack/gen_crds.py --check

format: venv ## ruff fix + format
	@$(PY) -m ruff check --fix .
	@$(PY) -m ruff format .

test: venv cluster-build lint ## the whole suite: unit, integration (real apiserver + kwok, real torchrun), e2e
	@$(PY) -m pytest tests

test-unit: venv ## fast tests, no cluster
	@$(PY) -m pytest tests/unit

run: cluster-up crds ## set up everything, start the cluster + operator, run the demo
	@bash hack/run-demo.sh $(STATE)

bench: venv cluster-build ## run the benchmarks (see docs/benchmarks.md)
	@for b in bench/*.py; do case $$b in */_*|*/plot.py|*/suite_under_load.py) continue;; esac; echo "== $$b"; $(PY) $$b; done
	@$(MAKE) --no-print-directory plots

test-under-load: venv cluster-build lint ## the whole suite quiet, then with a busy loop on every core (bench/suite_under_load.py)
	@$(PY) bench/suite_under_load.py

helm-lint: cluster-build ## helm lint the chart, then its golden-file, schema and RBAC tests
	@"$$($(CLUSTER) build 2>/dev/null)/helm" lint charts/aidc-operator --strict
	@$(PY) -m pytest tests/unit/chart -q

images: ## build the operator, trainer and server images (needs docker or buildah)
	@engine=$$(command -v docker || command -v buildah || true); \
	if [ -z "$$engine" ] || ! $$engine info >/dev/null 2>&1; then \
	  echo "images: no working docker/buildah engine here; see docker/README.md"; exit 1; fi; \
	for c in operator trainer server; do \
	  echo "== aidc-$$c"; $$engine build -f docker/$$c.Dockerfile -t ghcr.io/aidc-dev/aidc-$$c:0.1.0 . || exit 1; done

plots: ## render docs/img/*.png from bench/results/*.json (matplotlib in its own cached venv)
	@v=$${AIDC_CACHE:-$$HOME/.cache/aidc}/plots-venv-matplotlib-3.11.2; \
	if [ ! -x $$v/bin/python ]; then python3 -m venv $$v && $$v/bin/pip install -q matplotlib==3.11.2; fi; \
	$$v/bin/python bench/plot.py

clean: cluster-down ## stop the cluster and remove local state (the ~/.cache/aidc cache stays)
	rm -rf .state
