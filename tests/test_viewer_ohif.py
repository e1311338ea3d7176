"""OHIF beside the archive: the proxy (always), and a real browser on what `volumes pacs` sent (when installed).

The first tests run everywhere: :class:`volumes.pacs.viewer.ViewerServer` on a stand-in ``dist/``
and a stand-in archive. The browser test starts Orthanc, serves the real OHIF (scripts/setup_viewer.sh),
pushes a CT study to `volumes pacs listen`, and opens the study in headless Chromium as a
radiologist would: the study's three series are listed, our SEG loads with no error in the
console, its segment names are OHIF's, the labelmap OHIF draws over each CT image is the SEG we
wrote (voxel count and in-plane centroid per segment and slice), and OHIF reads our SR's volumes.
"""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from volumes.errors import VolumesError
from volumes.pacs.config import load_config
from volumes.pacs.viewer import ViewerServer, app_config, study_url

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- the proxy, no browser
class _Archive(BaseHTTPRequestHandler):
    """A stand-in DICOMweb root that records what reached it."""

    seen: list[tuple[str, str]] = []

    def log_message(self, *args):
        pass

    def _reply(self):
        type(self).seen.append((self.command, self.path))
        body = json.dumps([{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _reply


@pytest.fixture()
def archive():
    _Archive.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Archive)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/pacs/dicom-web"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def dist(tmp_path):
    folder = tmp_path / "dist"
    folder.mkdir()
    (folder / "index.html").write_text("<html>OHIF</html>")
    (folder / "app.bundle.abc.js").write_text("console.log(1)")
    (tmp_path / "secret.txt").write_text("outside dist")
    return folder


def test_the_viewer_serves_ohif_and_forwards_only_reads_to_the_archive(dist, archive):
    with ViewerServer(dist, archive) as viewer:
        assert viewer.url.startswith("http://127.0.0.1:")
        for route in ("/", "/viewer?StudyInstanceUIDs=1.2.3", "/segmentation/x"):  # OHIF's client routes
            response = requests.get(viewer.url + route, timeout=10)
            assert response.status_code == 200 and response.text == "<html>OHIF</html>", route
        script = requests.get(viewer.url + "/app.bundle.abc.js", timeout=10)
        assert script.text == "console.log(1)" and "javascript" in script.headers["content-type"]
        config = requests.get(viewer.url + "/app-config.js", timeout=10).text
        assert config == app_config() and '"qidoRoot": "/dicom-web"' in config and "cloudfront" not in config
        studies = requests.get(viewer.url + "/dicom-web/studies?PatientID=X", timeout=10)
        assert studies.status_code == 200 and studies.headers["content-type"] == "application/dicom+json"
        assert studies.json()[0]["0020000D"]["Value"] == ["1.2.3"]
        assert _Archive.seen == [("GET", "/pacs/dicom-web/studies?PatientID=X")]
        for method in ("post", "delete", "put"):  # the viewer is read-only: nothing else reaches the archive
            assert getattr(requests, method)(viewer.url + "/dicom-web/studies", timeout=10).status_code == 405
        assert _Archive.seen == [("GET", "/pacs/dicom-web/studies?PatientID=X")]
        # a path outside dist/ is never served (the single-page app answers instead)
        outside = requests.get(viewer.url + "/../secret.txt", timeout=10)
        assert "outside dist" not in outside.text


def test_volumes_pacs_viewer_serves_until_sigterm(dist, archive):
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "volumes", "pacs", "viewer", "--ohif", str(dist), "--dicomweb",
                                archive, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               cwd=ROOT, text=True)
    try:
        line = process.stdout.readline()
        assert f"OHIF at http://127.0.0.1:{port}" in line, line
        deadline = time.monotonic() + 30
        while True:
            try:
                response = requests.get(f"http://127.0.0.1:{port}/viewer?StudyInstanceUIDs=1.2", timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert response.text == "<html>OHIF</html>"
        process.terminate()
        assert process.wait(timeout=30) == 0
    finally:
        process.kill() if process.poll() is None else None


def test_the_viewer_refuses_a_missing_ohif_or_a_bad_archive_url(tmp_path, dist):
    with pytest.raises(VolumesError, match="setup_viewer.sh"):
        ViewerServer(tmp_path / "nothing", "http://127.0.0.1:8042/dicom-web")
    with pytest.raises(VolumesError, match="DICOMweb root"):
        ViewerServer(dist, "127.0.0.1:8042")


def test_a_node_with_a_viewer_gives_each_study_its_url(tmp_path):
    path = tmp_path / "node.json"
    path.write_text(json.dumps({"viewer": "http://127.0.0.1:3000/"}))
    config = load_config(path)
    assert config.viewer_url("1.2.840.1") == "http://127.0.0.1:3000/viewer?StudyInstanceUIDs=1.2.840.1"
    assert study_url("http://h:1", "1.2") == "http://h:1/viewer?StudyInstanceUIDs=1.2"
    path.write_text(json.dumps({}))
    assert load_config(path).viewer_url("1.2") is None
    path.write_text(json.dumps({"viewer": "localhost:3000"}))
    with pytest.raises(VolumesError, match="viewer="):
        load_config(path)


# ---------------------------------------------------------------------- the browser
@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """Orthanc, OHIF beside it, and the phantom CT study pushed to `volumes pacs listen` and sent back."""
    from ohif_browser import browser_missing, ohif_folder
    from orthanc_server import Orthanc, free_port, orthanc_or_skip

    orthanc_or_skip()
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("pynetdicom")
    import test_pacs_orthanc as pacs

    base = tmp_path_factory.mktemp("viewer")
    port = free_port()
    orthanc = Orthanc(base / "orthanc", {"volumes": ("VOLUMES", "127.0.0.1", port)})
    viewer = ViewerServer(ohif_folder(), orthanc.dicomweb).start()
    listener = None
    try:
        study = pacs._inputs(base / "inputs", None)["phantom"]
        orthanc.upload(study["series"]["ct"][1])
        config = pacs._node_config(base / "node.json", base, orthanc, port, pacs._weights(base), viewer=viewer.url)
        listener = pacs._start_listener(config)
        orthanc.push("volumes", [pacs._orthanc_id(orthanc, study["study"], "Study")])
        rows = pacs._wait_for(base / "out", [study["study"]])
        assert rows[study["study"]]["state"] == "done", rows
        yield {"base": base, "orthanc": orthanc, "viewer": viewer, "study": study["study"], "config": config,
               "listener_log": sorted(base.glob("listen-*.log"))[-1]}
    finally:
        if listener is not None:
            listener.terminate()
            listener.wait(timeout=60)
        viewer.stop()
        orthanc.stop()


def test_the_node_names_the_viewer_url_of_each_study(processed):
    url = study_url(processed["viewer"].url, processed["study"])
    out = processed["base"] / "out"
    done = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()
            if '"study_done"' in line]
    assert [e.get("viewer_url") for e in done] == [url]
    assert f"viewer: {url}" in processed["listener_log"].read_text()
    (report,) = sorted((out / "infer").glob("*/report.html"))
    assert f'href="{url}"' in report.read_text().replace("&amp;", "&")


def test_ohif_lists_the_study_loads_our_seg_over_the_ct_and_reads_our_sr(processed):
    import pydicom
    from ohif_browser import OhifPage, seg_frame_stats

    results = sorted((processed["base"] / "out" / "results").glob("*"))[-1]
    seg_file = results / "dinov2_unet_segmentation_seg.dcm"
    seg = pydicom.dcmread(seg_file, stop_before_pixels=True)
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    page = OhifPage()
    try:
        page.open_study(study_url(processed["viewer"].url, processed["study"]))
        # the study browser lists the CT and the two series we sent
        text = page.text()
        for description in ("volumes phantom case0", str(seg.SeriesDescription)[:40], "AI-generated measurements"):
            assert description in text, description
        segmentation = page.load_seg(str(seg.SeriesDescription)[:40])
        assert {s["index"]: s["label"] for s in segmentation["segments"]} == names
        # what OHIF draws over each CT image is the SEG we wrote: voxels and in-plane centroid, segment by segment
        drawn = {image.split("/instances/")[1].split("/")[0]: stats
                 for image, stats in page.labelmap().items() if stats}
        assert drawn == seg_frame_stats(seg_file)
        assert page.errors() == []
        page.script("document.querySelector('[data-cy=\"panelSegmentation-btn\"]')?.click()")
        page.wait(lambda: all(name in page.text() for name in names.values()), "every segment name on the page")
        shots = os.environ.get("VOLUMES_VIEWER_SHOTS")  # docs/ohif_seg.png: VOLUMES_VIEWER_SHOTS=docs pytest ...
        if shots:
            page.screenshot(ROOT / shots / "ohif_seg.png")
        # the SR: OHIF reads a volume in mL for every organ the SEG holds
        sr = pydicom.dcmread(results / "sr.dcm")
        measurements = page.load_sr("AI-generated measurements")
        volumes = {m["id"].split(" (")[0]: m["labels"] for m in measurements if m["id"].endswith("segmentation)")}
        expected = {}
        for group in sr.ContentSequence[-1].ContentSequence:
            items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in group.ContentSequence}
            if "Volume" in items:
                expected[items["Tracking Identifier"].TextValue.split(" (")[0]] = float(
                    items["Volume"].MeasuredValueSequence[0].NumericValue)
        assert expected and set(volumes) == set(expected)
        for organ, labels in volumes.items():
            (label,) = [entry for entry in labels if entry["label"] == "Volume"]
            value, unit = label["value"].split()
            assert unit == "mL" and abs(float(value) - expected[organ]) < 0.01, (organ, label)
        assert page.errors() == []
    finally:
        page.close()
