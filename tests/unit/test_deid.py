"""De-identification under a gateway's secret: consistent within a study, different
across studies and gateways, reversible only with the secret's mapping."""

from __future__ import annotations

import io
import stat
from pathlib import Path

import pydicom

from telerad import synthetic
from telerad.runtime.gateway.deid import Deidentifier


def encode(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_pseudonyms_are_consistent_within_a_study_and_differ_between_secrets(
    tmp_path: Path,
) -> None:
    deid = Deidentifier(tmp_path / "a" / "deid.key")
    assert stat.S_IMODE((tmp_path / "a" / "deid.key").stat().st_mode) == 0o600
    slices = list(synthetic.ct_series(n_slices=3, size=16, seed=41))
    study = str(slices[0].StudyInstanceUID)
    copies = [pydicom.dcmread(io.BytesIO(deid.deidentify(encode(ds), study))) for ds in slices]
    assert {c.StudyInstanceUID for c in copies} == {deid.pseudonym(study)}
    assert len({c.SeriesInstanceUID for c in copies}) == 1
    assert len({c.SOPInstanceUID for c in copies}) == 3
    assert all(c.file_meta.MediaStorageSOPInstanceUID == c.SOPInstanceUID for c in copies)
    assert all(c.PatientName != slices[0].PatientName for c in copies)
    # The same gateway again (its secret persisted) maps the same; another one does not.
    assert Deidentifier(tmp_path / "a" / "deid.key").pseudonym(study) == deid.pseudonym(study)
    assert Deidentifier(tmp_path / "b" / "deid.key").pseudonym(study) != deid.pseudonym(study)


def test_reidentify_maps_every_pseudonym_back(tmp_path: Path) -> None:
    deid = Deidentifier(tmp_path / "deid.key")
    slices = list(synthetic.ct_series(n_slices=2, size=16, seed=42))
    study = str(slices[0].StudyInstanceUID)
    copy = pydicom.dcmread(io.BytesIO(deid.deidentify(encode(slices[1]), study)))
    # A "result" that points at the copy, the way an SR's references do.
    result = pydicom.Dataset()
    result.file_meta = pydicom.dataset.FileMetaDataset()
    result.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    result.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    result.SOPClassUID = pydicom.uid.Comprehensive3DSRStorage
    result.SOPInstanceUID = "2.25.1"
    result.StudyInstanceUID = copy.StudyInstanceUID
    result.PatientName = copy.PatientName
    ref = pydicom.Dataset()
    ref.ReferencedSOPInstanceUID = copy.SOPInstanceUID
    result.ReferencedSOPSequence = [ref]
    headers = [pydicom.dcmread(io.BytesIO(encode(ds)), stop_before_pixels=True) for ds in slices]
    back = pydicom.dcmread(io.BytesIO(deid.reidentifier(headers, study)(encode(result))))
    assert back.StudyInstanceUID == study
    assert back.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == slices[1].SOPInstanceUID
    assert back.PatientName == slices[0].PatientName
    assert back.SOPInstanceUID == "2.25.1"  # the result's own UIDs are its own


def test_an_earlier_result_is_named_as_the_de_identified_copy_names_it(tmp_path: Path) -> None:
    """A job for a de-identified study names the result it replaces in pseudonyms: the
    same ones its copy of the study carries, which re-identification maps back."""
    deid = Deidentifier(tmp_path / "deid.key")
    (earlier,) = synthetic.ct_series(n_slices=1, size=16, seed=43)
    study = str(earlier.StudyInstanceUID)
    copy = pydicom.dcmread(io.BytesIO(deid.deidentify(encode(earlier), study)))
    keywords = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    named = deid.pseudonymize(study, {k: str(earlier[k].value) for k in keywords})
    assert named == {k: str(copy[k].value) for k in keywords}
    result = pydicom.Dataset()
    result.file_meta = pydicom.dataset.FileMetaDataset()
    result.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    result.SOPClassUID, result.SOPInstanceUID = earlier.SOPClassUID, pydicom.uid.generate_uid()
    result.StudyInstanceUID = named["StudyInstanceUID"]
    result.ReferencedSOPInstanceUID = named["SOPInstanceUID"]
    back = pydicom.dcmread(io.BytesIO(deid.reidentifier([earlier], study)(encode(result))))
    assert back.ReferencedSOPInstanceUID == earlier.SOPInstanceUID
