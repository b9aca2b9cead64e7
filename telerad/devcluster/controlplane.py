"""Start, wait for and stop a local Kubernetes control plane.

Flags follow controller-runtime's envtest for etcd and kube-apiserver, plus
kube-controller-manager (garbage collection, Deployments, node lifecycle), kube-scheduler
and kwok, which turns fake nodes Ready and pods bound to them Running.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from telerad.devcluster.nodes import FAKE_NODE_ANNOTATION, fake_nodes, node_is_schedulable
from telerad.devcluster.pki import Pki, write_kubeconfig
from telerad.devcluster.process import (
    ControlPlaneError,
    Process,
    executable_of,
    log_tail,
    stop_group,
)
from telerad.devcluster.provisioner import PROVISIONER

SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"
# kwok gives pods addresses from this loopback range, so a process run here in a pod's
# place (a gateway, a worker, a metrics stand-in) is reached at the pod's own IP, as
# Prometheus and the operator's autoscaler reach pods in a real cluster. The cost: the
# EndpointSlice controller refuses loopback addresses, so Services have no endpoints
# (there is no kube-proxy here to use them anyway).
KWOK_POD_CIDR = "127.244.0.1/16"
STATE_FILE = "state.json"
COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "provisioner",
)
# Every write (not read) is recorded, so tests can count what a client changed.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "Metadata", "verbs": ["create", "update", "patch", "delete", "deletecollection"]},
        {"level": "None"},
    ],
}
STORAGE_CLASSES = ("standard", "fast-ssd", "standard-hdd")


def _storage_class(name: str, default: bool) -> Any:
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": name,
            "annotations": {"storageclass.kubernetes.io/is-default-class": str(default).lower()},
        },
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
        "allowVolumeExpansion": True,
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _answers_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    return _http_get(url, context)[0] == 200


def _http_get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as resp:  # noqa: S310
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


@dataclass
class ControlPlane:
    """A control plane whose processes, certificates, logs and data live in ``state_dir``."""

    bin_dir: Path
    state_dir: Path
    etcd_data_dir: Path | None = None
    processes: list[Process] = field(default_factory=list)
    server: str = ""
    context: ssl.SSLContext | None = field(default=None, repr=False)
    """TLS to the API server as its admin, once it runs."""

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def audit_log(self) -> Path:
        """JSON lines, one per write request the API server handled."""
        return self.logs_dir / "audit.log"

    def binary(self, name: str) -> Path:
        path = self.bin_dir / name
        if not os.access(path, os.X_OK):
            raise ControlPlaneError(f"{path} is missing; build it with hack/build-k8s.sh")
        return path

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 180.0) -> None:
        """Start every component and return once nodes are schedulable. On failure,
        everything started so far is stopped and the error names the component."""
        deadline = time.monotonic() + timeout
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start(deadline)
        except BaseException:
            self.stop()
            raise

    def _start(self, deadline: float) -> None:
        pki = Pki.create(self.state_dir / "pki")
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        self.server = f"https://127.0.0.1:{api_port}"
        write_kubeconfig(self.kubeconfig, self.server, pki.ca_cert, pki.admin)
        data_dir = self.etcd_data_dir or self.state_dir / "etcd"
        shutil.rmtree(data_dir, ignore_errors=True)

        etcd = self._spawn(
            "etcd",
            "--name=telerad-dev",
            f"--data-dir={data_dir}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=telerad-dev=http://127.0.0.1:{peer_port}",
            # A throwaway cluster: durability costs seconds per test and buys nothing.
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        )
        self._wait(
            etcd,
            "etcd /health",
            lambda: b'"health":"true"' in _http_get(f"http://127.0.0.1:{etcd_port}/health")[1],
            deadline,
        )

        audit_policy = self.state_dir / "audit-policy.yaml"
        audit_policy.write_text(json.dumps(AUDIT_POLICY))
        apiserver = self._spawn(
            "kube-apiserver",
            f"--audit-policy-file={audit_policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            "--audit-log-maxsize=200",
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1",
            f"--secure-port={api_port}",
            f"--cert-dir={self.state_dir / 'apiserver-certs'}",
            f"--tls-cert-file={pki.apiserver_cert}",
            f"--tls-private-key-file={pki.apiserver_key}",
            f"--client-ca-file={pki.ca_cert}",
            f"--service-account-issuer={self.server}",
            f"--service-account-key-file={pki.service_account_key}",
            f"--service-account-signing-key-file={pki.service_account_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            # With it, pods created right after their namespace race the controller that
            # creates the namespace's default ServiceAccount.
            "--disable-admission-plugins=ServiceAccount",
            # The advertise address is loopback, which Endpoints validation refuses.
            "--endpoint-reconciler-type=none",
        )
        ctx = self.context = self.ssl_context(pki)
        self._wait(
            apiserver,
            "kube-apiserver /readyz",
            lambda: (
                _answers_ok(f"{self.server}/readyz", ctx)
                and _answers_ok(f"{self.server}/api/v1/namespaces/default", ctx)
            ),
            deadline,
        )

        for i, name in enumerate(STORAGE_CLASSES):
            self._request(
                "POST", "/apis/storage.k8s.io/v1/storageclasses", _storage_class(name, i == 0), ctx
            )
        provisioner = self._spawn(
            "provisioner",
            f"--server={self.server}",
            f"--ca={pki.ca_cert}",
            f"--cert={pki.admin.cert}",
            f"--key={pki.admin.key}",
            f"--root={self.state_dir / 'volumes'}",
            exe=Path(sys.executable),
            module="telerad.devcluster.provisioner",
        )

        kcm_port, sched_port = free_port(), free_port()
        health_paths = "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics"
        kcm = self._spawn(
            "kube-controller-manager",
            f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={kcm_port}",
            health_paths,
            f"--service-account-private-key-file={pki.service_account_key}",
            f"--root-ca-file={pki.ca_cert}",
            f"--cluster-cidr={POD_CIDR}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--kube-api-qps=100",
            "--kube-api-burst=200",
        )
        scheduler_config = self.state_dir / "scheduler.yaml"
        scheduler_config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubescheduler.config.k8s.io/v1",
                    "kind": "KubeSchedulerConfiguration",
                    "clientConnection": {"kubeconfig": str(self.kubeconfig)},
                    "leaderElection": {"leaderElect": False},
                }
            )
        )
        scheduler = self._spawn(
            "kube-scheduler",
            f"--config={scheduler_config}",
            "--bind-address=127.0.0.1",
            f"--secure-port={sched_port}",
            health_paths,
        )
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        for proc, port in ((kcm, kcm_port), (scheduler, sched_port)):
            url = f"https://127.0.0.1:{port}/healthz"
            self._wait(proc, f"{proc.name} /healthz", partial(_answers_ok, url, insecure), deadline)

        kwok_home = self.state_dir / "kwok-home"  # kwok also reads ~/.kwok/kwok.yaml
        kwok_home.mkdir(exist_ok=True)
        kwok = self._spawn(
            "kwok",
            f"--kubeconfig={self.kubeconfig}",
            f"--config={self.bin_dir / 'kwok-stages.yaml'}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
            "--node-lease-duration-seconds=40",
            f"--cidr={KWOK_POD_CIDR}",
            "--node-ip=10.244.0.1",
            f"--server-address=127.0.0.1:{free_port()}",
            env={**os.environ, "HOME": str(kwok_home)},
        )
        self.write_state()
        for node in fake_nodes():
            self._request("POST", "/api/v1/nodes", node, ctx)
        names = {n["metadata"]["name"] for n in fake_nodes()}

        def nodes_ready() -> bool:
            items = json.loads(self._request("GET", "/api/v1/nodes", None, ctx))["items"]
            ready = {n["metadata"]["name"] for n in items if node_is_schedulable(n)}
            return names <= ready

        self._wait(kwok, "fake nodes Ready and untainted", nodes_ready, deadline)
        self._wait(
            provisioner,
            "provisioner serving",
            lambda: "serving" in log_tail(provisioner.log),
            deadline,
        )
        # The serviceaccount controller running is the sign that kcm's controllers started.
        self._wait(
            kcm,
            "default ServiceAccount",
            partial(
                _answers_ok, f"{self.server}/api/v1/namespaces/default/serviceaccounts/default", ctx
            ),
            deadline,
        )

    def restart(self, name: str, down: float = 0.0, timeout: float = 60.0) -> None:
        """Crash one component (SIGKILL to its process group), leave it down `down`
        seconds, and start it again with the same command line and data; return once the
        API server is ready again. Any other component that died meanwhile is an error."""
        proc = next((p for p in self.processes if p.name == name), None)
        if proc is None or proc.popen is None or self.context is None:
            raise ControlPlaneError(f"no running component named {name!r}")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.popen.wait()
        time.sleep(down)
        proc.start()
        self.write_state()
        ready = partial(_answers_ok, f"{self.server}/readyz", self.context)
        self._wait(
            proc, f"the API server ready after restarting {name}", ready, time.monotonic() + timeout
        )

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
        (self.state_dir / STATE_FILE).unlink(missing_ok=True)

    # ------------------------------------------------------------------ detached use

    def write_state(self) -> None:
        state = {
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "bin_dir": str(self.bin_dir),
            "processes": [
                {"name": p.name, "pid": p.pid, "exe": str(Path(p.argv[0]).resolve())}
                for p in self.processes
            ],
        }
        (self.state_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    @classmethod
    def running_processes(cls, state_dir: Path) -> Iterator[tuple[str, int]]:
        """(name, pid) of the components recorded in ``state_dir`` that still run."""
        try:
            state = json.loads((state_dir / STATE_FILE).read_text())
        except FileNotFoundError:
            return
        for entry in state["processes"]:
            exe = executable_of(int(entry["pid"]))
            # State files written before "exe" was recorded name a binary in bin_dir.
            expected = Path(entry.get("exe") or Path(state["bin_dir"]) / entry["name"])
            if exe is not None and exe.resolve() == expected.resolve():
                yield entry["name"], int(entry["pid"])

    @classmethod
    def stop_detached(cls, state_dir: Path) -> list[str]:
        """Stop a control plane started by another process; return the components stopped."""
        stopped = []
        for name, pid in reversed(list(cls.running_processes(state_dir))):
            stop_group(pid)
            stopped.append(name)
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        return stopped

    # ------------------------------------------------------------------ helpers

    def ssl_context(self, pki: Pki) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        ctx.load_cert_chain(str(pki.admin.cert), str(pki.admin.key))
        return ctx

    def _spawn(
        self,
        name: str,
        *args: str,
        env: dict[str, str] | None = None,
        exe: Path | None = None,
        module: str | None = None,
    ) -> Process:
        prefix = [str(exe), "-m", module] if exe and module else [str(self.binary(name))]
        proc = Process(name, [*prefix, *args], self.logs_dir / f"{name}.log", env)
        self.processes.append(proc.start())
        return proc

    def _wait(self, proc: Process, what: str, ready: Callable[[], bool], deadline: float) -> None:
        while True:
            for p in self.processes:
                p.check_alive()
            if ready():
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"timed out waiting for {what}; log {proc.log}, tail:\n{log_tail(proc.log)}"
                )
            time.sleep(0.2)

    def _request(self, method: str, path: str, body: Any, ctx: ssl.SSLContext) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(  # noqa: S310
            self.server + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:  # noqa: S310
                return bytes(resp.read())
        except urllib.error.HTTPError as err:
            raise ControlPlaneError(
                f"{method} {path} failed: {err.code} {err.read().decode(errors='replace')}"
            ) from err
