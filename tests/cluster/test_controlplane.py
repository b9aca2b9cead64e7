"""The local control plane behaves as Kubernetes documents: the acceptance tests of the
foundation issue, run against the real binaries."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from lightkube import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta, OwnerReference
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.core_v1 import ConfigMap

from tests.cluster.conftest import Cluster, pinned_k8s_version

T = TypeVar("T")


def eventually(probe: Callable[[], T | None], what: str, timeout: float = 60) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.25)


def test_server_reports_pinned_version(cluster: Cluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    server = version["serverVersion"]
    if not cluster.local:
        pytest.skip(f"external cluster runs {server['gitVersion']}, not the pinned build")
    pinned = pinned_k8s_version()
    assert server["gitVersion"] == pinned
    assert (server["major"], server["minor"]) == ("1", pinned.split(".")[1])
    assert version["clientVersion"]["gitVersion"] == pinned


def test_fake_nodes_advertise_gpus(cluster: Cluster) -> None:
    nodes = {n["metadata"]["name"]: n for n in cluster.kubectl_json("get", "nodes")["items"]}
    gpu_nodes = [n for n in nodes.values() if "nvidia.com/gpu.product" in n["metadata"]["labels"]]
    assert len(gpu_nodes) >= 2
    for node in gpu_nodes:
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    cpu_nodes = [n for n in nodes.values() if "nvidia.com/gpu" not in n["status"]["allocatable"]]
    assert len(cpu_nodes) >= 2


def _gpu_pod_spec(gpus: int) -> dict[str, Any]:
    return {
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [
            {
                "name": "infer",
                "image": "registry.invalid/telerad/worker:test",
                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
            }
        ],
    }


def _deployment(name: str, replicas: int, gpus: int) -> str:
    labels = {"app": name}
    return json.dumps(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": _gpu_pod_spec(gpus)},
            },
        }
    )


def test_gpu_pods_run_on_gpu_nodes_only(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=_deployment("infer", 4, 1))

    def running_pods() -> list[Any] | None:
        pods = cluster.kubectl_json("-n", namespace, "get", "pods", "-l", "app=infer")["items"]
        running = [p for p in pods if p["status"].get("phase") == "Running"]
        return running if len(running) == 4 else None

    pods = eventually(running_pods, "4 GPU pods Running")
    gpu_nodes = {
        n["metadata"]["name"]
        for n in cluster.kubectl_json("get", "nodes", "-l", "nvidia.com/gpu.product")["items"]
    }
    assert {p["spec"]["nodeName"] for p in pods} <= gpu_nodes
    assert all(p["status"].get("podIP") for p in pods)


def test_pod_asking_for_more_gpus_than_a_node_has_stays_pending(
    cluster: Cluster, namespace: str
) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "too-big"},
        "spec": _gpu_pod_spec(9),
    }
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(pod))

    def unschedulable() -> dict[str, Any] | None:
        got = cluster.kubectl_json("-n", namespace, "get", "pod", "too-big")
        for cond in got["status"].get("conditions", []):
            if cond["type"] == "PodScheduled" and cond.get("reason") == "Unschedulable":
                return got
        return None

    got = eventually(unschedulable, "the scheduler to mark the pod Unschedulable")
    assert got["status"]["phase"] == "Pending"
    assert "spec" in got
    assert not got["spec"].get("nodeName")
    message = next(c["message"] for c in got["status"]["conditions"] if c["type"] == "PodScheduled")
    assert "Insufficient nvidia.com/gpu" in message


def test_deleting_owner_garbage_collects_dependents(cluster: Cluster, namespace: str) -> None:
    client = cluster.client(namespace)
    owner = client.create(ConfigMap(metadata=ObjectMeta(name="owner"), data={"a": "1"}))
    assert owner.metadata is not None
    ref = OwnerReference(
        apiVersion="v1",
        kind="ConfigMap",
        name="owner",
        uid=str(owner.metadata.uid),
        controller=True,
        blockOwnerDeletion=True,
    )
    client.create(ConfigMap(metadata=ObjectMeta(name="child", ownerReferences=[ref])))
    client.create(ConfigMap(metadata=ObjectMeta(name="bystander")))
    client.delete(ConfigMap, "owner")

    def child_gone() -> bool:
        try:
            client.get(ConfigMap, "child")
        except ApiError as err:
            return err.status.code == 404
        return False

    eventually(child_gone, "the garbage collector to delete the dependent")
    assert client.get(ConfigMap, "bystander").metadata is not None


def test_deployment_cascade_creates_and_deletes_replicasets(
    cluster: Cluster, namespace: str
) -> None:
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=_deployment("cascade", 1, 1))
    eventually(
        lambda: cluster.kubectl_json("-n", namespace, "get", "replicasets")["items"],
        "the Deployment controller to create a ReplicaSet",
    )
    cluster.kubectl("-n", namespace, "delete", "deployment", "cascade", "--wait=false")
    eventually(
        lambda: not cluster.kubectl_json("-n", namespace, "get", "replicasets,pods")["items"],
        "ReplicaSets and pods to be garbage collected",
    )


@pytest.fixture
def widget_crd(cluster: Cluster) -> Iterator[str]:
    """A CRD of its own per test, so schema changes never leak between tests."""
    group = f"t{uuid.uuid4().hex[:8]}.telerad.io"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {
                                        "minReplicas": {"type": "integer", "default": 0},
                                        "maxReplicas": {"type": "integer"},
                                    },
                                    "x-kubernetes-validations": [
                                        {
                                            "rule": "self.minReplicas <= self.maxReplicas",
                                            "message": "minReplicas must not exceed maxReplicas",
                                        }
                                    ],
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(crd))
    cluster.kubectl("wait", "--for=condition=Established", f"crd/widgets.{group}", "--timeout=60s")
    try:
        yield group
    finally:
        cluster.client().delete(CustomResourceDefinition, f"widgets.{group}")


def test_cel_rule_rejects_with_its_message(
    cluster: Cluster, namespace: str, widget_crd: str
) -> None:
    bad = {
        "apiVersion": f"{widget_crd}/v1",
        "kind": "Widget",
        "metadata": {"name": "bad"},
        "spec": {"minReplicas": 5, "maxReplicas": 2},
    }
    proc = cluster.kubectl("-n", namespace, "create", "-f", "-", input=json.dumps(bad), check=False)
    assert proc.returncode != 0
    assert "minReplicas must not exceed maxReplicas" in proc.stderr
    assert "Invalid value" in proc.stderr


def test_structural_schema_prunes_unknown_fields_and_defaults(
    cluster: Cluster, namespace: str, widget_crd: str
) -> None:
    Widget = create_namespaced_resource(widget_crd, "v1", "Widget", "widgets")
    client = cluster.client(namespace)
    client.create(Widget(metadata=ObjectMeta(name="w"), spec={"maxReplicas": 3, "colour": "blue"}))
    spec = client.get(Widget, "w")["spec"]
    assert spec == {"maxReplicas": 3, "minReplicas": 0}


def test_server_side_apply_conflicts_between_field_managers(
    cluster: Cluster, namespace: str
) -> None:
    client = cluster.client(namespace)

    def cm(**data: str) -> ConfigMap:
        return ConfigMap(
            apiVersion="v1", kind="ConfigMap", metadata=ObjectMeta(name="shared"), data=data
        )

    client.apply(cm(colour="red", size="s"), field_manager="alice")
    # A field no one else owns is shared without conflict.
    client.apply(cm(owner="bob"), field_manager="bob")
    with pytest.raises(ApiError) as conflict:
        client.apply(cm(colour="blue"), field_manager="bob")
    assert conflict.value.status.code == 409
    assert conflict.value.status.reason == "Conflict"
    assert 'conflict with "alice"' in str(conflict.value.status.message)
    assert ".data.colour" in str(conflict.value.status.message)
    assert client.get(ConfigMap, "shared").data == {"colour": "red", "size": "s", "owner": "bob"}

    # Forcing takes ownership; alice keeps the field she did not lose.
    client.apply(cm(colour="blue"), field_manager="bob", force=True)
    got = client.get(ConfigMap, "shared")
    assert got.data == {"colour": "blue", "size": "s"}
    assert got.metadata is not None
    assert got.metadata.managedFields is not None
    owners = {m.manager: json.dumps(m.fieldsV1) for m in got.metadata.managedFields}
    assert "f:colour" in owners["bob"]
    assert "f:colour" not in owners["alice"]


def test_claims_are_provisioned_bound_and_reclaimed(cluster: Cluster, namespace: str) -> None:
    if not cluster.local:
        pytest.skip("the hostPath provisioner belongs to the local control plane")
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "fast-ssd",
            "resources": {"requests": {"storage": "5Gi"}},
        },
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "user"},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "image": "registry.invalid/x",
                    "volumeMounts": [{"name": "d", "mountPath": "/d"}],
                }
            ],
            "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}],
        },
    }
    for obj in (claim, pod):
        cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(obj))
    eventually(
        lambda: (
            cluster.kubectl_json("-n", namespace, "get", "pod", "user")["status"].get("phase")
            == "Running"
        ),
        "the pod with a claim to run",
    )
    bound = cluster.kubectl_json("-n", namespace, "get", "pvc", "data")
    assert bound["status"]["phase"] == "Bound"
    volume = bound["spec"]["volumeName"]
    pv = cluster.kubectl_json("get", "pv", volume)
    assert pv["spec"]["capacity"]["storage"] == "5Gi"
    assert pv["spec"]["storageClassName"] == "fast-ssd"
    cluster.kubectl("-n", namespace, "delete", "pod", "user", "--wait=true")
    cluster.kubectl("-n", namespace, "delete", "pvc", "data", "--wait=true")
    eventually(
        lambda: cluster.kubectl("get", "pv", volume, check=False).returncode != 0,
        "the released volume to be deleted",
    )
