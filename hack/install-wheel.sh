#!/usr/bin/env bash
# Build telerad's wheel and install it with the locked dependencies (hashes checked) into
# a new virtual environment. The Dockerfile runs this; a test runs it too, so the image's
# install is exercised on machines without a Docker engine.
#   hack/install-wheel.sh VENV
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$1"
uv="${UV:-$root/hack/uv.sh}"
dist="$(mktemp -d)"
trap 'rm -rf "$dist"' EXIT
"$uv" build --project "$root" --wheel --out-dir "$dist" >&2
"$uv" export --project "$root" --frozen --no-dev --no-emit-project --no-header \
  --format requirements-txt > "$dist/requirements.txt"
"${PYTHON:-python3}" -m venv "$venv"
"$uv" pip install --python "$venv/bin/python" --require-hashes -r "$dist/requirements.txt" >&2
"$uv" pip install --python "$venv/bin/python" --no-deps "$dist"/*.whl >&2
