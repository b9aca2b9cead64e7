"""Operator at scale: apply -> Ready latency, operator memory, API writes per reconcile.

For each size N: a fresh local control plane (with enough extra kwok CPU nodes for the
pods), the CRDs, and `telerad operator` as its own process. N ImagingSites, each with
one AIModel (CPU worker) and one RoutingPolicy, are applied across tenants of ten
sites each (one namespace per tenant, one `kubectl apply` per tenant, all at once).
Latency is from the tenant's apply to the first poll (every 0.5 s) that sees the site
Ready. Memory is the operator's peak RSS (VmHWM). Writes per reconcile come from the
operator's own counters.

    .venv/bin/python bench/operator_scale.py --bin-dir "$(hack/build-k8s.sh)" --sites 1 100 1000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from telerad.devcluster import ControlPlane
from telerad.devcluster.controlplane import free_port

ROOT = Path(__file__).resolve().parents[1]
PER_TENANT = 10
PODS_PER_NODE = 110
SHM = Path("/dev/shm")  # noqa: S108  (etcd on tmpfs: a throwaway cluster)


def kubectl(bin_dir: Path, kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    return subprocess.run(
        [bin_dir / "kubectl", f"--kubeconfig={kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def tenant_objects(tenant: int, sites: range) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    for i in sites:
        site, model = f"site-{i}", f"model-{i}"
        objs += [
            {
                "apiVersion": "telerad.io/v1alpha1",
                "kind": "ImagingSite",
                "metadata": {"name": site, "labels": {"bench/site": site}},
                "spec": {
                    "aeTitle": f"SITE{i}",
                    "allowedCallers": [{"aeTitle": "CT01", "cidrs": ["10.0.0.0/8"]}],
                },
            },
            {
                "apiVersion": "telerad.io/v1alpha1",
                "kind": "AIModel",
                "metadata": {"name": model},
                "spec": {
                    "image": "registry.invalid/worker:bench",
                    "model": {"name": "ct-head-hyperdensity", "version": "0.1.0"},
                    "intendedUse": {"modalities": ["CT"], "bodyParts": ["HEAD"]},
                    "gpu": {"count": 0},
                },
            },
            {
                "apiVersion": "telerad.io/v1alpha1",
                "kind": "RoutingPolicy",
                "metadata": {"name": f"route-{i}"},
                "spec": {
                    "sites": {"names": [site]},
                    "rules": [
                        {
                            "name": "ct-head",
                            "match": {"modalities": ["CT"], "bodyParts": ["HEAD"]},
                            "models": [model],
                        }
                    ],
                },
            },
        ]
    return objs


def extra_nodes(count: int) -> list[dict[str, Any]]:
    capacity = {"cpu": "64", "memory": "256Gi", "pods": str(PODS_PER_NODE)}
    return [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": f"bench-cpu-{i}",
                "annotations": {"kwok.x-k8s.io/node": "fake"},
                "labels": {"kubernetes.io/hostname": f"bench-cpu-{i}", "type": "kwok"},
            },
            "status": {"capacity": capacity, "allocatable": capacity},
        }
        for i in range(count)
    ]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric_sum(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def run(bin_dir: Path, n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="telerad-bench-") as tmp:
        plane = ControlPlane(
            bin_dir=bin_dir,
            state_dir=Path(tmp) / "plane",
            etcd_data_dir=SHM / f"bench-etcd-{os.getpid()}",
        )
        plane.start()
        kc = plane.kubeconfig
        op = None
        try:
            kubectl(bin_dir, kc, "apply", "--server-side", "-k", str(ROOT / "crds"))
            kubectl(
                bin_dir, kc, "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"
            )
            nodes = (2 * n) // (PODS_PER_NODE - 10) + 1
            for node in extra_nodes(nodes):
                kubectl(bin_dir, kc, "create", "-f", "-", stdin=json.dumps(node))
            metrics_port = free_port()
            op_log = (Path(tmp) / "operator.log").open("wb")
            op = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "telerad"),
                    "operator",
                    f"--metrics-port={metrics_port}",
                    "--liveness-port=0",
                    "--log-format=plain",
                ],
                env={**os.environ, "KUBECONFIG": str(kc)},
                stdout=op_log,
                stderr=subprocess.STDOUT,
            )
            time.sleep(3)
            tenants = list(range((n + PER_TENANT - 1) // PER_TENANT))
            for t in tenants:
                kubectl(bin_dir, kc, "create", "namespace", f"tenant-{t}")
            docs = {
                t: tenant_objects(t, range(t * PER_TENANT, min(n, (t + 1) * PER_TENANT)))
                for t in tenants
            }
            applied: dict[str, float] = {}

            def apply(t: int) -> None:
                applied[f"tenant-{t}"] = time.monotonic()
                body = "\n---\n".join(json.dumps(d) for d in docs[t])
                kubectl(
                    bin_dir,
                    kc,
                    "-n",
                    f"tenant-{t}",
                    "apply",
                    "--server-side",
                    "-f",
                    "-",
                    stdin=body,
                )

            started = time.monotonic()
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(apply, tenants))
            ready: dict[str, float] = {}
            deadline = started + 1800
            while len(ready) < n and time.monotonic() < deadline:
                seen = time.monotonic()
                items = json.loads(kubectl(bin_dir, kc, "get", "imagingsites", "-A", "-o", "json"))[
                    "items"
                ]
                for item in items:
                    key = f"{item['metadata']['namespace']}/{item['metadata']['name']}"
                    conds = (item.get("status") or {}).get("conditions", [])
                    if key not in ready and any(
                        c["type"] == "Ready" and c["status"] == "True" for c in conds
                    ):
                        ready[key] = seen - applied[item["metadata"]["namespace"]]
                time.sleep(0.5)
            total = time.monotonic() - started
            time.sleep(5)
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                text = resp.read().decode()
            writes = metric_sum(text, "telerad_operator_api_writes_total")
            reconciles = metric_sum(text, "telerad_operator_reconcile_total")
            latencies = sorted(ready.values())
            q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
            return {
                "sites": n,
                "ready": len(ready),
                "p50": statistics.median(latencies),
                "p95": q[18],
                "all_ready_s": total,
                "peak_rss_mib": peak_rss_mib(op.pid),
                "operator_cpu_s": cpu_seconds(op.pid),
                "reconciles": int(reconciles),
                "writes": int(writes),
                "writes_per_reconcile": writes / reconciles if reconciles else float("nan"),
            }
        finally:
            if op is not None:
                op.terminate()
                op.wait(timeout=30)
            plane.stop()
            subprocess.run(["rm", "-rf", str(SHM / f"bench-etcd-{os.getpid()}")], check=False)


COLUMNS = (
    ("sites", "sites", "{}"),
    ("Ready", "ready", "{}"),
    ("apply->Ready p50 s", "p50", "{:.2f}"),
    ("p95 s", "p95", "{:.2f}"),
    ("all Ready s", "all_ready_s", "{:.1f}"),
    ("operator peak RSS MiB", "peak_rss_mib", "{:.0f}"),
    ("operator CPU s", "operator_cpu_s", "{:.1f}"),
    ("reconciles", "reconciles", "{}"),
    ("API writes", "writes", "{}"),
    ("writes/reconcile", "writes_per_reconcile", "{:.2f}"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bin-dir", type=Path, required=True)
    parser.add_argument("--sites", type=int, nargs="+", default=[1, 100, 1000])
    args = parser.parse_args()
    print("| " + " | ".join(c[0] for c in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for n in args.sites:
        r = run(args.bin_dir, n)
        print("| " + " | ".join(fmt.format(r[key]) for _, key, fmt in COLUMNS) + " |", flush=True)


if __name__ == "__main__":
    main()
