"""Reference model: hyperdensity (haemorrhage-like) on non-contrast head CT.

NOT FOR CLINICAL USE. A transparent, deterministic detector for exercising the stat path:
it finds intracranial voxels in the range of acute blood (55-95 HU after smoothing), away
from bone, and reports their volume. It knows nothing of calcifications, contrast, beam
hardening or motion, which a real model must.

The work is done at about 1 mm in plane: blocks of pixels are averaged (which also smooths
noise), bone is grown by a margin so that partial-volume voxels at the inner table of the
skull are not taken for blood, and the candidate voxels are counted.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

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
    """Dilate in plane by `steps` pixels (a square), by shifted ORs."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[:, 1:, :] |= out[:, :-1, :]
        grown[:, :-1, :] |= out[:, 1:, :]
        grown[:, :, 1:] |= out[:, :, :-1]
        grown[:, :, :-1] |= out[:, :, 1:]
        out = grown
    return out


def _outline(mask: npt.NDArray[np.bool_], factor: int) -> tuple[tuple[float, float], ...]:
    """The bounding box of a slice's candidate pixels, in source pixel coordinates."""
    rows = np.flatnonzero(mask.any(axis=1))
    columns = np.flatnonzero(mask.any(axis=0))
    top, bottom = float(rows[0] * factor), float((rows[-1] + 1) * factor)
    left, right = float(columns[0] * factor), float((columns[-1] + 1) * factor)
    return ((left, top), (right, top), (right, bottom), (left, bottom), (left, top))


class HyperdensityDetector:
    name = NAME
    version = VERSION

    def __init__(self, device: Device) -> None:
        # Plain numpy: it runs on the CPU whatever the machine has.
        self.device: Device = "cpu"

    def detect(self, series: Series) -> Detection | None:
        between, row_mm, column_mm = series.spacing
        factor = max(1, int(1.0 / min(row_mm, column_mm)))
        hu = _blocks(series.pixels, factor)
        pixel_mm = (row_mm * factor, column_mm * factor)
        bone = _grow(hu > BONE_HU, math.ceil(BONE_MARGIN_MM / min(pixel_mm)))
        blood = (hu >= BLOOD_HU[0]) & (hu <= BLOOD_HU[1]) & ~bone
        # Opening: scattered voxels (noise, partial volume) go, compact regions stay.
        blood = _grow(~_grow(~blood, 1), 1) & blood
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
