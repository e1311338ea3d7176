"""Send results back and confirm they arrived: C-STORE SCU or STOW-RS, then C-FIND or QIDO-RS.

Every status is checked. Success (0x0000) and the warnings (0xB000 coercion, 0xB006
elements discarded, 0xB007 data set does not match SOP class; logged) count as stored.
Network failures (no association, a dropped connection, a timeout, HTTP 5xx) and
0xA7xx (out of resources) are *transient*: :func:`with_retries` tries again after
``backoff_s``, doubling each time, up to ``tries`` attempts. Anything else (0xA9xx,
0xCxxx, HTTP 4xx, a rejected association) is a data or configuration error: no retry,
the job fails with the status in the reason.

After the store, :func:`confirm` asks the destination for the series' instances
(C-FIND at IMAGE level, or QIDO-RS) and fails unless every SOP Instance UID is there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from volumes.pacs.audit import AuditLog
from volumes.pacs.config import Endpoint

__all__ = ["dicomweb_client", "SendError", "StoreResult", "store", "confirm", "with_retries", "WARNING_STATUSES"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

WARNING_STATUSES = {0xB000: "coercion of data elements", 0xB006: "elements discarded",
                    0xB007: "data set does not match SOP class"}


class SendError(Exception):
    """A failed exchange; ``transient`` ones are retried."""

    def __init__(self, message: str, *, transient: bool, status: int | None = None):
        super().__init__(message)
        self.transient = transient
        self.status = status


@dataclass
class StoreResult:
    """What a destination answered for one instance."""

    sop_instance_uid: str
    status: int
    warning: str = ""


def _transient_status(status: int) -> bool:
    return (status & 0xFF00) == 0xA700


# ---------------------------------------------------------------------- DIMSE
def _associate(endpoint: Endpoint, calling_ae: str, contexts: Sequence[str], timeout: float,
               transfer_syntaxes: Sequence[str] | None = None) -> Any:
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for context in contexts:
        if transfer_syntaxes:
            ae.add_requested_context(context, list(transfer_syntaxes))
        else:
            ae.add_requested_context(context)
    assoc = ae.associate(endpoint.host, endpoint.port, ae_title=endpoint.ae_title)
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        raise SendError(f"{endpoint.name}: association rejected (is {calling_ae} a known modality there?)",
                        transient=False)
    raise SendError(f"{endpoint.name}: no association (connection refused, aborted or timed out)", transient=True)


def _store_dimse(endpoint: Endpoint, files: Sequence[Path], calling_ae: str, timeout: float) -> list[StoreResult]:
    import pydicom

    datasets = [pydicom.dcmread(f) for f in files]
    syntaxes = sorted({str(ds.file_meta.TransferSyntaxUID) for ds in datasets})
    assoc = _associate(endpoint, calling_ae, sorted({str(ds.SOPClassUID) for ds in datasets}), timeout,
                       transfer_syntaxes=syntaxes)
    results = []
    try:
        for path, ds in zip(files, datasets):
            status = assoc.send_c_store(ds)
            if "Status" not in status:
                raise SendError(f"{endpoint.name}: no C-STORE response for {path.name} (connection lost or timed out)",
                                transient=True)
            code = int(status.Status)
            if code == 0x0000 or code in WARNING_STATUSES:
                warning = WARNING_STATUSES.get(code, "")
                if warning:
                    logger.warning("%s: C-STORE of %s: warning 0x%04X (%s)", endpoint.name, path.name, code, warning)
                results.append(StoreResult(str(ds.SOPInstanceUID), code, warning))
                continue
            comment = str(status.get("ErrorComment", "") or "")
            raise SendError(f"{endpoint.name}: C-STORE of {path.name} failed with status 0x{code:04X} {comment}".strip(),
                            transient=_transient_status(code), status=code)
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def _find_dimse(endpoint: Endpoint, calling_ae: str, study_uid: str, series_uid: str, timeout: float) -> set[str]:
    from pydicom import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID, query.SeriesInstanceUID, query.SOPInstanceUID = study_uid, series_uid, ""
    assoc = _associate(endpoint, calling_ae, [StudyRootQueryRetrieveInformationModelFind], timeout)
    found = set()
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if "Status" not in status:
                raise SendError(f"{endpoint.name}: C-FIND interrupted", transient=True)
            code = int(status.Status)
            if code in (0xFF00, 0xFF01) and identifier is not None:
                found.add(str(identifier.SOPInstanceUID))
            elif code != 0x0000:
                raise SendError(f"{endpoint.name}: C-FIND failed with status 0x{code:04X}",
                                transient=_transient_status(code), status=code)
    finally:
        if assoc.is_established:
            assoc.release()
    return found


# ---------------------------------------------------------------------- DICOMweb
def dicomweb_client(endpoint: Endpoint, timeout: float) -> Any:
    """A DICOMwebClient for ``endpoint`` without the client's own retries."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=endpoint.url, timeout=timeout)
    # one retry policy, ours (with_retries: audited, back-off from the config), not the client's own
    client.set_http_retry_params(retry=False)
    return client


def _http_error(endpoint: Endpoint, what: str, exc: Exception) -> SendError:
    import requests

    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)) or (code is not None and code >= 500):
        return SendError(f"{endpoint.name}: {what} failed ({type(exc).__name__}: {exc})", transient=True)
    return SendError(f"{endpoint.name}: {what} failed with HTTP {code} ({exc})", transient=False)


def _store_dicomweb(endpoint: Endpoint, files: Sequence[Path], timeout: float) -> list[StoreResult]:
    import pydicom
    import requests

    datasets = [pydicom.dcmread(f) for f in files]
    try:
        response = dicomweb_client(endpoint, timeout).store_instances(datasets)
    except (requests.RequestException, OSError) as exc:
        raise _http_error(endpoint, "STOW-RS", exc) from exc
    failed = {str(item.ReferencedSOPInstanceUID): int(item.get("FailureReason", 0xC000))
              for item in (response.get("FailedSOPSequence") or [])}
    if failed:
        uid, code = next(iter(failed.items()))
        raise SendError(f"{endpoint.name}: STOW-RS refused {len(failed)} instance(s), e.g. {uid} with reason "
                        f"0x{code:04X}", transient=all(_transient_status(c) for c in failed.values()), status=code)
    results = []
    stored = {str(item.ReferencedSOPInstanceUID): item for item in (response.get("ReferencedSOPSequence") or [])}
    for ds in datasets:
        uid = str(ds.SOPInstanceUID)
        warning = int(stored[uid].get("WarningReason", 0)) if uid in stored else 0
        if warning:
            logger.warning("%s: STOW-RS of %s: warning 0x%04X", endpoint.name, uid, warning)
        results.append(StoreResult(uid, warning, WARNING_STATUSES.get(warning, "")))
    return results


def _find_dicomweb(endpoint: Endpoint, study_uid: str, series_uid: str, timeout: float) -> set[str]:
    import requests

    try:
        found = dicomweb_client(endpoint, timeout).search_for_instances(study_instance_uid=study_uid,
                                                                series_instance_uid=series_uid)
    except (requests.RequestException, OSError) as exc:
        raise _http_error(endpoint, "QIDO-RS", exc) from exc
    return {str(item["00080018"]["Value"][0]) for item in found if item.get("00080018", {}).get("Value")}


# ---------------------------------------------------------------------- public
def store(endpoint: Endpoint, files: Sequence[Path], *, calling_ae: str, timeout: float = 30.0) -> list[StoreResult]:
    """Store ``files`` at ``endpoint`` (one association / one STOW-RS request); raises :class:`SendError`."""
    files = [Path(f) for f in files]
    if not files:
        return []
    if endpoint.kind == "dicomweb":
        return _store_dicomweb(endpoint, files, timeout)
    return _store_dimse(endpoint, files, calling_ae, timeout)


def confirm(endpoint: Endpoint, study_uid: str, series_uid: str, sop_uids: Sequence[str], *, calling_ae: str,
            timeout: float = 30.0) -> None:
    """Raise :class:`SendError` (transient: a PACS may index late) unless every SOP UID is found in the series."""
    if endpoint.kind == "dicomweb":
        found = _find_dicomweb(endpoint, study_uid, series_uid, timeout)
    else:
        found = _find_dimse(endpoint, calling_ae, study_uid, series_uid, timeout)
    missing = sorted(set(sop_uids) - found)
    if missing:
        raise SendError(f"{endpoint.name}: {len(missing)} of {len(sop_uids)} sent instances not found in series "
                        f"{series_uid} (e.g. {missing[0]})", transient=True)


def with_retries(action: Callable[[], T], *, tries: int, backoff_s: float, audit: AuditLog | None = None,
                 what: str = "", sleep: Callable[[float], None] = time.sleep, **fields: Any) -> T:
    """Run ``action``; on a transient :class:`SendError` wait and retry (``backoff_s`` doubling).

    Raises the last error after ``tries`` attempts, or at once for a non-transient one.
    """
    for attempt in range(1, tries + 1):
        try:
            return action()
        except SendError as exc:
            if audit is not None:
                audit.event("send_error", what=what, attempt=attempt, tries=tries, transient=exc.transient,
                            status=f"0x{exc.status:04X}" if exc.status is not None else None, error=str(exc), **fields)
            if not exc.transient or attempt == tries:
                raise
            delay = backoff_s * 2 ** (attempt - 1)
            logger.warning("%s (try %d of %d); retrying in %.1f s", exc, attempt, tries, delay)
            sleep(delay)
    raise AssertionError("unreachable")
