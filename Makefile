# kubeloop — `make demo` runs the loop on a local control plane; `make test` runs every test.
# Everything installs itself: a Python environment cached by the hash of pyproject.toml, and a
# control plane built from Go modules cached by Kubernetes version (~/.cache/kubeloop).

SHELL := /bin/bash
.DEFAULT_GOAL := help

CACHE        ?= $(or $(KUBELOOP_CACHE),$(HOME)/.cache/kubeloop)
K8S_VERSION  ?= v1.35.4
# keyed by the dependencies only ([project] up to the scripts), so tool settings don't rebuild it
PY_HASH      := $(shell sed -n '/^\[project\]/,/^\[project.scripts\]/p' pyproject.toml | sha256sum | cut -c1-12)
VENV_DIR     := $(CACHE)/venv-$(PY_HASH)
VENV_STAMP   := .make/venv-$(PY_HASH)
PY           := .venv/bin/python
K8S_BIN      := $(CACHE)/k8s-$(K8S_VERSION)/bin
CLUSTER_DIR  ?= $(CACHE)/cluster
export KUBELOOP_CACHE := $(CACHE)
export K8S_VERSION
export KUBELOOP_CLUSTER_DIR := $(CLUSTER_DIR)
export PATH := $(K8S_BIN):$(PATH)

.PHONY: help
help: ## list the targets
	@awk 'BEGIN{FS=":.*## "} /^[a-zA-Z_-]+:.*## /{printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

## --- setup -------------------------------------------------------------------------------

$(VENV_STAMP): pyproject.toml
	@mkdir -p .make
	@if [ ! -f $(VENV_DIR)/.complete ]; then \
	  echo "[venv] creating $(VENV_DIR)"; rm -rf $(VENV_DIR); \
	  python3.11 -m venv $(VENV_DIR) && \
	  $(VENV_DIR)/bin/pip install -q --upgrade pip && \
	  $(VENV_DIR)/bin/pip install -q -e '.[dev,serving,training]' && touch $(VENV_DIR)/.complete; \
	fi
	@touch $@

# The environment is shared by every checkout on the machine (it is keyed by the dependencies,
# not the path), so point its editable install at this checkout whenever another one took it.
.PHONY: venv
venv: $(VENV_STAMP) ## create the cached Python environment (operator + dev tools)
	@ln -sfn $(VENV_DIR) .venv
	@$(PY) -c 'import kubeloop, sys; sys.exit(not kubeloop.__file__.startswith("$(CURDIR)/"))' \
	  2>/dev/null || $(VENV_DIR)/bin/pip install -q --no-deps -e . >/dev/null

.PHONY: system-deps
system-deps: ## Debian packages the tests and demo need (openssl, prometheus, chromium)
	@command -v openssl >/dev/null && command -v prometheus >/dev/null && \
	  command -v chromium >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	     --no-install-recommends openssl prometheus chromium >/dev/null)

.PHONY: cluster-build
cluster-build: system-deps ## build kube-apiserver, etcd, controller-manager, scheduler, kubectl, helm, kwok (cached)
	@hack/cluster/build.sh >/dev/null

.PHONY: cluster-up
cluster-up: cluster-build ## start the local control plane on 127.0.0.1 (idempotent)
	@python3 hack/cluster/cluster.py up

.PHONY: cluster-down
cluster-down: ## stop the local control plane (keeps its data)
	@python3 hack/cluster/cluster.py down

.PHONY: cluster-purge
cluster-purge: ## stop the local control plane and delete its data
	@python3 hack/cluster/cluster.py purge

## --- code --------------------------------------------------------------------------------

.PHONY: crds
crds: venv ## regenerate crds/ and the chart's CRD templates from the models
	@$(PY) -m kubeloop crds -o crds
	@$(PY) -m hack.chart_crds

.PHONY: dashboard
dashboard: venv ## regenerate the chart's Grafana dashboard (charts/kubeloop/files/dashboard.json)
	@$(PY) -m hack.dashboard

.PHONY: crds-check
crds-check: venv ## fail if crds/ or the chart differ from the models
	@$(PY) -m hack.crds_check

.PHONY: lint
lint: venv ## ruff and mypy --strict
	@.venv/bin/ruff check operator pipelines tests bench hack examples
	@.venv/bin/ruff format --check operator pipelines tests bench hack examples
	@.venv/bin/mypy operator/kubeloop pipelines/kubeloop_pipelines tests bench hack

.PHONY: fmt
fmt: venv ## format the code
	@.venv/bin/ruff format operator pipelines tests bench hack examples
	@.venv/bin/ruff check --fix operator pipelines tests bench hack examples

## --- the two commands ----------------------------------------------------------------------

.PHONY: test
test: venv system-deps cluster-build crds-check lint ## every test: unit, integration (real API server), chart, lint
	@.venv/bin/pytest -q -ra tests

.PHONY: test-unit
test-unit: venv ## unit tests only (no server)
	@.venv/bin/pytest -q -m "not integration" tests

.PHONY: demo
demo: venv cluster-up ## the whole loop on the local control plane
	@$(PY) -m hack.demo

.PHONY: bench
bench: venv system-deps cluster-build ## benchmarks (bench/); each ends with a RESULT line
	@$(PY) bench/reconcile_throughput.py --repeats 3
	@$(PY) bench/canary_timing.py --repeats 3
	@$(PY) bench/serving_overhead.py
	@$(PY) bench/compile_time.py
	@$(PY) bench/train_throughput.py
	@$(PY) bench/tune_efficiency.py
	@$(PY) bench/optimize_int8.py
	@$(PY) bench/drift_compute.py
	@$(PY) bench/closed_loop.py

.PHONY: chaos
chaos: venv system-deps cluster-build ## chaos suite: ~1,000 objects while operator, API server, etcd, Prometheus fail (RESULT line)
	@$(PY) bench/chaos.py

.PHONY: clean
clean: ## remove local build state (keeps the caches)
	rm -rf .make .venv .pytest_cache .mypy_cache .ruff_cache
