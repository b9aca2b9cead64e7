"""`make demo`: the whole system on this machine, end to end, in about a minute.

A local control plane; the CRDs and the operator with its own least-privilege RBAC; the
samples (manifests/samples); then every site's gateway and every model's worker started
from the very pods the operator created (their ConfigMaps, Secrets and addresses, by
telerad.devcluster.standin; on a cluster these are the containers); a CT head with a
bleed and a chest X-ray sent with dcmtk's storescu; and what a platform team wants to
see: the resources and their Ready state, the worklist with the AI's priorities, the SR
stored beside the images, the critical-finding alert a webhook received, and the
autoscaler's decision. Everything it started is stopped before it returns.

What differs from a cluster, all in `_localize`: the callers' networks become this
machine's, the DICOM TLS of one sample site is left out (no certificate names a loopback
pod address), results are not forwarded to the samples' example.org archives, studies
count as complete after 2 quiet seconds instead of 20, and the paging webhook points at
the demo's own receiver.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import yaml

from telerad import synthetic
from telerad.devcluster import standin
from telerad.devcluster.controlplane import ControlPlane, free_port

ROOT = Path(__file__).resolve().parents[2]
TENANT = "tenant-northwind"
TELERAD = Path(sys.executable).parent / "telerad"
# What a pod's image would hold: this environment and the Python it was made from.
IMAGE = [Path(sys.prefix), Path(sys.base_prefix)]
SYSTEM = "telerad-system"
LOCAL = ["127.0.0.0/8"]
T = TypeVar("T")


class DemoError(Exception):
    pass


def say(text: str = "") -> None:
    print(text, flush=True)


def step(text: str) -> None:
    say(f"\n==> {text}")


def eventually(probe: Callable[[], T | None], what: str, timeout: float = 120) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.3)


@dataclass
class Sink:
    """The paging service: a local webhook receiver that keeps what it is sent."""

    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def start(self) -> str:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sink.received.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/on-call"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@dataclass
class Demo:
    bin_dir: Path
    work: Path
    plane: ControlPlane
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    unconfined: dict[str, str] = field(default_factory=dict)
    sink: Sink = field(default_factory=Sink)
    token: str = ""
    scraped: list[str] = field(default_factory=list)

    # ---------------------------------------------------------------- plumbing

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        done = subprocess.run(
            [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.plane.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if check and done.returncode != 0:
            raise DemoError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def read(self, kind: str, name: str) -> dict[str, Any] | None:
        found = self.kubectl("-n", TENANT, "get", kind, name, "-o", "json", check=False)
        return json.loads(found) if found else None

    @property
    def kubeconfig(self) -> Path:
        return self.plane.kubeconfig

    def start(
        self,
        name: str,
        args: list[str],
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [*(prefix or []), str(TELERAD), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self.processes.append((name, proc))

    def healthy(self, name: str, url: str) -> None:
        proc = dict(self.processes)[name]

        def answers() -> bool:
            if proc.poll() is not None:
                tail = (self.work / "logs" / f"{name}.log").read_text(errors="replace")[-2000:]
                raise DemoError(f"{name} exited with {proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310
                    return bool(answer.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        eventually(answers, f"{name} at {url}", timeout=60)

    def http(self, url: str, accept: str = "application/json") -> Any:
        request = urllib.request.Request(  # noqa: S310  (the demo's own loopback gateways)
            url, headers={"Authorization": f"Bearer {self.token}", "Accept": accept}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            return json.loads(answer.read() or b"null")

    def stop(self) -> None:
        for _, proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in reversed(self.processes):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.sink.stop()
        self.plane.stop()

    # ---------------------------------------------------------------- the steps

    def control_plane(self) -> None:
        step("a local Kubernetes control plane (etcd, kube-apiserver, controllers, kwok nodes)")
        started = time.monotonic()
        self.plane.start()
        say(f"up in {time.monotonic() - started:.1f} s at {self.plane.server}")
        say(self.kubectl("get", "nodes").rstrip())

    def install(self) -> None:
        step("CRDs, namespaces, and the operator's least-privilege RBAC")
        self.kubectl("apply", "--server-side", "-k", str(ROOT / "crds"))
        self.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        for namespace in (SYSTEM, TENANT):
            self.kubectl("create", "namespace", namespace)
        self.kubectl("apply", "--server-side", "-k", str(ROOT / "manifests" / "rbac"))
        say(self.kubectl("get", "crd").rstrip())

    def operator(self) -> None:
        step("the operator, as its ServiceAccount")
        token = self.kubectl(
            "-n", SYSTEM, "create", "token", "telerad-operator", "--duration=1h"
        ).strip()  # fmt: skip
        admin = yaml.safe_load(self.kubeconfig.read_text())
        config = self.work / "operator.kubeconfig"
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": admin["clusters"],
                    "users": [{"name": "operator", "user": {"token": token}}],
                    "contexts": [
                        {
                            "name": "operator",
                            "context": {
                                "cluster": admin["clusters"][0]["name"],
                                "user": "operator",
                            },
                        }
                    ],
                    "current-context": "operator",
                }
            )
        )
        config.chmod(0o600)
        liveness = free_port()
        self.start(
            "operator",
            [
                "operator",
                f"--metrics-port={free_port()}",
                f"--liveness-port={liveness}",
                "--autoscale-interval-seconds=2",
                "--log-format=plain",
            ],
            env={"KUBECONFIG": str(config)},
        )
        self.healthy("operator", f"http://127.0.0.1:{liveness}/healthz")
        say("running (log: logs/operator.log)")

    def samples(self, webhook: str) -> None:
        step("the samples: two sites, two models, one routing policy")
        self.token = subprocess.run(
            [str(TELERAD), "token", "--tenant", TENANT],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for site in ("st-marys", "riverside"):
            self.kubectl(
                "-n", TENANT, "create", "secret", "generic", f"{site}-http-clients",
                f"--from-literal=worker={self.token}",
            )  # fmt: skip
        self.kubectl(
            "-n", TENANT, "create", "secret", "generic", "st-marys-paging",
            f"--from-literal=hmac-key={secrets.token_urlsafe(32)}",
        )  # fmt: skip
        documents = list(
            yaml.safe_load_all(self.kubectl("kustomize", str(ROOT / "manifests/samples")))
        )
        local = [_localize(d, webhook) for d in documents]
        self.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(local))
        for kind in ("imagingsite", "aimodel"):
            self.kubectl(
                "-n", TENANT, "wait", "--for=condition=Ready", kind, "--all", "--timeout=120s"
            )
        self.kubectl(
            "-n", TENANT, "wait", "--for=condition=Accepted", "routingpolicy", "--all",
            "--timeout=60s",
        )  # fmt: skip
        say(self.kubectl("-n", TENANT, "get", "telerad").rstrip())

    def _pod(self, component: str, instance: str) -> dict[str, Any]:
        """The Running pod of a Deployment that runs its current template."""
        deployment = self.read("deployment", _child(instance, component))

        def current() -> dict[str, Any] | None:
            selector = (
                f"app.kubernetes.io/component={component},app.kubernetes.io/instance={instance}"
            )
            listed = self.kubectl("-n", TENANT, "get", "pods", "-o", "json", "-l", selector)
            return standin.current_pod(json.loads(listed)["items"], deployment or {})

        return eventually(current, f"the {component} pod of {instance}")

    def runtime(self) -> dict[str, str]:
        """Start them; the gateways' addresses by site (every /metrics in self.scraped)."""
        step("each site's gateway and each model's worker, run here in its pod's place")
        gateways: dict[str, str] = {}
        hosts: dict[str, str] = {}
        sites = json.loads(self.kubectl("-n", TENANT, "get", "imagingsite", "-o", "json"))["items"]
        for site in sites:
            name = site["metadata"]["name"]
            pod = self._pod("gateway", name)
            ip = pod["status"]["podIP"]
            self.run_pod(f"gateway-{name}", pod, "gateway", self.work / "pods" / name)
            self.healthy(f"gateway-{name}", f"http://{ip}:8080/healthz")
            gateways[name] = ip
            self.scraped.append(f"{ip}:8080")
            hosts[f"{_child(name, 'gateway')}.{TENANT}.svc"] = ip
            confined = self.confined(f"gateway-{name}")
            say(f"gateway {name}: DICOM {ip}:11112, HTTP http://{ip}:8080; {confined}")
        models = json.loads(self.kubectl("-n", TENANT, "get", "aimodel", "-o", "json"))["items"]
        for model in models:
            name = model["metadata"]["name"]
            pod = self._pod("worker", name)
            ip = pod["status"]["podIP"]
            self.run_pod(f"worker-{name}", pod, "worker", self.work / "pods" / name, hosts)
            self.healthy(f"worker-{name}", f"http://{ip}:9090/healthz")
            self.scraped.append(f"{ip}:9090")
            say(
                f"worker {name}: model {model['spec']['model']['name']}, "
                f"metrics http://{ip}:9090; {self.confined(f'worker-{name}')}"
            )
        return gateways

    def run_pod(
        self,
        name: str,
        pod: dict[str, Any],
        container: str,
        root: Path,
        hosts: dict[str, str] | None = None,
    ) -> None:
        """Start a pod's container here, confined as its security context asks where this
        machine allows it (as root), and plainly otherwise; first make sure its ports are
        free, or say which process holds them."""
        try:
            standin.check_ports(pod, container)
        except standin.StandInError as err:
            raise DemoError(f"cannot run {name}: {err}") from None
        args = standin.prepare(pod, container, self.read, root, hosts)
        try:
            confinement = standin.confine(pod, container, root, IMAGE)
        except standin.StandInError as err:
            self.unconfined[name] = str(err)
            self.start(name, args)
            return
        self.start(name, args, confinement.env, confinement.prefix)

    def confined(self, name: str) -> str:
        """What the running process `name` really is, read from /proc."""
        if name in self.unconfined:
            return f"not confined ({self.unconfined[name]})"
        uid, read_only = standin.confined_as(dict(self.processes)[name].pid)
        return f"user {uid}, root file system {'read-only' if read_only else 'WRITABLE'}"

    def send(self, gateway: str) -> tuple[str, str]:
        step(
            "a CT head with a bleed from the ED scanner, a chest X-ray from X-ray room 2 (storescu)"
        )
        storescu = shutil.which("storescu")
        if storescu is None:
            raise DemoError("storescu not found: `make demo` installs dcmtk (hack/debs.sh)")
        ct = list(synthetic.ct_series(n_slices=48, size=256, seed=11, hyperdensity=True))
        cxr = [synthetic.chest_xray(seed=12, opacity=True)]
        for caller, datasets, label in (("STM_CT01", ct, "ct"), ("STM_DX02", cxr, "cxr")):
            files = synthetic.write_series(datasets, self.work / "studies" / label)
            command = [storescu, "-aet", caller, "-aec", "TELERAD_STM", gateway, "11112"]
            done = subprocess.run(
                [*command, *map(str, files)], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise DemoError(f"storescu failed: {done.stderr.strip()}")
            say(f"{caller} -> TELERAD_STM: {len(files)} instance(s), accepted")
        return str(ct[0].StudyInstanceUID), str(cxr[0].StudyInstanceUID)

    def results(self, gateway: str, studies: tuple[str, str]) -> None:
        base = f"http://{gateway}:8080"

        def both_done() -> list[dict[str, Any]] | None:
            worklist = self.http(f"{base}/worklist")
            entries = [e for e in worklist if e["studyUid"] in studies]
            done = all(e["jobs"] and all(j["state"] == "done" for j in e["jobs"]) for e in entries)
            return entries if len(entries) == 2 and done else None

        step("the worklist, as the reading radiologist sees it (AI priorities)")
        entries = eventually(both_done, "both studies read by their models", timeout=180)
        for entry in entries:
            jobs = ", ".join(
                f"{j['model']} {j['state']}{' CRITICAL' if j['critical'] else ''}"
                for j in entry["jobs"]
            )
            say(f"  {str(entry['priority']).upper():8} study {_short(entry['studyUid'])}  {jobs}")

        step("the structured reports stored beside the images (QIDO-RS)")
        for study in studies:
            series = (
                self.http(
                    f"{base}/studies/{study}/series?Modality=SR", accept="application/dicom+json"
                )
                or []
            )
            if not series:
                raise DemoError(f"no SR in study {_short(study)}")
            for item in series:
                description = (item.get("0008103E", {}).get("Value") or [""])[0]
                count = (item.get("00201209", {}).get("Value") or [0])[0]
                say(f"  study {_short(study)}: SR series '{description}', {count} instance(s)")

        step("the critical-finding alert the on-call webhook received")
        critical = sum(j["critical"] for e in entries for j in e["jobs"])
        eventually(lambda: len(self.sink.received) >= critical, "the alerts", timeout=60)
        for headers, body in self.sink.received:
            alert = json.loads(body)
            findings = ", ".join(f"{f['label']} {f['score']:.2f}" for f in alert["findings"])
            say(
                f"  {alert['kind']} from {alert['site']}: model {alert['model']}, {findings}; "
                f"signed {'Telerad-Signature' in headers}, key {headers.get('Idempotency-Key')}"
            )

    def keep_outputs(self, addresses: list[str]) -> None:
        """What the system said about itself, kept beside the logs (and grepped for patient
        data by the demo's test): events, status of every object, every /metrics."""
        out = self.work / "outputs"
        out.mkdir(exist_ok=True)
        (out / "events.json").write_text(self.kubectl("get", "events", "-A", "-o", "json"))
        (out / "telerad.json").write_text(self.kubectl("get", "telerad", "-A", "-o", "json"))
        for address in addresses:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
                (out / f"metrics-{address.replace(':', '-')}.txt").write_bytes(answer.read())

    def autoscaler(self) -> None:
        step("the autoscaler's decisions (AIModel status)")
        for model in json.loads(self.kubectl("-n", TENANT, "get", "aimodel", "-o", "json"))[
            "items"
        ]:
            status = model.get("status") or {}
            conditions = {c["type"]: c for c in status.get("conditions", [])}
            active = conditions.get("Autoscaling", {})
            say(
                f"  {model['metadata']['name']}: desired {status.get('desiredReplicas')}, "
                f"queue {status.get('queueDepth')}, Autoscaling {active.get('status')} "
                f"({active.get('reason')})"
            )
            say(f"    {status.get('scalingReason')}")


def _child(instance: str, component: str) -> str:
    return f"{instance}-{component}"


def _short(uid: str) -> str:
    """A study named without its UID (a stable digest is enough to tell them apart)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:8]


def _localize(document: dict[str, Any], webhook: str) -> dict[str, Any]:
    """The changes a sample needs to run on this machine (see the module docstring)."""
    document = json.loads(json.dumps(document))
    if document["kind"] == "ImagingSite":
        spec = document["spec"]
        for caller in spec.get("allowedCallers", []):
            caller["cidrs"] = LOCAL
        spec.pop("tls", None)
        spec.get("service", {}).pop("loadBalancerSourceRanges", None)
        spec.pop("destinations", None)
        spec["completion"] = {"quietSeconds": 2}
        for hook in spec.get("notifications", {}).get("webhooks", []):
            hook["url"] = webhook
    return document


def run(bin_dir: Path, keep: Path | None = None) -> int:
    work = keep or Path(tempfile.mkdtemp(prefix="telerad-demo-"))
    if keep is None:
        work.chmod(0o755)  # the pods' users must reach their volumes in it
    plane = ControlPlane(bin_dir=bin_dir, state_dir=work / "cluster")
    demo = Demo(bin_dir=bin_dir, work=work, plane=plane)
    started = time.monotonic()
    try:
        demo.control_plane()
        demo.install()
        demo.operator()
        webhook = demo.sink.start()
        demo.samples(webhook)
        gateways = demo.runtime()
        studies = demo.send(gateways["st-marys"])
        demo.results(gateways["st-marys"], studies)
        demo.autoscaler()
        demo.keep_outputs(demo.scraped)
    except DemoError as err:
        say(f"\ndemo failed: {err}\nlogs in {work / 'logs'}")
        return 1
    finally:
        with contextlib.suppress(Exception):
            demo.stop()
    say(f"\ndone in {time.monotonic() - started:.0f} s; every process stopped")
    if keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0
