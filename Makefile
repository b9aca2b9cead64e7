# The two commands a fresh machine needs: `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV := .venv
BIN := $(VENV)/bin
CLUSTER_DIR ?= .cluster

.PHONY: setup k8s-bins s3-bin debs image lint test test-fast cluster cluster-down cluster-status bench clean demo kind-e2e reliability

# Python environment from uv.lock (frozen: CI fails if pyproject.toml and the lock disagree).
# Bytecode compiled at install, and telerad's own on every target that runs it: where the
# environment sets PYTHONDONTWRITEBYTECODE (CI machines do), every Python process would
# otherwise compile some 600 modules again, 3 s of CPU per gateway start.
setup: $(VENV)/.synced
	@$(BIN)/python -m compileall -q telerad tests bench
$(VENV)/.synced: pyproject.toml uv.lock
	@hack/uv.sh sync --frozen --python 3.11 --compile-bytecode >&2
	@touch $@

# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and kwok, built
# from the Go module proxy into ~/.cache/telerad/k8s/ (a no-op once built).
k8s-bins:
	@hack/build-k8s.sh >/dev/null

# versitygw, the S3 server the object-storage tests start, built from the Go module proxy
# into ~/.cache/telerad/s3/ (a no-op once built).
s3-bin:
	@hack/build-s3.sh >/dev/null

# The real peers from Debian: dcmtk, Orthanc, dicom3tools, Prometheus (a no-op once installed).
debs:
	@hack/debs.sh

# The image built from the Dockerfile with buildah (no Docker, no registry) and imported
# into the local node's containerd; a no-op when current. Prints the image reference last.
# REGISTRY=host/path also pushes it there (docs/image.md).
REGISTRY ?=
image: debs
	@REGISTRY="$(REGISTRY)" hack/image.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/telerad crds --check

test: lint k8s-bins s3-bin debs
	TELERAD_K8S_BIN="$$(hack/build-k8s.sh)" TELERAD_S3_BIN="$$(hack/build-s3.sh)" \
	  $(BIN)/pytest $(PYTEST_ARGS)

# Unit tests only: no control plane, seconds.
test-fast: setup
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

# Prints `export KUBECONFIG=...` last, so `eval "$(make cluster | tail -1)"` works.
cluster: setup k8s-bins
	@$(BIN)/python -m telerad.devcluster up --dir $(CLUSTER_DIR) --bin-dir "$$(hack/build-k8s.sh)"

cluster-down:
	@$(BIN)/python -m telerad.devcluster down --dir $(CLUSTER_DIR)

cluster-status:
	@$(BIN)/python -m telerad.devcluster status --dir $(CLUSTER_DIR)

bench: setup k8s-bins debs
	$(BIN)/python bench/controlplane_start.py --bin-dir "$$(hack/build-k8s.sh)"
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/claims.py
	$(BIN)/python bench/dicomweb.py
	$(BIN)/python bench/triage.py

clean: cluster-down
	rm -rf $(VENV) $(CLUSTER_DIR) .mypy_cache .ruff_cache .pytest_cache

# The whole system on a local control plane, end to end; leaves no process behind.
demo: setup k8s-bins debs
	@$(BIN)/telerad demo --bin-dir "$$(hack/build-k8s.sh)"

# The demo's path on kind with the image built from this checkout (needs Docker and kind).
kind-e2e: setup debs
	@hack/kind-e2e.sh

# RELIABILITY.md's table: every reliability-marked test, RUNS times (default 1).
reliability: setup k8s-bins debs
	TELERAD_K8S_BIN="$$(hack/build-k8s.sh)" $(BIN)/python bench/reliability.py --runs $${RUNS:-1}
