"""Synthetic DICOM studies for tests, benchmarks and demos. Not for clinical use.

Every image here is a geometric phantom and every identifier is made up: patient names are
`SYNTHETIC^...`, patient IDs and accession numbers are derived from the seed, and all UIDs
are `2.25.` UUIDs (PS3.5 B.2) derived from the seed and the parameters. Nothing here comes
from, or resembles, a real patient, so the data can be committed, logged and shipped freely.

Determinism is the point: the same call gives the same UIDs and the same pixels, so a
benchmark can reuse files written earlier, and a test can name the instance it expects.
Different parameters give different UIDs, so two generated studies never collide in a store.

Only `write_series` touches the file system; everything else builds data sets in memory.
"""

from __future__ import annotations

import datetime
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    RE_VALID_UID,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
)
from pydicom.valuerep import format_number_as_ds

__all__ = ["chest_xray", "ct_series", "small_instances", "write_series"]

# Fixed namespace for the UUIDs behind every UID here; changing it changes every UID.
_NAMESPACE: Final = uuid.UUID("5d0f3a0e-6c1b-5b6e-9a43-7e1e1c0ad1c0")
_PIXEL_DATA: Final = Tag(0x7FE0, 0x0010)
_CT_INTERCEPT: Final = -1024
_COMMENT: Final = "SYNTHETIC PHANTOM - NOT FOR CLINICAL USE"
# Axial field of view of the head series, mm; the head fills most of it, as on a scanner.
_HEAD_FOV: Final = 240.0
# Head coverage from just above the skull base to the vertex, mm.
_HEAD_COVERAGE: Final = 150.0
_HEAD_FIRST_Z: Final = -55.0

# Tissue labels of the head phantom; each modality maps them to its own values.
_AIR, _SCALP, _BONE, _GREY, _WHITE, _CSF, _BLOOD = range(7)
# Hounsfield units per label. Brain stays within 20-50 HU and the bleed at 60-80 HU, the
# windows a haemorrhage detector is tuned for.
_CT_HU: Final = np.array([-1000, 20, 1000, 40, 29, 8, 70], dtype=np.int16)
_CT_NOISE_HU: Final = 4.0


def _uid(*parts: object) -> UID:
    """A 2.25 UID from a name-based UUID, so the same parts always give the same UID."""
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, '/'.join(map(str, parts))).int}")


def _number(*parts: object) -> int:
    """A stable pseudo-random integer for dates, accession numbers and the like."""
    return uuid.uuid5(_NAMESPACE, "#".join(map(str, parts))).int


def _ds(value: float) -> str:
    """DS strings are limited to 16 characters; floats like 240/512*k are not."""
    return format_number_as_ds(float(value))


def _check_seed(seed: int) -> None:
    # numpy refuses negative seeds; say so in our terms instead of deep in default_rng.
    if seed < 0:
        raise ValueError(f"seed must be >= 0, not {seed}")


@dataclass(frozen=True, slots=True)
class _Study:
    uid: UID
    date: datetime.datetime
    accession: str
    study_id: str
    description: str
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str


def _study(
    kind: str, seed: int, key: tuple[object, ...], description: str, study_uid: str | None
) -> _Study:
    """Patient and study identity: the patient depends on the seed alone (the same synthetic
    person across kinds of study), the study on every parameter."""
    if study_uid is None:
        uid = _uid(kind, "study", *key)
    else:
        # Checked before UID() sees it, which would only warn.
        if len(study_uid) > 64 or re.fullmatch(RE_VALID_UID, study_uid) is None:
            raise ValueError(f"study_uid {study_uid!r} is not a valid DICOM UID")
        uid = UID(study_uid)
    h = _number(uid)
    start = datetime.datetime(2024, 1, 1, 7, 0, 0) + datetime.timedelta(
        days=h % 365, seconds=(h >> 16) % (11 * 3600)
    )
    birth = datetime.date(1940, 1, 1) + datetime.timedelta(days=_number("birth", seed) % 20000)
    return _Study(
        uid=uid,
        date=start,
        accession=f"SYN{h % 10**12:012d}",
        study_id=f"{(h >> 40) % 10**6}",
        description=description,
        patient_name=f"SYNTHETIC^{kind.upper()}",
        patient_id=f"SYN-{kind.upper()}-{seed:06d}",
        birth_date=birth.strftime("%Y%m%d"),
        sex="MF"[seed % 2],
    )


def _dataset(study: _Study, sop_class: UID, sop_uid: UID) -> FileDataset:
    """The modules every instance shares: file meta, SOP common, patient, study, equipment."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", Dataset(), preamble=b"\0" * 128, file_meta=meta, is_implicit_VR=False)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study.date.strftime("%Y%m%d")
    ds.StudyTime = study.date.strftime("%H%M%S")
    ds.AccessionNumber = study.accession
    ds.Manufacturer = "TELERAD SYNTHETIC"
    ds.ManufacturerModelName = "PHANTOM"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study.description
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.StudyInstanceUID = study.uid
    ds.StudyID = study.study_id
    ds.ImageComments = _COMMENT
    return ds


def _series(
    ds: Dataset,
    *,
    modality: str,
    uid: UID,
    number: int,
    description: str,
    when: datetime.datetime,
    body_part: str,
) -> None:
    ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.Modality = modality
    ds.SeriesDescription = description
    ds.BodyPartExamined = body_part
    ds.SeriesInstanceUID = uid
    ds.SeriesNumber = number


def _pixels(ds: Dataset, image: npt.NDArray[np.integer], *, bits_stored: int) -> None:
    """Image Pixel module; the data element is OW and little endian, as the transfer syntax
    says, whatever the host's byte order."""
    signed = np.issubdtype(image.dtype, np.signedinteger)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.add_new(_PIXEL_DATA, "OW", image.astype("<i2" if signed else "<u2").tobytes())


def _plane(
    ds: Dataset, *, size: int, spacing: float, z: float, thickness: float, fov: float
) -> None:
    """Image Plane module for an axial slice centred on the isocentre."""
    corner = -fov / 2 + spacing / 2
    ds.PatientPosition = "HFS"
    ds.ImagePositionPatient = [_ds(corner), _ds(corner), _ds(z)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
    ds.SliceThickness = _ds(thickness)
    ds.SliceLocation = _ds(z)


# --------------------------------------------------------------------------- head phantom


@dataclass(frozen=True, slots=True)
class _Ellipsoid:
    centre: tuple[float, float, float]
    axes: tuple[float, float, float]
    label: int


def _head(seed: int, bleed_z: float | None) -> list[_Ellipsoid]:
    """Nested ellipsoids, outermost first, in patient coordinates (LPS, mm). The seed varies
    the head's size by a few per cent so that seeds differ in pixels, not only in UIDs."""
    rng = np.random.default_rng([seed, 1])
    sx, sy = (float(v) for v in rng.uniform(0.96, 1.04, size=2))

    def shell(a: float, b: float, c: float, label: int) -> _Ellipsoid:
        return _Ellipsoid((0.0, 0.0, 0.0), (a * sx, b * sy, c), label)

    parts = [
        shell(74, 94, 100, _SCALP),
        shell(69, 89, 95, _BONE),
        shell(62, 82, 88, _GREY),
        shell(50, 68, 72, _WHITE),
        _Ellipsoid((-9.0, 0.0, 15.0), (6.0, 24.0, 14.0), _CSF),
        _Ellipsoid((9.0, 0.0, 15.0), (6.0, 24.0, 14.0), _CSF),
    ]
    if bleed_z is not None:
        # In the left hemisphere, clear of the ventricles and well inside the skull.
        parts.append(_Ellipsoid((30.0, -15.0, bleed_z), (12.0, 12.0, 12.0), _BLOOD))
    return parts


class _SlicedPhantom:
    """Labels of axial slices through ellipsoids. Each ellipsoid's in-plane quadratic form is
    computed once; a slice is then one comparison per ellipsoid, which is what makes a
    300-slice 512x512 series take a second or two rather than a minute."""

    def __init__(self, parts: Sequence[_Ellipsoid], size: int, fov: float) -> None:
        spacing = fov / size
        coords = (np.arange(size, dtype=np.float32) + 0.5) * spacing - fov / 2
        self._size = size
        self._parts = [
            (
                p,
                ((coords[None, :] - p.centre[0]) / p.axes[0]) ** 2
                + ((coords[:, None] - p.centre[1]) / p.axes[1]) ** 2,
            )
            for p in parts
        ]

    def labels(self, z: float) -> npt.NDArray[np.uint8]:
        out = np.zeros((self._size, self._size), dtype=np.uint8)
        for part, q in self._parts:
            r = 1.0 - ((z - part.centre[2]) / part.axes[2]) ** 2
            if r > 0:
                out[q <= r] = part.label
        return out


def _noise(
    seed: int, shape: tuple[int, int], sigma: float, count: int = 8
) -> npt.NDArray[np.int16]:
    """A few noise fields, cycled through the slices: fresh noise for every slice would be
    most of the generation time and buys nothing a test can see."""
    rng = np.random.default_rng([seed, 2])
    return np.rint(rng.normal(0.0, sigma, size=(count, *shape))).astype(np.int16)


def ct_series(
    n_slices: int = 300,
    size: int = 512,
    seed: int = 0,
    hyperdensity: bool = False,
    study_uid: str | None = None,
    *,
    series_number: int = 1,
    slice_thickness: float | None = None,
) -> Iterator[FileDataset]:
    """An axial non-contrast head CT, inferior to superior, one slice per data set.

    Pixels are stored as HU + 1024 with RescaleIntercept -1024 (signed 16-bit, as many
    scanners write them), so a reader that forgets the modality LUT sees brain at ~1060
    instead of ~35 and fails loudly rather than almost working.

    With `hyperdensity` a sphere of ~70 HU (an acute bleed) of 12 mm radius is centred on
    the middle slice (index n_slices // 2) in the left hemisphere, so it shows on that slice
    and on those within 12 mm of it. The slices cover 150 mm unless `slice_thickness` says
    otherwise. Pass `study_uid` (and a distinct `series_number`) to add a series to an
    existing study.
    """
    _check_seed(seed)
    if n_slices < 1 or size < 8:
        raise ValueError("need n_slices >= 1 and size >= 8")
    thickness = round(_HEAD_COVERAGE / n_slices, 3) if slice_thickness is None else slice_thickness
    if thickness <= 0:
        raise ValueError(f"slice_thickness must be positive, not {thickness}")
    key = ("ct", seed, n_slices, size, hyperdensity, thickness)
    study = _study("ct", seed, key, "CT HEAD WO CONTRAST", study_uid)
    series_uid = _uid(*key, study.uid, series_number, "series")
    frame_uid = _uid(*key, study.uid, series_number, "frame")
    description = "AXIAL HEAD " + _ds(thickness) + "MM"
    when = study.date + datetime.timedelta(minutes=2 * series_number)
    spacing = _HEAD_FOV / size
    zs = [_HEAD_FIRST_Z + i * thickness for i in range(n_slices)]
    bleed_z = zs[n_slices // 2] if hyperdensity else None
    phantom = _SlicedPhantom(_head(seed, bleed_z), size, _HEAD_FOV)
    noise = _noise(seed, (size, size), _CT_NOISE_HU)
    for i, z in enumerate(zs):
        hu = _CT_HU[phantom.labels(z)] + noise[i % len(noise)]
        stored = np.clip(hu - _CT_INTERCEPT, 0, 4095)
        sop_uid = _uid(*key, study.uid, series_number, "instance", i)
        ds = _dataset(study, CTImageStorage, sop_uid)
        _series(
            ds,
            modality="CT",
            uid=series_uid,
            number=series_number,
            description=description,
            when=when,
            body_part="HEAD",
        )
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = i + 1
        ds.AcquisitionNumber = 1
        ds.KVP = "120"
        _plane(ds, size=size, spacing=spacing, z=z, thickness=thickness, fov=_HEAD_FOV)
        _pixels(ds, stored.astype(np.int16), bits_stored=16)
        ds.RescaleIntercept = str(_CT_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "80"
        yield ds


# --------------------------------------------------------------------------- small MR

# (description, TR ms, TE ms, per-label signal) for the series of the small-instance study.
_MR_SERIES: Final[tuple[tuple[str, str, str, tuple[int, ...]], ...]] = (
    ("AX T1 SE", "500", "15", (0, 900, 60, 500, 650, 150, 800)),
    ("AX T2 TSE", "4000", "100", (0, 500, 50, 800, 600, 1800, 400)),
    ("AX FLAIR", "9000", "120", (0, 600, 50, 700, 550, 80, 900)),
    ("AX PD TSE", "2500", "20", (0, 700, 60, 900, 800, 1000, 700)),
)


def small_instances(
    n: int = 2000, seed: int = 0, size: int = 64, *, n_series: int = 4
) -> Iterator[FileDataset]:
    """One brain MR study of `n` small instances (64x64x16 bit is ~9 KB each) spread evenly
    over `n_series` series: the shape of load where per-instance overhead, not bandwidth,
    limits an ingest path.

    Instance numbers run on across the series (1..n) rather than restarting at 1, so all
    the files of the study can sit in one directory under `write_series`' names."""
    _check_seed(seed)
    if n < 0 or n_series < 1 or size < 8:
        raise ValueError("need n >= 0, n_series >= 1 and size >= 8")
    key = ("mr", seed, n, size, n_series)
    study = _study("mr", seed, key, "MR BRAIN WO CONTRAST", None)
    # One frame of reference: the patient does not move between the series of one session.
    frame_uid = _uid(*key, "frame")
    spacing = _HEAD_FOV / size
    phantom = _SlicedPhantom(_head(seed, None), size, _HEAD_FOV)
    noise = _noise(seed, (size, size), 12.0)
    per, extra = divmod(n, n_series)
    number = 0
    for s in range(n_series):
        count = per + (1 if s < extra else 0)
        if count == 0:
            continue
        description, tr, te, signal = _MR_SERIES[s % len(_MR_SERIES)]
        lut = np.array(signal, dtype=np.int16)
        series_uid = _uid(*key, "series", s)
        thickness = round(_HEAD_COVERAGE / count, 3)
        when = study.date + datetime.timedelta(minutes=5 * s)
        for i in range(count):
            number += 1
            z = _HEAD_FIRST_Z + i * thickness
            image = np.clip(lut[phantom.labels(z)] + noise[number % len(noise)], 0, 4095)
            ds = _dataset(study, MRImageStorage, _uid(*key, "instance", number))
            _series(
                ds,
                modality="MR",
                uid=series_uid,
                number=s + 1,
                description=description,
                when=when,
                body_part="HEAD",
            )
            ds.FrameOfReferenceUID = frame_uid
            ds.PositionReferenceIndicator = ""
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
            ds.InstanceNumber = number
            ds.AcquisitionNumber = 1
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.RepetitionTime = tr
            ds.EchoTime = te
            ds.EchoTrainLength = 1
            ds.MagneticFieldStrength = "1.5"
            ds.ImagedNucleus = "1H"
            _plane(ds, size=size, spacing=spacing, z=z, thickness=thickness, fov=_HEAD_FOV)
            _pixels(ds, image.astype(np.uint16), bits_stored=12)
            ds.WindowCenter = "600"
            ds.WindowWidth = "1200"
            yield ds


# --------------------------------------------------------------------------- chest X-ray


def _chest_image(seed: int, rows: int, columns: int, opacity: bool) -> npt.NDArray[np.uint16]:
    """A PA chest as displayed: patient's right on the image's left, head at the top, more
    attenuation brighter (MONOCHROME2). Lungs dark, mediastinum, heart and spine bright,
    ribs as curved bands over the lungs; enough for a viewer or a model's pre-processing to
    have something chest-shaped to work on."""
    rng = np.random.default_rng([seed, 3])
    jitter = rng.uniform(0.95, 1.05, size=3).astype(np.float32)
    u = np.linspace(-1.0, 1.0, columns, dtype=np.float32)[None, :]  # towards patient's left
    v = np.linspace(-1.0, 1.0, rows, dtype=np.float32)[:, None]  # towards the feet

    def inside(cu: float, cv: float, au: float, av: float) -> npt.NDArray[np.bool_]:
        return ((u - cu) / au) ** 2 + ((v - cv) / av) ** 2 <= 1.0

    att = np.full((rows, columns), 0.04, dtype=np.float32)
    body = (np.abs(u) / 0.86) ** 4 + (np.abs(v - 0.15) / 1.25) ** 4 <= 1.0
    att[body] = 0.5
    lungs = inside(-0.38, -0.08, 0.27 * jitter[0], 0.56) | inside(
        0.38, -0.08, 0.25 * jitter[1], 0.54
    )
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * 7.0 * (v - 0.3 * u**2))) ** 8
    att[lungs] = (0.2 + 0.12 * np.broadcast_to(ribs, att.shape))[lungs]
    att[inside(0.12, 0.25, 0.27 * jitter[2], 0.23)] = 0.62  # heart, to the patient's left
    if opacity:
        # Consolidation filling most of the right upper zone (the image's left).
        att[lungs & inside(-0.38, -0.4, 0.26, 0.26)] = 0.55
    att[body & (np.abs(u) < 0.08)] = 0.7  # spine and mediastinum
    clavicles = (
        (np.abs(v + 0.58 - 0.18 * np.abs(u)) < 0.025) & (np.abs(u) > 0.08) & (np.abs(u) < 0.55)
    )
    att[clavicles] = 0.8
    att += rng.normal(0.0, 0.01, size=att.shape).astype(np.float32)
    return np.clip(att * 3800 + 100, 0, 4095).astype(np.uint16)


def chest_xray(
    seed: int = 0,
    size: tuple[int, int] = (2048, 2048),
    modality: Literal["DX", "CR"] = "DX",
    *,
    study_uid: str | None = None,
    opacity: bool = False,
) -> FileDataset:
    """A single-view PA chest radiograph, 12 bits stored in 16, at 0.2 mm per pixel.

    DX is Digital X-Ray For Presentation, with the attributes its IOD requires beyond CR's
    (presentation intent, pixel intensity relationship, presentation LUT), because that is
    what modern rooms send; CR is for paths that must handle the older class.

    With `opacity` a dense consolidation fills most of the right upper lung zone.
    """
    _check_seed(seed)
    rows, columns = size
    if rows < 8 or columns < 8:
        raise ValueError(f"size {size} is too small")
    # Only a changed image changes the UIDs: earlier studies keep theirs.
    key = ("cxr", seed, rows, columns, modality, *(("opacity",) if opacity else ()))
    study = _study("cxr", seed, key, "XR CHEST 1 VIEW", study_uid)
    sop_class = (
        DigitalXRayImageStorageForPresentation
        if modality == "DX"
        else (ComputedRadiographyImageStorage)
    )
    ds = _dataset(study, sop_class, _uid(*key, study.uid, "instance"))
    _series(
        ds,
        modality=modality,
        uid=_uid(*key, study.uid, "series"),
        number=1,
        description="CHEST PA",
        when=study.date + datetime.timedelta(minutes=1),
        body_part="CHEST",
    )
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.InstanceNumber = 1
    ds.KVP = "125"
    ds.DistanceSourceToDetector = "1800"
    ds.ImagerPixelSpacing = ["0.2", "0.2"]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.ImageLaterality = "U"
        region = Dataset()
        region.CodeValue = "43799004"
        region.CodingSchemeDesignator = "SCT"
        region.CodeMeaning = "Chest"
        ds.AnatomicRegionSequence = [region]
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY"
        ds.LossyImageCompression = "00"
        ds.BurnedInAnnotation = "NO"
    _pixels(ds, _chest_image(seed, rows, columns, opacity), bits_stored=12)
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    return ds


# --------------------------------------------------------------------------- files


def write_series(datasets: Iterable[Dataset], directory: Path | str) -> list[Path]:
    """Write each data set as a Part 10 file named by its instance number (0001.dcm, ...),
    streaming, so a 300-slice series never has to be in memory at once.

    Two data sets with the same instance number are an error rather than one silently
    replacing the other; a data set without one is named by its position (1-based)."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    seen: set[str] = set()
    for position, ds in enumerate(datasets, start=1):
        number = ds.get("InstanceNumber")
        name = f"{int(number) if number is not None else position:04d}.dcm"
        if name in seen:
            raise ValueError(f"two data sets would both be written as {name}")
        seen.add(name)
        path = target / name
        dcmwrite(path, ds, enforce_file_format=True)
        written.append(path)
    return written
