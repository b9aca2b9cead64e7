"""A real Kubernetes control plane for the cluster tests.

One control plane per session, started from the binaries of hack/build-k8s.sh, or an
existing cluster when TELERAD_TEST_KUBECONFIG points at one. Each test gets a namespace of
its own. A control plane that fails to start errors every test with its log tail: a
missing component is never a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from lightkube import Client, KubeConfig
from lightkube.config import client_adapter
from lightkube.config.client_adapter import ConnectionParams
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace

from telerad.devcluster import ControlPlane

ROOT = Path(__file__).resolve().parents[2]


def pinned_k8s_version() -> str:
    for line in (ROOT / "hack/k8s-bins/go.mod").read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["k8s.io/kubernetes"] and parts[1].startswith("v"):
            return parts[1]
    raise AssertionError("hack/k8s-bins/go.mod does not pin k8s.io/kubernetes")


def k8s_bin_dir() -> Path:
    if env := os.environ.get("TELERAD_K8S_BIN"):
        return Path(env)
    # Idempotent: prints the cache directory at once when the binaries are built.
    out = subprocess.run(
        [ROOT / "hack/build-k8s.sh"], check=True, capture_output=True, text=True
    ).stdout
    return Path(out.strip().splitlines()[-1])


@dataclass
class Cluster:
    kubeconfig: Path
    kubectl_path: str
    plane: ControlPlane | None

    @property
    def local(self) -> bool:
        return self.plane is not None

    def client(self, namespace: str | None = None) -> Client:
        return Client(
            KubeConfig.from_file(self.kubeconfig),
            namespace=namespace,
            field_manager="telerad-tests",
        )

    def http(self) -> httpx.Client:
        """A raw HTTP client with the kubeconfig's credentials, for calls that must be fast."""
        return client_adapter.Client(
            KubeConfig.from_file(self.kubeconfig).get(), ConnectionParams()
        )

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.kubectl_path, f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{proc.stderr}")
        return proc

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if external := os.environ.get("TELERAD_TEST_KUBECONFIG"):
        yield Cluster(Path(external), "kubectl", None)
        return
    bin_dir = k8s_bin_dir()
    state_dir = tmp_path_factory.mktemp("controlplane")
    # etcd on tmpfs when there is one: the tests never need its data to survive.
    shm = Path("/dev/shm")  # noqa: S108
    etcd_dir = shm / f"telerad-etcd-{uuid.uuid4().hex[:8]}" if os.access(shm, os.W_OK) else None
    plane = ControlPlane(bin_dir=bin_dir, state_dir=state_dir, etcd_data_dir=etcd_dir)
    plane.start()
    try:
        yield Cluster(plane.kubeconfig, str(bin_dir / "kubectl"), plane)
    finally:
        plane.stop()
        if etcd_dir is not None:
            subprocess.run(["rm", "-rf", str(etcd_dir)], check=False)


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    stem = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40]
    name = f"t-{stem.strip('-')}-{uuid.uuid4().hex[:5]}"
    client = cluster.client()
    client.create(Namespace(metadata=ObjectMeta(name=name)))
    try:
        yield name
    finally:
        client.delete(Namespace, name)
