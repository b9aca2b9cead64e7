"""Run a pod's process here, in the pod's place.

The dev cluster has no kubelet and no container runtime: kwok marks pods Running and gives
them loopback addresses. This module does the rest of a kubelet's work for one container
of such a pod: it writes the pod's ConfigMap, Secret and projected volumes under a local
root, makes its emptyDir and claim mounts as directories, and rewrites the container's
config file so that every path in it points under that root and the process listens on
the pod's own address. The process then starts from exactly what the operator rendered,
and is reached the way the pod would be (by the operator's autoscaler, by Prometheus).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

Body = dict[str, Any]
Read = Callable[[str, str], Body | None]
"""(kind, name) -> the object from the API server, or None when it does not exist."""


class StandInError(Exception):
    pass


def _files(source: Body, kind: str, read: Read) -> dict[str, bytes]:
    name = source.get("name") or source.get("secretName", "")
    obj = read(kind, name)
    if obj is None:
        if source.get("optional"):
            return {}
        raise StandInError(f"{kind} {name!r} that the pod mounts does not exist")
    data = (
        {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        if kind == "ConfigMap"
        else {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    )
    if kind == "ConfigMap":
        data |= {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
    items = source.get("items")
    if not items:
        return data
    return {i["path"]: data[i["key"]] for i in items if i["key"] in data}


def _volume_files(volume: Body, read: Read) -> dict[str, bytes] | None:
    """Files of a volume by relative path; None for a directory volume (emptyDir, claim)."""
    if "configMap" in volume:
        return _files(volume["configMap"], "ConfigMap", read)
    if "secret" in volume:
        return _files(volume["secret"], "Secret", read)
    if "projected" in volume:
        files: dict[str, bytes] = {}
        for source in volume["projected"].get("sources", []):
            for key, kind in (("configMap", "ConfigMap"), ("secret", "Secret")):
                if key in source:
                    files |= _files(source[key], kind, read)
        return files
    if "emptyDir" in volume or "persistentVolumeClaim" in volume:
        return None
    raise StandInError(
        f"volume {volume['name']!r}: only configMap, secret, projected, "
        "emptyDir and persistentVolumeClaim volumes can stand in here"
    )


def current_pod(pods: list[Body], deployment: Body) -> Body | None:
    """A pod that has its address and runs the Deployment's current template (the
    template's annotations, its config hash among them): the one to stand in for."""
    want = deployment["spec"]["template"]["metadata"].get("annotations") or {}
    for pod in pods:
        have = pod["metadata"].get("annotations") or {}
        if (pod.get("status") or {}).get("podIP") and want.items() <= have.items():
            return pod
    return None


def local(path: str, root: Path) -> Path:
    return root / PurePosixPath(path).relative_to("/")


def materialize(pod: Body, container: str, read: Read, root: Path) -> list[str]:
    """Write the volumes `container` mounts under `root`; return their mount paths."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    spec = next(c for c in pod["spec"]["containers"] if c["name"] == container)
    mounts = []
    for mount in spec.get("volumeMounts", []):
        target = local(mount["mountPath"], root)
        target.mkdir(parents=True, exist_ok=True)
        files = _volume_files(volumes[mount["name"]], read)
        for relative, content in (files or {}).items():
            path = target / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(0o600)
        mounts.append(mount["mountPath"])
    return mounts


def _moved(value: Any, mounts: list[str], root: Path, hosts: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _moved(v, mounts, root, hosts) for k, v in value.items()}
    if isinstance(value, list):
        return [_moved(v, mounts, root, hosts) for v in value]
    if isinstance(value, str) and any(
        value == m or value.startswith(m.rstrip("/") + "/") for m in mounts
    ):
        return str(local(value, root))
    if isinstance(value, str):
        for name, address in hosts.items():
            value = value.replace(f"//{name}:", f"//{address}:")
    return value


def prepare(
    pod: Body, container: str, read: Read, root: Path, hosts: Mapping[str, str] | None = None
) -> list[str]:
    """The command line that runs `container` of `pod` here: its volumes written under
    `root`, and its `--config` file rewritten to those paths, the pod's address, and the
    addresses `hosts` gives Service names in URLs (the cluster DNS this machine lacks)."""
    mounts = materialize(pod, container, read, root)
    spec = next(c for c in pod["spec"]["containers"] if c["name"] == container)
    args = list(spec.get("args", []))
    if "--config" not in args:
        raise StandInError(f"container {container!r} has no --config argument")
    at = args.index("--config") + 1
    config_path = local(args[at], root)
    config = yaml.safe_load(config_path.read_text())
    config = _moved(config, mounts, root, hosts or {})
    config["bindAddress"] = pod["status"]["podIP"]
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    args[at] = str(config_path)
    return args
