"""Batch inference over many cases with one or more bundles: fault-isolated, resumable, scalable.

Per case the runner

1. hashes the input (file bytes; every file of a DICOM series) and, with ``resume``,
   skips the case when its outputs are complete for the same input and models;
2. loads the volume once (RAS, :class:`volumes.data.io.LoadVolumed`) and runs each
   bundle's preprocessing - both on background threads, ahead of the model;
3. runs each bundle's network, then writes under ``OUTPUT/<case-id>/``:
   ``<bundle>_seg.nii.gz`` (the input's original geometry), ``<bundle>_seg.dcm``
   (DICOM SEG referencing the source series, for DICOM input),
   ``<bundle>_probabilities.json``, ``overview.png`` (three views with the mask, the
   slice-importance curve) and, last, ``record.json`` - the proof the case is complete.

A case that fails at any stage gets ``OUTPUT/<case-id>/failure.json`` with a readable
reason and the batch goes on. At the end the per-case records are merged into
``predictions.csv``, ``predictions.jsonl``, ``failures.csv`` and ``report.html``. Every
file is written under a temporary name and renamed, so an interrupted run leaves no
partial file; what a killed writer leaves (a temporary file SIGKILL kept from being
removed) is swept when the case is visited again, as a new attempt or by ``--resume``, and
the merged outputs' when they are merged (:func:`volumes.atomic.sweep_temporaries`). That
is safe because one case is written by one process at a time: under ``torchrun`` each
process takes every N-th case and only rank 0 merges, after a barrier; the Ray engine
gives a case to one actor at a time and retries it only after that actor died.

The stages are public so that other engines run exactly this code:
:meth:`BatchInference.prepare_case` (steps 1-2; its model-free part is
:class:`CaseLoader`, picklable, for CPU tasks), :meth:`BatchInference.finish_case`
(step 3 and the record or failure), :meth:`BatchInference.run_case` (both) and
:meth:`BatchInference.merge`. :mod:`volumes.inference.ray_engine` is such an engine.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from volumes.arrays import spacing_mm
from volumes.atomic import atomic_write_bytes, sweep_temporaries
from volumes.devices import torchrun_rank
from volumes.errors import VolumesError
from volumes.inference.bundles import BundleModel

__all__ = ["BatchInference", "CaseLoader", "InferenceSummary", "PreparedCase", "input_sha256", "normalize_items"]

logger = logging.getLogger(__name__)

RECORD = "record.json"
FAILURE = "failure.json"
FIGURE = "overview.png"


def input_sha256(item: Mapping[str, Any]) -> str:
    """SHA-256 of a case's input bytes (:func:`volumes.data.io.source_sha256`)."""
    from volumes.data.io import source_sha256

    return source_sha256(item["image"], item.get("series_uid"))


@dataclass
class InferenceSummary:
    """What a run did (over all processes)."""

    total: int
    succeeded: int
    skipped: int
    failed: int
    seconds: float
    output_dir: Path

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def line(self) -> str:
        report = self.output_dir / "report.html"
        return (f"{self.total} cases: {self.succeeded} done, {self.skipped} already complete (resume), "
                f"{self.failed} failed in {self.seconds:.1f} s; report: {report}")


def normalize_items(items: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Copies of the cases with ``case_id`` set (the file name without extensions by default).

    Raises:
        VolumesError: two cases share a case id (they would write into the same folder).
    """
    items = [dict(item) for item in items]
    for item in items:
        item.setdefault("case_id", Path(str(item["image"])).name.split(".")[0])
    ids = [item["case_id"] for item in items]
    if len(set(ids)) != len(ids):
        raise VolumesError(f"case ids must be unique; repeated: {sorted({i for i in ids if ids.count(i) > 1})}")
    return items


@dataclass
class PreparedCase:
    """A case after the background stages: hashed, loaded, and (when prefetching) preprocessed for every bundle."""

    item: dict
    input_sha256: str | None = None
    skip: bool = False
    volume: Any = None
    data: dict[str, dict] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    failure: dict | None = None


class _StageError(Exception):
    def __init__(self, stage: str, error: BaseException):
        super().__init__(str(error))
        self.stage = stage
        self.error = error


def _reason(item: Mapping[str, Any], exc: BaseException) -> str:
    """A readable one-line reason that names the input."""
    message = str(exc).strip() or type(exc).__name__
    if not isinstance(exc, VolumesError):
        message = f"{type(exc).__name__}: {message}"
    source = str(item.get("image", ""))
    return message if source and source in message else f"{source}: {message}"


def _fresh(volume: Any) -> Any:
    """The loaded volume for one bundle's transforms: the same voxels (no copy), its own metadata.

    The preprocessing makes new tensors rather than writing into its input (tested), so the
    voxels can be shared; metadata and the trace of applied operations are per bundle,
    because each bundle's ``Invertd`` reads and pops its own trace.
    """
    from monai.data import MetaTensor

    if not isinstance(volume, MetaTensor):
        return volume
    return MetaTensor(volume.as_tensor(), meta=copy.deepcopy(dict(volume.meta)),
                      applied_operations=copy.deepcopy(volume.applied_operations))


@dataclass
class _FigureParts:
    """What a case's figure draws: the first segmentation's mask and labels, the first classifier's importance."""

    mask: Any = None
    labels: Sequence[str] = ()
    quality: Any = None
    importance: Any = None
    top: Sequence[int] = ()


@dataclass
class CaseLoader:
    """The model-free stages of a case: hash its input, check ``resume``, load the volume.

    Holds no network, so it pickles small: a distributed engine runs it in CPU tasks
    away from the model workers (:mod:`volumes.inference.ray_engine`).

    Args:
        output_dir: where the cases' folders are.
        model_keys: ``{bundle_id: model_key}`` of the bundles (:attr:`BundleModel.model_key`).
        resume: report a case as skipped when its outputs are complete for this input and models.
    """

    output_dir: Path
    model_keys: dict[str, str]
    resume: bool = False

    def __post_init__(self) -> None:
        from volumes.data.io import LoadVolumed

        self.output_dir = Path(self.output_dir)
        # voxels as stored (int16 for CT: half of float32); each bundle's preprocessing
        # makes floats of its resized slices, so no float copy of the full volume exists
        self.loader = LoadVolumed("image", dtype=None)

    def case_dir(self, item: Mapping[str, Any]) -> Path:
        return self.output_dir / str(item["case_id"])

    def complete(self, item: Mapping[str, Any], sha: str) -> bool:
        """Outputs of a previous run are complete for this input and these models."""
        path = self.case_dir(item) / RECORD
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        if record.get("input_sha256") != sha or record.get("models") != self.model_keys:
            return False
        return all((self.output_dir / rel).is_file() for rel in record.get("files", []))

    def load(self, item: dict) -> PreparedCase:
        """Hash, resume check, load; ``[C, H, W, D]`` volume in :attr:`PreparedCase.volume`. Never raises."""
        prepared = PreparedCase(item=item)
        try:
            start = time.perf_counter()
            prepared.input_sha256 = input_sha256(item)
            prepared.timings["hash"] = time.perf_counter() - start
            if self.resume and self.complete(item, prepared.input_sha256):
                prepared.skip = True
                return prepared
            start = time.perf_counter()
            prepared.volume = self.loader({k: v for k, v in item.items() if k != "label"})["image"]
            prepared.timings["load"] = time.perf_counter() - start
        except Exception as exc:  # one bad case never stops the batch
            prepared.failure = {"stage": "read", "error": _reason(item, exc)}
            prepared.volume = None
        return prepared


class BatchInference:
    """Run bundles over cases, writing per-case outputs and merged tables and report.

    Args:
        models: the bundles to run (see :func:`volumes.inference.bundles.load_bundle`).
        output_dir: where everything is written.
        resume: skip cases whose outputs are complete for the same input hash and models.
        workers: background threads that hash, load and preprocess the next cases while
            the network runs (0: everything on the calling thread). ``None`` (the default):
            1 when a model runs on CUDA, 0 on CPU, where the threads compete with the
            network for the same cores: on a 2-core CPU prefetching gave no throughput
            and cost one more loaded volume of memory (docs/PERFORMANCE.md).
        figures: draw ``overview.png`` per case and put it in the report.
        progress: show a progress bar with ETA.
        share_encoder: bundles with the same encoder (name, weights hash, options) and slice
            preparation run it once per case and share its features
            (:mod:`volumes.inference.shared_encoder`); False runs each bundle's own.
    """

    def __init__(self, models: Sequence[BundleModel], output_dir: str | Path, *, resume: bool = False,
                 workers: int | None = None, figures: bool = True, progress: bool = True,
                 share_encoder: bool = True):
        models = list(models)
        if not models:
            raise VolumesError("no bundles to run")
        ids = [m.bundle_id for m in models]
        if len(set(ids)) != len(ids):
            raise VolumesError(f"bundle ids must differ, got {ids}")
        if workers is None:
            workers = 1 if any(torch.device(m.predictor.device).type == "cuda" for m in models) else 0
        if workers < 0:
            raise VolumesError(f"workers must be >= 0, got {workers}")
        self.models = models
        self.output_dir = Path(output_dir)
        self.resume = resume
        self.workers = int(workers)
        self.figures = figures
        self.progress = progress
        self._rank = 0
        from volumes.inference.shared_encoder import EncoderSharing

        self.sharing = EncoderSharing(models, enabled=share_encoder)

    # ------------------------------------------------------------------ per case
    def _case_dir(self, item: Mapping[str, Any]) -> Path:
        return self.output_dir / str(item["case_id"])

    def model_keys(self) -> dict[str, str]:
        """``{bundle_id: model_key}``: what ``record.json`` and ``--resume`` compare."""
        return {m.bundle_id: m.model_key for m in self.models}

    def case_loader(self) -> CaseLoader:
        """The model-free stages of :meth:`prepare_case` with this runner's settings (picklable)."""
        return CaseLoader(self.output_dir, self.model_keys(), self.resume)

    def prepare_case(self, item: dict, loader: CaseLoader | None = None) -> PreparedCase:
        """Background stages: hash, resume check, load, and (when prefetching) preprocess. Never raises."""
        prepared = (loader or self.case_loader()).load(item)
        if self.workers and prepared.failure is None and not prepared.skip:
            # ahead of the networks, on the prefetch thread; without prefetching each
            # bundle prepares its input just before its network runs (_run_models), so
            # one bundle's prepared slices are not held during another's network
            try:
                for model in self.models:
                    self._preprocess(prepared, model)
            except Exception as exc:  # one bad case never stops the batch
                prepared.failure = {"stage": "preprocess", "error": _reason(item, exc)}
                prepared.volume = None
                prepared.data = {}
        return prepared

    @staticmethod
    def _preprocess(prepared: PreparedCase, model: Any) -> None:
        start = time.perf_counter()
        data = dict(prepared.item, image=_fresh(prepared.volume))
        data.pop("label", None)
        prepared.data[model.bundle_id] = model.predictor.prepare(data)
        prepared.timings[f"preprocess:{model.bundle_id}"] = time.perf_counter() - start

    def _prefetched(self, items: Sequence[dict]) -> Iterator[PreparedCase]:
        """Prepared cases in order, ``workers`` cases ahead of the caller."""
        loader = self.case_loader()
        if self.workers == 0:
            for item in items:
                yield self.prepare_case(item, loader)
            return
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="volumes-prefetch")
        try:
            upcoming = iter(items)
            pending = deque(pool.submit(self.prepare_case, item, loader) for item in itertools.islice(upcoming, self.workers))
            while pending:
                done = pending.popleft()
                following = next(upcoming, None)
                if following is not None:
                    pending.append(pool.submit(self.prepare_case, following, loader))
                yield done.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _run_models(self, prepared: PreparedCase) -> dict[str, Any]:
        """Every model on one case (:meth:`_predict`), each one's outputs (:meth:`_write_outputs`), the figure."""
        item = prepared.item
        case_dir = self._case_dir(item)
        case_dir.mkdir(parents=True, exist_ok=True)
        rows, files, drawn = [], [], _FigureParts()
        for model in self.models:
            result, timings = self._predict(prepared, model)
            row: dict[str, Any] = {
                "case_id": item["case_id"], "source": str(item["image"]), "input_sha256": prepared.input_sha256,
                "bundle": model.bundle_id, "bundle_version": model.version, "task": model.task,
                "weights_sha256": model.weights_sha256, "outputs": {},
            }
            if item.get("viewer_url"):  # `volumes pacs` with a viewer: the study's page in OHIF
                row["viewer_url"] = str(item["viewer_url"])
            if model.bundle_id in self.sharing.last_report:  # the encoder ran once for the group's heads
                row["encoder_sharing"] = self.sharing.last_report[model.bundle_id]
            try:
                start = time.perf_counter()
                self._write_outputs(prepared, model, result, row, case_dir, drawn)
                timings["write"] = time.perf_counter() - start
            except Exception as exc:
                raise _StageError("write", exc) from exc
            row["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
            files += list(row["outputs"].values())
            rows.append(row)
        if self.figures:
            files.append(self._draw_figure(prepared, case_dir, drawn, rows))
        return {"case_id": item["case_id"], "source": str(item["image"]), "input_sha256": prepared.input_sha256,
                "models": self.model_keys(), "files": files, "rank": self._rank, "rows": rows}

    def _predict(self, prepared: PreparedCase, model: Any) -> tuple[dict[str, Any], dict[str, float]]:
        """One model's prediction on a case (preprocessing it first if needed), and the stage timings so far."""
        bid = model.bundle_id
        if bid not in prepared.data:
            try:
                self._preprocess(prepared, model)
            except Exception as exc:
                raise _StageError("preprocess", exc) from exc
        timings = {"hash": prepared.timings.get("hash", 0.0), "load": prepared.timings.get("load", 0.0),
                   "preprocess": prepared.timings.get(f"preprocess:{bid}", 0.0)}
        try:
            start = time.perf_counter()
            self.sharing.last_report.pop(bid, None)
            result = self.sharing.predict(model, prepared.data.pop(bid))
            timings["infer"] = time.perf_counter() - start
        except Exception as exc:
            raise _StageError("infer", exc) from exc
        return result, timings

    def _rel(self, path: str | Path) -> str:
        return Path(path).relative_to(self.output_dir).as_posix()

    def _write_outputs(self, prepared: PreparedCase, model: Any, result: dict[str, Any], row: dict[str, Any],
                       case_dir: Path, drawn: "_FigureParts") -> None:
        """One model's files for a case: label map, organ volumes and DICOM SEG, or the probabilities."""
        from volumes.segmentation import organ_volumes_ml, to_original_orientation, write_label_map

        item, volume, bid = prepared.item, prepared.volume, model.bundle_id
        if model.task == "segmentation":
            label_map = result["label_map"]
            meta = getattr(label_map, "meta", {}) or {}
            original = meta.get("original_affine", volume.meta.get("original_affine"))
            path = write_label_map(label_map, label_map.affine, case_dir / f"{bid}_seg.nii.gz", original_affine=original)
            row["outputs"]["segmentation"] = self._rel(path)
            # the mask on the loaded volume's grid (RAS), for volumes, figures and DICOM SEG
            mask, _ = to_original_orientation(np.asarray(label_map[0]), np.asarray(label_map.affine),
                                              np.asarray(volume.affine))
            row["organ_volumes_ml"] = {k: round(v, 3) for k, v in organ_volumes_ml(
                mask, spacing_mm(volume.affine), model.predictor.labels).items()}
            if result.get("quality") is not None:
                row["quality"] = result["quality"]
            if Path(item["image"]).is_dir():
                from volumes.inference.dicom_seg import write_dicom_seg

                seg = write_dicom_seg(mask, np.asarray(volume.affine), item["image"], case_dir / f"{bid}_seg.dcm",
                                      labels=model.predictor.labels, series_uid=item.get("series_uid"))
                row["outputs"]["dicom_seg"] = self._rel(seg)
            if drawn.mask is None:
                drawn.mask, drawn.labels, drawn.quality = mask, model.predictor.labels, row.get("quality")
            return
        calibration = ("probabilities_uncalibrated", "temperature", "logit_bias")
        row.update({k: result[k] for k in ("probabilities", "predicted", "top_slices", *calibration) if k in result})
        path = case_dir / f"{bid}_probabilities.json"
        content = {k: row[k] for k in ("case_id", "bundle", "probabilities", "predicted", "top_slices", *calibration)
                   if k in row}
        content["importance"] = [round(float(v), 6) for v in result["importance"]]
        atomic_write_bytes(path, lambda f, c=content: f.write(json.dumps(c, indent=1).encode()))
        row["outputs"]["probabilities"] = self._rel(path)
        if drawn.importance is None:
            drawn.importance, drawn.top = result["importance"], [s["slice"] for s in result["top_slices"]]

    def _draw_figure(self, prepared: PreparedCase, case_dir: Path, drawn: "_FigureParts",
                     rows: list[dict[str, Any]]) -> str:
        """The case's overview figure (first segmentation, first classifier's slice importance); its path."""
        try:
            from volumes.inference.figures import case_figure, quality_badge

            volume = prepared.volume
            start = time.perf_counter()
            depth = volume.shape[-1]
            # importance is per slice of the classifier's input: drawn when that is the volume's own slices
            curve = drawn.importance if drawn.importance is not None and len(drawn.importance) == depth else None
            figure = case_figure(np.asarray(volume[0]), spacing_mm(volume.affine), case_dir / FIGURE,
                                 label_map=drawn.mask, labels=drawn.labels, importance=curve,
                                 top_slices=drawn.top if curve is not None else (),
                                 title=str(prepared.item["case_id"]), badge=quality_badge(drawn.quality))
            for row in rows:
                row["outputs"]["figure"] = self._rel(figure)
                row["timings_s"]["figure"] = round(time.perf_counter() - start, 4)
            return self._rel(figure)
        except Exception as exc:
            raise _StageError("figure", exc) from exc

    def finish_case(self, prepared: PreparedCase) -> str:
        """Run or skip one prepared case; write its record or failure.

        Returns the outcome: ``"done"``, ``"skipped"`` (resume) or ``"failed"``. A bad case
        never raises; only an unwritable output folder does.
        """
        item = prepared.item
        case_dir = self._case_dir(item)
        # a killed earlier attempt's temporary files: nobody else writes this case now
        sweep_temporaries(case_dir, unknown_after_s=0)
        if prepared.skip:
            return "skipped"
        failure = prepared.failure
        if failure is None:
            try:
                record = self._run_models(prepared)
            except _StageError as exc:
                failure = {"stage": exc.stage, "error": _reason(item, exc.error)}
            else:
                atomic_write_bytes(case_dir / RECORD, lambda f: f.write(json.dumps(record, indent=1).encode()))
                (case_dir / FAILURE).unlink(missing_ok=True)
                return "done"
        failure = {"case_id": item["case_id"], "source": str(item["image"]), **failure}
        logger.warning("case %s failed at %s: %s", item["case_id"], failure["stage"], failure["error"])
        case_dir.mkdir(parents=True, exist_ok=True)
        (case_dir / RECORD).unlink(missing_ok=True)  # whatever was there is not for this input
        atomic_write_bytes(case_dir / FAILURE, lambda f: f.write(json.dumps(failure, indent=1).encode()))
        return "failed"

    def run_case(self, item: dict) -> str:
        """:meth:`prepare_case` then :meth:`finish_case` on the calling thread; returns the outcome."""
        return self.finish_case(self.prepare_case(item))

    # ------------------------------------------------------------------ batch
    def run(self, items: Sequence[Mapping[str, Any]]) -> InferenceSummary:
        """Process every case (this process's share under torchrun) and write the merged outputs."""
        from tqdm.auto import tqdm

        items = normalize_items(items)
        start = time.perf_counter()
        # cases can take long: the default 30-minute barrier timeout is too short for a batch
        rank, world = torchrun_rank(timeout_minutes=24 * 60)
        self._rank = rank
        share = items[rank::world]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        counts = {"done": 0, "skipped": 0, "failed": 0}
        bar = tqdm(total=len(share), desc="infer" if world == 1 else f"infer [rank {rank}]", unit="case",
                   disable=not self.progress, position=rank)
        try:
            for prepared in self._prefetched(share):
                outcome = self.finish_case(prepared)
                counts[outcome] += 1
                bar.set_postfix(counts, refresh=False)
                bar.update()
                del prepared
        finally:
            bar.close()
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        if rank == 0:
            self.merge(items)
        if world > 1:
            totals = torch.tensor([counts["done"], counts["skipped"], counts["failed"]], dtype=torch.long)
            if dist.get_backend() == "nccl":
                totals = totals.cuda()
            dist.all_reduce(totals)
            counts = dict(zip(("done", "skipped", "failed"), totals.cpu().tolist()))
            dist.barrier()
        return InferenceSummary(total=len(items), succeeded=counts["done"], skipped=counts["skipped"],
                                failed=counts["failed"], seconds=time.perf_counter() - start,
                                output_dir=self.output_dir)

    # ------------------------------------------------------------------ merged outputs
    def merge(self, items: Sequence[Mapping[str, Any]]) -> tuple[list[dict], list[dict]]:
        """Collect every case's record or failure into the tables and the report."""
        sweep_temporaries(self.output_dir, unknown_after_s=0)  # a killed merge's; only one process merges
        rows, failures = [], []
        for item in items:
            case_dir = self._case_dir(item)
            try:
                record = json.loads((case_dir / RECORD).read_text())
                rows.extend(record["rows"])
                continue
            except (OSError, ValueError, KeyError):
                pass
            try:
                failures.append(json.loads((case_dir / FAILURE).read_text()))
            except (OSError, ValueError):
                failures.append({"case_id": item["case_id"], "source": str(item["image"]), "stage": "unknown",
                                 "error": "no record and no failure written (the process stopped?)"})
        jsonl = "".join(json.dumps(row) + "\n" for row in rows)
        atomic_write_bytes(self.output_dir / "predictions.jsonl", lambda f: f.write(jsonl.encode()))
        atomic_write_bytes(self.output_dir / "predictions.csv", lambda f: f.write(_csv(rows).encode()))
        atomic_write_bytes(self.output_dir / "failures.csv", lambda f: f.write(
            _table(failures, ["case_id", "source", "stage", "error"]).encode()))
        from volumes.inference.report import write_report

        summary = {"cases": len(items), "succeeded": len({r["case_id"] for r in rows}), "failed": len(failures),
                   "bundles": ", ".join(f"{m.bundle_id} {m.version}" for m in self.models)}
        write_report(self.output_dir, rows, failures, summary=summary)
        return rows, failures


def _flat(row: Mapping[str, Any]) -> dict[str, Any]:
    """One predictions.jsonl row as flat CSV cells."""
    flat = {k: row[k] for k in ("case_id", "source", "input_sha256", "bundle", "bundle_version", "task",
                                "weights_sha256")}
    flat["predicted"] = row.get("predicted", "")
    for name, p in row.get("probabilities", {}).items():
        flat[f"p_{name}"] = p
    for name, p in row.get("probabilities_uncalibrated", {}).items():
        flat[f"p_uncalibrated_{name}"] = p
    if "temperature" in row:
        flat["temperature"] = row["temperature"]
    for name, offset in zip(row.get("probabilities", {}), row.get("logit_bias") or ()):
        flat[f"logit_bias_{name}"] = offset  # Platt's intercept for two classes (volumes.calibration)
    if "top_slices" in row:
        flat["top_slices"] = " ".join(str(s["slice"]) for s in row["top_slices"])
    quality = row.get("quality")
    if quality:  # segmentation quality control (volumes.quality)
        flat.update({"qc_flag": quality.get("flag"), "qc_score": quality.get("score"),
                     "qc_threshold": quality.get("threshold"), "qc_ood_z": quality.get("ood_z"),
                     "qc_reasons": "; ".join(quality.get("reasons", []))})
        for organ, values in quality.get("organs", {}).items():
            flat[f"qc_flag_{organ}"] = values.get("flag")
            flat[f"qc_score_{organ}"] = values.get("score")
    for organ, ml in row.get("organ_volumes_ml", {}).items():
        flat[f"volume_ml_{organ}"] = ml
    for key, path in row.get("outputs", {}).items():
        flat[f"file_{key}"] = path
    for stage, seconds in row.get("timings_s", {}).items():
        flat[f"time_{stage}_s"] = seconds
    return flat


def _table(rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    flat = [_flat(row) for row in rows]
    fields: dict[str, None] = dict.fromkeys(["case_id", "source", "input_sha256", "bundle", "bundle_version", "task",
                                             "weights_sha256", "predicted"])
    for row in flat:
        fields.update(dict.fromkeys(row))
    return _table(flat, list(fields))
