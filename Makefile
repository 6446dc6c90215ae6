# The one interface for developers and CI. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.8
STAMP := $(VENV)/.installed-$(shell sha1sum requirements.lock 2>/dev/null | cut -c1-12)
PROTO_STAMP := gen/.stamp
PROTOS := $(shell find protos -name '*.proto' 2>/dev/null)
export PYTHONPATH := $(CURDIR)/services:$(CURDIR)/libs:$(CURDIR)/gen
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
CHAOS_ARGS ?=
# npm packages of the repository, each with its package-lock.json and .npmrc.
NPM_PACKAGES := tools/buf clients/node-grpc clients/ts
NPM_STAMPS := $(addsuffix /node_modules/.installed,$(NPM_PACKAGES))
# The TypeScript client's build (types from protos/ by buf + protoc-gen-es, then tsc).
TS_BUILT := clients/ts/dist/.built
TS_INPUTS := $(shell find clients/ts/src -name '*.ts' -not -path '*/gen/*' 2>/dev/null) \
  clients/ts/tsconfig.json clients/ts/buf.gen.yaml clients/ts/package-lock.json $(PROTOS)

.PHONY: help deps system-deps proto lint fmt typecheck test test-fast run run-cluster stop status \
        bench-seq bench-logic bench bench-cluster bench-ab bench-idle bench-prune chaos chaos-seq chaos-cluster \
        k8s-check alerts-check proto-check node-deps ts-build images sdk seqsvc-client seqsvc-run \
        seqsvc-stop clean lock

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | sort | \
	  awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

system-deps: ## Install missing system packages (redis-server, postgresql, promtool, node and npm, chromium) with apt
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server >/dev/null; }
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || command -v pg_config >/dev/null || { \
	  echo "installing postgresql"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql >/dev/null; }
	@# promtool is in Debian's prometheus package; without recommends it brings no exporters.
	@command -v promtool >/dev/null || { \
	  echo "installing promtool (Debian's prometheus package)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@# Node for buf (proto-check) and the Node gRPC client's tests: Debian's own.
	@command -v node >/dev/null && command -v npm >/dev/null || { \
	  echo "installing nodejs and npm"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nodejs npm >/dev/null; }
	@# The web chat's browser tests: Debian's chromium, driven by Playwright for
	@# Python through its executable path (Playwright never downloads a browser here).
	@test -x /usr/bin/chromium || { \
	  echo "installing chromium (Debian's package)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

$(STAMP): requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@test -x $(UV) || $(PY) -m pip install -q uv==$(UV_VERSION)
	$(UV) pip sync -q --python $(PY) requirements.lock
	@# The project's import roots, like an editable install: .venv/bin/python finds
	@# the services, libs and generated code from anywhere.
	@printf '%s\n' $(CURDIR)/services $(CURDIR)/libs $(CURDIR)/gen > \
	  "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/im-backend.pth"
	@rm -f $(VENV)/.installed-*; touch $@

$(PROTO_STAMP): $(PROTOS) $(STAMP)
	@rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=gen --grpc_python_out=gen \
	  --mypy_out=gen --mypy_grpc_out=gen $(PROTOS)
	@find gen -type d -exec touch {}/__init__.py \;
	@rm -f gen/__init__.py
	@touch $@

deps: system-deps $(STAMP) $(PROTO_STAMP) ## Install everything that is missing (apt, .venv, generated code)

# Each npm package's locked dependencies, again whenever its lockfile changes.
$(NPM_STAMPS): %/node_modules/.installed: %/package-lock.json %/package.json | system-deps
	cd $* && npm ci --no-audit --no-fund
	@touch $@

node-deps: $(NPM_STAMPS) ## Install the npm packages' locked dependencies (buf, the Node gRPC client, the TS client)

$(TS_BUILT): $(TS_INPUTS) clients/ts/node_modules/.installed
	cd clients/ts && npm run build
	@touch $@

ts-build: $(TS_BUILT) ## Build the TypeScript client (clients/ts/dist, which the web chat loads)

proto: ## Regenerate the protobuf/gRPC code into gen/
	@rm -f $(PROTO_STAMP)
	@$(MAKE) --no-print-directory $(PROTO_STAMP)

lock: ## Re-pin requirements.lock from requirements.in
	$(UV) pip compile -q requirements.in -o requirements.lock --python $(PY)

lint: deps ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: deps ## Format and autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: deps ## mypy on the project's own code
	$(VENV)/bin/mypy services libs

test: deps lint typecheck k8s-check alerts-check proto-check node-deps ts-build ## Everything CI runs: lint, types, manifests, alerts, the API contract, all tests (the TS client's and the browser's too)
	IM_REQUIRE_BROWSER=1 $(PY) -m pytest $(PYTEST_ARGS)

test-fast: deps ## pytest only, skipping slow tests
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

run: deps ts-build ## Start the whole stack locally (PostgreSQL, Redis, NATS, 4 services, the web chat); ports from IM_DEV_BASE_PORT (default 17000: base..base+499)
	$(PY) -m imdev run

run-cluster: deps ## The replicated topology locally: 3 NATS nodes (stream R3), PostgreSQL primary + synchronous standby, 2 of each service, 3 seqsvc instances; same ports base as run
	$(PY) -m imdev run-cluster

stop: ## Stop everything `make run` started (whatever its state file says)
	@if [ -x $(PY) ]; then $(PY) -m imdev stop; fi

status: ## Show what `make run` started, its addresses and metrics ports, and whether it is healthy
	@$(PY) -m imdev status

bench-seq: deps ## Benchmark seqsvc: against Redis INCR and a PostgreSQL counter; open-loop p99.9; three instances (routing, handovers)
	$(PY) bench/seqsvc.py

bench-logic: deps ## Benchmark logic SendMessage and fan-out
	$(PY) bench/logic.py

bench: deps ## End-to-end benchmark (1:1 load plain and with read receipts, connections, group)
	$(PY) bench/e2e.py

bench-cluster: deps ## What replication costs: the 1:1 load of `make bench` on the single-node stack, then on the cluster topology, same session; ratios (bench/e2e_cluster.py)
	$(PY) bench/e2e_cluster.py

bench-prune: deps ## Retention pruning of 2 x 1M rows under 300 sends/s (bench/prune.py)
	$(PY) bench/prune.py

AB_PRESET ?= liveness
AB_ARGS ?=
bench-ab: deps ## End-to-end before/after of one change's switches in one run (AB_PRESET=liveness|batching|quiet); AB_ARGS="--closed-senders 10" adds the closed loop
	$(PY) bench/e2e_ab.py --preset $(AB_PRESET) $(AB_ARGS)

bench-idle: deps ## Idle cost of 10,000 open streams, liveness off vs on, in one run
	$(PY) bench/e2e_idle.py

chaos: deps ## Full chaos run
	$(PY) -m chaos

chaos-seq: deps ## seqsvc: three instances through 5 rounds of SIGTERM, kill -9, SIGSTOP and PostgreSQL stalls, checked value by value
	IM_SEQSVC_CHAOS_ROUNDS=5 $(PY) -m pytest -s tests/seqsvc/test_seqsvc_multi.py $(PYTEST_ARGS)

CHAOS_CLUSTER_DURATION ?= 300
CHAOS_SEED ?= 1
chaos-cluster: deps ## Chaos on the replicated topology: NATS node kills (leader too), rolling restarts, store wipes, PostgreSQL failovers, proxy cuts, and every single-node kind (CHAOS_CLUSTER_DURATION s, CHAOS_SEED)
	$(PY) -m chaos --cluster --duration $(CHAOS_CLUSTER_DURATION) --seed $(CHAOS_SEED) $(CHAOS_ARGS)

k8s-check: deps ## Render and validate the Kubernetes manifests offline
	@if [ -f deploy/check.py ]; then $(PY) deploy/check.py; else echo "k8s-check: no manifests yet"; fi

proto-check: tools/buf/node_modules/.installed ## buf lint, and buf breaking against the last release tag or the merge base (docs/protocol.md, "Versioning")
	tools/buf/proto-check.sh

alerts-check: system-deps ## promtool: check the alerting rules and run their unit tests
	promtool check rules deploy/prometheus/rules.yml
	promtool test rules deploy/prometheus/rules_test.yml

sdk: deps ## Build the client SDK's wheel and sdist into dist/ (apps: pip install ./sdk/python)
	$(UV) build -q sdk/python -o dist

seqsvc-client: deps ## Build seqsvc's installable client (wheel and sdist) into dist/ (teams: pip install dist/seqsvc_client-*.whl)
	$(UV) build -q sdk/seqsvc-client -o dist

SEQSVC_PORT ?= 50053
SEQSVC_PG_PORT ?= 55432
SEQSVC_METRICS_PORT ?= 50063
seqsvc-run: deps ## Start PostgreSQL and one seqsvc alone on 127.0.0.1:$(SEQSVC_PORT), and print a first call
	$(PY) -m imdev.seqsvc_run run --port $(SEQSVC_PORT) --pg-port $(SEQSVC_PG_PORT) \
	  --metrics-port $(SEQSVC_METRICS_PORT)

seqsvc-stop: ## Stop what `make seqsvc-run` started
	@if [ -x $(PY) ]; then $(PY) -m imdev.seqsvc_run stop; fi

images: ## Build container images (needs a container engine)
	docker build -t im-backend:dev -f deploy/Dockerfile .

clean: ## Stop `make run`'s stack, remove its data, generated code, caches and local state
	@if [ -x $(PY) ]; then $(PY) -m imdev clean; fi
	rm -rf gen .run dist .mypy_cache .ruff_cache .pytest_cache $(addsuffix /node_modules,$(NPM_PACKAGES)) \
	  clients/ts/dist clients/ts/src/gen
