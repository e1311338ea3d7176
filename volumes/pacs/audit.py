"""Append-only JSONL audit log: one record per event, no patient names, PatientID hashed.

Every record holds the UTC time, the event name and the UIDs, AE titles, model identity
and status codes the caller passes. Patient-identifying values never reach the file:
``PatientID`` is replaced by ``patient_hash`` (a salted SHA-256, so a site can still link
the events of one patient without storing the ID) and the keys in :data:`DROPPED`
(names, birth date, addresses...) are removed wherever they appear.

Each record is one ``write`` on a file opened with ``O_APPEND`` followed by ``fsync``:
concurrent writers (the SCP's threads) never interleave lines, and a record written
before a kill -9 is on disk.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Mapping

__all__ = ["AuditLog", "hash_patient_id", "DROPPED"]

DROPPED = frozenset({
    "PatientName", "PatientBirthDate", "PatientAddress", "PatientTelephoneNumbers", "OtherPatientNames",
    "PatientMotherBirthName", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "InstitutionAddress", "OtherPatientIDs", "patient_name",
})
"""Keys removed from every audit record (DICOM keywords of PHI and their lower-case twins)."""


def hash_patient_id(patient_id: str | None, salt: str = "") -> str | None:
    """A salted SHA-256 of a PatientID, 16 hex digits; None for a missing ID."""
    if patient_id is None or str(patient_id).strip() == "":
        return None
    return hashlib.sha256(f"{salt}\x1f{patient_id}".encode()).hexdigest()[:16]


def _scrub(value: Any, salt: str) -> Any:
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if key in DROPPED:
                continue
            if key in ("PatientID", "patient_id"):
                out["patient_hash"] = hash_patient_id(item, salt)
                continue
            out[str(key)] = _scrub(item, salt)
        return out
    if isinstance(value, (list, tuple)):
        return [_scrub(item, salt) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class AuditLog:
    """Append events to ``path`` (JSON lines).

    Args:
        path: the log file; parent folders are created.
        salt: mixed into the PatientID hash (keep it secret and constant per site).
    """

    def __init__(self, path: str | Path, *, salt: str = ""):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.salt = salt
        self._lock = threading.Lock()

    def event(self, event: str, **fields: Any) -> dict:
        """Write one record and return it (as written)."""
        record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                  "event": event, **_scrub(fields, self.salt)}
        line = (json.dumps(record, sort_keys=False, default=str) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        return record

    def records(self) -> list[dict]:
        """Every record so far (a torn last line from a kill is skipped)."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out
