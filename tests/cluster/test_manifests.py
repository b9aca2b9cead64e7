"""manifests/ as a platform team applies them: server-side dry runs against the real
control plane, so the API server's own validation (schemas, CEL rules, RBAC objects)
judges every object."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.cluster.conftest import Cluster

ROOT = Path(__file__).resolve().parents[2]


def dry_run(cluster: Cluster, path: str) -> str:
    done = cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "--dry-run=server", "-k", str(ROOT / path),
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def built(cluster: Cluster, path: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(cluster.kubectl("kustomize", str(ROOT / path)).stdout))


def ensure_namespace(cluster: Cluster, name: str) -> None:
    if cluster.kubectl("get", "namespace", name, check=False).returncode != 0:
        cluster.kubectl("create", "namespace", name)


def test_the_default_install_passes_a_server_dry_run(cluster: Cluster, crds: None) -> None:
    ensure_namespace(cluster, "telerad-system")  # a dry run creates nothing to put things in
    out = dry_run(cluster, "manifests/default")
    for applied in (
        "namespace/telerad-system",
        "customresourcedefinition.apiextensions.k8s.io/aimodels.telerad.io",
        "serviceaccount/telerad-operator",
        "clusterrole.rbac.authorization.k8s.io/telerad-operator-children",
        "deployment.apps/telerad-operator",
    ):
        assert f"{applied} serverside-applied (server dry run)" in out, out
    (deployment,) = [o for o in built(cluster, "manifests/default") if o["kind"] == "Deployment"]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    assert pod["serviceAccountName"] == "telerad-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {p["name"] for p in container["ports"]} == {"metrics", "healthz"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "memory" in container["resources"]["limits"]


def test_the_samples_pass_a_server_dry_run(cluster: Cluster, crds: None) -> None:
    ensure_namespace(cluster, "tenant-northwind")
    out = dry_run(cluster, "manifests/samples")
    # Two sites, two models, one policy, and the grant of the TLS Secret (a Role, its binding).
    assert out.count("serverside-applied (server dry run)") == 7, out


def test_monitoring_builds_with_the_dashboard_for_grafanas_sidecar(cluster: Cluster) -> None:
    """Its kinds need the Prometheus Operator's CRDs, which this cluster does not run, so it
    is built, not dry-run; the rules and dashboard are checked in tests/shipping."""
    objects = {o["kind"]: o for o in built(cluster, "manifests/monitoring")}
    assert set(objects) == {"PodMonitor", "PrometheusRule", "ConfigMap"}
    dashboard = objects["ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    text = (ROOT / "manifests" / "monitoring" / "dashboard.json").read_text()
    assert dashboard["data"]["telerad-dashboard.json"] == text
    ports = {e["port"] for e in objects["PodMonitor"]["spec"]["podMetricsEndpoints"]}
    assert ports == {"http", "metrics"}
