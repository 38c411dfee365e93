# Two entry points for a fresh machine: `make run` (the quickstart pipeline, locally) and `make test`.
# Everything installs itself into a virtualenv cached under ~/.cache, keyed by the pinned dependencies.

SHELL := /bin/bash
CACHE_DIR ?= $(HOME)/.cache/finetune-operator
VENV ?= $(CACHE_DIR)/venv
PY := $(VENV)/bin/python
# The project runs from the source tree (no editable install), so one cached venv serves every clone.
export PYTHONPATH := $(CURDIR)/operator:$(CURDIR)/trainer
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0
DEPS_STAMP := $(VENV)/.deps-$(shell cat pyproject.toml | sha256sum | cut -c1-16)

.PHONY: install run test test-unit crds check-crds k8s-binaries dev-cluster operator bench-operator clean

install: $(DEPS_STAMP)

# The stamp's name carries the hash of pyproject.toml, so a fresh clone (new mtimes) reuses an up-to-date venv.
$(DEPS_STAMP):
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first: DeepSpeed builds against the installed torch without build isolation.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q --no-build-isolation "deepspeed==0.19.8"
	$(PY) -c "import subprocess, sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
		subprocess.check_call([sys.executable, '-m', 'pip', 'install', '-q', *p['dependencies'], *sum(p['optional-dependencies'].values(), [])])"
	@rm -f $(VENV)/.deps-*
	@touch $@

run: install
	$(PY) -m finetune_trainer tiny-model models/tiny --data-dir examples/data
	$(PY) -m finetune_trainer run examples/quickstart.yaml --status-file out/quickstart/status.json

test: install k8s-binaries
	$(PY) -m pytest tests

test-unit: install
	$(PY) -m pytest tests -m unit

crds: install
	$(PY) -m finetune_operator.crdgen

check-crds: install
	$(PY) -m finetune_operator.crdgen --check

# Kubernetes' own binaries (kube-apiserver, etcd, kubectl, helm) built from their Go modules, cached under ~/.cache.
k8s-binaries: install
	$(PY) -m finetune_operator.devcluster --build-only

dev-cluster: install
	$(PY) -m finetune_operator.devcluster

operator: install
	$(PY) -m finetune_operator run --executor local --standalone

bench-operator: install
	$(PY) bench/operator_scale.py 200 1000

clean:
	rm -rf out models .pytest_cache
