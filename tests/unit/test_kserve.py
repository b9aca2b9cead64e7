"""The KServe v2 request telerad sends and the answers it accepts or refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydicom.dataset import Dataset

from telerad.runtime.models.base import Series
from telerad.runtime.models.kserve import HEADER_LENGTH, InferenceError, detections, request


def series(slices: int = 2) -> Series:
    images = []
    for i in range(slices):
        image = Dataset()
        image.SOPInstanceUID = f"1.2.{i + 1}"
        images.append(image)
    pixels = np.arange(slices * 3 * 4, dtype=np.float32).reshape(slices, 3, 4)
    return Series("1.2", "CT", "HEAD", images, pixels, (5.0, 0.5, 0.5))


def answer(scores: list[float], boxes: list[float], labels: list[str]) -> dict[str, object]:
    return {
        "outputs": [
            {"name": "scores", "datatype": "FP32", "shape": [len(scores)], "data": scores},
            {"name": "boxes", "datatype": "FP32", "shape": [len(scores), 5], "data": boxes},
            {"name": "labels", "datatype": "BYTES", "shape": [len(labels)], "data": labels},
        ]
    }


def test_the_request_is_a_json_header_then_little_endian_fp32() -> None:
    body, headers = request(series())
    length = int(headers[HEADER_LENGTH])
    header = json.loads(body[:length])
    image, spacing = header["inputs"]
    assert image["shape"] == [2, 3, 4] and image["datatype"] == "FP32"
    assert image["parameters"]["binary_data_size"] == 2 * 3 * 4 * 4
    assert spacing["data"] == [5.0, 0.5, 0.5]
    assert np.array_equal(np.frombuffer(body[length:], dtype="<f4"), np.arange(24))


def test_outputs_become_detections_on_the_right_image() -> None:
    (found,) = detections(series(), answer([0.9], [1, 0, 0, 2, 2], ["hyperdensity"]))
    assert found.label == "hyperdensity" and found.score == pytest.approx(0.9)
    assert found.regions[0].sop_uid == "1.2.2"
    assert found.regions[0].outline[2] == (2.0, 2.0)


@pytest.mark.parametrize(
    "bad",
    [
        {"outputs": []},
        answer([0.9], [1, 0, 0, 2], ["x"]),
        answer([1.5], [0, 0, 0, 1, 1], ["x"]),
        answer([0.5], [7, 0, 0, 1, 1], ["x"]),
        answer([0.5, 0.6], [0, 0, 0, 1, 1, 0, 0, 0, 1, 1], ["x"]),
    ],
)
def test_answers_outside_the_contract_are_errors(bad: dict[str, object]) -> None:
    with pytest.raises(InferenceError):
        detections(series(), bad)
