"""``volumes.pacs`` pieces without a PACS: rules, pre-flight, ledger, audit, UIDs, retries, config, the SCP's gates."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pynetdicom")
import pydicom  # noqa: E402

from volumes.data.dicom import write_dicom_series  # noqa: E402
from volumes.errors import VolumesError  # noqa: E402
from volumes.pacs.audit import AuditLog, hash_patient_id  # noqa: E402
from volumes.pacs.config import load_config  # noqa: E402
from volumes.pacs.ledger import Ledger  # noqa: E402
from volumes.pacs.rules import non_image_reason, preflight, select, summarize_series  # noqa: E402
from volumes.pacs.send import SendError, with_retries  # noqa: E402
from volumes.pacs.uids import derived_uid, instance_set_sha256, job_key  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name")


def _series(folder: Path, slices: int = 10, spacing: float = 2.5, **header) -> Path:
    """A small CT series (``write_dicom_series``), then header values set on every file."""
    affine = np.diag([1.5, 1.5, spacing, 1.0])
    write_dicom_series(np.arange(12 * 10 * slices).reshape(12, 10, slices) % 200, affine, folder)
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SliceThickness = spacing
        for key, value in header.items():
            setattr(ds, key, value)
        ds.save_as(path, enforce_file_format=True)
    return folder


# ---------------------------------------------------------------------- rules
def test_selection_rules_keywords_regex_ranges_and_exclusions(tmp_path):
    summary = summarize_series(_series(tmp_path / "s", SeriesDescription="Abdomen 3.0 B30f"))
    assert summary.attributes["Orientation"] == "axial" and summary.attributes["NumberOfInstances"] == 10
    cases = [
        ({"Modality": "ct"}, True, None),
        ({"Modality": "MR"}, False, "Modality='CT' does not match 'MR'"),
        ({"ImageType": ["!DERIVED", "!LOCALIZER"], "Orientation": "axial"}, True, None),
        ({"ImageType": "!primary"}, False, "matches excluded 'primary'"),
        ({"SliceThickness": "<=5"}, True, None),
        ({"SliceThickness": "<2.5"}, False, "does not match '<2.5'"),
        ({"SliceThickness": "1..3"}, True, None),
        ({"SliceThickness": {"min": 3}}, False, "does not match"),
        ({"SeriesDescription": "/abdo(men)?\\s+3/"}, True, None),
        ({"SeriesDescription": "!/b30f/"}, False, "matches excluded"),
        ({"NumberOfInstances": ">=10"}, True, None),
        ({"ContrastBolusAgent": "iodine"}, False, "ContrastBolusAgent is missing"),
        ({"ContrastBolusAgent": "!iodine"}, True, None),
    ]
    for rule, selected, phrase in cases:
        ok, reason = select({"bundles": {"seg": [rule]}}, "seg", summary)
        assert ok is selected, (rule, reason)
        if phrase:
            assert phrase in reason, (rule, reason)
    # several rules: any one selects; a bundle without rules is not run when others have rules
    rules = {"bundles": {"seg": [{"Modality": "MR"}, {"Modality": "CT", "SliceThickness": "<=3"}]}}
    assert select(rules, "seg", summary) == (True, "rule 2 matches")
    ok, reason = select(rules, "cls", summary)
    assert not ok and "no rule selects bundle cls" in reason
    assert select({}, "cls", summary)[0] is True
    assert select({"bundles": {"*": {"Modality": "CT"}}}, "cls", summary)[0] is True


def _mutate(folder: Path, index: int, **values) -> None:
    files = sorted(folder.iterdir())
    ds = pydicom.dcmread(files[index])
    for key, value in values.items():
        setattr(ds, key, value)
    ds.save_as(files[index], enforce_file_format=True)


def test_preflight_refuses_each_bad_geometry_with_a_plain_reason(tmp_path):
    good = _series(tmp_path / "good")
    assert preflight(summarize_series(good)) is None

    tilt = _series(tmp_path / "tilt", GantryDetectorTilt=12.0)
    assert "gantry tilt of 12 degrees" in preflight(summarize_series(tilt))

    sheared = _series(tmp_path / "sheared")
    for k, path in enumerate(sorted(sheared.iterdir())):  # positions drifting sideways: a tilt without the tag
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * k, z]
        ds.save_as(path, enforce_file_format=True)
    assert "gantry tilt: slice positions are sheared" in preflight(summarize_series(sheared))

    missing = _series(tmp_path / "missing")
    sorted(missing.iterdir())[4].unlink()
    reason = preflight(summarize_series(missing))
    # the loader's own geometry check, reported (volumes.data.dicom.check_series_geometry)
    assert "a missing slice between positions" in reason and "(gap 5 mm, median spacing 2.5 mm)" in reason

    duplicate = _series(tmp_path / "duplicate")
    first = pydicom.dcmread(sorted(duplicate.iterdir())[0])
    _mutate(duplicate, 3, ImagePositionPatient=list(first.ImagePositionPatient))
    assert "slices share the position" in preflight(summarize_series(duplicate))

    few = _series(tmp_path / "few", slices=4)
    assert preflight(summarize_series(few), min_slices=8) == "too few slices: 4 (at least 8 needed)"

    mixed = _series(tmp_path / "mixed")
    _mutate(mixed, 2, ImageOrientationPatient=[1, 0, 0, 0, 0.8, -0.6])
    assert "inconsistent orientation" in preflight(summarize_series(mixed))

    truncated = _series(tmp_path / "truncated")
    path = sorted(truncated.iterdir())[6]
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(path, enforce_file_format=True)
    assert f"{path.name}: truncated instance (pixel data 100 of 240 bytes)" == preflight(summarize_series(truncated))

    cut = _series(tmp_path / "cut")
    path = sorted(cut.iterdir())[1]
    path.write_bytes(path.read_bytes()[:-150])  # the file itself ends early, inside the pixel data
    assert preflight(summarize_series(cut)) == f"{path.name}: truncated instance (pixel data 90 of 240 bytes)"
    path.write_bytes(path.read_bytes()[:400])  # ends inside the header
    assert "unreadable or truncated instance" in preflight(summarize_series(cut))

    video = _series(tmp_path / "video")
    path = sorted(video.iterdir())[0]
    ds = pydicom.dcmread(path)
    ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds.save_as(path, enforce_file_format=False)
    assert "unsupported transfer syntax 1.2.840.10008.1.2.4.100 (MPEG2" in preflight(summarize_series(video))


def test_non_image_series_are_recognised(tmp_path):
    folder = tmp_path / "sr"
    folder.mkdir()
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID, ds.Modality = pydicom.uid.generate_uid(), "SR"
    ds.save_as(folder / "sr.dcm", enforce_file_format=True)
    assert non_image_reason(summarize_series(folder)) == "non-image object (Basic Text SR Storage, Modality SR)"
    assert non_image_reason(summarize_series(_series(tmp_path / "ct"))) is None


# ---------------------------------------------------------------------- ledger, audit, UIDs
def test_uids_are_deterministic_valid_and_change_with_any_input():
    a = instance_set_sha256(["1.2.3", "1.2.4"])
    assert a == instance_set_sha256(["1.2.4", "1.2.3", "1.2.3"])  # a set: order and repeats do not matter
    key = job_key("1.2.9", a, ["model-a", "model-b"])
    assert key == job_key("1.2.9", a, ["model-b", "model-a"])
    others = {job_key("1.2.8", a, ["model-a", "model-b"]), job_key("1.2.9", instance_set_sha256(["1.2.3"]),
              ["model-a", "model-b"]), job_key("1.2.9", a, ["model-a", "model-c"])}
    assert key not in others and len(others) == 3
    uid = derived_uid(key, "seg", "instance")
    assert uid == derived_uid(key, "seg", "instance") != derived_uid(key, "seg", "series")
    assert uid.startswith("2.25.") and len(uid) <= 64 and uid[5:].isdigit() and not uid[5:].startswith("0")
    assert pydicom.uid.UID(uid).is_valid


def test_ledger_states_survive_a_killed_process(tmp_path):
    path = tmp_path / "ledger.sqlite"
    script = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from volumes.pacs.ledger import Ledger
ledger = Ledger({str(path)!r})
ledger.touch_study("1.2.3", patient_hash="abc", source="ORTHANC")
ledger.set_series("k1", study_uid="1.2.3", series_uid="1.2.3.1", state="inferred", outputs={{"files": ["a.dcm"]}})
ledger.set_series("k2", study_uid="1.2.3", series_uid="1.2.3.2", state="skipped", reason="pre-flight: gantry tilt")
os.kill(os.getpid(), 9)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == -9, result.stderr
    ledger = Ledger(path)
    assert ledger.study("1.2.3")["state"] == "receiving" and ledger.study("1.2.3")["patient_hash"] == "abc"
    rows = {r["job_key"]: r for r in ledger.series_of_study("1.2.3")}
    assert rows["k1"]["state"] == "inferred" and rows["k1"]["outputs"] == {"files": ["a.dcm"]}
    assert rows["k2"]["reason"] == "pre-flight: gantry tilt"
    # quiet period: not ready until it has passed; a study left in "processing" (killed run) is ready at once
    assert ledger.ready_studies(quiet_s=3600) == []
    assert ledger.ready_studies(quiet_s=0) == ["1.2.3"]
    ledger.set_study("1.2.3", "processing")
    assert ledger.ready_studies(quiet_s=3600) == ["1.2.3"]
    assert ledger.ready_studies(quiet_s=0, busy={"1.2.3"}) == []
    ledger.set_series("k1", study_uid="1.2.3", series_uid="1.2.3.1", state="sent", attempt=True)
    ledger.set_series("k1", study_uid="1.2.3", series_uid="1.2.3.1", state="failed", reason="send: 0xA700",
                      attempt=True)
    row = ledger.series("k1")
    assert (row["state"], row["attempts"], row["outputs"]) == ("failed", 2, {"files": ["a.dcm"]})
    with pytest.raises(ValueError, match="unknown series state"):
        ledger.set_series("k1", study_uid="1.2.3", series_uid="1.2.3.1", state="done")
    ledger.close()
    with sqlite3.connect(path) as db:  # a plain SQLite file any tool can read
        assert db.execute("SELECT count(*) FROM series").fetchone()[0] == 2


def test_audit_log_hashes_patient_id_and_drops_names(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl", salt="s")
    audit.event("received", PatientID="PAT-7", PatientName="Doe^John", study_uid="1.2.3",
                nested={"PatientBirthDate": "19700101", "calling_ae": "ORTHANC"}, status=0xA700)
    with open(tmp_path / "audit.jsonl", "a") as handle:
        handle.write('{"torn')  # a record cut by a kill
    records = audit.records()
    assert len(records) == 1
    (record,) = records
    assert record["event"] == "received" and record["study_uid"] == "1.2.3" and record["status"] == 0xA700
    assert record["patient_hash"] == hash_patient_id("PAT-7", "s") != hash_patient_id("PAT-7", "other")
    assert record["nested"] == {"calling_ae": "ORTHANC"}
    text = (tmp_path / "audit.jsonl").read_text()
    assert "Doe" not in text and "PAT-7" not in text and "19700101" not in text
    assert hash_patient_id("") is None


# ---------------------------------------------------------------------- retries
def test_retries_back_off_on_transient_errors_and_stop_on_data_errors(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    delays, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise SendError("0xA700 out of resources", transient=True, status=0xA700)
        return "stored"

    assert with_retries(flaky, tries=4, backoff_s=0.5, audit=audit, sleep=delays.append, what="store") == "stored"
    assert delays == [0.5, 1.0] and len(calls) == 3

    def bad_data():
        calls.append(1)
        raise SendError("0xA900 data set does not match", transient=False, status=0xA900)

    calls.clear()
    with pytest.raises(SendError, match="0xA900"):
        with_retries(bad_data, tries=4, backoff_s=0.5, audit=audit, sleep=delays.append)
    assert len(calls) == 1  # no retry on a data error

    def down():
        raise SendError("no association", transient=True)

    delays.clear()
    with pytest.raises(SendError, match="no association"):
        with_retries(down, tries=3, backoff_s=1.0, sleep=delays.append)
    assert delays == [1.0, 2.0]  # three tries, then the job fails
    statuses = [r["status"] for r in audit.records() if r["event"] == "send_error"]
    assert statuses == ["0xA700", "0xA700", "0xA900"]


def test_send_to_a_closed_port_is_a_transient_network_error(tmp_path):
    from orthanc_server import free_port

    from volumes.pacs.config import Endpoint
    from volumes.pacs.send import store

    files = sorted(_series(tmp_path / "s", slices=2).iterdir())
    assert store(Endpoint(ae_title="NOBODY", port=free_port()), [], calling_ae="VOLUMES") == []
    with pytest.raises(SendError, match="no association") as info:
        store(Endpoint(ae_title="NOBODY", port=free_port()), files, calling_ae="VOLUMES", timeout=2)
    assert info.value.transient
    with pytest.raises(SendError, match="STOW-RS failed") as info:
        store(Endpoint(kind="dicomweb", url=f"http://127.0.0.1:{free_port()}/dicom-web"), files,
              calling_ae="VOLUMES", timeout=2)
    assert info.value.transient


# ---------------------------------------------------------------------- config
def test_config_errors_name_the_file_and_the_key(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text("ae_title: VOLUMES\nport: 11112\nstorage: in\nrules: {min_slices: 4}\n"
                    "peers: [{ae_title: ORTHANC, host: 127.0.0.1, port: 4242}]\n")
    config = load_config(path)
    assert config.bind == "127.0.0.1"  # loopback unless told otherwise
    assert config.storage == (tmp_path / "in").resolve() and config.rules == {"min_slices": 4}
    assert config.peer("ORTHANC").port == 4242 and config.peer("OTHER") is None
    for text, phrase in [("ae_title: THIS_TITLE_IS_TOO_LONG\n", "ae_title='THIS_TITLE_IS_TOO_LONG' is not a valid AE"),
                         ("port: many\n", "port='many' must be an integer"),
                         ("destinations: [{kind: ftp}]\n", "destinations[0].kind='ftp' is not allowed"),
                         ("destinations: [{kind: dicomweb, url: ftp://x}]\n", "must be an http(s) URL"),
                         ("colour: blue\n", "unknown keys ['colour']"),
                         ("quiet_s: -1\n", "quiet_s=-1.0 must be >= 0"),
                         ("[1, 2]\n", "must hold a mapping"),
                         ("a: [\n", "not valid YAML")]:
        path.write_text(text)
        with pytest.raises(VolumesError) as info:
            load_config(path)
        assert str(path) in str(info.value) and phrase in str(info.value), str(info.value)


# ---------------------------------------------------------------------- the SCP's gates
@pytest.fixture
def scp(tmp_path):
    from orthanc_server import free_port

    from volumes.pacs.scp import StorageSCP

    path = tmp_path / "node.json"
    path.write_text(json.dumps({"port": free_port(), "storage": "in", "output": "out", "min_free_mb": 1,
                                "peers": [{"ae_title": "ORTHANC", "host": "127.0.0.1"},
                                          {"ae_title": "FARAWAY", "host": "127.0.0.2"}]}))
    config = load_config(path)
    ledger = Ledger(tmp_path / "out" / "ledger.sqlite")
    audit = AuditLog(tmp_path / "out" / "audit.jsonl")
    server = StorageSCP(config, ledger, audit)
    server.start()
    yield server
    server.stop()
    ledger.close()


def _associate(port: int, calling: str):
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", pydicom.uid.ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae.associate("127.0.0.1", port, ae_title="VOLUMES")


def _wait_for(scp, event: str, count: int = 1, timeout: float = 30.0) -> None:
    """Wait until the SCP's audit log holds ``count`` records of ``event`` (its handlers run on their own threads)."""
    import time

    deadline = time.monotonic() + timeout
    while sum(r["event"] == event for r in scp.audit.records()) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def test_scp_refuses_unknown_ae_titles_wrong_addresses_and_full_disks(scp, tmp_path):
    files = sorted(_series(tmp_path / "s", slices=3).iterdir())
    for calling in ("INTRUDER", "FARAWAY"):  # unknown title; known title from an address not configured for it
        assoc = _associate(scp.port, calling)
        assert assoc.is_rejected and not assoc.is_established
        assert assoc.acceptor.primitive.diagnostic == 0x03  # calling AE title not recognised
    assoc = _associate(scp.port, "ORTHANC")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assert assoc.send_c_store(pydicom.dcmread(files[0])).Status == 0x0000
    scp.config.min_free_mb = 1e12  # the disk "fills up" during the association
    assert assoc.send_c_store(pydicom.dcmread(files[1])).Status == 0xA700
    assoc.release()
    _wait_for(scp, "association_released")  # the release handler files the stored instance
    assoc = _associate(scp.port, "ORTHANC")
    assert assoc.is_rejected and assoc.acceptor.primitive.result == 0x02  # transient: try again later
    events = [r for r in scp.audit.records() if r["event"] in ("association_refused", "store_refused")]
    assert [e.get("calling_ae") for e in events] == ["INTRUDER", "FARAWAY", "ORTHANC", "ORTHANC"]
    assert "below" in events[-1]["reason"]
    stored = list((tmp_path / "in").rglob("*.dcm"))
    assert [p.stem for p in stored] == [str(pydicom.dcmread(files[0]).SOPInstanceUID)]


def test_scp_discards_an_aborted_association_and_dedupes_a_resend(scp, tmp_path):
    files = sorted(_series(tmp_path / "s", slices=4).iterdir())
    assoc = _associate(scp.port, "ORTHANC")
    for path in files[:2]:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    assoc.abort()
    _wait_for(scp, "association_aborted")
    assert not list((tmp_path / "in").rglob("*.dcm"))  # nothing of the aborted association is kept
    for _ in range(2):  # the whole series twice: stored once
        assoc = _associate(scp.port, "ORTHANC")
        for path in files:
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
        assoc.release()
    _wait_for(scp, "association_released", 2)
    released = [r for r in scp.audit.records() if r["event"] == "association_released"]
    assert [(r["stored"], r["duplicates"]) for r in released] == [(4, 0), (0, 4)]
    assert sorted(p.stem for p in (tmp_path / "in").rglob("*.dcm")) == sorted(
        str(pydicom.dcmread(f).SOPInstanceUID) for f in files)
    (study,) = scp.ledger.studies()
    assert study["state"] == "receiving" and study["source"] == "ORTHANC"
    # a data set with a UID that is not a UID (path tricks) is refused, nothing written outside storage
    ds = pydicom.dcmread(files[0])
    ds.SeriesInstanceUID = "../../escape"
    assoc = _associate(scp.port, "ORTHANC")
    assert assoc.send_c_store(ds).Status == 0xA900
    assoc.release()
    assert not (tmp_path / "escape").exists() and not list(tmp_path.glob("**/escape*"))


def test_a_released_study_stays_busy_until_its_instances_are_filed(scp, tmp_path):
    """``pull`` waits on busy_studies after a C-MOVE: a study must not look complete while it is being filed."""
    import threading

    files = sorted(_series(tmp_path / "s", slices=3).iterdir())
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    filing, go_on = threading.Event(), threading.Event()
    real_file = scp._file

    def slow_file(pending):
        filing.set()
        go_on.wait(30)
        real_file(pending)

    scp._file = slow_file
    assoc = _associate(scp.port, "ORTHANC")
    for path in files:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    assert scp.busy_studies() == {study}
    assoc.release()
    assert filing.wait(30)
    assert scp.busy_studies() == {study}  # released, not yet filed: still busy
    def filed():
        return [p for p in (tmp_path / "in").rglob("*.dcm") if ".partial" not in p.parts]

    assert not filed()
    go_on.set()
    _wait_for(scp, "association_released")
    assert scp.busy_studies() == set()
    assert len(filed()) == 3
    assert scp.ledger.studies()[0]["study_uid"] == study


def test_a_dropped_connection_discards_its_instances(scp, tmp_path):
    """A sender whose connection drops without A-RELEASE or A-ABORT (killed, cable pulled) keeps nothing here."""
    files = sorted(_series(tmp_path / "s", slices=3).iterdir())
    assoc = _associate(scp.port, "ORTHANC")
    for path in files:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    assoc.dul.socket.socket.close()  # the TCP connection goes, no DICOM goodbye
    _wait_for(scp, "association_aborted")
    assert [r["discarded"] for r in scp.audit.records() if r["event"] == "association_aborted"] == [3]
    assert not list((tmp_path / "in").rglob("*.dcm")) and scp.busy_studies() == set()
    assoc.kill()
