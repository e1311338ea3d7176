"""One study through the node: select, pre-flight, BatchInference, SEG + SR, send, confirm.

:class:`PacsNode` holds the config, the bundles (loaded once), the ledger and the audit
log. :meth:`PacsNode.process_study` takes a study received under
``storage/<StudyInstanceUID>/<SeriesInstanceUID>/`` and, per series:

1. applies the selection rules per bundle and, for the selected bundles, the
   pre-flight (:mod:`volumes.pacs.rules`); a skipped series gets its reason in the
   ledger and the audit log, and the other series go on;
2. runs :class:`~volumes.inference.runner.BatchInference` on the series folder (with
   ``resume``: after a kill the finished inference is reused), under
   ``output/infer/<job key>/``;
3. writes ``output/results/<job key>/``: each SEG with derived UIDs and AI marking, and
   the TID 1500 SR (:mod:`volumes.pacs.sr`);
4. sends them to every destination and confirms them there (:mod:`volumes.pacs.send`).

A series whose job key (source series, its instance set, the models) is already
``confirmed`` or ``skipped`` is not redone: a re-sent study changes nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

from volumes.atomic import sweep_temporaries
from volumes.errors import VolumesError
from volumes.pacs.audit import AuditLog
from volumes.pacs.config import PacsConfig
from volumes.pacs.ledger import Ledger
from volumes.pacs.rules import min_slices, non_image_reason, preflight, select, summarize_series
from volumes.pacs.send import SendError, confirm, store, with_retries
from volumes.pacs.sr import build_sr, mark_seg
from volumes.pacs.uids import instance_set_sha256, job_key

__all__ = ["PacsNode", "load_models"]

logger = logging.getLogger(__name__)


def load_models(config: PacsConfig) -> list[Any]:
    """The config's bundles as :class:`~volumes.inference.bundles.BundleModel` (on its device)."""
    from volumes.devices import resolve_device
    from volumes.inference.bundles import load_bundle

    if not config.bundles:
        raise VolumesError(f"{config.path}: no bundles configured")
    device = str(resolve_device(config.device))
    return [load_bundle(spec.path, device=device, weights=spec.weights, overrides=spec.overrides or None)
            for spec in config.bundles]


def _identity(model: Any) -> dict[str, str]:
    return {"bundle": model.bundle_id, "version": str(model.version), "weights_sha256": model.weights_sha256,
            "task": model.task, "model_key": model.model_key}


class _SeriesFailed(Exception):
    pass


class PacsNode:
    """The node's state: config, bundles, ledger (``output/ledger.sqlite``), audit (``output/audit.jsonl``).

    Args:
        config: the parsed configuration.
        models: already loaded bundles (default: loaded from the config on first use).
    """

    def __init__(self, config: PacsConfig, models: Sequence[Any] | None = None):
        self.config = config
        self.output = Path(config.output)
        self.output.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.output / "ledger.sqlite")
        self.audit = AuditLog(self.output / "audit.jsonl", salt=config.patient_salt)
        self._models = list(models) if models is not None else None
        # what a killed node left mid-write (pulled instances, SEG and SR): a temporary file of a
        # process still alive (another node on the same folders) is never touched
        for folder in (Path(config.storage), self.output / "results"):
            sweep_temporaries(folder, recursive=True)

    @property
    def models(self) -> list[Any]:
        if self._models is None:
            self._models = load_models(self.config)
        return self._models

    def close(self) -> None:
        self.ledger.close()

    # ------------------------------------------------------------------ studies
    def process_ready(self, busy: Iterable[str] = ()) -> list[str]:
        """Process every study whose quiet period is over (or whose run was interrupted)."""
        done = []
        for study_uid in self.ledger.ready_studies(self.config.quiet_s, busy):
            self.process_study(study_uid)
            done.append(study_uid)
        return done

    def process_study(self, study_uid: str) -> str:
        """Run one received study; returns its final state (``done`` or ``failed``)."""
        folder = Path(self.config.storage) / study_uid
        self.ledger.set_study(study_uid, "processing")
        series_folders = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        self.audit.event("study_started", study_uid=study_uid, series=len(series_folders))
        if not series_folders:
            self.ledger.set_study(study_uid, "failed", f"{folder}: no series received")
            self.audit.event("study_failed", study_uid=study_uid, reason="no series received")
            return "failed"
        failures = []
        for series_folder in series_folders:
            try:
                state = self._process_series(study_uid, series_folder)
            except Exception as exc:  # one bad series never stops the study
                logger.exception("series %s failed", series_folder.name)
                state = f"failed: {type(exc).__name__}: {exc}"
            if state.startswith("failed"):
                failures.append(f"{series_folder.name}: {state}")
        if failures:
            self.ledger.set_study(study_uid, "failed", "; ".join(failures)[:2000])
            self.audit.event("study_failed", study_uid=study_uid, reason=failures)
            return "failed"
        self.ledger.set_study(study_uid, "done")
        viewer = self.config.viewer_url(study_uid)
        self.audit.event("study_done", study_uid=study_uid, **({"viewer_url": viewer} if viewer else {}))
        return "done"

    # ------------------------------------------------------------------ series
    def _process_series(self, study_uid: str, folder: Path) -> str:
        summary = summarize_series(folder)
        series_uid = summary.series_uid
        patient = str(getattr(summary.header, "PatientID", "") or "") if summary.header is not None else ""
        instances = instance_set_sha256(summary.sop_instance_uids)
        chosen, reasons = [], {}
        for model in self.models:
            ok, reason = select(self.config.rules, model.bundle_id, summary)
            (chosen.append(model) if ok else reasons.__setitem__(model.bundle_id, reason))
        base = dict(study_uid=study_uid, series_uid=series_uid, instances_sha256=instances,
                    n_instances=len(summary.files))
        non_image = non_image_reason(summary)
        if non_image is not None:
            chosen, reasons = [], {m.bundle_id: non_image for m in self.models}
        key = job_key(series_uid, instances, [m.model_key for m in chosen])
        row = self.ledger.series(key)
        if row is not None and row["state"] in ("confirmed", "skipped"):
            self.audit.event("series_unchanged", job_key=key, state=row["state"], **base)
            return row["state"]
        for bundle, reason in reasons.items():
            self.audit.event("series_not_selected", job_key=key, bundle=bundle, reason=reason, PatientID=patient,
                             **base)
        if not chosen:
            reason = "not selected: " + "; ".join(f"{b}: {r}" for b, r in reasons.items())
            self.ledger.set_series(key, state="skipped", reason=reason, bundles=[], **base)
            return "skipped"
        problem = preflight(summary, min_slices=min_slices(self.config.rules))
        if problem is not None:
            reason = f"pre-flight: {problem}"
            self.ledger.set_series(key, state="skipped", reason=reason, bundles=[m.bundle_id for m in chosen], **base)
            self.audit.event("series_skipped", job_key=key, reason=reason, PatientID=patient, **base)
            return "skipped"
        self.ledger.set_series(key, state="selected", bundles=[m.bundle_id for m in chosen], **base)
        self.audit.event("series_selected", job_key=key, bundles=[_identity(m) for m in chosen], PatientID=patient,
                         **base)
        try:
            outputs = self._infer(key, summary, chosen, base)
            self._send(key, outputs, base)
        except _SeriesFailed as exc:
            self.ledger.set_series(key, state="failed", reason=str(exc), **base)
            self.audit.event("series_failed", job_key=key, reason=str(exc), **base)
            return f"failed: {exc}"
        self.ledger.set_series(key, state="confirmed", **base)
        self.audit.event("series_confirmed", job_key=key, **base)
        return "confirmed"

    def _infer(self, key: str, summary: Any, models: list[Any], base: dict) -> dict:
        """BatchInference on the series folder, then the marked SEGs and the SR; returns the output files."""
        import json

        import pydicom

        from volumes.data.dicom import check_dicom_series
        from volumes.inference.runner import BatchInference

        work = self.output / "infer" / key
        runner = BatchInference(models, work, resume=True, workers=0, figures=False, progress=False)
        item = {"image": str(summary.folder), "case_id": "series", "series_uid": summary.series_uid}
        if self.config.viewer:
            item["viewer_url"] = self.config.viewer_url(base["study_uid"])
        runner.run([item])
        case = work / "series"
        if not (case / "record.json").is_file():
            try:
                failure = json.loads((case / "failure.json").read_text())
                reason = f"inference failed at {failure.get('stage')}: {failure.get('error')}"
            except (OSError, ValueError):
                reason = "inference wrote neither record.json nor failure.json"
            raise _SeriesFailed(reason)
        record = json.loads((case / "record.json").read_text())
        by_id = {m.bundle_id: m for m in models}
        results = self.output / "results" / key
        sources = [pydicom.dcmread(f, stop_before_pixels=True)
                   for f in check_dicom_series(summary.folder, series_uid=summary.series_uid)]
        segs, classes, files = [], [], []
        for row in record["rows"]:
            model = by_id[row["bundle"]]
            identity = _identity(model)
            if row["task"] == "segmentation":
                seg_file = row["outputs"].get("dicom_seg")
                if not seg_file:
                    raise _SeriesFailed(f"{row['bundle']}: the runner wrote no DICOM SEG")
                marked = mark_seg(work / seg_file, results / f"{row['bundle']}_seg.dcm", key, identity)
                files.append(marked)
                segs.append((pydicom.dcmread(marked), identity, row.get("organ_volumes_ml", {}),
                             list(model.predictor.labels), row.get("quality")))
            else:
                predicted = row["predicted"]
                classes.append((identity, predicted, float(row["probabilities"][predicted])))
        sr = build_sr(sources, segs, classes, results / "sr.dcm", key)
        files.append(sr)
        outputs = {"files": [str(p) for p in files],
                   "series": [str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in files],
                   "sop_instance_uids": [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                                         for p in files],
                   "record": str(case / "record.json")}
        self.ledger.set_series(key, state="inferred", outputs=outputs, **base)
        self.audit.event("inferred", job_key=key, outputs=outputs["sop_instance_uids"],
                         models=[_identity(m) for m in models],
                         organ_volumes_ml={s[1]["bundle"]: s[2] for s in segs},
                         quality={s[1]["bundle"]: (s[4] or {}).get("flag") for s in segs},
                         classification={c[0]["bundle"]: {"predicted": c[1], "probability": c[2]} for c in classes},
                         **base)
        return outputs

    def _send(self, key: str, outputs: dict, base: dict) -> None:
        """Store every output at every destination, then confirm each output series there."""
        cfg = self.config
        files = [Path(f) for f in outputs["files"]]
        for destination in cfg.destinations:
            fields = dict(job_key=key, destination=destination.name, study_uid=base["study_uid"],
                          series_uid=base["series_uid"])
            try:
                results = with_retries(lambda d=destination: store(d, files, calling_ae=cfg.ae_title,
                                                                     timeout=cfg.timeout_s),
                                       tries=cfg.tries, backoff_s=cfg.backoff_s, audit=self.audit, what="store",
                                       **fields)
                self.audit.event("sent", statuses={r.sop_instance_uid: f"0x{r.status:04X}" for r in results},
                                 called_ae=destination.ae_title or None, calling_ae=cfg.ae_title, **fields)
                self.ledger.set_series(key, state="sent", attempt=True, **base)
                for series_uid in sorted(set(outputs["series"])):
                    uids = [u for u, s in zip(outputs["sop_instance_uids"], outputs["series"]) if s == series_uid]
                    with_retries(lambda d=destination, s=series_uid, u=uids: confirm(
                        d, base["study_uid"], s, u, calling_ae=cfg.ae_title, timeout=cfg.timeout_s),
                        tries=cfg.tries, backoff_s=cfg.backoff_s, audit=self.audit, what="confirm", **fields)
                self.audit.event("confirmed", output_series=sorted(set(outputs["series"])), **fields)
            except SendError as exc:
                raise _SeriesFailed(f"send to {destination.name}: {exc}") from exc
