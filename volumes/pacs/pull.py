"""``volumes pacs pull``: find studies on a PACS and fetch them into the node's storage.

* DIMSE: C-FIND at STUDY level (Study Root), then C-MOVE of each study to our own AE
  title. The PACS opens a storage association to us, so the caller runs the node's
  :class:`~volumes.pacs.scp.StorageSCP` meanwhile (and the PACS must know our AE).
* DICOMweb: QIDO-RS ``/studies`` with the same filters, then WADO-RS of each study in
  its stored transfer syntax (``transfer-syntax=*``: nothing is transcoded), written to
  ``storage/<study>/<series>/<sop>.dcm`` like the SCP does (existing instances are kept).

The query: a date range (``StudyDate``), a modality (``ModalitiesInStudy``) and/or
accession numbers (one query per accession, read from a file, one per line).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volumes.atomic import atomic_path
from volumes.errors import VolumesError
from volumes.pacs.audit import hash_patient_id
from volumes.pacs.config import Endpoint
from volumes.pacs.scp import valid_uid
from volumes.pacs.send import SendError, _associate, dicomweb_client

__all__ = ["StudyQuery", "read_accessions", "find_studies", "pull_dimse", "pull_dicomweb"]

logger = logging.getLogger(__name__)


@dataclass
class StudyQuery:
    """Which studies to pull; empty fields match everything."""

    date_from: str | None = None   # YYYYMMDD
    date_to: str | None = None
    modality: str | None = None
    accessions: list[str] = field(default_factory=list)

    def date_range(self) -> str | None:
        if not self.date_from and not self.date_to:
            return None
        return f"{self.date_from or ''}-{self.date_to or ''}"

    def filters(self) -> list[dict[str, str]]:
        """One filter mapping per query (one per accession number, or a single one)."""
        base: dict[str, str] = {}
        if self.date_range():
            base["StudyDate"] = self.date_range()
        if self.modality:
            base["ModalitiesInStudy"] = self.modality
        if not self.accessions:
            return [base]
        return [{**base, "AccessionNumber": accession} for accession in self.accessions]


def read_accessions(path: str | Path) -> list[str]:
    """Accession numbers, one per line (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise VolumesError(f"{path}: cannot read the accession list ({exc.strerror or exc})") from exc
    out = [line.split("#", 1)[0].strip() for line in lines]
    out = [a for a in out if a]
    bad = [a for a in out if len(a) > 16 or "\\" in a or "*" in a or "?" in a]
    if bad:
        raise VolumesError(f"{path}: not accession numbers (at most 16 characters, no wildcards): {bad[:3]}")
    return out


def find_studies(source: Endpoint, query: StudyQuery, *, calling_ae: str, timeout: float = 30.0) -> list[str]:
    """Study Instance UIDs matching ``query`` at ``source`` (C-FIND or QIDO-RS)."""
    found: list[str] = []
    for filters in query.filters():
        if source.kind == "dicomweb":
            client = dicomweb_client(source, timeout)
            # no get_remaining: Orthanc's plugin ignores offset, so paging would repeat the first page forever
            results = client.search_for_studies(search_filters=filters)
            uids = [r["0020000D"]["Value"][0] for r in results if r.get("0020000D", {}).get("Value")]
        else:
            uids = _c_find_studies(source, filters, calling_ae, timeout)
        found += [u for u in uids if u not in found]
    return found


def _c_find_studies(source: Endpoint, filters: dict[str, str], calling_ae: str, timeout: float) -> list[str]:
    from pydicom import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    for keyword in ("StudyDate", "ModalitiesInStudy", "AccessionNumber"):
        setattr(query, keyword, filters.get(keyword, ""))
    assoc = _associate(source, calling_ae, [FIND], timeout)
    uids = []
    try:
        for status, identifier in assoc.send_c_find(query, FIND):
            code = int(status.Status) if "Status" in status else None
            if code is None:
                raise SendError(f"{source.name}: C-FIND interrupted", transient=True)
            if code in (0xFF00, 0xFF01) and identifier is not None:
                uids.append(str(identifier.StudyInstanceUID))
            elif code != 0x0000:
                raise SendError(f"{source.name}: C-FIND failed with status 0x{code:04X}", transient=False, status=code)
    finally:
        if assoc.is_established:
            assoc.release()
    return uids


def pull_dimse(node: Any, scp: Any, study_uids: list[str], *, wait_s: float = 30.0) -> list[str]:
    """C-MOVE each study to our own AE (``scp`` receives it); returns the studies fully moved."""
    from pydicom import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

    cfg = node.config
    moved = []
    for study_uid in study_uids:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        assoc = _associate(cfg.source, cfg.ae_title, [MOVE], cfg.timeout_s)
        final = None
        try:
            for status, _ in assoc.send_c_move(query, cfg.ae_title, MOVE):
                if "Status" in status:
                    final = status
        finally:
            if assoc.is_established:
                assoc.release()
        code = int(final.Status) if final is not None else None
        failed = int(getattr(final, "NumberOfFailedSuboperations", 0) or 0) if final is not None else 0
        node.audit.event("pulled", method="C-MOVE", source=cfg.source.name, study_uid=study_uid,
                         status=f"0x{code:04X}" if code is not None else None, failed_suboperations=failed)
        if code not in (0x0000, 0xB000) or failed:
            logger.warning("C-MOVE of study %s from %s ended with status %s, %d failed", study_uid, cfg.source.name,
                           hex(code) if code is not None else "none", failed)
            continue
        # the sub-operations' association is released before the final response, but the
        # SCP's release handler runs on its own thread: wait until it has filed the study
        deadline = time.monotonic() + wait_s
        while study_uid in scp.busy_studies() and time.monotonic() < deadline:
            time.sleep(0.05)
        moved.append(study_uid)
    return moved


def pull_dicomweb(node: Any, study_uids: list[str]) -> list[str]:
    """WADO-RS each study (stored transfer syntax) into the storage folder; returns the studies fetched."""
    cfg = node.config
    client = dicomweb_client(cfg.source, cfg.timeout_s)
    fetched = []
    for study_uid in study_uids:
        datasets = client.retrieve_study(study_uid, media_types=(("application/dicom", "*"),))
        stored, patient = 0, None
        for ds in datasets:
            study, series, sop = (str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                                                  "SOPInstanceUID"))
            if not all(valid_uid(u) for u in (study, series, sop)) or study != study_uid:
                node.audit.event("pull_refused", study_uid=study_uid, reason="blank or malformed UIDs in an instance")
                continue
            patient = patient or ds.get("PatientID")
            target = Path(cfg.storage) / study / series / f"{sop}.dcm"
            if target.exists():
                continue
            with atomic_path(target, suffix=".dcm") as tmp:
                ds.save_as(tmp, enforce_file_format=True)
            stored += 1
        node.ledger.touch_study(study_uid, patient_hash=hash_patient_id(patient, cfg.patient_salt), source=cfg.source.name)
        node.audit.event("pulled", method="WADO-RS", source=cfg.source.name, study_uid=study_uid,
                         instances=len(datasets), stored=stored)
        fetched.append(study_uid)
    return fetched
