"""Reference model: hyperdensity (haemorrhage-like) on non-contrast head CT.

NOT FOR CLINICAL USE. A transparent, deterministic detector for exercising the stat path,
run as an ONNX graph through ONNX Runtime like a trained network would be:
it finds intracranial voxels in the range of acute blood (55-95 HU after smoothing), away
from bone, and reports their volume. It knows nothing of calcifications, contrast, beam
hardening or motion, which a real model must.

The work is done at about 1 mm in plane: blocks of pixels are averaged (which also smooths
noise), bone is grown by a margin so that partial-volume voxels at the inner table of the
skull are not taken for blood, and the candidate voxels are counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import onnxruntime
from onnx import NodeProto, TensorProto, helper

from telerad.runtime.models.base import (
    Code,
    Detection,
    Device,
    Measure,
    NotApplicable,
    Region,
    Result,
    Series,
    Study,
)

NAME = "ct-head-hyperdensity"
VERSION = "1.0.0"
BLOOD_HU = (55.0, 95.0)
BONE_HU = 300.0
BONE_MARGIN_MM = 4.0
# A finding needs this much blood-range tissue; smaller is noise or partial volume.
MIN_VOLUME_ML = 0.05
# Volume at which the score reaches 1 - 1/e; 7 mL scores ~0.999 and 2.3 mL ~0.9.
SCALE_ML = 1.0
HEMORRHAGE = Code("1386000", "SCT", "Intracranial hemorrhage")
VOLUME = Code("118565006", "SCT", "Volume")
MEAN = Code("373098007", "SCT", "Mean")
MILLILITRE = Code("ml", "UCUM", "milliliter")
HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
Candidates = Callable[
    [npt.NDArray[np.float32], int, int], tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]
]
PROCEDURE = Code("303653007", "SCT", "Computed tomography of head")


def _blocks(pixels: npt.NDArray[np.float32], factor: int) -> npt.NDArray[np.float32]:
    """Mean over factor x factor blocks in plane (edges cropped)."""
    if factor == 1:
        return pixels
    n, rows, columns = pixels.shape
    rows, columns = rows // factor * factor, columns // factor * factor
    cropped = pixels[:, :rows, :columns]
    shaped = cropped.reshape(n, rows // factor, factor, columns // factor, factor)
    out: npt.NDArray[np.float32] = shaped.mean(axis=(2, 4), dtype=np.float32)
    return out


def _grow(mask: npt.NDArray[np.bool_], steps: int) -> npt.NDArray[np.bool_]:
    """Dilate in plane by a (2 steps + 1) square, by shifted ORs (a max filter)."""
    out = mask.copy()
    for _ in range(steps):
        rows = out.copy()
        rows[:, 1:, :] |= out[:, :-1, :]
        rows[:, :-1, :] |= out[:, 1:, :]
        out = rows.copy()
        out[:, :, 1:] |= rows[:, :, :-1]
        out[:, :, :-1] |= rows[:, :, 1:]
    return out


def candidates(
    pixels: npt.NDArray[np.float32], factor: int, margin: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """(HU in blocks, voxels in the blood range away from bone, opened): the image work,
    in numpy. `onnx_graph` is the same computation as an ONNX graph."""
    hu = _blocks(pixels, factor)
    bone = _grow(hu > BONE_HU, margin)
    blood = (hu >= BLOOD_HU[0]) & (hu <= BLOOD_HU[1]) & ~bone
    # Opening: scattered voxels (noise, partial volume) go, compact regions stay.
    return hu, _grow(~_grow(~blood, 1), 1) & blood


def onnx_graph(factor: int, margin: int) -> bytes:
    """`candidates` as an ONNX model (opset 17): image FP32 [slices, rows, columns] in,
    `hu` and `blood` (0/1) FP32 [slices, 1, rows / factor, columns / factor] out."""

    def pool(name: str, source: str, size: int) -> NodeProto:
        return helper.make_node(
            "MaxPool", [source], [name], kernel_shape=[size, size], pads=[size // 2] * 4
        )

    def constant(name: str, value: float) -> NodeProto:
        return helper.make_node(
            "Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [value])
        )

    nodes = [
        constant("bone_hu", BONE_HU),
        constant("low", BLOOD_HU[0]),
        constant("high", BLOOD_HU[1]),
        constant("one", 1.0),
        helper.make_node(
            "Constant", [], ["axis"], value=helper.make_tensor("a", TensorProto.INT64, [1], [1])
        ),
        helper.make_node("Unsqueeze", ["image", "axis"], ["planes"]),
        helper.make_node(
            "AveragePool",
            ["planes"],
            ["hu"],
            kernel_shape=[factor, factor],
            strides=[factor, factor],
        ),
        helper.make_node("Greater", ["hu", "bone_hu"], ["bone_b"]),
        helper.make_node("Cast", ["bone_b"], ["bone"], to=TensorProto.FLOAT),
        pool("near_bone", "bone", 2 * margin + 1),
        helper.make_node("GreaterOrEqual", ["hu", "low"], ["above"]),
        helper.make_node("LessOrEqual", ["hu", "high"], ["below"]),
        helper.make_node("And", ["above", "below"], ["in_range"]),
        helper.make_node("Cast", ["in_range"], ["in_range_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "near_bone"], ["far_from_bone"]),
        helper.make_node("Mul", ["in_range_f", "far_from_bone"], ["raw"]),
        helper.make_node("Sub", ["one", "raw"], ["not_raw"]),
        pool("not_raw_grown", "not_raw", 3),
        helper.make_node("Sub", ["one", "not_raw_grown"], ["eroded"]),
        pool("opened", "eroded", 3),
        helper.make_node("Mul", ["opened", "raw"], ["blood"]),
    ]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["slices", "rows", "columns"])
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, ["slices", 1, "r", "c"])
        for name in ("hu", "blood")
    ]
    graph = helper.make_graph(nodes, "ct-head-hyperdensity", [image], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return bytes(model.SerializeToString())


def _outline(mask: npt.NDArray[np.bool_], factor: int) -> tuple[tuple[float, float], ...]:
    """The bounding box of a slice's candidate pixels, in source pixel coordinates."""
    rows = np.flatnonzero(mask.any(axis=1))
    columns = np.flatnonzero(mask.any(axis=0))
    top, bottom = float(rows[0] * factor), float((rows[-1] + 1) * factor)
    left, right = float(columns[0] * factor), float((columns[-1] + 1) * factor)
    return ((left, top), (right, top), (right, bottom), (left, bottom), (left, top))


class _Onnx:
    """`candidates` run by ONNX Runtime: on the GPU (CUDA provider) when asked and there,
    else on the CPU. One session per block factor and bone margin, made on first use."""

    def __init__(self, device: Device) -> None:
        available = onnxruntime.get_available_providers()
        cuda = device == "cuda" and "CUDAExecutionProvider" in available
        self.device: Device = "cuda" if cuda else "cpu"
        self._providers = ["CUDAExecutionProvider"] * cuda + ["CPUExecutionProvider"]
        self._sessions: dict[tuple[int, int], onnxruntime.InferenceSession] = {}

    def __call__(
        self, pixels: npt.NDArray[np.float32], factor: int, margin: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        key = (factor, margin)
        if key not in self._sessions:
            self._sessions[key] = onnxruntime.InferenceSession(
                onnx_graph(factor, margin), providers=self._providers
            )
        hu, blood = self._sessions[key].run(None, {"image": np.ascontiguousarray(pixels)})
        return hu[:, 0], blood[:, 0] > 0.5


class HyperdensityDetector:
    """The detector; its image work runs as an ONNX graph through ONNX Runtime, or, with
    `backend="numpy"`, as the same computation in numpy (the reference the graph is
    tested against)."""

    name = NAME
    version = VERSION

    def __init__(self, device: Device, backend: str = "onnx") -> None:
        if backend == "onnx":
            self._candidates: Candidates = _Onnx(device)
            self.device: Device = self._candidates.device
        else:
            self._candidates = candidates
            self.device = "cpu"

    def detect(self, series: Series) -> Detection | None:
        between, row_mm, column_mm = series.spacing
        factor = max(1, int(1.0 / min(row_mm, column_mm)))
        pixel_mm = (row_mm * factor, column_mm * factor)
        margin = math.ceil(BONE_MARGIN_MM / min(pixel_mm))
        hu, blood = self._candidates(series.pixels, factor, margin)
        voxel_ml = between * pixel_mm[0] * pixel_mm[1] / 1000.0
        volume = float(blood.sum()) * voxel_ml
        if volume < MIN_VOLUME_ML:
            return None
        per_slice = blood.sum(axis=(1, 2))
        key = int(per_slice.argmax())
        image = series.images[min(key, len(series.images) - 1)]
        return Detection(
            label="hyperdensity",
            finding=HEMORRHAGE,
            score=round(1.0 - math.exp(-volume / SCALE_ML), 4),
            measures=(
                Measure(VOLUME, round(volume, 3), MILLILITRE, "volume_ml"),
                Measure(MEAN, round(float(hu[blood].mean()), 1), HU, "mean_hu"),
            ),
            regions=(
                Region(
                    series_uid=series.uid,
                    sop_uid=str(image.SOPInstanceUID),
                    outline=_outline(blood[key], factor),
                ),
            ),
        )

    def predict(self, study: Study) -> Result:
        series = study.of("CT")
        if not series:
            raise NotApplicable("the study has no CT image series")
        found = [d for s in series if (d := self.detect(s)) is not None]
        return Result(detections=sorted(found, key=lambda d: -d.score)[:1], procedure=PROCEDURE)


def load(device: Device) -> HyperdensityDetector:
    return HyperdensityDetector(device)
