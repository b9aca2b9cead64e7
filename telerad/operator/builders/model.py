"""An AIModel's children: worker ConfigMap, Deployment and metrics Service."""

from __future__ import annotations

from pathlib import Path

import yaml

from telerad.api import names
from telerad.api.aimodel import AIModel
from telerad.api.config import GatewayEndpoint, WorkerConfig
from telerad.api.site import ImagingSite
from telerad.operator.builders.common import (
    CONFIG_HASH_ANNOTATION,
    CONTAINER_SECURITY,
    POD_SECURITY,
    Manifest,
    config_hash,
    metadata,
    resources,
)
from telerad.operator.settings import OperatorSettings

COMPONENT = "worker"
METRICS_PORT = 9090
CONFIG_DIR = Path("/etc/telerad")
CONFIG_FILE = "worker.yaml"
GATEWAYS_DIR = Path("/etc/telerad/gateways")
# The key of a site's access Secret that holds the token its model workers use.
WORKER_TOKEN_KEY = "worker"  # noqa: S105  (the name of a key, not a secret)
GPU = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"


def fixed_replicas(model: AIModel) -> int | None:
    """The replicas the Deployment is applied with: spec.replicas when a person (kubectl
    scale) or an autoscaler of the AIModel set it. None leaves them out of the applied
    object, to the operator's autoscaler (or an HPA of the Deployment) through the scale
    subresource; a new Deployment starts with one worker."""
    return model.spec.replicas


def _endpoint(name: str, site: ImagingSite, namespace: str) -> GatewayEndpoint:
    scheme = "https" if site.spec.tls is not None else "http"
    host = f"{names.site_child(name, 'gateway')}.{namespace}.svc"
    return GatewayEndpoint(
        site=name,
        url=f"{scheme}://{host}:{site.spec.http_port}",
        token_file=GATEWAYS_DIR / name / "token" if site.spec.access is not None else None,
        ca_file=GATEWAYS_DIR / name / "ca.crt" if site.spec.tls is not None else None,
    )


def worker_config(model: AIModel, namespace: str, gateways: dict[str, ImagingSite]) -> WorkerConfig:
    """``gateways``: the sites whose rules route to this model, by name."""
    return WorkerConfig(
        model=model.spec.model,
        name=model.metadata.name,
        gateways=[_endpoint(name, site, namespace) for name, site in sorted(gateways.items())],
        third_party=model.spec.third_party,
        inference_server=model.spec.inference_server,
        thresholds=model.spec.thresholds,
        device="auto" if model.spec.gpu.count else "cpu",
        metrics_port=METRICS_PORT,
    )


def config_map(owner: Manifest, config: WorkerConfig) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(owner, names.model_child(owner["metadata"]["name"]), COMPONENT),
        "data": {
            CONFIG_FILE: yaml.dump(config.to_wire(), Dumper=yaml.CSafeDumper, sort_keys=False)
        },
    }


def _gateway_volumes(gateways: dict[str, ImagingSite]) -> list[Manifest]:
    """Per site: its client token (the `worker` key of its access Secret) and the CA of
    its HTTPS certificate, side by side in one directory. Only those keys are mounted."""
    volumes = []
    for name, site in sorted(gateways.items()):
        sources: list[Manifest] = []
        if site.spec.access is not None:
            secret = site.spec.access.token_secret_name
            items = [{"key": WORKER_TOKEN_KEY, "path": "token"}]
            sources.append({"secret": {"name": secret, "items": items}})
        if site.spec.tls is not None:
            items = [{"key": "ca.crt", "path": "ca.crt"}]
            sources.append({"secret": {"name": site.spec.tls.secret_name, "items": items}})
        if sources:
            volumes.append({"name": f"gw-{name}", "projected": {"sources": sources}})
    return volumes


def deployment(
    owner: Manifest,
    model: AIModel,
    config: Manifest,
    settings: OperatorSettings,
    gateways: dict[str, ImagingSite] | None = None,
) -> Manifest:
    model_name = owner["metadata"]["name"]
    name = names.model_child(model_name)
    gpu = model.spec.gpu
    res = resources(model.spec.resources)
    node_selector = dict(gpu.node_selector)
    tolerations = [t.to_wire() for t in gpu.tolerations]
    if gpu.count:
        # Extended resources are requested through limits; requests default to them.
        res["limits"] = {**res.get("limits", {}), GPU: str(gpu.count)}
        tolerations.insert(0, {"key": GPU, "operator": "Exists", "effect": "NoSchedule"})
        if gpu.product:
            node_selector[GPU_PRODUCT_LABEL] = gpu.product
    pod: Manifest = {
        "automountServiceAccountToken": False,
        "securityContext": POD_SECURITY,
        "containers": [
            {
                "name": COMPONENT,
                "image": model.spec.image,
                "imagePullPolicy": settings.image_pull_policy,
                "args": [COMPONENT, "--config", str(CONFIG_DIR / CONFIG_FILE)],
                "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
                "readinessProbe": {
                    "httpGet": {"path": "/healthz", "port": "metrics"},
                    "periodSeconds": 5,
                },
                "livenessProbe": {
                    "httpGet": {"path": "/healthz", "port": "metrics"},
                    "periodSeconds": 10,
                },
                "resources": res,
                "securityContext": CONTAINER_SECURITY,
                "volumeMounts": [
                    {"name": "config", "mountPath": str(CONFIG_DIR), "readOnly": True},
                    {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108  (read-only root filesystem)
                ],
            }
        ],
        "volumes": [
            {"name": "config", "configMap": {"name": name}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    for volume in _gateway_volumes(gateways or {}):
        pod["volumes"].append(volume)
        pod["containers"][0]["volumeMounts"].append(
            {
                "name": volume["name"],
                "mountPath": str(GATEWAYS_DIR / volume["name"].removeprefix("gw-")),
                "readOnly": True,
            }
        )
    if node_selector:
        pod["nodeSelector"] = node_selector
    if tolerations:
        pod["tolerations"] = tolerations
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(owner, name, COMPONENT),
        "spec": {
            **({"replicas": fixed} if (fixed := fixed_replicas(model)) is not None else {}),
            "selector": {"matchLabels": names.selector_labels(model_name, COMPONENT)},
            "template": {
                "metadata": {
                    "labels": names.labels(model_name, COMPONENT),
                    "annotations": {CONFIG_HASH_ANNOTATION: config_hash(config["data"])},
                },
                "spec": pod,
            },
        },
    }


def service(owner: Manifest) -> Manifest:
    model_name = owner["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, names.model_child(model_name), COMPONENT),
        "spec": {
            "type": "ClusterIP",
            "selector": names.selector_labels(model_name, COMPONENT),
            "ports": [
                {
                    "name": "metrics",
                    "port": METRICS_PORT,
                    "targetPort": "metrics",
                    "protocol": "TCP",
                }
            ],
        },
    }


def children(
    owner: Manifest,
    model: AIModel,
    gateways: dict[str, ImagingSite],
    settings: OperatorSettings,
) -> list[Manifest]:
    config = config_map(owner, worker_config(model, owner["metadata"]["namespace"], gateways))
    return [config, service(owner), deployment(owner, model, config, settings, gateways)]
