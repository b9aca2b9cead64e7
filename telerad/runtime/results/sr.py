"""A model's result as a DICOM Comprehensive 3D SR, TID 1500 (Measurement Report), built
with highdicom: one measurement group per detection, outlined on the image where the model
localised it, with its score, measurements and the algorithm's name and version; a report
without detections says so with an explicit "absent" evaluation, so that a PACS shows the
model ran and found nothing rather than nothing at all."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID

from telerad.api.jobs import ResultRef
from telerad.runtime.models.base import Code, Detection, Result

SERIES_NUMBER = 9001
MANUFACTURER = "telerad"
# A private scheme (PS3.16 8.2, 99 prefix) for the score, which DICOM has no code for.
SCORE = hd.sr.CodedConcept("score", "99TELERAD", "Model score")
UNITY = hd.sr.CodedConcept("1", "UCUM", "no units")
FINDING = hd.sr.CodedConcept("121071", "DCM", "Finding")


def _concept(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def result_uid(job_key: str, what: str) -> UID:
    """UIDs of a result derived from the job (PS3.5 B.2): storing the same job's result
    twice, after a retry, replaces the instance instead of adding a second report."""
    return UID(f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, f'telerad/{job_key}/{what}').int}")


def _group(
    detection: Detection,
    index: int,
    images: dict[str, Dataset],
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    tracking = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{detection.label} {index + 1}")
    measurements = [
        hd.sr.Measurement(
            name=_concept(m.name), value=m.value, unit=_concept(m.unit), algorithm_id=algorithm
        )
        for m in detection.measures
    ]
    measurements.append(
        hd.sr.Measurement(name=SCORE, value=detection.score, unit=UNITY, algorithm_id=algorithm)
    )
    region = detection.regions[0]
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=np.array(region.outline, dtype=np.float64),
            source_image=hd.sr.SourceImageForRegion.from_source_image(images[region.sop_uid]),
        ),
        finding_type=_concept(detection.finding),
        algorithm_id=algorithm,
        measurements=measurements,
    )


def _absent(
    result: Result, images: Sequence[Dataset], algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="no finding"),
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=FINDING, value=codes.SCT.Absent),
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(images[0])],
    )


def _predecessor(ref: ResultRef) -> Dataset:
    """What highdicom reads of a previous version: its four UIDs."""
    ds = Dataset()
    ds.StudyInstanceUID = ref.study_uid
    ds.SeriesInstanceUID = ref.series_uid
    ds.SOPInstanceUID = ref.sop_uid
    ds.SOPClassUID = ref.sop_class_uid
    return ds


def build(
    result: Result,
    evidence: Sequence[Dataset],
    *,
    model: str,
    version: str,
    job_key: str,
    replaces: Sequence[ResultRef] = (),
) -> Dataset:
    """The SR of `result`, referencing `evidence` (the source data sets, pixel data not
    needed). Its UIDs derive from `job_key`, so a retried job stores the same instance.
    `replaces`: earlier results of the model on the study, which this one supersedes
    (Predecessor Documents Sequence, PS3.3 C.17.2)."""
    if not evidence:
        raise ValueError("an SR needs at least one source image")
    algorithm = hd.sr.AlgorithmIdentification(
        name=model, version=version, family=codes.cid7162.ArtificialIntelligence
    )
    images = {str(ds.SOPInstanceUID): ds for ds in evidence}
    groups: list[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = [_group(d, i, images, algorithm) for i, d in enumerate(result.detections) if d.regions]
    if not groups:
        groups = [_absent(result, evidence, algorithm)]
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid(f"{model}/{version}", "device"),
            name=model,
            manufacturer_name=MANUFACTURER,
            model_name=f"{model} {version}",
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_concept(result.procedure),
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(evidence),
        content=report,
        series_instance_uid=result_uid(job_key, "series"),
        series_number=SERIES_NUMBER,
        sop_instance_uid=result_uid(job_key, "instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=f"AI {model} {version} - NOT FOR CLINICAL USE"[:64],
        previous_versions=[_predecessor(ref) for ref in replaces] or None,
    )
    sr.SoftwareVersions = version
    sr.ManufacturerModelName = model[:64]
    return sr
