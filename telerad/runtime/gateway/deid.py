"""De-identification for third-party models, and re-identification of what they return.

A job whose rule or model asks for it (`deidentify`) is served a copy of its study made
with dicognito: names, IDs, accession numbers, institutions and the like replaced by
consistent dummies, dates moved back consistently, private elements removed, and every
UID replaced by one derived from it (PS3.15 Annex E, Basic Application Level
Confidentiality Profile, with "clean" actions done by substitution). The pseudonyms derive
from a secret of this gateway and the study, so every instance of the study, and every
retry of its job, maps each UID the same way; nobody without the secret can map back.

The result the model stores comes back through the same mapping, reversed: each UID it
carries that is a pseudonym of one of the study's UIDs is replaced by the original, and the
patient and study attributes are copied from the study as stored. The vendor never sees
the originals; the PACS never sees the pseudonyms.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import pydicom
from dicognito.anonymizer import Anonymizer
from pydicom.dataset import Dataset, FileMetaDataset

# PS3.16 CID 7050: what was done, recorded in the copy (PS3.3 C.7.1.1).
BASIC_PROFILE = ("113100", "DCM", "Basic Application Confidentiality Profile")
CLEAN_DESCRIPTORS = ("113105", "DCM", "Clean Descriptors Option")
# Copied back from the study into a re-identified result.
PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDsSequence",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDescription",
    "InstitutionName",
)


class Deidentifier:
    """De- and re-identification under this gateway's secret (a file on the hot volume,
    made on first start, readable by the gateway only)."""

    def __init__(self, secret_file: Path) -> None:
        if not secret_file.exists():
            secret_file.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # another process made it first
            else:
                with os.fdopen(fd, "w") as out:
                    out.write(secrets.token_hex(32))
                    out.flush()
                    os.fsync(out.fileno())
        self._secret = secret_file.read_text().strip().encode()

    def key(self, study_uid: str) -> str:
        return hmac.new(self._secret, study_uid.encode(), hashlib.sha256).hexdigest()

    def pseudonym(self, study_uid: str) -> str:
        """The study's UID as its de-identified copy carries it."""
        return self.pseudonymize(study_uid, {"StudyInstanceUID": study_uid})["StudyInstanceUID"]

    def pseudonymize(self, study_uid: str, uids: dict[str, str]) -> dict[str, str]:
        """UIDs of the study's instances (by keyword) as its de-identified copy carries
        them: the same mapping, value by value, as `deidentify`."""
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        for keyword, uid in uids.items():
            setattr(ds, keyword, uid)
        Anonymizer(seed=self.key(study_uid)).anonymize(ds)
        return {keyword: str(ds[keyword].value) for keyword in uids}

    def deidentify(self, part10: bytes, study_uid: str) -> bytes:
        return deidentify(part10, self.key(study_uid))

    def reidentifier(self, headers: Sequence[Dataset], study_uid: str) -> Callable[[bytes], bytes]:
        """What restores results of the study's copy; `headers`: the study's stored
        instances (pixel data not needed). The mapping is made once for all of them."""
        back = pseudonyms(headers, self.key(study_uid))
        return lambda part10: reidentify(part10, back, headers[0])


def _code(value: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value
    return item


def deidentify(part10: bytes, key: str) -> bytes:
    """The de-identified copy of one stored instance, in its stored transfer syntax."""
    ds = pydicom.dcmread(io.BytesIO(part10))
    Anonymizer(seed=key).anonymize(ds)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethodCodeSequence = [_code(BASIC_PROFILE), _code(CLEAN_DESCRIPTORS)]
    # The file meta repeats the instance UID and names the sender: neither may stay.
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "SourceApplicationEntityTitle" in ds.file_meta:
        del ds.file_meta.SourceApplicationEntityTitle
    return _encode(ds)


def _pairs(original: Dataset, copy: Dataset) -> Iterator[tuple[str, str]]:
    """(pseudonym, original) of every UID the two data sets hold at the same place."""
    for element in original:
        if element.tag not in copy or not element.value:
            continue
        other = copy[element.tag]
        if element.VR == "UI":
            before = element.value if element.VM > 1 else [element.value]
            after = other.value if other.VM > 1 else [other.value]
            yield from ((str(a), str(b)) for a, b in zip(after, before, strict=False))
        elif element.VR == "SQ":
            for item, item_copy in zip(element.value, other.value, strict=False):
                yield from _pairs(item, item_copy)


def pseudonyms(headers: Iterable[Dataset], key: str) -> dict[str, str]:
    """Pseudonym -> original, for every UID of the study's instances (their headers)."""
    back: dict[str, str] = {}
    for original in headers:
        copy = copy_of(original)
        Anonymizer(seed=key).anonymize(copy)
        back.update(_pairs(original, copy))
    return back


def copy_of(ds: Dataset) -> Dataset:
    return pydicom.dcmread(io.BytesIO(_encode(ds)))


def _encode(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def reidentify(part10: bytes, back: dict[str, str], study: Dataset) -> bytes:
    """A result made from the de-identified copy, with the study's own identity restored."""
    ds = pydicom.dcmread(io.BytesIO(part10))
    for element in ds.iterall():
        if element.VR != "UI" or not element.value:
            continue
        if element.VM > 1:
            element.value = [back.get(str(v), str(v)) for v in element.value]
        else:
            element.value = back.get(str(element.value), str(element.value))
    if "PatientIdentityRemoved" in ds:
        del ds.PatientIdentityRemoved
    if "DeidentificationMethodCodeSequence" in ds:
        del ds.DeidentificationMethodCodeSequence
    for keyword in PATIENT_AND_STUDY:
        if keyword in study:
            setattr(ds, keyword, study[keyword].value)
        elif keyword in ds:
            delattr(ds, keyword)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return _encode(ds)
