#!/usr/bin/env bash
# Build the S3 server the tests run (versitygw, Apache-2.0; its POSIX backend keeps a
# bucket as a directory) from the Go module proxy, into the cache beside the control-plane
# binaries. Idempotent: a finished build leaves a stamp and later runs only print the path.
# The last line printed is always the binary's path.
set -euo pipefail

VERSITYGW_VERSION="${VERSITYGW_VERSION:-v1.8.0}"
CACHE="${TELERAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/telerad}"
OUT="$CACHE/s3/versitygw-${VERSITYGW_VERSION}"
BIN="$OUT/versitygw"

export GOTOOLCHAIN=local                # never download another Go
export GOFLAGS="-buildvcs=false -trimpath"
export CGO_ENABLED=0                    # its POSIX backend needs no cgo (only RDMA would)
# GOCACHE and GOMODCACHE keep Go's defaults (under $HOME), which CI reuses between runs.

stamp="$OUT/.complete-$(go env GOVERSION)"
if [[ -f "$stamp" && -x "$BIN" ]]; then echo "$BIN"; exit 0; fi
mkdir -p "$OUT"
printf '[build-s3 %s] versitygw %s\n' "$(date +%T)" "$VERSITYGW_VERSION" >&2

# Unstamped, `versitygw --version` says "git"/"norev": these are the variables its own
# Makefile sets (Build is a commit there; the tag is all a module build knows).
ld="-s -w -X=main.Version=${VERSITYGW_VERSION} -X=main.Build=${VERSITYGW_VERSION}"
ld+=" -X=main.BuildTime=1970-01-01T00:00:00Z"
GOBIN="$OUT" go install -ldflags="$ld" "github.com/versity/versitygw/cmd/versitygw@${VERSITYGW_VERSION}"

"$BIN" --version >&2
touch "$stamp"
echo "$BIN"
