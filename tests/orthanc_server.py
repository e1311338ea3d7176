"""A real Orthanc PACS for the tests: its own config and storage, free loopback ports, stopped at the end.

Orthanc (Debian packages ``orthanc`` and ``orthanc-dicomweb``, installed by
``scripts/setup_pacs.sh``) runs with ``RemoteAccessAllowed: false`` (HTTP from
localhost only), no authentication (loopback only), the DICOMweb plugin on
``/dicom-web/`` and our node registered in ``DicomModalities`` so it can push to us and
C-MOVE to us. :func:`orthanc_or_skip` skips a test with a clear reason only when the
binary or the plugin is missing.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

ORTHANC_BIN = "Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_AET = "ORTHANC"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def orthanc_or_skip() -> str:
    """The Orthanc binary, or skip with the reason."""
    binary = shutil.which(ORTHANC_BIN)
    if binary is None:
        pytest.skip("Orthanc is not installed (run scripts/setup_pacs.sh: apt-get install orthanc orthanc-dicomweb)")
    if not DICOMWEB_PLUGIN.is_file():
        pytest.skip(f"the Orthanc DICOMweb plugin {DICOMWEB_PLUGIN} is missing (apt-get install orthanc-dicomweb)")
    return binary


class Orthanc:
    """One Orthanc process; ``modalities`` maps a name to ``(AE title, host, port)`` of nodes it may call."""

    def __init__(self, folder: Path, modalities: dict[str, tuple[str, str, int]]):
        import requests

        self.binary = orthanc_or_skip()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dicom_port, self.http_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        config = {
            "Name": "volumes-test", "StorageDirectory": str(self.folder / "db"), "IndexDirectory": str(self.folder / "db"),
            "DicomAet": ORTHANC_AET, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "SslEnabled": False,
            "DicomModalities": {name: list(entry) for name, entry in modalities.items()},
            "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": False, "DicomCheckModalityHost": True,
            "DicomCheckCalledAet": False, "DicomScuTimeout": 20, "OverwriteInstances": False,
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1, "SaveJobs": False, "ConcurrentJobs": 1, "HttpTimeout": 30,
            "StorageCompression": False, "LimitFindResults": 0, "LimitFindInstances": 0,
        }
        self.config_path = self.folder / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.log = open(self.folder / "orthanc.log", "wb")
        self.process = subprocess.Popen([self.binary, str(self.config_path)], stdout=self.log, stderr=subprocess.STDOUT)
        self.session = requests.Session()
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.session.get(f"{self.url}/system", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Orthanc did not start; log:\n{(self.folder / 'orthanc.log').read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    # ------------------------------------------------------------------ REST
    def get(self, path: str) -> Any:
        response = self.session.get(f"{self.url}{path}", timeout=60)
        response.raise_for_status()
        return response.json() if "json" in response.headers.get("content-type", "") else response.content

    def post(self, path: str, body: Any) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body)
        response = self.session.post(f"{self.url}{path}", data=data, timeout=120)
        response.raise_for_status()
        return response.json() if "json" in response.headers.get("content-type", "") else response.content

    def upload(self, files: list[Path]) -> list[str]:
        """POST each file to /instances; returns Orthanc's instance ids."""
        return [self.post("/instances", Path(f).read_bytes())["ID"] for f in files]

    def series_uids(self, study_uid: str) -> dict[str, str]:
        """SeriesInstanceUID -> Modality of every series of a study."""
        ids = self.post("/tools/lookup", study_uid.encode())
        study = next((i["ID"] for i in ids if i["Type"] == "Study"), None)
        if study is None:
            return {}
        return {s["MainDicomTags"]["SeriesInstanceUID"]: s["MainDicomTags"].get("Modality", "")
                for s in self.get(f"/studies/{study}/series")}

    def instance_bytes(self, sop_uid: str) -> bytes:
        ids = self.post("/tools/lookup", sop_uid.encode())
        (instance,) = [i["ID"] for i in ids if i["Type"] == "Instance"]
        return self.get(f"/instances/{instance}/file")

    def push(self, modality: str, resources: list[str], synchronous: bool = True) -> Any:
        """C-STORE the given Orthanc ids (studies, series or instances) to a modality."""
        return self.post(f"/modalities/{modality}/store", {"Resources": resources, "Synchronous": synchronous})

    def statistics(self) -> dict:
        return self.get("/statistics")
