# Two entry points for a fresh machine: `make run` (the quickstart pipeline, locally) and `make test`.
# Every Python install goes through uv.lock (`uv sync --frozen`); uv itself is pinned by hash in dev/uv-requirements.txt.

SHELL := /bin/bash
CACHE_DIR ?= $(HOME)/.cache/finetune-operator
UV_VERSION := $(shell sed -n 's/^uv==\([0-9.]*\).*/\1/p' dev/uv-requirements.txt)
UV := $(CACHE_DIR)/uv-$(UV_VERSION)/bin/uv
# The project's environment. uv makes it match the lock exactly on every target; CI points VENV at a fresh directory.
VENV ?= $(CURDIR)/.venv
export UV_PROJECT_ENVIRONMENT := $(VENV)
# Bytecode compiled at install (as in the images): with PYTHONDONTWRITEBYTECODE set, as on CI machines, every process
# would otherwise compile torch, transformers, peft and deepspeed from source at each import (21 s against 7.6 s).
export UV_COMPILE_BYTECODE := 1
PY := $(VENV)/bin/python
# The product packages (api/, operator/, trainer/) are installed editable by uv; dev tooling runs from the tree.
export PYTHONPATH := $(CURDIR)/dev
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install lock lock-check lint format run test test-images test-unit crds check-crds k8s-binaries system-packages dev-cluster operator bench-operator images clean

$(UV):
	python3 -m venv $(CACHE_DIR)/uv-$(UV_VERSION)
	$(CACHE_DIR)/uv-$(UV_VERSION)/bin/pip install -q --require-hashes -r dev/uv-requirements.txt

# `finetune` and `finetune-operator` land in $(VENV)/bin.
install: $(UV)
	$(UV) sync --frozen --extra operator --extra trainer --quiet

# After editing dependencies in pyproject.toml: re-resolve and commit uv.lock.
lock: $(UV)
	$(UV) lock

lock-check: $(UV)
	$(UV) lock --check

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

run: install
	$(VENV)/bin/finetune tiny-model models/tiny --data-dir examples/data
	$(VENV)/bin/finetune run examples/quickstart.yaml --status-file out/quickstart/status.json

# The neighbour tests need every component; building them up front shows the (first-run) build outside pytest.
test: WITH = all
test: lock-check lint check-crds k8s-binaries system-packages
	$(PY) -m pytest -m "not image" --durations=25

# The images, built with buildah and run: a source change rebuilds the 6 GB trainer image (about 7 minutes), so CI
# runs them as a step of their own after `make test`.
test-images: lock-check k8s-binaries system-packages
	$(PY) -m pytest -m image --durations=10

test-unit: install
	$(PY) -m pytest -m unit

crds: install
	$(PY) -m finetune_dev.crdgen

check-crds: install
	$(PY) -m finetune_dev.crdgen --check

# Kubernetes' own binaries (kube-apiserver, etcd, kubectl, helm) built from their Go modules, cached under ~/.cache.
# WITH="kube-scheduler kwok ..." (or WITH=all) adds neighbours; GPU_NODES=N fake GPU nodes (needs kwok).
WITH_FLAGS = $(foreach c,$(WITH),--with $(c))

k8s-binaries: install
	$(PY) -m finetune_dev --build-only $(WITH_FLAGS)

# Debian packages that some tests drive for real: Chromium (the report's browser test), buildah and debootstrap
# (the image builds). Installed when run as root; elsewhere those tests are skipped and say why.
SYSTEM_PACKAGES := chromium buildah debootstrap
system-packages:
	@missing="$$(for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null || echo $$p; done)"; \
	if [ -n "$$missing" ]; then \
		{ test "$$(id -u)" = 0 && apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } || \
		echo "not installed: $$missing (the tests that need them will be skipped)"; \
	fi

dev-cluster: install
	$(PY) -m finetune_dev $(WITH_FLAGS) $(if $(GPU_NODES),--gpu-nodes $(GPU_NODES))

operator: install
	$(VENV)/bin/finetune-operator run --executor local

bench-operator: install
	$(PY) bench/operator_scale.py 1000

# The operator and trainer images from their Dockerfiles, with buildah on a local Debian base (root, buildah and
# debootstrap needed; docs/install.md). Cached under ~/.cache/finetune-operator/images.
images: install
	$(PY) -m finetune_dev.images build operator
	$(PY) -m finetune_dev.images build trainer

clean:
	rm -rf out models .pytest_cache
