"""The reference models on real and synthetic images, the study assembly they read, and
the SR the worker builds from their results (checked by dicom3tools' dciodvfy)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from telerad import synthetic
from telerad.api.aimodel import Thresholds
from telerad.api.config import WorkerConfig
from telerad.runtime.gpu import Gpus
from telerad.runtime.models import base, cthead, volume
from telerad.runtime.results import sr
from telerad.runtime.worker.run import findings

REAL_CT = get_testdata_file("693_UNCR.dcm")
REAL_CXR = get_testdata_file("RG1_UNCR.dcm")


def study_of(datasets: list[pydicom.Dataset]) -> base.Study:
    return volume.assemble(str(datasets[0].StudyInstanceUID), datasets)


def test_plugins_are_found_by_entry_point_and_unknown_ones_named() -> None:
    assert {"ct-head-hyperdensity", "cxr-opacity"} <= set(base.available())
    with pytest.raises(base.UnknownModel, match="no-such-model"):
        base.load("no-such-model", "cpu")


def test_assembly_orders_slices_by_position_and_applies_the_modality_lut() -> None:
    slices = list(synthetic.ct_series(n_slices=12, size=32, seed=3))
    shuffled = slices[1::2] + slices[::2][::-1]
    study = study_of(shuffled)
    (series,) = study.series
    order = [str(ds.SOPInstanceUID) for ds in series.images]
    assert order == [str(ds.SOPInstanceUID) for ds in slices]
    assert series.pixels.shape == (12, 32, 32)
    assert series.pixels.min() == pytest.approx(-1000, abs=30)  # air in HU, not stored values
    assert series.spacing == pytest.approx((150 / 12, 240 / 32, 240 / 32), rel=1e-3)


def test_ct_model_finds_the_bleed_where_it_is_and_nothing_in_a_normal_head() -> None:
    model = base.load("ct-head-hyperdensity", "cpu")
    assert model.device == "cpu"
    normal = study_of(list(synthetic.ct_series(n_slices=60, size=256, seed=4)))
    assert model.predict(normal).detections == []
    slices = list(synthetic.ct_series(n_slices=60, size=256, seed=4, hyperdensity=True))
    (found,) = model.predict(study_of(slices)).detections
    assert found.label == "hyperdensity" and found.score > 0.99
    volume_ml = next(m.value for m in found.measures if m.key == "volume_ml")
    assert volume_ml == pytest.approx(4 / 3 * np.pi * 12**3 / 1000, rel=0.15)
    (region,) = found.regions
    # The bleed is centred at x=30, y=-15 mm (LPS) on slice 30: column 160, row 112.
    xs = [x for x, _ in region.outline]
    ys = [y for _, y in region.outline]
    assert min(xs) < 160 < max(xs) and min(ys) < 112 < max(ys)
    near = {str(ds.SOPInstanceUID) for ds in slices[26:35]}
    assert region.sop_uid in near


def test_ct_model_on_the_real_head_slice_and_on_a_bleed_painted_into_it() -> None:
    model = base.load("ct-head-hyperdensity", "cpu")
    assert model.predict(study_of([pydicom.dcmread(REAL_CT)])).detections == []
    ds = pydicom.dcmread(REAL_CT)
    # 30 HU more in a 10 mm disc of brain parenchyma: 35 HU tissue becomes blood-like.
    hu = ds.pixel_array.astype(np.int32)
    rows, columns = np.ogrid[: ds.Rows, : ds.Columns]
    disc = (rows - 300) ** 2 + (columns - 290) ** 2 <= (10 / 0.4785) ** 2
    brain = (hu - 1024 > 20) & (hu - 1024 < 45)
    hu[disc & brain] += 35
    ds.PixelData = hu.astype(ds.pixel_array.dtype).tobytes()
    (found,) = model.predict(study_of([ds])).detections
    (region,) = found.regions
    xs = [x for x, _ in region.outline]
    ys = [y for _, y in region.outline]
    assert min(xs) <= 290 <= max(xs) and min(ys) <= 300 <= max(ys)


def test_ct_model_is_not_for_other_modalities() -> None:
    model = base.load("ct-head-hyperdensity", "cpu")
    with pytest.raises(base.NotApplicable, match="no CT"):
        model.predict(study_of([synthetic.chest_xray(seed=1, size=(64, 64))]))


def test_cxr_model_on_the_real_chest_x_ray_and_synthetic_ones() -> None:
    model = base.load("cxr-opacity", "cpu")
    assert model.predict(study_of([pydicom.dcmread(REAL_CXR)])).detections == []
    for seed in range(3):
        clear = synthetic.chest_xray(seed=seed, size=(1024, 1024))
        assert model.predict(study_of([clear])).detections == []
        sick = synthetic.chest_xray(seed=seed, size=(1024, 1024), opacity=True)
        (found,) = model.predict(study_of([sick])).detections
        assert found.label == "opacity" and found.score > 0.9
        # The consolidation is in the patient's right upper zone: the image's left, top half.
        xs = [x for x, _ in found.regions[0].outline]
        ys = [y for _, y in found.regions[0].outline]
        assert max(xs) <= 1024 * 0.6 and max(ys) <= 1024 * 0.6


def test_thresholds_decide_what_is_critical() -> None:
    result = base.Result(
        detections=[
            base.Detection("hyperdensity", base.Code("1", "SCT", "x"), 0.85),
            base.Detection("opacity", base.Code("2", "SCT", "y"), 0.6),
        ],
        procedure=base.Code("3", "SCT", "z"),
    )
    config = WorkerConfig.model_validate(
        {"model": {"name": "m", "version": "1"}, "thresholds": {"critical": 0.8}}
    )
    assert [f.critical for f in findings(result, config)] == [True, False]
    stricter = config.model_copy(
        update={"thresholds": Thresholds(critical=0.8, findings={"hyperdensity": 0.9})}
    )
    assert [f.critical for f in findings(result, stricter)] == [False, False]


def test_no_gpu_means_zero_gpus_and_no_error() -> None:
    gpus = Gpus()
    if gpus.count:  # pragma: no cover  (a machine with a GPU)
        assert gpus.sample()
    else:
        assert gpus.sample() == [] and gpus.reason
    gpus.close()


@pytest.mark.parametrize("hyperdensity", [True, False])
def test_the_sr_passes_dciodvfy_and_references_its_sources(
    hyperdensity: bool, tmp_path: Path
) -> None:
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.fail("dciodvfy is not installed: `make test` installs dicom3tools")
    slices = list(synthetic.ct_series(n_slices=40, size=128, seed=5, hyperdensity=hyperdensity))
    study = study_of(slices)
    model = base.load("ct-head-hyperdensity", "cpu")
    result = model.predict(study)
    assert bool(result.detections) == hyperdensity
    evidence = list(study.series[0].images)
    report = sr.build(result, evidence, model=model.name, version=model.version, job_key="s/1")
    again = sr.build(result, evidence, model=model.name, version=model.version, job_key="s/1")
    # A retried job stores the same instance, not a second report.
    assert report.SOPInstanceUID == again.SOPInstanceUID
    assert report.SeriesInstanceUID == again.SeriesInstanceUID
    assert report.StudyInstanceUID == slices[0].StudyInstanceUID
    assert report.PatientID == slices[0].PatientID
    path = tmp_path / "sr.dcm"
    report.save_as(path, enforce_file_format=True)
    check = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
    output = check.stdout + check.stderr
    assert [line for line in output.splitlines() if line.startswith("Error")] == []
    text = str(report)
    assert "ct-head-hyperdensity" in text and model.version in text
    assert ("Absent" in text) != hyperdensity


def test_the_onnx_graph_computes_what_the_numpy_reference_does() -> None:
    real = study_of([pydicom.dcmread(REAL_CT)]).series[0]
    bleed = study_of(list(synthetic.ct_series(n_slices=30, size=256, seed=6, hyperdensity=True)))
    onnx = cthead.HyperdensityDetector("cpu")
    reference = cthead.HyperdensityDetector("cpu", backend="numpy")
    for series in (real, bleed.series[0]):
        for factor, margin in ((1, 3), (2, 4)):
            hu, blood = cthead.candidates(series.pixels, factor, margin)
            hu_onnx, blood_onnx = onnx._candidates(series.pixels, factor, margin)
            assert np.allclose(hu, hu_onnx, atol=1e-3)
            assert np.array_equal(blood, blood_onnx)
            assert blood.any() or series is real  # the bleed: a mask to compare
        assert onnx.detect(series) == reference.detect(series)
    assert onnx.device == "cpu"  # no CUDA provider here
