"""A real Kubernetes control plane for the cluster tests.

One control plane per session, started from the binaries of hack/build-k8s.sh, or an
existing cluster when TELERAD_TEST_KUBECONFIG points at one. Each test gets a namespace of
its own. A control plane that fails to start errors every test with its log tail: a
missing component is never a skip.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import yaml
from lightkube import Client, KubeConfig
from lightkube.config import client_adapter
from lightkube.config.client_adapter import ConnectionParams
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace

from telerad.api.crd import KINDS
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


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-k", str(ROOT / "crds"))
    for kind in KINDS:
        cluster.kubectl(
            "wait", "--for=condition=Established", f"crd/{kind.plural}.telerad.io", "--timeout=60s"
        )


OPERATOR_USER = "system:serviceaccount:telerad-system:telerad-operator"


@dataclass
class Operator:
    """`telerad operator` as a separate process, authenticated as its ServiceAccount."""

    cluster: Cluster
    kubeconfig: Path
    log: Path
    resync_seconds: float
    metrics_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.metrics_port, liveness = _free_port(), _free_port()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "telerad"),
                    "operator",
                    f"--resync-seconds={self.resync_seconds}",
                    f"--metrics-port={self.metrics_port}",
                    f"--liveness-port={liveness}",
                    "--autoscale-interval-seconds=1",
                    "--log-format=plain",
                ],
                env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{liveness}/healthz", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"operator liveness never answered:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a node failure or the OOM killer would: no cleanup of any kind."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    def writes_in(
        self, namespace: str, since: datetime.datetime
    ) -> list[tuple[str, dict[str, Any]]]:
        """(verb, object) of the writes the operator's ServiceAccount sent to objects in
        ``namespace`` since ``since``, from the API server's audit log."""
        return [
            (w["verb"], w["objectRef"])
            for w in self.writes_since(since)
            if w["objectRef"].get("namespace") == namespace
        ]

    def writes_since(self, since: datetime.datetime) -> list[dict[str, Any]]:
        """Write requests the operator's ServiceAccount sent, from the audit log."""
        if self.cluster.plane is None:
            pytest.skip("counting writes needs the local control plane's audit log")
        found = []
        for line in self.cluster.plane.audit_log.read_text().splitlines():
            entry = json.loads(line)
            when = datetime.datetime.fromisoformat(
                entry["requestReceivedTimestamp"].replace("Z", "+00:00")
            )
            if entry["user"]["username"] == OPERATOR_USER and when >= since:
                found.append(entry)
        return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_account_kubeconfig(cluster: Cluster, path: Path, namespace: str, name: str) -> Path:
    token = cluster.kubectl(
        "-n", namespace, "create", "token", name, "--duration=6h"
    ).stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [
            {"name": name, "context": {"cluster": admin["clusters"][0]["name"], "user": name}}
        ],
        "current-context": name,
    }
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def operator(
    cluster: Cluster, crds: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    """The operator with its production RBAC (manifests/rbac), not as cluster admin."""
    if cluster.kubectl("get", "namespace", "telerad-system", check=False).returncode != 0:
        cluster.kubectl("create", "namespace", "telerad-system")
    cluster.kubectl("apply", "--server-side", "-k", str(ROOT / "manifests" / "rbac"))
    work = tmp_path_factory.mktemp("operator")
    kubeconfig = service_account_kubeconfig(
        cluster, work / "kubeconfig", "telerad-system", "telerad-operator"
    )
    op = Operator(cluster, kubeconfig, work / "operator.log", resync_seconds=3)
    op.start()
    try:
        yield op
    finally:
        op.stop()
