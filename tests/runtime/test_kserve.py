"""The worker in external inference server mode, against a small KServe v2 server that
the test runs (HTTP, the binary tensor extension) with the reference CT model behind it,
the way a vendor's Triton or KServe container would sit beside the worker."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset

from telerad import synthetic
from telerad.api.aimodel import InferenceServer
from telerad.runtime.models import cthead
from telerad.runtime.models.base import Series
from telerad.runtime.models.kserve import HEADER_LENGTH
from tests.runtime.conftest import GatewayFactory, Sink, done_jobs, results, storescu, with_alerts

MODEL = "ct"


@dataclass
class V2Server:
    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)


def infer(header: dict[str, Any], raw: bytes) -> dict[str, Any]:
    inputs = {i["name"]: i for i in header["inputs"]}
    shape = inputs["image"]["shape"]
    pixels = np.frombuffer(raw, dtype="<f4").reshape(shape)
    images = []
    for index in range(shape[0]):
        image = Dataset()
        image.SOPInstanceUID = str(index)
        images.append(image)
    series = Series("1", "CT", "HEAD", images, pixels, tuple(inputs["spacing"]["data"]))
    found = cthead.HyperdensityDetector("cpu").detect(series)
    scores, boxes, labels = [], [], []
    if found is not None:
        outline = found.regions[0].outline
        scores.append(found.score)
        boxes.append([float(found.regions[0].sop_uid), *outline[0], *outline[2]])
        labels.append(found.label)
    return {
        "model_name": MODEL,
        "outputs": [
            {"name": "scores", "datatype": "FP32", "shape": [len(scores)], "data": scores},
            {
                "name": "boxes",
                "datatype": "FP32",
                "shape": [len(boxes), 5],
                "data": [v for box in boxes for v in box],
            },
            {"name": "labels", "datatype": "BYTES", "shape": [len(labels)], "data": labels},
        ],
    }


@pytest.fixture
def v2_server() -> Iterator[V2Server]:
    state = V2Server()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            ready = self.path in ("/v2/health/ready", f"/v2/models/{MODEL}/ready")
            self._answer(200 if ready else 404, {"ready": ready})

        def do_POST(self) -> None:
            if self.path != f"/v2/models/{MODEL}/infer":
                self._answer(404, {"error": "no such model"})
                return
            body = self.rfile.read(int(self.headers["Content-Length"]))
            length = int(self.headers.get(HEADER_LENGTH, len(body)))
            header = json.loads(body[:length])
            state.requests.append({"header": header, "binary": len(body) - length})
            self._answer(200, infer(header, body[length:]))

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state
    server.shutdown()


def test_the_worker_runs_a_model_on_a_v2_inference_server(
    start_gateway: GatewayFactory,
    start_worker: Any,
    v2_server: V2Server,
    sink: Sink,
    tmp_path: Path,
) -> None:
    gateway = with_alerts(start_gateway, sink)
    server = InferenceServer(url=v2_server.url, model=MODEL)
    start_worker(gateway, inference_server=server)
    study = list(synthetic.ct_series(n_slices=40, size=256, seed=51, hyperdensity=True))
    storescu(gateway, synthetic.write_series(study, tmp_path / "ct"))
    gateway.wait_for(lambda: len(done_jobs(gateway)) == 1, timeout=60)
    (job,) = done_jobs(gateway)
    (finding,) = job["findings"]
    assert finding["label"] == "hyperdensity" and finding["critical"] is True
    assert len(results(gateway, str(study[0].StudyInstanceUID))) == 1
    # One request for the one series, its pixels as binary FP32, not JSON numbers.
    (sent,) = v2_server.requests
    assert sent["header"]["inputs"][0]["shape"] == [40, 256, 256]
    assert sent["binary"] == 40 * 256 * 256 * 4
    gateway.wait_for(lambda: len(sink.received) == 1)


def test_a_dead_inference_server_fails_the_job_for_a_retry(
    start_gateway: GatewayFactory,
    start_worker: Any,
    sink: Sink,
    tmp_path: Path,
) -> None:
    gateway = with_alerts(start_gateway, sink)
    dead = InferenceServer(url="http://127.0.0.1:9", model=MODEL, timeout_seconds=5)
    start_worker(gateway, inference_server=dead)
    study = synthetic.ct_series(n_slices=10, size=64, seed=52)
    storescu(gateway, synthetic.write_series(study, tmp_path / "ct"))
    gateway.wait_for(lambda: any(j["reason"] for j in gateway.get("/jobs")), timeout=60)
    (job,) = gateway.get("/jobs")
    assert job["state"] == "queued" and "ct" in job["reason"]
    assert done_jobs(gateway) == []
