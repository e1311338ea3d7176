"""``volumes pacs`` against a real Orthanc: push to ``listen``, ``pull`` by DIMSE and DICOMweb, SEG + SR back.

One Orthanc (tests/orthanc_server.py) holds three studies: a phantom CT series, the real
20-slice CT series (when ../shared/data is present) and a study of one good series next
to bad ones (a missing slice, a truncated instance, an unsupported transfer syntax, a
PDF). The networks are random-initialised and tiny (a 1-block ViT-S/14 at 56 px): what
is tested is the node, the DICOM objects and their geometry, not accuracy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("pynetdicom")
pytest.importorskip("dicomweb_client")
import pydicom  # noqa: E402

from dicom_conformance import dciodvfy_errors  # noqa: E402
from orthanc_server import ORTHANC_AET, Orthanc, free_port, orthanc_or_skip  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = {name: ROOT / "bundles" / name for name in ("dinov2_unet_segmentation", "dinov2_slice_classification")}
TINY = {"encoder_model_kwargs": {"depth": 1}, "preprocessing_config#size": 56}
PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PAT-12345"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
RULES = {"min_slices": 8, "bundles": {"*": [{"Modality": "CT", "Orientation": "axial", "SliceThickness": "<=5",
                                             "ImageType": ["!DERIVED", "!SECONDARY", "!LOCALIZER"]}]}}
MPEG2 = "1.2.840.10008.1.2.4.100"

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


# ---------------------------------------------------------------------- inputs
def _weights(folder: Path) -> dict[str, Path]:
    """Random-initialised weights of both bundles, saved the way the bundles save them."""
    from monai.bundle import ConfigParser

    out = {}
    for name, bundle in BUNDLES.items():
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        for key, value in TINY.items():
            parser[key] = value
        torch.manual_seed(0)
        out[name] = folder / f"{name}.pt"
        torch.save({"model": parser.get_parsed_content("network_def").state_dict()}, out[name])
    return out


def _rewrite(files: list[Path], folder: Path, *, study: str, series: str, tag: str, **values) -> list[Path]:
    """Copies of ``files`` in a new study/series with fresh SOP UIDs (derived from ``tag``) and header values."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for index, path in enumerate(files):
        ds = pydicom.dcmread(path)
        sop = pydicom.uid.generate_uid(entropy_srcs=[tag, str(index)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPClassUID = ds.SOPClassUID or ds.file_meta.MediaStorageSOPClassUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID, ds.AccessionNumber = PATIENT_NAME, PATIENT_ID, "ACC-" + tag[:10]
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SliceThickness = ds.get("SliceThickness") or 3
        for key, value in values.items():
            setattr(ds, key, value)
        target = folder / f"{index:03d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


def _pdf(folder: Path, study: str) -> Path:
    """An Encapsulated PDF object in the study (a non-image object the node must skip)."""
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["pdf"])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, pydicom.uid.generate_uid(entropy_srcs=["pdf-series"])
    ds.Modality, ds.PatientName, ds.PatientID = "DOC", PATIENT_NAME, PATIENT_ID
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.DocumentTitle = "report"
    pdf = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
    ds.EncapsulatedDocument = pdf + b"\x00" * (len(pdf) % 2)
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / "doc.dcm", enforce_file_format=True)
    return folder / "doc.dcm"


def _inputs(base: Path, shared: Path | None) -> dict:
    """The studies uploaded to Orthanc: name -> {study, files, series: {name: (uid, files)}}."""
    from volumes.data.phantoms import PhantomConfig, generate_phantom, write_case

    config = PhantomConfig.segmentation_demo(matrix=48, inplane_spacing_mm=(8.0, 8.0), slice_spacing_mm=(4.0, 4.0),
                                             extent_mm=(150.0, 160.0))
    entry = write_case(generate_phantom(3, config), base / "phantom", "case0", fmt="dicom")
    phantom = sorted((base / "phantom" / entry["image"]).iterdir())
    uid = lambda *s: pydicom.uid.generate_uid(entropy_srcs=list(s))  # noqa: E731
    studies = {}
    p_study = uid("study-p")
    studies["phantom"] = {"study": p_study, "series": {
        "ct": (uid("series-p"), _rewrite(phantom, base / "p", study=p_study, series=uid("series-p"), tag="p"))}}
    if shared is not None:
        real = sorted((shared / "totalsegmentator_example" / "example_ct_dicom").iterdir())
        r_study, r_series = uid("study-r"), uid("series-r")
        # the example series is anonymised with blank Study/Series/SOP UIDs, which a PACS refuses: fill them in
        studies["real"] = {"study": r_study, "series": {
            "ct": (r_series, _rewrite(real, base / "r", study=r_study, series=r_series, tag="r"))}}
    b_study = uid("study-b")
    series = {"good": (uid("b-good"), _rewrite(phantom, base / "b-good", study=b_study, series=uid("b-good"), tag="bg"))}
    missing = _rewrite(phantom, base / "b-missing", study=b_study, series=uid("b-missing"), tag="bm")
    missing[7].unlink()
    series["missing"] = (uid("b-missing"), missing[:7] + missing[8:])
    truncated = _rewrite(phantom, base / "b-trunc", study=b_study, series=uid("b-trunc"), tag="bt")
    ds = pydicom.dcmread(truncated[5])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(truncated[5], enforce_file_format=True)
    series["truncated"] = (uid("b-trunc"), truncated)
    mpeg = _rewrite(phantom, base / "b-mpeg", study=b_study, series=uid("b-mpeg"), tag="bv")
    for path in mpeg:
        ds = pydicom.dcmread(path)
        ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = MPEG2
        ds.save_as(path, enforce_file_format=False)
    series["mpeg"] = (uid("b-mpeg"), mpeg)
    pdf = _pdf(base / "b-pdf", b_study)
    series["pdf"] = (str(pydicom.dcmread(pdf).SeriesInstanceUID), [pdf])
    studies["bad"] = {"study": b_study, "series": series}
    return studies


def _node_config(path: Path, base: Path, orthanc: Orthanc, port: int, weights: dict[str, Path], **extra) -> Path:
    config = {
        "ae_title": "VOLUMES", "bind": "127.0.0.1", "port": port,
        "peers": [{"ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": orthanc.dicom_port}],
        "storage": str(base / "incoming"), "output": str(base / "out"), "quiet_s": 1.5, "min_free_mb": 1,
        "bundles": [{"path": str(BUNDLES[n]), "weights": str(w), "set": TINY} for n, w in weights.items()],
        "rules": RULES, "device": "cpu", "tries": 3, "backoff_s": 0.2, "timeout_s": 20,
        "destinations": [{"kind": "dimse", "ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": orthanc.dicom_port},
                         {"kind": "dicomweb", "url": orthanc.dicomweb}],
        "patient_salt": "test-salt", **extra,
    }
    path.write_text(json.dumps(config, indent=1))
    return path


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, request):
    orthanc_or_skip()
    if shutil.which("dciodvfy") is None or shutil.which("dcentvfy") is None:
        pytest.skip("dicom3tools (dciodvfy, dcentvfy) not installed: run scripts/setup_pacs.sh")
    try:
        shared = request.getfixturevalue("shared_data")
    except pytest.skip.Exception:
        shared = None
    base = tmp_path_factory.mktemp("pacs")
    port = free_port()
    orthanc = Orthanc(base / "orthanc", {"volumes": ("VOLUMES", "127.0.0.1", port)})
    try:
        studies = _inputs(base / "inputs", shared)
        for study in studies.values():
            for _, files in study["series"].values():
                orthanc.upload(files)
        weights = _weights(base)
        yield {"base": base, "orthanc": orthanc, "port": port, "studies": studies, "weights": weights}
    finally:
        orthanc.stop()


# ---------------------------------------------------------------------- helpers
def _start_listener(config: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """``volumes pacs listen`` in its own process (output to a log file: a full pipe would block it)."""
    log = config.parent / f"listen-{time.monotonic_ns()}.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen([sys.executable, "-m", "volumes", "pacs", "listen", "--config", str(config),
                                    "--poll-s", "0.3", *extra], env=ENV, stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if "listening as" in log.read_text(errors="replace"):
            return process
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the listener did not start:\n{log.read_text(errors='replace')[-3000:]}")


def _ledger(out: Path):
    from volumes.pacs.ledger import Ledger

    return Ledger(out / "ledger.sqlite")


def _wait_for(out: Path, study_uids: list[str], timeout: float = 300) -> dict[str, dict]:
    """Poll the ledger until every study is done or failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "ledger.sqlite").exists():
            ledger = _ledger(out)
            rows = {s: ledger.study(s) for s in study_uids}
            ledger.close()
            if all(r is not None and r["state"] in ("done", "failed") for r in rows.values()):
                return rows
        time.sleep(0.5)
    raise AssertionError(f"studies not processed in {timeout} s: {rows}")


def _orthanc_id(orthanc: Orthanc, uid: str, kind: str) -> str:
    return next(i["ID"] for i in orthanc.post("/tools/lookup", uid.encode()) if i["Type"] == kind)


def _outputs(out: Path, study_uid: str) -> dict[str, dict]:
    """Confirmed series of a study in a node's ledger: source series UID -> ledger row."""
    ledger = _ledger(out)
    rows = {r["series_uid"]: r for r in ledger.series_of_study(study_uid) if r["state"] == "confirmed"}
    ledger.close()
    return rows


def _send_without_release(port: int, files: list[Path]) -> object:
    """Open an association as Orthanc's AE and C-STORE ``files`` without releasing it."""
    from pynetdicom import AE

    ae = AE(ae_title=ORTHANC_AET)
    ae.add_requested_context(str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPClassUID),
                             pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="VOLUMES")
    assert assoc.is_established
    for path in files:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    return assoc


# ---------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def listened(pacs):
    """Orthanc pushes every study to ``volumes pacs listen``; the first listener is killed mid-study."""
    base, orthanc, studies = pacs["base"] / "node1", pacs["orthanc"], pacs["studies"]
    base.mkdir()
    config = _node_config(base / "node.json", base, orthanc, pacs["port"], pacs["weights"])
    phantom_files = studies["phantom"]["series"]["ct"][1]
    # 1) a listener that receives part of the phantom study and is killed with -9 mid-association
    first = _start_listener(config, ("--receive-only",))
    try:
        released = _send_without_release(pacs["port"], phantom_files[:5])
        released.release()  # these five are committed
        incoming = base / "incoming" / studies["phantom"]["study"]
        deadline = time.monotonic() + 30
        while len(list(incoming.rglob("*.dcm"))) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        _send_without_release(pacs["port"], phantom_files[5:9])  # these four are in flight when it dies
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert len(list((base / "incoming" / studies["phantom"]["study"]).rglob("*.dcm"))) == 5
    # 2) a new listener; Orthanc pushes every study (the phantom one again, in full)
    listener = _start_listener(config)
    try:
        for name in studies:
            orthanc.push("volumes", [_orthanc_id(orthanc, studies[name]["study"], "Study")])
        uids = [s["study"] for s in studies.values()]
        states = _wait_for(base / "out", uids)
        before = {s: orthanc.series_uids(s) for s in uids}
        # 3) the phantom study pushed once more: nothing new is made or stored
        orthanc.push("volumes", [_orthanc_id(orthanc, studies["phantom"]["study"], "Study")])
        time.sleep(1.0)
        _wait_for(base / "out", uids)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            from volumes.pacs.audit import AuditLog

            events = AuditLog(base / "out" / "audit.jsonl").records()
            if sum(e["event"] == "study_done" and e["study_uid"] == studies["phantom"]["study"] for e in events) >= 2:
                break
            time.sleep(0.5)
        after = {s: orthanc.series_uids(s) for s in uids}
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=60)
    return {"base": base, "states": states, "before": before, "after": after, "code": listener.returncode}


def test_listen_sends_seg_and_sr_back_and_a_rerun_changes_nothing(pacs, listened):
    studies, orthanc = pacs["studies"], pacs["orthanc"]
    good = [n for n in ("phantom", "real") if n in studies]
    for name in good:
        study = studies[name]["study"]
        assert listened["states"][study]["state"] == "done", listened["states"][study]
        confirmed = _outputs(listened["base"] / "out", study)
        source_uid = studies[name]["series"]["ct"][0]
        assert set(confirmed) == {source_uid}
        series = orthanc.series_uids(study)
        outputs = confirmed[source_uid]["outputs"]
        # one SEG series and one SR series next to the source series, with the ledger's UIDs
        assert sorted(series.values()) == ["CT", "SEG", "SR"]
        assert {series[s] for s in outputs["series"]} == {"SEG", "SR"}
    # the re-push: same series in Orthanc, no new instance, and the ledger did not redo the series
    assert listened["after"] == listened["before"]
    from volumes.pacs.audit import AuditLog

    events = AuditLog(listened["base"] / "out" / "audit.jsonl").records()
    unchanged = [e for e in events if e["event"] == "series_unchanged" and e["study_uid"] == studies["phantom"]["study"]]
    assert unchanged and unchanged[0]["state"] == "confirmed"
    assert sum(e["event"] == "series_confirmed" and e["study_uid"] == studies["phantom"]["study"]
               for e in events) == 1


def test_killed_listener_loses_and_duplicates_nothing(pacs, listened):
    study = pacs["studies"]["phantom"]
    # the re-push also brought back our SEG and SR (skipped as non-image series); the CT series:
    files = sorted((listened["base"] / "incoming" / study["study"] / study["series"]["ct"][0]).glob("*.dcm"))
    expected = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in study["series"]["ct"][1]}
    assert len(files) == len(expected) == len(study["series"]["ct"][1])
    assert {f.stem for f in files} == expected
    assert not any((listened["base"] / "incoming" / ".partial").iterdir())
    # the bytes are the ones Orthanc holds (stored as they came)
    some = files[3]
    assert some.read_bytes()[132:] .endswith(pacs["orthanc"].instance_bytes(some.stem)[-4096:])


def _seg_matches_mask(seg_bytes: bytes, record_dir: Path, source_files: list[Path], labels: list[str]) -> int:
    """The SEG's frames equal the runner's NIfTI mask on each source image; returns the labelled pixels."""
    import io

    import highdicom as hd

    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    mask_img = nib.load(record_dir / "dinov2_unet_segmentation_seg.nii.gz")
    mask = np.asarray(mask_img.dataobj)
    inverse = np.linalg.inv(mask_img.affine)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_files]
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    segments = list(range(1, len(labels)))
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=segments,
                                               assert_missing_frames_are_empty=True)
    total = 0
    for index, ds in enumerate(sources):
        # the NIfTI is in the series' stored geometry: image k is voxel plane k, x along rows of the image
        ras = np.diag([-1.0, -1.0, 1.0]) @ np.array([float(v) for v in ds.ImagePositionPatient])
        ijk = inverse[:3, :3] @ ras + inverse[:3, 3]
        np.testing.assert_allclose(ijk[:2], [0, 0], atol=1e-3)
        plane = mask[:, :, int(round(ijk[2]))].T
        for s, number in enumerate(segments):
            np.testing.assert_array_equal(pixels[index, :, :, s], (plane == number).astype(pixels.dtype))
        total += int((plane > 0).sum())
    return total


def test_seg_pixels_read_back_from_orthanc_equal_the_masks(pacs, listened):
    from volumes.data.phantoms import LABEL_NAMES

    studies, orthanc = pacs["studies"], pacs["orthanc"]
    for name in [n for n in ("phantom", "real") if n in studies]:
        source_uid, source_files = studies[name]["series"]["ct"]
        row = _outputs(listened["base"] / "out", studies[name]["study"])[source_uid]
        record_dir = Path(row["outputs"]["record"]).parent
        seg_uid = row["outputs"]["sop_instance_uids"][0]
        labelled = _seg_matches_mask(orthanc.instance_bytes(seg_uid), record_dir, source_files, list(LABEL_NAMES))
        assert labelled > 0  # random weights still label something; an all-empty SEG would test nothing


def test_seg_and_sr_pass_dciodvfy_and_dcentvfy(pacs, listened, tmp_path):
    studies, orthanc = pacs["studies"], pacs["orthanc"]
    for name in [n for n in ("phantom", "real") if n in studies]:
        source_uid, source_files = studies[name]["series"]["ct"]
        row = _outputs(listened["base"] / "out", studies[name]["study"])[source_uid]
        written = []
        for uid in row["outputs"]["sop_instance_uids"]:
            path = tmp_path / f"{name}-{uid}.dcm"
            path.write_bytes(orthanc.instance_bytes(uid))  # as the PACS serves them
            written.append(path)
            errors = dciodvfy_errors(path)
            assert not errors, f"{name} {uid}:\n" + "\n".join(errors)
        seg, sr = (pydicom.dcmread(p) for p in written)
        assert seg.Modality == "SEG" and sr.Modality == "SR"
        assert seg.SeriesDescription.startswith("AI-generated") and sr.SeriesDescription.startswith("AI-generated")
        equipment = seg.ContributingEquipmentSequence[0]
        assert equipment.ManufacturerModelName == "dinov2_unet_segmentation"
        assert len(equipment.SoftwareVersions[1]) == 64  # the weights' SHA-256
        check = subprocess.run(["dcentvfy", *map(str, source_files), *map(str, written)], capture_output=True,
                               text=True, timeout=120)
        errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{name} dcentvfy:\n" + "\n".join(errors)


def test_sr_reports_organ_volumes_referencing_seg_segments_and_the_classification(pacs, listened):
    import highdicom as hd

    study, orthanc = pacs["studies"]["phantom"], pacs["orthanc"]
    source_uid = study["series"]["ct"][0]
    row = _outputs(listened["base"] / "out", study["study"])[source_uid]
    seg_uid, sr_uid = row["outputs"]["sop_instance_uids"]
    record = json.loads(Path(row["outputs"]["record"]).read_text())
    by_task = {r["task"]: r for r in record["rows"]}
    import io

    sr = hd.sr.srread(io.BytesIO(orthanc.instance_bytes(sr_uid)))
    report = sr.content
    groups = report.get_volumetric_roi_measurement_groups()
    volumes = {o: v for o, v in by_task["segmentation"]["organ_volumes_ml"].items() if v > 0}
    assert len(groups) == len(volumes) > 0
    from volumes.data.phantoms import LABEL_NAMES

    for group in groups:
        # the reference to the SEG: an IMAGE content item naming the SEG instance and its segment number
        (reference,) = [item.ReferencedSOPSequence[0] for item in group.referenced_segment
                        if item.ValueType == "IMAGE"]
        assert reference.ReferencedSOPInstanceUID == seg_uid
        name = LABEL_NAMES[int(reference.ReferencedSegmentNumber)]
        (measurement,) = group.get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))
        assert measurement.unit.value == "mL"
        assert measurement.value == pytest.approx(volumes[name], abs=1e-3)
    (image_group,) = report.get_image_measurement_groups()
    (evaluation,) = image_group.get_qualitative_evaluations()
    predicted = by_task["classification"]["predicted"]
    assert evaluation.name.meaning == "AI volume classification"
    assert evaluation.value.meaning == f"Class {predicted}"
    (probability,) = image_group.get_measurements()
    assert probability.value == pytest.approx(by_task["classification"]["probabilities"][predicted], abs=1e-6)


def test_bad_series_are_skipped_with_reasons_and_the_rest_of_the_study_runs(pacs, listened):
    study = pacs["studies"]["bad"]
    ledger = _ledger(listened["base"] / "out")
    rows = {r["series_uid"]: r for r in ledger.series_of_study(study["study"])}
    ledger.close()
    reasons = {name: rows[uid]["reason"] for name, (uid, _) in study["series"].items()}
    assert rows[study["series"]["good"][0]]["state"] == "confirmed"
    assert listened["states"][study["study"]]["state"] == "done"
    expected = {"missing": "a missing slice between positions", "truncated": "truncated instance",
                "mpeg": f"unsupported transfer syntax {MPEG2}", "pdf": "non-image object"}
    for name, phrase in expected.items():
        assert rows[study["series"][name][0]]["state"] == "skipped"
        assert phrase in reasons[name], reasons
    assert "missing slice" in reasons["missing"]
    from volumes.pacs.audit import AuditLog

    events = AuditLog(listened["base"] / "out" / "audit.jsonl").records()
    logged = " ".join(json.dumps(e) for e in events if e.get("study_uid") == study["study"])
    for phrase in expected.values():
        assert phrase in logged
    # no PHI in the audit log: neither the name nor the raw PatientID, only the salted hash
    text = (listened["base"] / "out" / "audit.jsonl").read_text()
    assert "Doe" not in text and PATIENT_ID not in text
    from volumes.pacs.audit import hash_patient_id

    assert hash_patient_id(PATIENT_ID, "test-salt") in text


@pytest.mark.parametrize("method", ["dimse", "dicomweb"])
def test_pull_fetches_runs_and_makes_the_same_objects(pacs, listened, method, tmp_path):
    from volumes.cli import main

    orthanc, studies = pacs["orthanc"], pacs["studies"]
    source = ({"kind": "dimse", "ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": orthanc.dicom_port}
              if method == "dimse" else {"kind": "dicomweb", "url": orthanc.dicomweb})
    config = _node_config(tmp_path / "node.json", tmp_path, orthanc, pacs["port"], pacs["weights"], source=source)
    accessions = tmp_path / "accessions.txt"
    accessions.write_text("# the phantom study\nACC-p\n")
    before = orthanc.series_uids(studies["phantom"]["study"])
    code = main(["pacs", "pull", "--config", str(config), "--from", "19000101", "--modality", "CT",
                 "--accessions", str(accessions)])
    assert code == 0
    mine = _outputs(tmp_path / "out", studies["phantom"]["study"])
    theirs = _outputs(listened["base"] / "out", studies["phantom"]["study"])
    assert set(mine) == set(theirs) == {studies["phantom"]["series"]["ct"][0]}
    (uid,) = mine
    # deterministic UIDs: another node, another transport, the same SEG and SR identities
    assert mine[uid]["outputs"]["sop_instance_uids"] == theirs[uid]["outputs"]["sop_instance_uids"]
    assert mine[uid]["outputs"]["series"] == theirs[uid]["outputs"]["series"]
    assert orthanc.series_uids(studies["phantom"]["study"]) == before
    source_uid, source_files = studies["phantom"]["series"]["ct"]
    assert len(list((tmp_path / "incoming" / studies["phantom"]["study"] / source_uid).glob("*.dcm"))) == len(
        source_files)
    # only the accession asked for was pulled
    assert not (tmp_path / "incoming" / studies["bad"]["study"]).exists()
