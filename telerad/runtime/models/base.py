"""What a model plugin is: loaded once, given a study's pixels with their geometry, it
returns detections. Plugins register under the entry-point group `telerad.models`; the
worker finds one by the name in its config and never imports it by path.

A plugin module exposes a `load(device) -> Model` callable. `device` is what the worker
chose (`cuda` only when a GPU is present and the config allows it); a plugin that cannot use
it runs on the CPU and says so in `Model.device`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

GROUP = "telerad.models"
Device = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class Series:
    """One image series, slices ordered along the patient axis (or a single image)."""

    uid: str
    modality: str
    body_part: str
    images: Sequence[Dataset]
    """The source data sets without their pixel data, in the order of `pixels`."""
    pixels: npt.NDArray[np.float32]
    """(slices, rows, columns) in modality units (HU for CT), after the modality LUT;
    radiographs as displayed (MONOCHROME1 inverted), more attenuation brighter."""
    spacing: tuple[float, float, float]
    """(between slices, between rows, between columns) in mm; 1.0 where unknown."""


@dataclass(frozen=True)
class Study:
    uid: str
    series: Sequence[Series]

    def of(self, *modalities: str) -> list[Series]:
        return [s for s in self.series if s.modality in modalities]


@dataclass(frozen=True)
class Code:
    """A coded concept for the SR: (value, scheme, meaning), e.g. SNOMED CT."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Measure:
    name: Code
    value: float
    unit: Code
    """A UCUM unit."""
    key: str
    """Short name reported with the job's findings, e.g. volume_ml."""


@dataclass(frozen=True)
class Region:
    """Where on one image the model localised a finding: a closed outline in pixel
    coordinates (column, row), as an SR image region (PS3.3 C.18.6) wants them."""

    series_uid: str
    sop_uid: str
    outline: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Detection:
    label: str
    """Short name of the finding, as the job reports it (e.g. hyperdensity)."""
    finding: Code
    score: float
    """Confidence in [0, 1]; the worker's thresholds decide what is critical."""
    measures: tuple[Measure, ...] = ()
    regions: tuple[Region, ...] = ()


@dataclass(frozen=True)
class Result:
    detections: list[Detection]
    procedure: Code
    """What was examined, for the SR's Procedure Reported."""
    notes: list[str] = field(default_factory=list)
    """Why nothing could be said, when so (e.g. no CT series in the study)."""


class NotApplicable(ValueError):
    """The study cannot be read by this model (wrong modality, no pixels); retrying will
    not change that, so the job is parked with this message."""


class Model(Protocol):
    name: str
    version: str
    device: Device

    def predict(self, study: Study) -> Result: ...


Loader = Callable[[Device], Model]


class UnknownModel(LookupError):
    """No plugin of that name is installed."""


def available() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=GROUP))


def load(name: str, device: Device) -> Model:
    """The plugin registered as `name`, loaded for `device`."""
    found = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not found:
        known = ", ".join(available()) or "none"
        raise UnknownModel(f"no model plugin {name!r} in {GROUP} (installed: {known})")
    loader: Loader = found[0].load()
    return loader(device)
