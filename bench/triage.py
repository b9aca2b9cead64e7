"""Time to triage a 300-slice CT head, and inference throughput of the reference models.

Triage: a gateway and a CT head worker as processes (``telerad gateway`` / ``telerad
worker`` from their example configs; completion quiet time 1 s, worker poll 0.25 s), a
webhook receiver in this process. For each of N studies (synthetic 300-slice 512x512 head
CTs with a bleed, ``telerad.synthetic.ct_series(seed=k, hyperdensity=True)``, built in
memory before the clock starts), one pynetdicom association sends the slices; the clock
starts when the last C-STORE is answered. Recorded per study:

- completion: last instance stored -> study complete and its job queued (the quiet timer,
  reported apart because it is a setting, not work);
- triage: job queued -> SR stored, job complete (worklist raised to stat, alert in the
  outbox, one transaction) -> alert received by the webhook;
- model: the worker's own inference time for the study (its
  ``telerad_worker_stage_seconds{stage="inference"}``), reported apart;
- beyond model: triage minus model time (the goal is under 2 s).

Throughput: each reference model on its input, per device present (no GPU here: the CPU
row only), studies or images per second, after one warm-up call.

    .venv/bin/python bench/triage.py              # 20 studies
    .venv/bin/python bench/triage.py --studies 3  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from pynetdicom import AE

from telerad import synthetic
from telerad.api.config import GatewayConfig, WorkerConfig
from telerad.api.site import Completion, Notifications, Webhook
from telerad.runtime.gateway.example import ensure_keyring, ensure_token, example_config
from telerad.runtime.models import base, volume
from telerad.runtime.worker.example import example_config as worker_example

TELERAD = Path(sys.executable).parent / "telerad"


def free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Alerts:
    def __init__(self) -> None:
        self.received: dict[str, float] = {}
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        alerts = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                alerts.received.setdefault(body["studyInstanceUID"], time.time())
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        return Handler


def get(url: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310  (loopback http)
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
        body = answer.read()
    return json.loads(body) if body.startswith((b"[", b"{")) else body.decode()


def inference_seconds(metrics_url: str) -> float:
    for line in get(metrics_url).splitlines():
        if line.startswith("telerad_worker_stage_seconds_sum") and 'stage="inference"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.005)


def start(argv: list[str], log: Path, ready: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    wait(lambda: _ok(ready), 60, argv[1])
    return proc


def _ok(url: str) -> bool:
    try:
        get(url)
    except OSError:
        return False
    return True


def triage(studies: int, workdir: Path) -> tuple[list[dict[str, float]], dict[str, float]]:
    alerts = Alerts()
    config = example_config(free_port(), free_port(), workdir / "data")
    config = GatewayConfig.model_validate(
        config.model_copy(
            update={
                "completion": Completion(quiet_seconds=1),
                "notifications": Notifications(webhooks=[Webhook(name="on-call", url=alerts.url)]),
            }
        ).model_dump()
    )
    token_file = ensure_token(config)
    ensure_keyring(config)
    token = token_file.read_text().strip()
    (workdir / "gateway.yaml").write_text(yaml.safe_dump(config.to_wire()))
    http = f"http://127.0.0.1:{config.http_port}"
    worker = worker_example(http, "ct-head-hyperdensity", token_file, free_port())
    worker = WorkerConfig.model_validate(
        worker.model_copy(update={"poll_seconds": 0.25}).model_dump()
    )
    (workdir / "worker.yaml").write_text(yaml.safe_dump(worker.to_wire()))
    metrics = f"http://127.0.0.1:{worker.metrics_port}/metrics"
    procs = [
        start([str(TELERAD), "gateway", "--config", str(workdir / "gateway.yaml")],
              workdir / "gateway.log", f"{http}/healthz"),
        start([str(TELERAD), "worker", "--config", str(workdir / "worker.yaml")],
              workdir / "worker.log", f"http://127.0.0.1:{worker.metrics_port}/healthz"),
    ]  # fmt: skip
    rows = []
    try:
        for k in range(studies):
            slices = list(
                synthetic.ct_series(n_slices=300, size=512, seed=100 + k, hyperdensity=True)
            )
            study = str(slices[0].StudyInstanceUID)
            ae = AE(ae_title="PYNETDICOM")
            ae.add_requested_context(slices[0].SOPClassUID, "1.2.840.10008.1.2.1")
            assoc = ae.associate("127.0.0.1", config.dicom_port, ae_title=config.ae_title)
            model_before = inference_seconds(metrics)
            for ds in slices:
                assert assoc.send_c_store(ds).Status == 0
            last = time.time()
            assoc.release()
            wait(lambda uid=study: uid in alerts.received, 120, "the alert")
            jobs = [j for j in get(f"{http}/jobs?limit=1000", token) if j["studyUid"] == study]
            (job,) = jobs
            queued = datetime.fromisoformat(job["createdAt"]).timestamp()
            done = datetime.fromisoformat(job["updatedAt"]).timestamp()
            model = inference_seconds(metrics) - model_before
            rows.append(
                {
                    "completion": queued - last,
                    "sr": done - queued,
                    "alert": alerts.received[study] - queued,
                    "model": model,
                    "beyond": alerts.received[study] - queued - model,
                }
            )
            print(
                f"study {k + 1}/{studies}: "
                + ", ".join(f"{n} {v:.2f}s" for n, v in rows[-1].items()),
                file=sys.stderr,
            )
        means = stages(metrics)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
    return rows, means


def throughput() -> list[tuple[str, str, str, float, str]]:
    from telerad.runtime.models.cthead import HyperdensityDetector  # noqa: PLC0415

    ct = list(synthetic.ct_series(n_slices=300, size=512, seed=7, hyperdensity=True))
    cxr = synthetic.chest_xray(seed=7, size=(2048, 2048), opacity=True)
    ct_study = volume.assemble(str(ct[0].StudyInstanceUID), ct)
    cxr_study = volume.assemble(str(cxr.StudyInstanceUID), [cxr])
    runs: list[tuple[str, base.Model, base.Study, str, int]] = [
        ("onnx", base.load("ct-head-hyperdensity", "cpu"), ct_study, "300-slice studies", 5),
        ("numpy", HyperdensityDetector("cpu", backend="numpy"), ct_study, "300-slice studies", 5),
        ("numpy", base.load("cxr-opacity", "cpu"), cxr_study, "2048x2048 images", 20),
    ]
    out = []
    for backend, model, study, unit, count in runs:
        model.predict(study)  # warm-up: sessions, caches
        started = time.perf_counter()
        for _ in range(count):
            model.predict(study)
        rate = count / (time.perf_counter() - started)
        out.append((model.name, backend, model.device, rate, unit))
    return out


def stages(metrics_url: str) -> dict[str, float]:
    """Mean seconds per worker stage over the run."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in get(metrics_url).splitlines():
        for kind, into in (("_sum", sums), ("_count", counts)):
            if line.startswith(f"telerad_worker_stage_seconds{kind}"):
                stage = line.split('stage="')[1].split('"')[0]
                into[stage] = float(line.rsplit(" ", 1)[1])
    return {s: sums[s] / counts[s] for s in sums if counts.get(s)}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="telerad-triage-") as tmp:
        rows, means = triage(args.studies, Path(tmp))
    rates = throughput()
    print(f"## Time to triage: 300-slice CT head, {args.studies} studies\n")
    print(f"`{' '.join(['.venv/bin/python', 'bench/triage.py', *sys.argv[1:]])}` on "
          f"{platform.node() or 'this machine'}, {os.cpu_count()} CPUs, no GPU, "
          f"{datetime.now().date()}.\n")  # fmt: skip
    print("| seconds | p50 | p95 | max |")
    print("|---|---|---|---|")
    names = {
        "completion": "last instance -> study complete, job queued (quiet timer 1 s)",
        "sr": "job queued -> SR stored, job complete, worklist stat",
        "alert": "job queued -> alert received by the webhook",
        "model": "of which model time (inference)",
        "beyond": "alert received, beyond model time",
    }
    for key, label in names.items():
        values = [r[key] for r in rows]
        print(f"| {label} | {pct(values, 0.5):.2f} | {pct(values, 0.95):.2f} | {max(values):.2f} |")
    mean = statistics.mean(r["completion"] + r["alert"] for r in rows)
    print(f"\nMean last instance -> alert, completion timer included: {mean:.2f} s.\n")
    spent = ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in means.items())
    print(f"Where the worker's time goes, mean seconds per study: {spent}.\n")
    print("## Inference throughput of the reference models\n")
    print("| model | image work | device | per second | of |")
    print("|---|---|---|---|---|")
    for name, backend, device, rate, unit in rates:
        print(f"| {name} | {backend} | {device} | {rate:.2f} | {unit} |")


if __name__ == "__main__":
    main()
