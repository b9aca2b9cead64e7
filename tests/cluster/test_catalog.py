"""A site whose catalog is the tenant's PostgreSQL, on the real control plane: the
operator mounts the Secret `spec.catalog` names into the gateway and renders only its
directory, and when the gateway cannot open that catalog the site is Degraded
(`CatalogUnavailable`), saying why without a word of the Secret's content.

The gateway is `telerad gateway` started from the very pod the operator's Deployment
created (telerad.devcluster.standin does a kubelet's part); kwok runs no kubelet, so the
test does the rest of one: it reports the container's exit, with the termination message
the gateway left, in the pod's status."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

from telerad.devcluster import standin
from tests.cluster.conftest import Cluster, Operator
from tests.cluster.test_controlplane import eventually
from tests.runtime.conftest import TELERAD

SITE = "er-site"
SECRET = "er-db-app"  # noqa: S105  (a Secret's name)
PASSWORD = "correct-horse-battery"  # noqa: S105  (the test database's password)
STARTUP_ERROR = "Error: cannot start the gateway: "

SITE_OBJECT: dict[str, Any] = {
    "apiVersion": "telerad.io/v1alpha1",
    "kind": "ImagingSite",
    "metadata": {"name": SITE},
    "spec": {
        "aeTitle": "TELERAD_ER",
        "allowedCallers": [{"aeTitle": "ER_CT01", "cidrs": ["127.0.0.0/8"]}],
        "storage": {"hot": {"size": "1Gi", "days": 7}, "retentionDays": 7},
        "catalog": {"secretRef": {"name": SECRET}},
    },
}


def apply(cluster: Cluster, ns: str, obj: dict[str, Any]) -> None:
    cluster.kubectl(
        "-n", ns, "apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(obj)
    )  # fmt: skip


def conditions(cluster: Cluster, ns: str) -> dict[str, Any]:
    status = cluster.kubectl_json("-n", ns, "get", "imagingsite", SITE).get("status") or {}
    return {c["type"]: c for c in status.get("conditions", [])}


def gateway_pod(cluster: Cluster, ns: str) -> dict[str, Any] | None:
    selector = f"app.kubernetes.io/component=gateway,app.kubernetes.io/instance={SITE}"
    pods = cluster.kubectl_json("-n", ns, "get", "pods", "-l", selector)["items"]
    running = [p for p in pods if (p.get("status") or {}).get("podIP")]
    return running[0] if running else None


def report(cluster: Cluster, ns: str, pod: dict[str, Any], container: dict[str, Any]) -> None:
    """The kubelet's report of the gateway container, and the pod's readiness with it."""
    ready = "True" if container["ready"] else "False"
    conditions = [
        {**c, "status": ready} if c["type"] in ("Ready", "ContainersReady") else c
        for c in pod["status"].get("conditions", [])
    ]
    patch = {"status": {"containerStatuses": [container], "conditions": conditions}}
    cluster.kubectl(
        "-n", ns, "patch", "pod", pod["metadata"]["name"], "--subresource=status",
        "--type=merge", "-p", json.dumps(patch),
    )  # fmt: skip


def test_a_gateway_that_cannot_open_its_catalog_degrades_the_site(
    cluster: Cluster, operator: Operator, namespace: str, tmp_path: Path
) -> None:
    # A Secret with a password but no address: neither `uri` nor `host`.
    data = {"dbname": "telerad", "user": "telerad", "password": PASSWORD}
    apply(
        cluster,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        },
    )
    apply(cluster, namespace, SITE_OBJECT)
    pod = eventually(lambda: gateway_pod(cluster, namespace), "the gateway's pod")

    # Mounted whole and read-only; the ConfigMap names only the directory.
    spec = pod["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "catalog"]
    assert volume["secret"]["secretName"] == SECRET
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "catalog"]
    assert mount["readOnly"] is True
    config = cluster.kubectl_json("-n", namespace, "get", "configmap", f"{SITE}-gateway")
    assert f"secretDir: {mount['mountPath']}" in config["data"]["gateway.yaml"]
    assert PASSWORD not in json.dumps(config)

    def read(kind: str, name: str) -> dict[str, Any] | None:
        found = cluster.kubectl("-n", namespace, "get", kind, name, "-o", "json", check=False)
        return json.loads(found.stdout) if found.returncode == 0 else None

    args = standin.prepare(pod, "gateway", read, tmp_path / "gateway")
    done = subprocess.run(
        [str(TELERAD), *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    # What the gateway wrote to its terminationMessagePath is what it printed last.
    (said,) = [line for line in done.stderr.splitlines() if line.startswith(STARTUP_ERROR)]
    message = said.removeprefix(STARTUP_ERROR)
    assert message.startswith("CatalogUnavailable: ")
    exited = {
        "name": "gateway",
        "ready": False,
        "restartCount": 1,
        "image": spec["containers"][0]["image"],
        "imageID": "",
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": message}},
    }
    report(cluster, namespace, pod, exited)

    def degraded() -> dict[str, Any]:
        return conditions(cluster, namespace).get("Degraded", {})

    eventually(lambda: degraded().get("reason") == "CatalogUnavailable", "CatalogUnavailable")
    assert degraded()["status"] == "True"
    assert "neither 'uri' nor 'host'" in degraded()["message"]
    assert pod["metadata"]["name"] in degraded()["message"]
    assert conditions(cluster, namespace)["Ready"]["status"] == "False"
    site = cluster.kubectl_json("-n", namespace, "get", "imagingsite", SITE)
    events = cluster.kubectl_json(
        "-n", namespace, "get", "events", "--field-selector", f"involvedObject.name={SITE}"
    )
    assert any(e["reason"] == "CatalogUnavailable" for e in events["items"])
    assert PASSWORD not in json.dumps(site) + json.dumps(events)

    # Running and ready again (the Secret fixed): the condition clears.
    started = {"startedAt": pod["metadata"]["creationTimestamp"]}
    running = {**exited, "ready": True, "state": {"running": started}}
    report(cluster, namespace, pod, running)
    eventually(lambda: degraded().get("status") == "False", "Degraded cleared", timeout=60)
