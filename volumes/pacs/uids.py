"""Deterministic UIDs for the objects `volumes pacs` writes.

A re-run on the same input with the same models must produce objects with the same
SOP Instance and Series Instance UIDs, so that the PACS answers "already stored"
instead of filing a second series. The UIDs are therefore derived from everything that
decides the output: the source series UID, a hash of its set of SOP Instance UIDs,
and each bundle's version, weights hash and settings (its ``model_key``).

UIDs under the ``2.25`` root are the decimal form of a 128-bit number (ISO/IEC 9834-8,
DICOM PS3.5 B.2), so the first 128 bits of a SHA-256 of the inputs make a valid UID
that needs no registered organisation root.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

__all__ = ["derived_uid", "instance_set_sha256", "job_key"]


def instance_set_sha256(sop_instance_uids: Iterable[str]) -> str:
    """SHA-256 of a series' set of SOP Instance UIDs (order and duplicates do not matter)."""
    joined = "\n".join(sorted(set(str(uid) for uid in sop_instance_uids)))
    return hashlib.sha256(joined.encode()).hexdigest()


def job_key(series_uid: str, instances_sha256: str, model_keys: Iterable[str]) -> str:
    """The ledger key of one series' job: source series, its instances, the models that ran."""
    content = "\n".join([series_uid, instances_sha256, *sorted(model_keys)])
    return hashlib.sha256(content.encode()).hexdigest()


def derived_uid(key: str, *purpose: str) -> str:
    """A ``2.25.<int>`` UID from a job key and a purpose (e.g. ``("seg", "series")``).

    Equal arguments give equal UIDs; distinct ones differ with probability 1 - 2**-128.
    """
    digest = hashlib.sha256("\x1f".join([key, *purpose]).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"
