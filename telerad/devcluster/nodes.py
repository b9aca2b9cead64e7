"""The fake nodes kwok manages: two CPU nodes and two GPU nodes.

Node status may be set on create (kubelet relies on it) and kwok's node-initialize stage
keeps the given capacity, so a node advertises ``nvidia.com/gpu`` like one running
NVIDIA's device plugin. GPU nodes carry the label GPU Feature Discovery sets and the taint
managed GPU node pools add, so only workloads that tolerate it land there.
"""

from __future__ import annotations

from typing import Any

FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
GPUS_PER_NODE = 8
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
NOT_READY_TAINT = "node.kubernetes.io/not-ready"


def _node(name: str, capacity: dict[str, str], labels: dict[str, str], taints: list[Any]) -> Any:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {FAKE_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                **labels,
            },
        },
        "spec": {"taints": taints},
        "status": {"capacity": capacity, "allocatable": capacity, "phase": "Running"},
    }


def fake_nodes() -> list[Any]:
    cpu = {"cpu": "16", "memory": "64Gi", "pods": "110"}
    gpu = {"cpu": "64", "memory": "512Gi", "pods": "110", GPU_RESOURCE: str(GPUS_PER_NODE)}
    gpu_labels = {GPU_PRODUCT_LABEL: GPU_PRODUCT, "nvidia.com/gpu.present": "true"}
    return [_node(f"cpu-{i}", cpu, {}, []) for i in range(2)] + [
        _node(f"gpu-{i}", gpu, gpu_labels, [GPU_TAINT]) for i in range(2)
    ]


def node_is_schedulable(node: Any) -> bool:
    """Ready, and the node lifecycle controller has lifted the not-ready taint."""
    conditions = node.get("status", {}).get("conditions", [])
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
    taints = node.get("spec", {}).get("taints") or []
    return ready and not any(t["key"] == NOT_READY_TAINT for t in taints)
