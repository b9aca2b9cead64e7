#!/usr/bin/env bash
# Run uv, installing a pinned copy into the user cache first when the machine has none.
set -euo pipefail
UV_VERSION=0.13.9
cache="${TELERAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/telerad}"
uv="$cache/uv-$UV_VERSION/bin/uv"
if [[ ! -x "$uv" ]]; then
  python3 -m venv "$cache/uv-$UV_VERSION" >&2
  "$cache/uv-$UV_VERSION/bin/pip" install --quiet --disable-pip-version-check "uv==$UV_VERSION" >&2
fi
export UV_PYTHON_DOWNLOADS=never   # use the machine's Python 3.11; never fetch one
exec "$uv" "$@"
