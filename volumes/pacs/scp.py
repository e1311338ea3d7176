"""The storage SCP of ``volumes pacs listen`` (pynetdicom).

* C-ECHO and C-STORE of every storage SOP class, in any transfer syntax: the bytes are
  stored as they came (file meta + the data set as received, no re-encoding); the
  pre-flight later refuses what the loader cannot decode.
* Only the peers of the config may associate: the calling AE title *and* the peer's
  address must match an entry (others get A-ASSOCIATE-RJ "calling AE title not
  recognised"). Below ``min_free_mb`` of free disk a new association is rejected
  (transient, local limit exceeded) and a C-STORE inside one answers 0xA700 (Out of
  Resources), so the sender keeps the study and retries later.
* Instances go to ``storage/.partial/<association>/`` first. When the association is
  released they are moved to ``storage/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
  (an instance already there is a duplicate and dropped) and the study's quiet period
  restarts in the ledger. An aborted or broken association's instances are discarded:
  the sender did not get its confirmation and will send them again. Partial folders
  left by a killed process are removed at start.
* UIDs become file names only when they are plain UIDs (digits and dots), so a crafted
  data set cannot write outside the storage folder.
"""

from __future__ import annotations

import io
import itertools
import logging
import re
import shutil
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from volumes.pacs.audit import AuditLog, hash_patient_id
from volumes.pacs.config import PacsConfig
from volumes.pacs.ledger import Ledger

__all__ = ["StorageSCP", "free_mb", "valid_uid"]

logger = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_DATASET_MISMATCH = 0xA900


def valid_uid(value: Any) -> bool:
    """A DICOM UID (digits and dots, at most 64 characters): safe as a file name."""
    text = str(value or "")
    return 0 < len(text) <= 64 and bool(_UID.match(text))


def free_mb(path: Path) -> float:
    """Free disk space under ``path`` in MiB."""
    return shutil.disk_usage(path).free / 2**20


def _resolve(host: str) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return {host}


@dataclass
class _Pending:
    """Instances received on one open association."""

    folder: Path
    calling_ae: str
    items: list[tuple[Path, str, str, str]] = field(default_factory=list)  # tmp, study, series, sop
    patients: dict[str, str | None] = field(default_factory=dict)  # study -> patient hash
    filing: bool = False  # released: its instances are being moved into storage


class StorageSCP:
    """Receive studies into ``config.storage``; record them in ``ledger`` and ``audit``.

    Args:
        config: the node's configuration (AE title, bind address, port, peers, watermark).
        ledger, audit: where arrivals are recorded.
        on_released: called with the study UIDs an association completed (optional).
    """

    def __init__(self, config: PacsConfig, ledger: Ledger, audit: AuditLog, *,
                 on_released: Callable[[set[str]], None] | None = None):
        self.config = config
        self.ledger = ledger
        self.audit = audit
        self.on_released = on_released
        self.storage = Path(config.storage)
        self.partial = self.storage / ".partial"
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._server: Any = None
        self._serial = itertools.count()
        self._allowed = {p.ae_title: _resolve(p.host) for p in config.peers}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Bind and serve on background threads (returns at once)."""
        from pydicom.uid import AllTransferSyntaxes
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        self.storage.mkdir(parents=True, exist_ok=True)
        # what a killed process left half-received: its sender never got a release
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = 8
        ae.network_timeout = self.config.timeout_s
        ae.dimse_timeout = self.config.timeout_s
        ae.acse_timeout = self.config.timeout_s
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, list(AllTransferSyntaxes))
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            # EVT_ABORTED also covers a connection that drops without an A-ABORT (pynetdicom
            # turns it into an A-P-ABORT). EVT_CONN_CLOSE is not a discard signal: it fires on the
            # network thread when a peer closes after our A-RELEASE-RP, possibly before the
            # association thread has run _on_released, and would throw away a released study.
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        self._server = ae.start_server((self.config.bind, self.config.port), block=False, evt_handlers=handlers)
        self.audit.event("listen_started", ae_title=self.config.ae_title, bind=self.config.bind,
                         port=self.port, peers=sorted(self._allowed))

    @property
    def port(self) -> int:
        """The bound port (useful with ``port: 0``)."""
        return int(self._server.server_address[1]) if self._server is not None else self.config.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            self.audit.event("listen_stopped", ae_title=self.config.ae_title)

    def busy_studies(self) -> set[str]:
        """Studies with instances on an association that is still open."""
        with self._lock:
            return {study for pending in self._pending.values() for _, study, _, _ in pending.items}

    # ------------------------------------------------------------------ handlers
    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        calling = assoc.requestor.primitive.calling_ae_title
        calling = calling.decode(errors="replace") if isinstance(calling, bytes) else str(calling)
        calling = calling.strip()
        address = assoc.requestor.address
        if calling not in self._allowed or address not in self._allowed[calling]:
            self.audit.event("association_refused", calling_ae=calling, address=address,
                             reason="calling AE title or address not in the configured peers")
            logger.warning("refused association from %s at %s: not a configured peer", calling, address)
            assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
            assoc.kill()  # as pynetdicom's own rejections do: waits until the reject PDU has left
            return
        free = free_mb(self.storage)
        if free < self.config.min_free_mb:
            self.audit.event("association_refused", calling_ae=calling, address=address,
                             reason=f"free disk {free:.0f} MiB below {self.config.min_free_mb:.0f} MiB")
            assoc.acse.send_reject(0x02, 0x03, 0x02)  # transient, presentation, local limit exceeded
            assoc.kill()
            return
        with self._lock:
            # a folder per association, never reused (Python may reuse id(assoc) once one is freed)
            folder = self.partial / f"{next(self._serial):06d}"
            self._pending[id(assoc)] = _Pending(folder=folder, calling_ae=calling)
        self.audit.event("association_accepted", calling_ae=calling, address=address)

    def _on_store(self, event: Any) -> int:
        pending = self._pending.get(id(event.assoc))
        if pending is None:
            return STATUS_CANNOT_UNDERSTAND
        if free_mb(self.storage) < self.config.min_free_mb:
            self.audit.event("store_refused", calling_ae=pending.calling_ae, status=STATUS_OUT_OF_RESOURCES,
                             reason="free disk below the watermark")
            return STATUS_OUT_OF_RESOURCES
        try:
            ds = event.dataset
            study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
            sop = str(event.request.AffectedSOPInstanceUID or ds.get("SOPInstanceUID", ""))
            patient_id = ds.get("PatientID")
        except Exception as exc:
            logger.warning("C-STORE from %s: cannot decode the data set (%s)", pending.calling_ae, exc)
            return STATUS_CANNOT_UNDERSTAND
        if not all(valid_uid(uid) for uid in (study, series, sop)):
            self.audit.event("store_refused", calling_ae=pending.calling_ae, status=STATUS_DATASET_MISMATCH,
                             study_uid=study[:64], series_uid=series[:64], sop_uid=sop[:64],
                             reason="blank or malformed Study/Series/SOP Instance UID")
            return STATUS_DATASET_MISMATCH
        pending.folder.mkdir(parents=True, exist_ok=True)
        tmp = pending.folder / f"{sop}.dcm"
        with open(tmp, "wb") as handle:
            # the received data set bytes as they came, behind a standard file meta header
            import pydicom

            handle.write(b"\x00" * 128 + b"DICM")
            pydicom.filewriter.write_file_meta_info(handle, event.file_meta, enforce_standard=True)
            handle.write(_raw(event.request.DataSet))
        with self._lock:
            pending.items.append((tmp, study, series, sop))
            pending.patients.setdefault(study, hash_patient_id(patient_id, self.config.patient_salt))
        return STATUS_SUCCESS

    def _on_released(self, event: Any) -> None:
        # the entry stays in _pending (so busy_studies still names its studies) until the
        # instances are filed and the ledger touched: a C-MOVE waiting on busy_studies must
        # not see the study as complete while its files are still being moved
        with self._lock:
            pending = self._pending.get(id(event.assoc))
            if pending is None:
                return
            pending.filing = True  # a late abort event must not discard it now
        try:
            self._file(pending)
        finally:
            with self._lock:
                self._pending.pop(id(event.assoc), None)
        if self.on_released is not None and pending.items:
            self.on_released({s for _, s, _, _ in pending.items})

    def _file(self, pending: "_Pending") -> None:
        """Move an association's instances into the storage folder and touch their studies."""
        stored, duplicates, studies = 0, 0, set()
        for tmp, study, series, sop in pending.items:
            target = self.storage / study / series / f"{sop}.dcm"
            if target.exists():
                duplicates += 1
                tmp.unlink(missing_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.replace(target)  # same file system: atomic
            stored += 1
            studies.add(study)
        shutil.rmtree(pending.folder, ignore_errors=True)
        for study in {s for _, s, _, _ in pending.items}:
            # even a study of duplicates only restarts its quiet period: a re-push is processed once
            self.ledger.touch_study(study, patient_hash=pending.patients.get(study), source=pending.calling_ae)
        self.audit.event("association_released", calling_ae=pending.calling_ae, stored=stored,
                         duplicates=duplicates, studies=sorted({s for _, s, _, _ in pending.items}))

    def _on_aborted(self, event: Any) -> None:
        if getattr(event.assoc, "is_released", False):
            return  # released: _on_released files its instances
        with self._lock:
            pending = self._pending.get(id(event.assoc))
            if pending is None or pending.filing:
                return  # released (committed or being committed) or never accepted
            del self._pending[id(event.assoc)]
        shutil.rmtree(pending.folder, ignore_errors=True)
        self.audit.event("association_aborted", calling_ae=pending.calling_ae, discarded=len(pending.items),
                         studies=sorted({s for _, s, _, _ in pending.items}))


def _raw(dataset: Any) -> bytes:
    """The encoded data set of a C-STORE request (a BytesIO in pynetdicom)."""
    if isinstance(dataset, io.BytesIO):
        return dataset.getvalue()
    return bytes(dataset.read())
