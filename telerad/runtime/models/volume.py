"""From the data sets of a study to what a model reads: each image series as one array in
modality units, slices in patient order, with its spacing."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut

from telerad.runtime.models.base import Series, Study


def _position(ds: Dataset) -> float:
    """Distance along the slice normal; instance number where the geometry is missing."""
    orientation = ds.get("ImageOrientationPatient")
    position = ds.get("ImagePositionPatient")
    if orientation is None or position is None or len(orientation) != 6:
        return float(ds.get("InstanceNumber") or 0)
    row = np.array([float(v) for v in orientation[:3]])
    column = np.array([float(v) for v in orientation[3:]])
    return float(np.dot(np.cross(row, column), [float(v) for v in position]))


def _frames(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames") or 1)


def _pixels(ds: Dataset, out: npt.NDArray[np.float32]) -> None:
    """Write the data set's pixels, in modality units, into `out` (frames, rows, columns)."""
    raw = ds.pixel_array
    if "ModalityLUTSequence" in ds:
        out[...] = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32).reshape(out.shape)
    else:
        # The linear rescale in float32, in place: pydicom's goes through float64.
        out[...] = raw.reshape(out.shape)
        slope = float(ds.get("RescaleSlope") or 1.0)
        intercept = float(ds.get("RescaleIntercept") or 0.0)
        if slope != 1.0:
            out *= slope
        if intercept:
            out += intercept
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        np.subtract(out.max(), out, out=out)


def _spacing(images: list[Dataset]) -> tuple[float, float, float]:
    first = images[0]
    in_plane = first.get("PixelSpacing") or first.get("ImagerPixelSpacing")
    rows, columns = (float(v) for v in in_plane) if in_plane and len(in_plane) == 2 else (1, 1)
    if len(images) > 1:
        between = abs(_position(images[1]) - _position(images[0])) or 1.0
    else:
        between = float(first.get("SliceThickness") or 1.0)
    return between, rows or 1.0, columns or 1.0


def assemble(study_uid: str, datasets: Iterable[Dataset]) -> Study:
    """Image series of the study (those with pixel data of one size); others, such as
    earlier results, are left out. The data sets give up their pixel data to the arrays,
    so a 300-slice study is not held twice."""
    by_series: dict[str, list[Dataset]] = defaultdict(list)
    for ds in datasets:
        if "PixelData" in ds and ds.get("StudyInstanceUID") == study_uid:
            by_series[str(ds.SeriesInstanceUID)].append(ds)
    series = []
    for uid, found in sorted(by_series.items()):
        found.sort(key=_position)
        shape = (found[0].Rows, found[0].Columns)
        images = [ds for ds in found if (ds.Rows, ds.Columns) == shape]
        # One array filled slice by slice: no per-slice copies to join afterwards.
        pixels = np.empty((sum(map(_frames, images)), *shape), dtype=np.float32)
        at = 0
        for ds in images:
            _pixels(ds, pixels[at : at + _frames(ds)])
            at += _frames(ds)
            del ds.PixelData
        series.append(
            Series(
                uid=uid,
                modality=str(images[0].get("Modality") or ""),
                body_part=str(images[0].get("BodyPartExamined") or "").upper(),
                images=images,
                pixels=pixels,
                spacing=_spacing(images),
            )
        )
    return Study(uid=study_uid, series=series)
