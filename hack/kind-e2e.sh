#!/usr/bin/env bash
# `make kind-e2e`: the demo's path on a kind cluster with the image built from this
# checkout, for machines with Docker and kind (the development machine has neither, so
# this is not run in CI). Gateways and workers run as the real pods; there are no GPUs,
# so the models run on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in docker kind kubectl storescu; do
  command -v "$tool" >/dev/null || { echo "kind-e2e needs $tool" >&2; exit 2; }
done
cluster=telerad-e2e image=telerad:e2e ns=tenant-northwind
docker build -t "$image" .
kind create cluster --name "$cluster" --wait 180s
trap 'kill $(jobs -p) 2>/dev/null || true; kind delete cluster --name "$cluster"' EXIT
kind load docker-image "$image" --name "$cluster"

kubectl apply --server-side -k manifests/default
kubectl -n telerad-system set image deployment/telerad-operator operator="$image"
kubectl -n telerad-system set env deployment/telerad-operator \
  TELERAD_IMAGE="$image" TELERAD_IMAGE_PULL_POLICY=Never
kubectl -n telerad-system rollout status deployment/telerad-operator --timeout=180s

kubectl create namespace "$ns"
token="$(docker run --rm "$image" token --tenant "$ns")"
for site in st-marys riverside; do
  kubectl -n "$ns" create secret generic "$site-http-clients" --from-literal=worker="$token"
done
kubectl -n "$ns" create secret generic st-marys-paging --from-literal=hmac-key="$RANDOM$RANDOM"
# The samples as the demo localizes them: callers from anywhere on the kind network, no
# DICOM TLS, no external destinations or webhooks; workers from this image, on CPU.
kubectl kustomize manifests/samples | python3 -c '
import sys, yaml
docs = list(yaml.safe_load_all(sys.stdin))
for d in docs:
    s = d["spec"]
    if d["kind"] == "ImagingSite":
        for c in s["allowedCallers"]:
            c["cidrs"] = ["0.0.0.0/0"]
        for key in ("tls", "destinations", "notifications"):
            s.pop(key, None)
        s["service"] = {"type": "ClusterIP"}
        s["completion"] = {"quietSeconds": 2}
        for tier in s["storage"].values():
            if isinstance(tier, dict):
                tier.pop("storageClassName", None)
                tier["size"] = "1Gi"
    if d["kind"] == "AIModel":
        s["image"] = sys.argv[1]
        s["gpu"] = {"count": 0}
        s.pop("resources", None)
print(yaml.safe_dump_all(docs))
' "$image" | kubectl apply --server-side -f -
kubectl -n "$ns" wait --for=condition=Ready imagingsite,aimodel --all --timeout=300s

kubectl -n "$ns" port-forward svc/st-marys-gateway 11112:11112 8080:8080 &
sleep 3
study="$(mktemp -d)"
.venv/bin/python -c 'import sys; from telerad import synthetic
synthetic.write_series(synthetic.ct_series(n_slices=48, size=256, seed=11, hyperdensity=True), sys.argv[1])' "$study"
storescu -aet STM_CT01 -aec TELERAD_STM 127.0.0.1 11112 "$study"/*
for _ in $(seq 120); do
  if curl -fsS -H "Authorization: Bearer $token" http://127.0.0.1:8080/worklist | grep -q '"critical":true'; then
    curl -fsS -H "Authorization: Bearer $token" http://127.0.0.1:8080/worklist; echo
    kubectl get telerad -n "$ns"
    echo "kind-e2e: the CT head was read, found critical and put first on the worklist"
    exit 0
  fi
  sleep 2
done
echo "kind-e2e: no critical result within 4 minutes" >&2
kubectl -n "$ns" logs deploy/ct-head-hyperdensity-worker --tail=50 >&2 || true
exit 1
