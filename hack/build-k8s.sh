#!/usr/bin/env bash
# Build the local control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok) from the Go module proxy. Idempotent: the binaries go to
# a cache directory named after the pinned versions; a finished build leaves a stamp and
# later runs only print the directory. The last line printed is always that directory.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
K8S_VERSION="$(awk '$1=="k8s.io/kubernetes" && $2 ~ /^v/ {print $2}' "$here/k8s-bins/go.mod")"
ETCD_VERSION="$(awk '$1=="go.etcd.io/etcd/server/v3" && $2 ~ /^v/ {print $2}' "$here/etcd-bin/go.mod")"
KWOK_VERSION="${KWOK_VERSION:-v0.7.0}"
CACHE="${TELERAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/telerad}"
OUT="$CACHE/k8s/k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}"

export GOTOOLCHAIN=local                # never download another Go
export GOFLAGS="-buildvcs=false -trimpath -mod=readonly"
export CGO_ENABLED=0                    # upstream links these statically too
# GOCACHE and GOMODCACHE keep Go's defaults (under $HOME), which CI reuses between runs.

stamp="$OUT/.complete-$(go env GOVERSION)"
if [[ -f "$stamp" ]]; then echo "$OUT"; exit 0; fi
mkdir -p "$OUT"
log() { printf '[build-k8s %s] %s\n' "$(date +%T)" "$*" >&2; }

# Unstamped module builds report "v0.0.0-master+\$Format:%H\$" on /version, which breaks
# clients that parse it; these are the variables Kubernetes' hack/lib/version.sh sets.
minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
ld="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ld+=" -X ${p}.gitVersion=${K8S_VERSION} -X ${p}.gitMajor=1 -X ${p}.gitMinor=${minor}"
  ld+=" -X ${p}.gitTreeState=clean -X ${p}.buildDate=1970-01-01T00:00:00Z"
done
log "kubernetes ${K8S_VERSION}"
(cd "$here/k8s-bins" && go build -tags=selinux,notest,grpcnotrace -ldflags="$ld" -o "$OUT/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)

log "etcd ${ETCD_VERSION}"
(cd "$here/etcd-bin" && go build -ldflags="-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=${ETCD_VERSION}" \
  -o "$OUT/etcd" go.etcd.io/etcd/server/v3)

log "kwok ${KWOK_VERSION}"
GOFLAGS="-buildvcs=false -trimpath" GOBIN="$OUT" go install -ldflags="-s -w" "sigs.k8s.io/kwok/cmd/kwok@${KWOK_VERSION}"
# kwok v0.7's built-in fallback picks the wrong heartbeat stage, so pass its "fast" stage
# set explicitly (node-initialize, heartbeat-with-lease, pod ready/complete/delete).
kwok_dir="$(cd "$OUT" && GOFLAGS= go mod download -json "sigs.k8s.io/kwok@${KWOK_VERSION}" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
         pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
  echo "---"; cat "$kwok_dir/kustomize/stage/$f"
done > "$OUT/kwok-stages.yaml"

"$OUT/kube-apiserver" --version >&2
"$OUT/etcd" --version >&2
touch "$stamp"
echo "$OUT"
