"""The synthetic studies: valid Part 10 files, the HU a detector expects, stable UIDs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileDataset
from pydicom.pixels.processing import apply_modality_lut
from pydicom.uid import (
    UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

from telerad import synthetic

SLICES = 20
SIZE = 128


def _hu(ds: Dataset) -> npt.NDArray[np.float64]:
    return np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)


def _read_all(paths: list[Path]) -> list[FileDataset]:
    return [dcmread(p) for p in paths]


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> list[FileDataset]:
    out = tmp_path_factory.mktemp("ct")
    return _read_all(synthetic.write_series(synthetic.ct_series(SLICES, SIZE, seed=3), out))


@pytest.fixture(scope="module")
def ct_bleed(tmp_path_factory: pytest.TempPathFactory) -> list[FileDataset]:
    out = tmp_path_factory.mktemp("ct-bleed")
    series = synthetic.ct_series(SLICES, SIZE, seed=3, hyperdensity=True)
    return _read_all(synthetic.write_series(series, out))


def _uids(datasets: list[FileDataset]) -> list[str]:
    return [str(ds.SOPInstanceUID) for ds in datasets]


def test_ct_files_are_part10_ct_images(ct: list[FileDataset], tmp_path: Path) -> None:
    assert len(ct) == SLICES
    for ds in ct:
        assert ds.preamble == b"\0" * 128
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == CTImageStorage
        assert ds.Modality == "CT"
        assert ds.BodyPartExamined == "HEAD"
        assert ds.StudyDescription == "CT HEAD WO CONTRAST"
        assert str(ds.PatientName).startswith("SYNTHETIC^")
        assert ds.PixelRepresentation == 1
        assert ds.BitsAllocated == 16
        assert ds.pixel_array.shape == (SIZE, SIZE)
        assert ds.pixel_array.dtype == np.int16
    assert [ds.InstanceNumber for ds in ct] == list(range(1, SLICES + 1))


def test_written_names_follow_instance_numbers(tmp_path: Path) -> None:
    paths = synthetic.write_series(synthetic.ct_series(3, 16), tmp_path)
    assert [p.name for p in paths] == ["0001.dcm", "0002.dcm", "0003.dcm"]
    assert all(p.parent == tmp_path for p in paths)


def test_duplicate_instance_numbers_are_refused(tmp_path: Path) -> None:
    twice = [*synthetic.ct_series(2, 16, seed=1), *synthetic.ct_series(2, 16, seed=2)]
    with pytest.raises(ValueError, match=r"0001\.dcm"):
        synthetic.write_series(twice, tmp_path)


def test_ct_geometry(ct: list[FileDataset]) -> None:
    zs = [float(ds.ImagePositionPatient[2]) for ds in ct]
    steps = np.diff(zs)
    assert np.all(steps > 0)
    assert steps == pytest.approx(float(ct[0].SliceThickness))
    for ds in ct:
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(ds.PixelSpacing[0]) == float(ds.PixelSpacing[1]) > 0
        assert float(ds.SliceLocation) == pytest.approx(float(ds.ImagePositionPatient[2]))
        assert ds.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
        assert ds.SeriesInstanceUID == ct[0].SeriesInstanceUID
        assert ds.StudyInstanceUID == ct[0].StudyInstanceUID


def test_ct_hounsfield_units(ct: list[FileDataset]) -> None:
    middle = _hu(ct[SLICES // 2])
    corner = middle[:8, :8]
    assert corner.mean() == pytest.approx(-1000, abs=10)
    c = SIZE // 2
    # White matter in front of the ventricles (the image's top rows are anterior).
    brain = middle[c - 22 : c - 16, c - 4 : c + 4]
    assert 20 <= brain.mean() <= 50
    assert np.all((brain > 0) & (brain < 70))
    # A skull: a good share of a ring of pixels near +1000 HU around the brain.
    row = middle[c]
    assert (row > 700).sum() >= 2
    assert row.max() == pytest.approx(1000, abs=30)


def _bleed_pixels(ds: Dataset) -> int:
    hu = _hu(ds)
    return int(((hu >= 55) & (hu <= 100)).sum())


def test_hyperdensity_only_when_asked(ct: list[FileDataset], ct_bleed: list[FileDataset]) -> None:
    plain = [_bleed_pixels(ds) for ds in ct]
    bleed = [_bleed_pixels(ds) for ds in ct_bleed]
    assert max(plain) < 5
    assert bleed[SLICES // 2] > 50
    hit = [i for i, count in enumerate(bleed) if count > 20]
    # A few central slices, not the whole series.
    assert SLICES // 2 in hit
    assert 1 <= len(hit) <= 5
    assert all(abs(i - SLICES // 2) <= 2 for i in hit)
    blob = _hu(ct_bleed[SLICES // 2])
    assert 60 <= blob[(blob >= 55) & (blob <= 100)].mean() <= 80


def test_uids_valid_and_unique(ct: list[FileDataset], ct_bleed: list[FileDataset]) -> None:
    for ds in ct:
        for uid in (
            ds.SOPInstanceUID,
            ds.SeriesInstanceUID,
            ds.StudyInstanceUID,
            ds.FrameOfReferenceUID,
        ):
            assert UID(uid).is_valid
    assert len(set(_uids(ct))) == SLICES
    # The bleed changes the pixels, so it must change the identities too.
    assert not set(_uids(ct)) & set(_uids(ct_bleed))
    assert ct[0].StudyInstanceUID != ct_bleed[0].StudyInstanceUID


def test_same_seed_same_uids_and_pixels() -> None:
    a = list(synthetic.ct_series(4, 32, seed=7))
    b = list(synthetic.ct_series(4, 32, seed=7))
    assert _uids(a) == _uids(b)
    assert [ds.StudyInstanceUID for ds in a] == [ds.StudyInstanceUID for ds in b]
    assert all(x.PixelData == y.PixelData for x, y in zip(a, b, strict=True))
    assert a[0].PatientID == b[0].PatientID
    assert a[0].AccessionNumber == b[0].AccessionNumber


def test_different_seeds_differ() -> None:
    a = list(synthetic.ct_series(4, 32, seed=7))
    b = list(synthetic.ct_series(4, 32, seed=8))
    assert not set(_uids(a)) & set(_uids(b))
    assert a[0].StudyInstanceUID != b[0].StudyInstanceUID
    assert a[0].SeriesInstanceUID != b[0].SeriesInstanceUID
    assert a[0].PatientID != b[0].PatientID
    assert any(x.PixelData != y.PixelData for x, y in zip(a, b, strict=True))


def test_series_added_to_a_given_study() -> None:
    first = list(synthetic.ct_series(2, 16, seed=1))
    study = str(first[0].StudyInstanceUID)
    second = list(synthetic.ct_series(2, 16, seed=1, study_uid=study, series_number=2))
    assert {ds.StudyInstanceUID for ds in second} == {study}
    assert second[0].SeriesInstanceUID != first[0].SeriesInstanceUID
    assert not set(_uids(first)) & set(_uids(second))
    with pytest.raises(ValueError, match="not a valid"):
        next(synthetic.ct_series(2, 16, study_uid="1.02.3"))


def test_negative_seed_is_refused() -> None:
    with pytest.raises(ValueError, match="seed"):
        next(synthetic.ct_series(2, 16, seed=-1))


def test_small_instances(tmp_path: Path) -> None:
    n = 60
    paths = synthetic.write_series(synthetic.small_instances(n=n, seed=2), tmp_path)
    assert len(paths) == n
    sizes = [p.stat().st_size for p in paths]
    assert all(6 * 1024 <= s <= 12 * 1024 for s in sizes), (min(sizes), max(sizes))
    datasets = _read_all(paths)
    assert {ds.SOPClassUID for ds in datasets} == {MRImageStorage}
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    series = {ds.SeriesInstanceUID for ds in datasets}
    assert 2 <= len(series) <= 6
    assert len(set(_uids(datasets))) == n
    assert all(UID(u).is_valid for u in _uids(datasets))
    for ds in datasets:
        assert ds.pixel_array.shape == (64, 64)
        assert ds.pixel_array.dtype == np.uint16
    # Something head-shaped rather than blank images.
    assert any(int(ds.pixel_array.max()) > 300 for ds in datasets)


def test_chest_xray(tmp_path: Path) -> None:
    ds = synthetic.chest_xray(seed=5, size=(256, 200))
    [path] = synthetic.write_series([ds], tmp_path)
    read = dcmread(path)
    assert read.SOPClassUID == DigitalXRayImageStorageForPresentation
    assert read.Modality == "DX"
    assert read.BodyPartExamined == "CHEST"
    assert read.ViewPosition == "PA"
    assert read.PhotometricInterpretation == "MONOCHROME2"
    assert read.PixelRepresentation == 0
    assert read.BitsStored in (12, 16)
    image = read.pixel_array
    assert image.shape == (256, 200)
    assert image.dtype == np.uint16
    assert int(image.max()) < 2**read.BitsStored
    # Lungs darker than the spine between them, the body brighter than the air around it.
    spine = image[100:140, 96:104].mean()
    right_lung = image[110:130, 50:70].mean()
    assert right_lung < 0.5 * spine
    assert image[:, :3].mean() < right_lung
    assert UID(read.SOPInstanceUID).is_valid
    assert synthetic.chest_xray(seed=5, size=(32, 32)).SOPInstanceUID == (
        synthetic.chest_xray(seed=5, size=(32, 32)).SOPInstanceUID
    )


def test_chest_cr() -> None:
    ds = synthetic.chest_xray(size=(64, 64), modality="CR")
    assert ds.Modality == "CR"
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1"
    assert "PresentationIntentType" not in ds
