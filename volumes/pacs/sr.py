"""What `volumes pacs` sends back: the SEG with deterministic UIDs and AI marking, and a TID 1500 SR.

:func:`mark_seg` takes the DICOM SEG that :class:`~volumes.inference.runner.BatchInference`
wrote and gives it the derived Series/SOP Instance UIDs (:mod:`volumes.pacs.uids`), an
"AI-generated" SeriesDescription and a ContributingEquipmentSequence naming the
algorithm, its version and the weights' SHA-256. Nothing else changes (pixels, segments
and references are the runner's).

:func:`build_sr` writes a DICOM Comprehensive 3D SR holding a TID 1500 Measurement
Report (highdicom): one TID 1411 volumetric group per organ present, with its volume in
mL (and its quality-control flag and score, :mod:`volumes.quality`, when the segmenter has
them, plus a TID 1501 group with the case's flag), referencing the organ's segment in the
SEG; and, for each classifier, a TID 1501
group with the predicted class as a qualitative evaluation and its probability as a
measurement. The observer is a device (the algorithm), the evidence is the source
images and the SEG. The algorithm is named once per group (the groups' Algorithm Name and
Version rows), not again under each measurement: OHIF reads a measurement's value only when
its content items are coordinates, and skipped every volume of an SR that had them.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from volumes import __version__
from volumes.atomic import atomic_path
from volumes.pacs.uids import derived_uid

__all__ = ["ModelIdentity", "mark_seg", "build_sr", "AI_PREFIX"]

logger = logging.getLogger(__name__)
logging.getLogger("highdicom").setLevel(logging.WARNING)

AI_PREFIX = "AI-generated"
MANUFACTURER = "volumes"
_PRIVATE_SCHEME = "99VOLUMES"  # a private coding scheme (PS3.16 8.2: designators starting with 99)
_ML = ("mL", "UCUM", "milliliter")
# TID 1501 reserves "Finding" (DCM 121071) for the finding type, so the evaluation has its own concept name
_CLASSIFICATION = ("classification", _PRIVATE_SCHEME, "AI volume classification")
_NO_UNITS = ("1", "UCUM", "no units")
# quality control of a segmentation (volumes.quality): a flag per organ and per case, and its score
_QC = ("qc-flag", _PRIVATE_SCHEME, "AI segmentation quality control")
_QC_SCORE = ("qc-score", _PRIVATE_SCHEME, "AI segmentation quality control score")
_QC_FLAGS = {"pass": ("qc-pass", _PRIVATE_SCHEME, "Quality control passed"),
             "review": ("qc-review", _PRIVATE_SCHEME, "Review recommended")}
# A fixed creation time: the same inputs must give the same bytes, not only the same UIDs.
_FIXED_DATE, _FIXED_TIME = "20000101", "000000"


class ModelIdentity(dict):
    """``{"bundle", "version", "weights_sha256", "task"}`` of one bundle (a plain dict for JSON)."""


def _equipment(pydicom: Any, models: Sequence[Mapping[str, str]]) -> Any:
    items = []
    for model in models:
        item = pydicom.Dataset()
        item.Manufacturer = MANUFACTURER
        item.ManufacturerModelName = str(model["bundle"])[:64]
        item.SoftwareVersions = [str(model["version"])[:64], str(model["weights_sha256"])[:64]]
        item.ContributionDescription = (f"{AI_PREFIX} by algorithm {model['bundle']} version {model['version']}, "
                                        f"weights sha256 {model['weights_sha256']}, volumes {__version__}")
        code = pydicom.Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "109102", "DCM", "Processing Equipment"
        item.PurposeOfReferenceCodeSequence = [code]
        items.append(item)
    return pydicom.Sequence(items)


def _description(models: Sequence[Mapping[str, str]], what: str) -> str:
    names = ", ".join(f"{m['bundle']} {m['version']}" for m in models)
    return f"{AI_PREFIX} {what}: {names}"[:64]  # LO: 64 characters


def mark_seg(seg_path: str | Path, out_path: str | Path, key: str, model: Mapping[str, str],
             series_number: int = 300) -> Path:
    """Copy the runner's SEG to ``out_path`` with derived UIDs and the AI marking."""
    import pydicom

    ds = pydicom.dcmread(seg_path)
    sop_uid = derived_uid(key, model["bundle"], "seg", "instance")
    ds.SeriesInstanceUID = derived_uid(key, model["bundle"], "seg", "series")
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    dimension = derived_uid(key, model["bundle"], "seg", "dimensions")
    for item in ds.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = dimension
    for item in ds.get("DimensionIndexSequence", []):
        item.DimensionOrganizationUID = dimension
    ds.SeriesNumber = series_number
    ds.SeriesDescription = _description([model], "segmentation")
    ds.ContributingEquipmentSequence = _equipment(pydicom, [model])
    for keyword in ("SeriesDate", "ContentDate", "InstanceCreationDate"):
        if keyword in ds:
            setattr(ds, keyword, _FIXED_DATE)
    for keyword in ("SeriesTime", "ContentTime", "InstanceCreationTime"):
        if keyword in ds:
            setattr(ds, keyword, _FIXED_TIME)
    with atomic_path(out_path, suffix=".dcm") as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return Path(out_path)


def _concept(hd: Any, triple: tuple[str, str, str]) -> Any:
    return hd.sr.CodedConcept(value=triple[0], scheme_designator=triple[1], meaning=triple[2])


def _quality_items(hd: Any, quality: Mapping[str, Any] | None) -> tuple[list, list]:
    """The QC flag as a qualitative evaluation and its score as a measurement (empty without QC)."""
    if not quality or quality.get("flag") not in _QC_FLAGS:
        return [], []
    evaluation = hd.sr.QualitativeEvaluation(name=_concept(hd, _QC), value=_concept(hd, _QC_FLAGS[quality["flag"]]))
    score = quality.get("score")
    measurements = [] if score is None else [hd.sr.Measurement(
        name=_concept(hd, _QC_SCORE), value=round(float(score), 3), unit=_concept(hd, _NO_UNITS))]
    return [evaluation], measurements


def build_sr(
    sources: Sequence[Any],
    segs: Sequence[tuple[Any, Mapping[str, str], Mapping[str, float], Sequence[str], Mapping[str, Any] | None]],
    classifications: Sequence[tuple[Mapping[str, str], str, float]],
    out_path: str | Path,
    key: str,
    *,
    series_number: int = 301,
) -> Path:
    """Write the TID 1500 measurement report of one series.

    Args:
        sources: the source images' headers (pydicom data sets, slice order).
        segs: per segmentation bundle ``(seg_dataset, model, organ_volumes_ml, labels, quality)``;
            ``labels[k]`` is segment number ``k`` of the SEG (``labels[0]`` background);
            ``quality`` is the row's quality-control result (:mod:`volumes.quality`; None
            without QC), written as qualitative evaluations: the flag and score of each organ
            in its group, and the case's in a group of its own.
        classifications: per classifier ``(model, predicted_label, probability)``.
        out_path: the SR file (written atomically).
        key: the job key, from which the SR's UIDs derive.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from volumes.inference.dicom_seg import _segment_codes

    models = [seg[1] for seg in segs] + [m for m, _, _ in classifications]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid(key, "device"), name=", ".join(m["bundle"] for m in models)[:64],
        manufacturer_name=MANUFACTURER, model_name=", ".join(m["bundle"] for m in models)[:64])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    groups: list[Any] = []
    series_uid = str(sources[0].SeriesInstanceUID)
    for seg, model, volumes_ml, labels, quality in segs:
        algorithm = hd.sr.AlgorithmIdentification(name=model["bundle"], version=str(model["version"]))
        organs_qc = (quality or {}).get("organs") or {}
        for number, name in enumerate(labels[1:], start=1):
            if float(volumes_ml.get(name, 0.0)) <= 0.0:
                continue  # absent organs have no frames in the SEG: nothing to reference
            _, property_type = _segment_codes(hd, name)
            segment = hd.sr.ReferencedSegment(
                sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
                segment_number=number, source_series=hd.sr.SourceSeriesForSegmentation(series_uid))
            volume = hd.sr.Measurement(name=codes.SCT.Volume, value=float(volumes_ml[name]), unit=_concept(hd, _ML))
            evaluations, measurements = _quality_items(hd, organs_qc.get(name))
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid(key, model["bundle"], "tracking", name), identifier=f"{name} ({model['bundle']})"),
                referenced_segment=segment, finding_type=property_type, algorithm_id=algorithm,
                measurements=[volume, *measurements], qualitative_evaluations=evaluations or None))
        if quality:  # the case's flag, also when an organ it flags has no segment (not found)
            evaluations, measurements = _quality_items(hd, quality)
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid(key, model["bundle"], "tracking", "qc"),
                                                             identifier=f"quality control ({model['bundle']})"),
                algorithm_id=algorithm, qualitative_evaluations=evaluations, measurements=measurements))
    for model, predicted, probability in classifications:
        algorithm = hd.sr.AlgorithmIdentification(name=model["bundle"], version=str(model["version"]))
        finding = _concept(hd, (str(predicted)[:16], _PRIVATE_SCHEME, f"Class {predicted}"[:64]))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid(key, model["bundle"], "tracking"),
                                                         identifier=f"classification ({model['bundle']})"),
            algorithm_id=algorithm,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=_concept(hd, _CLASSIFICATION), value=finding)],
            measurements=[hd.sr.Measurement(name=codes.DCM.Probability, value=round(float(probability), 6),
                                            unit=_concept(hd, _NO_UNITS))]))
    modality = str(getattr(sources[0], "Modality", "CT"))
    procedure = codes.LN.MRIUnspecifiedBodyRegion if modality == "MR" else codes.LN.CTUnspecifiedBodyRegion
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=procedure,
                                     imaging_measurements=groups)
    fixed = datetime.datetime(2000, 1, 1)
    equipment = [hd.ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=m["bundle"][:64], software_versions=[str(m["version"]), m["weights_sha256"]],
        contribution_description=(f"{AI_PREFIX} by algorithm {m['bundle']} version {m['version']}, weights sha256 "
                                  f"{m['weights_sha256']}, volumes {__version__}")) for m in models]
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*sources, *(seg[0] for seg in segs)], content=report,
        series_instance_uid=derived_uid(key, "sr", "series"), series_number=series_number,
        sop_instance_uid=derived_uid(key, "sr", "instance"), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, contributing_equipment=equipment,
        series_description=_description(models, "measurements"), content_date=fixed.date(), content_time=fixed.time(),
    )
    with atomic_path(out_path, suffix=".dcm") as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    return Path(out_path)
