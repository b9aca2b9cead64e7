"""A model behind a KServe v2 / Triton inference server: how vendors ship models.

Each image series goes to `POST {url}/v2/models/{model}/infer` with the binary tensor
extension (a JSON header, then the raw little-endian FP32 pixels), so a 300-slice CT is
not spelled out as JSON numbers. The contract telerad asks of the model:

inputs
  `image`   FP32 [slices, rows, columns], modality units (HU for CT)
  `spacing` FP32 [3], mm between slices, rows and columns
outputs (JSON)
  `scores`  FP32 [K], one per detection, in [0, 1]
  `boxes`   FP32 [K, 5], slice index, left, top, right, bottom (pixels)
  `labels`  BYTES [K], the finding's short name
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from telerad.api.aimodel import InferenceServer
from telerad.runtime.models.base import (
    Code,
    Detection,
    Device,
    NotApplicable,
    Region,
    Result,
    Series,
    Study,
)

OUTPUTS = ("scores", "boxes", "labels")
IMAGING = Code("363679005", "SCT", "Imaging")
HEADER_LENGTH = "Inference-Header-Content-Length"


class InferenceError(RuntimeError):
    """The server did not answer as the protocol and the contract say."""


def request(series: Series) -> tuple[bytes, dict[str, str]]:
    """The binary-extension request for one series: body and headers."""
    pixels = np.ascontiguousarray(series.pixels, dtype="<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": "image",
                "shape": list(series.pixels.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(pixels)},
            },
            {"name": "spacing", "shape": [3], "datatype": "FP32", "data": list(series.spacing)},
        ],
        "outputs": [{"name": name} for name in OUTPUTS],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    return head + pixels, headers


def detections(series: Series, answer: dict[str, Any]) -> list[Detection]:
    """The contract's outputs as detections on `series`."""
    try:
        outputs = {o["name"]: o for o in answer["outputs"]}
        scores = [float(v) for v in outputs["scores"]["data"]]
        boxes = np.asarray(outputs["boxes"]["data"], dtype=np.float64).reshape(len(scores), 5)
        labels = [str(v) for v in outputs["labels"]["data"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise InferenceError(f"the answer does not follow the contract: {exc!r}") from None
    if len(labels) != len(scores) or any(not 0 <= s <= 1 for s in scores):
        raise InferenceError("the answer does not follow the contract: scores and labels")
    found = []
    for score, box, label in zip(scores, boxes, labels, strict=True):
        index = int(box[0])
        if not 0 <= index < len(series.images):
            raise InferenceError(f"box on slice {index}, outside the series")
        left, top, right, bottom = (float(v) for v in box[1:])
        outline = ((left, top), (right, top), (right, bottom), (left, bottom), (left, top))
        found.append(
            Detection(
                label=label[:64],
                finding=Code(label[:16], "99TELERAD", label[:64]),
                score=score,
                regions=(Region(series.uid, str(series.images[index].SOPInstanceUID), outline),),
            )
        )
    return found


class RemoteModel:
    def __init__(self, server: InferenceServer, name: str, version: str) -> None:
        self.server = server
        self.name = name
        self.version = version
        self.device: Device = "cpu"  # as far as this process is concerned
        self._url = f"{str(server.url).rstrip('/')}/v2/models/{server.model}"

    def _call(self, path: str, body: bytes | None, headers: dict[str, str]) -> dict[str, Any]:
        http = urllib.request.Request(  # noqa: S310  (an http(s) URL from the config)
            self._url + path, data=body, headers=headers, method="POST" if body else "GET"
        )
        try:
            with urllib.request.urlopen(http, timeout=self.server.timeout_seconds) as answer:  # noqa: S310
                payload: dict[str, Any] = json.loads(answer.read())
                return payload
        except urllib.error.HTTPError as exc:
            raise InferenceError(f"{self.server.model}: answered {exc.code}") from None
        except (urllib.error.URLError, TimeoutError, ValueError) as exc:
            raise InferenceError(f"{self.server.model}: {exc!r}") from None

    def ready(self) -> bool:
        try:
            self._call("/ready", None, {})
        except InferenceError:
            return False
        return True

    def predict(self, study: Study) -> Result:
        if not study.series:
            raise NotApplicable("the study has no image series")
        found = []
        for series in study.series:
            body, headers = request(series)
            found += detections(series, self._call("/infer", body, headers))
        return Result(detections=sorted(found, key=lambda d: -d.score), procedure=IMAGING)
