"""SQLite job ledger: each study processed once, a state per series, restart where it stopped.

Two tables, in ``OUTPUT/ledger.sqlite``:

* ``studies``: one row per StudyInstanceUID. ``receiving`` while instances arrive (with
  the time of the last completed association), then ``processing``, ``done`` or
  ``failed`` (with the reason). New instances for a finished study put it back to
  ``receiving``; its series whose instance set did not change keep their job key and are
  not redone.
* ``series``: one row per job key (:func:`volumes.pacs.uids.job_key`: source series,
  hash of its instance set, the models) with the step it reached: ``selected``,
  ``skipped`` (not selected or refused by the pre-flight, with the reason),
  ``inferred``, ``sent``, ``confirmed`` or ``failed`` (with the reason), the try count
  and the output files.

Every change is its own committed transaction in WAL mode, so a kill -9 loses at most
the step in progress, which is redone on restart (the steps are idempotent: inference
resumes from ``record.json``, the UIDs are deterministic so a re-send stores nothing new).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

__all__ = ["Ledger", "SERIES_STATES", "STUDY_STATES"]

STUDY_STATES = ("receiving", "processing", "done", "failed")
SERIES_STATES = ("selected", "skipped", "inferred", "sent", "confirmed", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    patient_hash TEXT,
    source TEXT,
    last_activity REAL NOT NULL,
    reason TEXT,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS series (
    job_key TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    instances_sha256 TEXT,
    n_instances INTEGER,
    bundles TEXT,
    state TEXT NOT NULL,
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    outputs TEXT,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS series_by_study ON series(study_uid);
"""


class Ledger:
    """The job ledger at ``path`` (created with its tables when missing). Thread-safe."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # autocommit (isolation_level=None): each statement is committed when it returns
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, tuple(params)).fetchall()

    # ------------------------------------------------------------------ studies
    def touch_study(self, study_uid: str, *, patient_hash: str | None = None, source: str | None = None) -> None:
        """Instances of ``study_uid`` arrived now: (back) to ``receiving``, quiet period restarts."""
        now = time.time()
        self._exec(
            "INSERT INTO studies(study_uid, state, patient_hash, source, last_activity, updated) "
            "VALUES (?, 'receiving', ?, ?, ?, ?) ON CONFLICT(study_uid) DO UPDATE SET state='receiving', "
            "last_activity=excluded.last_activity, updated=excluded.updated, reason=NULL, "
            "patient_hash=COALESCE(excluded.patient_hash, patient_hash), source=COALESCE(excluded.source, source)",
            (study_uid, patient_hash, source, now, now))

    def set_study(self, study_uid: str, state: str, reason: str | None = None) -> None:
        if state not in STUDY_STATES:
            raise ValueError(f"unknown study state {state!r}; one of {STUDY_STATES}")
        now = time.time()
        self._exec(
            "INSERT INTO studies(study_uid, state, last_activity, reason, updated) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(study_uid) DO UPDATE SET state=excluded.state, reason=excluded.reason, updated=excluded.updated",
            (study_uid, state, now, reason, now))

    def study(self, study_uid: str) -> dict | None:
        rows = self._exec("SELECT * FROM studies WHERE study_uid=?", (study_uid,))
        return dict(rows[0]) if rows else None

    def studies(self, state: str | None = None) -> list[dict]:
        if state is None:
            return [dict(r) for r in self._exec("SELECT * FROM studies ORDER BY last_activity")]
        return [dict(r) for r in self._exec("SELECT * FROM studies WHERE state=? ORDER BY last_activity", (state,))]

    def ready_studies(self, quiet_s: float, busy: Iterable[str] = ()) -> list[str]:
        """Studies to process: ``receiving`` and quiet for ``quiet_s``, or ``processing`` (a run that
        was killed), except those with an association still open (``busy``)."""
        busy = set(busy)
        cutoff = time.time() - quiet_s
        rows = self._exec("SELECT study_uid FROM studies WHERE (state='receiving' AND last_activity<=?) "
                          "OR state='processing' ORDER BY last_activity", (cutoff,))
        return [r["study_uid"] for r in rows if r["study_uid"] not in busy]

    # ------------------------------------------------------------------ series
    def series(self, job_key: str) -> dict | None:
        rows = self._exec("SELECT * FROM series WHERE job_key=?", (job_key,))
        return _series_row(rows[0]) if rows else None

    def series_of_study(self, study_uid: str) -> list[dict]:
        return [_series_row(r) for r in self._exec("SELECT * FROM series WHERE study_uid=? ORDER BY updated",
                                                    (study_uid,))]

    def set_series(self, job_key: str, *, study_uid: str, series_uid: str, state: str, reason: str | None = None,
                   instances_sha256: str | None = None, n_instances: int | None = None,
                   bundles: list[str] | None = None, outputs: dict | None = None, attempt: bool = False) -> None:
        """Record the step a series' job reached (creating its row); ``attempt`` counts one more try."""
        if state not in SERIES_STATES:
            raise ValueError(f"unknown series state {state!r}; one of {SERIES_STATES}")
        now = time.time()
        self._exec(
            "INSERT INTO series(job_key, study_uid, series_uid, instances_sha256, n_instances, bundles, state, reason, "
            "attempts, outputs, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(job_key) DO UPDATE SET "
            "state=excluded.state, reason=excluded.reason, attempts=attempts+?, updated=excluded.updated, "
            "instances_sha256=COALESCE(excluded.instances_sha256, instances_sha256), "
            "n_instances=COALESCE(excluded.n_instances, n_instances), bundles=COALESCE(excluded.bundles, bundles), "
            "outputs=COALESCE(excluded.outputs, outputs)",
            (job_key, study_uid, series_uid, instances_sha256, n_instances,
             json.dumps(bundles) if bundles is not None else None, state, reason, int(attempt),
             json.dumps(outputs) if outputs is not None else None, now, int(attempt)))


def _series_row(row: sqlite3.Row) -> dict:
    out = dict(row)
    for key in ("bundles", "outputs"):
        out[key] = json.loads(out[key]) if out[key] else None
    return out
