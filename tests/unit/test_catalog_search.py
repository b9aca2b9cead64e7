"""QIDO-RS searches on a real SQLite catalog filled through the real ingest path."""

from __future__ import annotations

import fnmatch
import io
from pathlib import Path

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from telerad.api.config import HOT, CatalogConfig
from telerad.runtime.dataset import StoreStatus
from telerad.runtime.dicomweb import qido
from telerad.runtime.gateway.ingest import Ingest
from telerad.runtime.gateway.metrics import GatewayMetrics
from telerad.runtime.store import backends
from telerad.runtime.store.files import DiskTier
from telerad.runtime.store.search import Level
from tests.unit.test_runtime_store import store_bytes

CT = Path(str(get_testdata_file("CT_small.dcm")))
EXPLICIT = "1.2.840.10008.1.2.1"


class Archive:
    def __init__(self, root: Path, catalog: CatalogConfig) -> None:
        url, password = backends.connection(catalog, root)
        self.catalog = backends.open(url, site="example", password=password)
        self.ingest = Ingest(self.catalog, {HOT: DiskTier(HOT, root)}, GatewayMetrics("test"), 0)

    def store(self, **attributes: object) -> pydicom.Dataset:
        ds = pydicom.dcmread(CT)
        ds.StudyInstanceUID = attributes.pop("StudyInstanceUID", generate_uid())
        ds.SeriesInstanceUID = attributes.pop("SeriesInstanceUID", generate_uid())
        ds.SOPInstanceUID = attributes.pop("SOPInstanceUID", generate_uid())
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        out = io.BytesIO()
        pydicom.dcmwrite(out, ds)
        outcome = store_bytes(
            self.ingest,
            _body(out.getvalue()),
            EXPLICIT,
            str(ds.SOPClassUID),
            ds.SOPInstanceUID,
            "X",
        )
        assert outcome.status == StoreStatus.SUCCESS, outcome
        return ds

    def find(self, level: Level, *params: tuple[str, str], **scope: str) -> list[dict[str, object]]:
        query = qido.parse(level, list(params), **scope)
        return qido.results(query, self.catalog.search(query.search), "http://g")


def _body(part10: bytes) -> bytes:
    stream = io.BytesIO(part10)
    pydicom.filereader.read_preamble(stream, False)
    pydicom.filereader._read_file_meta_info(stream)
    return part10[stream.tell() :]


def uids(results: list[dict[str, object]], tag: str = "0020000D") -> set[str]:
    return {r[tag]["Value"][0] for r in results}  # type: ignore[index]


@pytest.fixture
def archive(tmp_path: Path, catalog_config: CatalogConfig) -> Archive:
    return Archive(tmp_path, catalog_config)


def test_matching_kinds(archive: Archive) -> None:
    a = archive.store(
        PatientName="Doe^Jane",
        PatientID="P_1%",
        StudyDate="20240105",
        StudyTime="083000",
        Modality="CT",
    )
    b = archive.store(
        PatientName="DOE^JOHN",
        PatientID="P12",
        StudyDate="20231231",
        StudyTime="121501",
        Modality="MR",
    )
    c = archive.store(
        PatientName="Roe^Ann",
        PatientID="P_1x",
        StudyDate="20240301",
        StudyTime="1200",
        Modality="CT",
    )
    study = Level.STUDY
    assert uids(archive.find(study, ("PatientName", "doe*"))) == {
        a.StudyInstanceUID,
        b.StudyInstanceUID,
    }
    assert uids(archive.find(study, ("PatientName", "doe^jane"))) == {a.StudyInstanceUID}
    # % and _ are literal characters in DICOM, not SQL wildcards.
    assert uids(archive.find(study, ("PatientID", "P_1%"))) == {a.StudyInstanceUID}
    assert uids(archive.find(study, ("PatientID", "P_1?"))) == {
        a.StudyInstanceUID,
        c.StudyInstanceUID,
    }
    assert uids(archive.find(study, ("PatientID", "p12"))) == set()  # case-sensitive
    assert uids(archive.find(study, ("StudyDate", "20240101-"))) == {
        a.StudyInstanceUID,
        c.StudyInstanceUID,
    }
    assert uids(archive.find(study, ("StudyDate", "-20240105"))) == {
        a.StudyInstanceUID,
        b.StudyInstanceUID,
    }
    assert uids(archive.find(study, ("StudyDate", "20240105"))) == {a.StudyInstanceUID}
    assert uids(archive.find(study, ("StudyTime", "1200-1215"))) == {
        b.StudyInstanceUID,
        c.StudyInstanceUID,
    }
    assert uids(archive.find(study, ("ModalitiesInStudy", "MR"))) == {b.StudyInstanceUID}
    both = f"{a.StudyInstanceUID},{c.StudyInstanceUID}"
    assert uids(archive.find(study, ("StudyInstanceUID", both))) == {
        a.StudyInstanceUID,
        c.StudyInstanceUID,
    }
    with pytest.raises(qido.QueryError, match="YYYYMMDD"):  # no wildcards on dates
        archive.find(Level.SERIES, ("StudyDate", "2024*"))
    assert uids(archive.find(Level.SERIES, ("Modality", "C?"), ("PatientName", "*ann"))) == {
        c.StudyInstanceUID
    }


def test_results_carry_counts_levels_and_latest_versions(archive: Archive) -> None:
    study, series = generate_uid(), generate_uid()
    first = archive.store(StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=1)
    archive.store(StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=2)
    archive.store(StudyInstanceUID=study, Modality="MR", InstanceNumber=3)
    # The same SOP Instance UID with other content: a second version, still one instance.
    archive.store(
        StudyInstanceUID=study,
        SeriesInstanceUID=series,
        SOPInstanceUID=first.SOPInstanceUID,
        InstanceNumber=1,
        StudyDescription="changed",
    )
    (found,) = archive.find(Level.STUDY)
    assert found["00201206"]["Value"] == [2]  # type: ignore[index]  # series
    assert found["00201208"]["Value"] == [3]  # type: ignore[index]  # instances
    assert found["00080061"]["Value"] == ["CT", "MR"]  # type: ignore[index]
    assert found["00081190"]["Value"] == [f"http://g/studies/{study}"]  # type: ignore[index]
    instances = archive.find(Level.INSTANCE, study_uid=study, series_uid=series)
    assert len(instances) == 2
    assert all(i["00280010"]["Value"] == [128] for i in instances)  # type: ignore[index]
    assert instances[0]["00081190"]["Value"][0].endswith(
        f"/series/{series}/instances/{first.SOPInstanceUID}"
    )  # type: ignore[index]
    everything = archive.find(Level.INSTANCE, ("PatientID", str(first.PatientID)))
    assert len(everything) == 3 and "00100020" in everything[0]


def test_pages_are_stable_and_say_when_more_remain(archive: Archive) -> None:
    for _ in range(5):
        archive.store(PatientID="PAGED")
    seen = []
    for offset in range(0, 6, 2):
        query = qido.parse(
            Level.STUDY, [("PatientID", "PAGED"), ("limit", "2"), ("offset", str(offset))]
        )
        result = archive.catalog.search(query.search)
        seen += [r["StudyInstanceUID"] for r in result.rows]
        assert result.more == (offset < 4)
        assert bool(qido.result_warnings(query, result)) == result.more
    assert len(seen) == len(set(seen)) == 5


_ALPHABET = "ab%_[]*?^"


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Archive]:
    """One archive per backend for the examples of a property, emptied after each."""
    return {}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@settings(max_examples=60, deadline=None)
@given(
    names=st.lists(
        st.text(alphabet="ab%_[]^", min_size=1, max_size=6), min_size=1, max_size=5, unique=True
    ),
    pattern=st.text(alphabet=_ALPHABET, min_size=1, max_size=6),
)
def test_wildcards_match_as_dicom_says(  # noqa: PLR0917  (fixtures and examples)
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
    archives: dict[str, Archive],
    backend: str,
    names: list[str],
    pattern: str,
) -> None:
    """The backend's pattern matching with escaping agrees with a reference: fnmatch with
    only * and ? special, on study descriptions (case-sensitive) and patient names
    (case-insensitive)."""
    if backend not in archives:
        catalog = CatalogConfig()
        if backend == "postgresql":
            database = request.getfixturevalue("postgres").create_database(f"wild{backend[:2]}")
            catalog = CatalogConfig(url=database.url, password_file=database.password_file)
        archives[backend] = Archive(tmp_path_factory.mktemp("wild"), catalog)
    archive = archives[backend]
    by_name = {
        name: archive.store(StudyDescription=name, PatientName=name.upper()).StudyInstanceUID
        for name in names
    }
    try:
        literal = pattern.replace("[", "[[]")  # fnmatch treats [ as a class; DICOM does not
        expected = {uid for name, uid in by_name.items() if fnmatch.fnmatchcase(name, literal)}
        assert uids(archive.find(Level.STUDY, ("StudyDescription", pattern))) == expected
        assert uids(archive.find(Level.STUDY, ("PatientName", pattern))) == expected
    finally:
        for uid in by_name.values():
            archive.catalog.forget_study(uid)
