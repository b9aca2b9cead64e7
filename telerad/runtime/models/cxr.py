"""Reference model: lung opacity on a frontal chest radiograph.

NOT FOR CLINICAL USE. A transparent, deterministic detector: it finds the aerated lung (the
dark pixels inside the body), splits it at the mediastinum, and compares the upper and
middle zones of the two lungs, where the heart does not intrude. A zone with much less
aerated lung than its mirror suggests an opacity (consolidation, effusion, collapse). It
knows nothing of rotation, devices, bilateral disease or lateral views.
"""

from __future__ import annotations

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

NAME = "cxr-opacity"
VERSION = "1.0.0"
WORK_SIZE = 256
# Aerated-area ratio of a zone to its mirror: at or above RATIO_NORMAL it scores 0, and the
# score rises linearly to 1 at RATIO_NORMAL - RATIO_SPAN.
RATIO_NORMAL = 0.75
RATIO_SPAN = 0.5
# SNOMED CT has no concept as plain as "opacity on a radiograph" in DICOM's context
# groups; a private scheme (PS3.16 8.2: 99 prefix) says exactly what is meant.
OPACITY = Code("lung-opacity", "99TELERAD", "Lung opacity")
RATIO = Code("118586006", "SCT", "Ratio")
NO_UNITS = Code("1", "UCUM", "no units")
PROCEDURE = Code("399208008", "SCT", "Plain chest X-ray")
ZONES = ("upper", "middle")


def _otsu(values: npt.NDArray[np.float32]) -> float:
    hist, edges = np.histogram(values, bins=128)
    p = hist / max(hist.sum(), 1)
    weight = np.cumsum(p)
    mean = np.cumsum(p * edges[:-1])
    between = (mean[-1] * weight - mean) ** 2 / (weight * (1 - weight) + 1e-12)
    return float(edges[int(np.argmax(between))])


def _normalised(image: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], int]:
    factor = max(1, max(image.shape) // WORK_SIZE)
    rows, columns = image.shape[0] // factor * factor, image.shape[1] // factor * factor
    small = image[:rows, :columns].reshape(rows // factor, factor, columns // factor, factor)
    work = small.mean(axis=(1, 3), dtype=np.float32)
    low, high = np.percentile(work, [1, 99])
    return np.clip((work - low) / max(float(high - low), 1e-6), 0, 1).astype(np.float32), factor


class OpacityDetector:
    name = NAME
    version = VERSION

    def __init__(self, device: Device) -> None:
        self.device: Device = "cpu"

    def detect(self, series: Series) -> Detection | None:
        image, factor = _normalised(series.pixels[0])
        body = image > _otsu(image.ravel()) * 0.5
        # Inside the body: body pixels on both sides in the same row (air outside is not).
        enclosed = np.maximum.accumulate(body, axis=1) & np.fliplr(
            np.maximum.accumulate(np.fliplr(body), axis=1)
        )
        if not enclosed.any():
            return None
        lungs = enclosed & (image < _otsu(image[enclosed]))
        columns = image.shape[1]
        centre = image[:, columns // 3 : 2 * columns // 3].mean(axis=0)
        mid = columns // 3 + int(centre.argmax())
        lung_rows = np.flatnonzero(lungs.sum(axis=1) > 0.05 * columns)
        if len(lung_rows) < 3:
            return None
        edges = np.linspace(lung_rows[0], lung_rows[-1], 4).astype(int)
        worst, worst_zone, worst_side = 1.0, 0, 0
        for zone in range(len(ZONES)):
            band = lungs[edges[zone] : edges[zone + 1]]
            sides = (int(band[:, :mid].sum()), int(band[:, mid:].sum()))
            ratio = min(sides) / max(*sides, 1)
            if ratio < worst:
                worst, worst_zone, worst_side = ratio, zone, int(np.argmin(sides))
        score = float(np.clip((RATIO_NORMAL - worst) / RATIO_SPAN, 0.0, 1.0))
        if score == 0.0:
            return None
        top, bottom = edges[worst_zone] * factor, edges[worst_zone + 1] * factor
        left, right = (0, mid * factor) if worst_side == 0 else (mid * factor, columns * factor)
        box = ((left, top), (right, top), (right, bottom), (left, bottom), (left, top))
        return Detection(
            label="opacity",
            finding=OPACITY,
            score=round(score, 4),
            measures=(Measure(RATIO, round(worst, 3), NO_UNITS, "aerated_ratio"),),
            regions=(
                Region(
                    series_uid=series.uid,
                    sop_uid=str(series.images[0].SOPInstanceUID),
                    outline=tuple((float(x), float(y)) for x, y in box),
                ),
            ),
        )

    def predict(self, study: Study) -> Result:
        series = [s for s in study.of("CR", "DX") if s.pixels.shape[0] == 1]
        if not series:
            raise NotApplicable("the study has no single-image CR or DX series")
        found = [d for s in series if (d := self.detect(s)) is not None]
        return Result(detections=sorted(found, key=lambda d: -d.score)[:1], procedure=PROCEDURE)


def load(device: Device) -> OpacityDetector:
    return OpacityDetector(device)
