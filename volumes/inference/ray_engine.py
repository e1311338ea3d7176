"""Batch inference on a Ray cluster: the runner's own stages, streamed by Ray Data to whoever is free.

One Ray Data dataset, streamed (no stage waits for the previous one to finish)::

    cases, discovered once on the driver
      -> map (CPU tasks)           CaseLoader.load: hash, resume check, load the volume (RAS)
      -> map_batches (actors)      BatchInference.finish_case: networks, the atomic writers,
                                   record.json last (or failure.json); a fixed pool of
                                   long-lived actors, each loading the bundles once
      -> driver                    BatchInference.merge: predictions.csv/.jsonl, failures.csv,
                                   report.html, in the order of the cases

Every case is its own batch, and each actor takes one at a time, so a free actor takes
the next case (work stealing) and a slow node delays only the case it holds. Ray
restarts an actor that dies (elsewhere when its node is gone) and runs its case again on
it; a load task whose worker dies is retried on any worker (Ray Data retries both
without limit). A per-run ledger on the shared
output folder (``OUTPUT/.ray-run-~<pid>@<host>.<id>/<case-id>.json``) makes the retries exactly-once
and bounded: an attempt that finished before its worker died is not run again, and a
case that kills its loading or model worker ``max_attempts`` times (out of memory, a
crash in a native library) is written to ``failure.json`` instead of being retried for
ever. The ledger is removed at the end; a ledger whose driver was killed is removed by
the next run on that folder once its driver's process is gone.

Outputs, ``--resume`` and the per-case fault isolation are those of
:class:`~volumes.inference.runner.BatchInference`, because this module calls its
methods: it adds scheduling, not a second implementation. Every node must see the
bundles, the inputs and the output folder at the same paths (shared storage), and have
``volumes`` installed (docs/RAY.md).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from volumes.atomic import HOST, atomic_write_bytes, writer_alive
from volumes.errors import VolumesError
from volumes.inference.runner import BatchInference, CaseLoader, InferenceSummary, PreparedCase, normalize_items

__all__ = ["BundleSource", "CaseWorker", "check_private_auth", "RayConfig", "RayInference", "RaySummary", "require_ray"]

logger = logging.getLogger(__name__)

INSTALL = "pip install 'volumes[ray]'"
_LEDGER = re.compile(r"^\.ray-run-~(?P<pid>[0-9]+)@(?P<host>[0-9a-f]{8})\.[0-9a-f]{12}$")


def sweep_ledgers(output_dir: Path) -> list[Path]:
    """Remove the attempt ledgers of drivers that were killed (a dead process of this host)."""
    removed = []
    for entry in (output_dir.iterdir() if output_dir.is_dir() else ()):
        owner = _LEDGER.match(entry.name)
        if owner and entry.is_dir() and writer_alive(int(owner["pid"]), owner["host"]) is False:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def require_ray():
    """Import ``ray`` (with Ray Data) or raise a :class:`VolumesError` naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is the ``data`` extra of ray)
    except ImportError as exc:
        raise VolumesError(f"--engine ray needs Ray Data, which is not installed ({exc}); "
                           f"install it with: {INSTALL}") from exc
    return ray


def check_private_auth() -> None:
    """Refuse a private Ray instance without Ray's token authentication.

    Ray's gRPC servers listen on every interface even when the node's address is
    127.0.0.1 (Ray has no option to bind them to the loopback interface), so the token is
    what keeps other machines out. Ray enables it for new local instances unless
    ``RAY_AUTH_MODE`` says otherwise.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        raise VolumesError(f"RAY_AUTH_MODE={mode}: a private Ray instance listens on every network interface, "
                           f"so it runs only with Ray's token authentication (unset RAY_AUTH_MODE or set it to token)")


@dataclass(frozen=True)
class BundleSource:
    """Where a worker loads a bundle from: what :func:`~volumes.inference.bundles.load_bundle` takes.

    Paths are made absolute: workers may start in another folder, or on another node.
    """

    root: str
    weights: str | None = None
    overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", os.path.abspath(self.root))
        if self.weights is not None:
            object.__setattr__(self, "weights", os.path.abspath(self.weights))

    def load(self, device: Any):
        from volumes.inference.bundles import load_bundle

        return load_bundle(self.root, device=device, weights=self.weights, overrides=self.overrides)


@dataclass
class RayConfig:
    """How to use the cluster.

    Attributes:
        address: ``None`` or ``"local"``: start a private Ray instance on this machine
            (127.0.0.1, stopped at the end); ``"auto"``: join the cluster this node belongs
            to; ``"HOST:PORT"``: join that cluster's head. A Ray already initialised in this
            process is used as it is.
        workers: model actors (each holds one copy of every bundle). ``None``: one per
            ``num_gpus`` share of the cluster's GPUs, or 1 on a CPU cluster.
        num_gpus: GPUs per actor (fractions share a GPU); ``None``: 1 when the cluster has
            GPUs, else 0 (CPU actors).
        num_cpus: CPUs per actor; its torch uses as many threads.
        load_cpus: CPUs per load task (hash and load one case).
        load_tasks: most load tasks at once (``None``: as many as free CPUs allow; Ray Data's
            backpressure bounds how far loading runs ahead of the actors).
        load_memory: bytes of RAM reserved per load task, so that Ray does not start more
            loads on a node than its memory holds (a 512 x 512 x 1000 int16 CT is 0.5 GiB).
        max_attempts: attempts of a case whose worker process dies before it is recorded
            as failed.
        local_cpus: logical CPUs of a private instance (``None``: the machine's cores, at
            least enough for every actor and one load task).
    """

    address: str | None = None
    workers: int | None = None
    num_gpus: float | None = None
    num_cpus: float = 1.0
    load_cpus: float = 1.0
    load_tasks: int | None = None
    load_memory: int = 1 << 30
    max_attempts: int = 3
    local_cpus: int | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise VolumesError(f"--ray-workers must be >= 1, got {self.workers}")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise VolumesError(f"--ray-num-gpus must be >= 0, got {self.num_gpus}")
        if self.num_cpus <= 0 or self.load_cpus <= 0:
            raise VolumesError(f"CPUs per actor and per load task must be > 0, got {self.num_cpus}, {self.load_cpus}")
        if self.load_tasks is not None and self.load_tasks < 1:
            raise VolumesError(f"load_tasks must be >= 1, got {self.load_tasks}")
        if self.load_memory <= 0:
            raise VolumesError(f"load_memory must be > 0 bytes, got {self.load_memory}")
        if self.max_attempts < 1:
            raise VolumesError(f"max_attempts must be >= 1, got {self.max_attempts}")


@dataclass
class RaySummary(InferenceSummary):
    """:class:`InferenceSummary` plus, per case, how many attempts it took and which worker ran it.

    ``connect_s``, ``stream_s`` and ``merge_s`` split :attr:`seconds`: joining or starting
    Ray, the streamed pipeline (actor start-up included), and the driver's merge - the
    serial part that does not shrink with more workers.
    """

    attempts: dict[str, int] = field(default_factory=dict)
    workers: dict[str, str] = field(default_factory=dict)
    loaded_by: dict[str, str] = field(default_factory=dict)
    connect_s: float = 0.0
    stream_s: float = 0.0
    merge_s: float = 0.0

    @property
    def retried(self) -> dict[str, int]:
        """Cases that needed more than one attempt (their worker died)."""
        return {case: n for case, n in self.attempts.items() if n > 1}


def _where() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Ledger:
    """Per-run attempts of each case, on the shared output folder (one small JSON per case).

    Only one worker holds a case at a time (Ray retries a task after its worker died), so
    the files need no lock; they are written atomically because a worker can die mid-write.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _path(self, case_id: str) -> Path:
        return self.folder / f"{case_id}.json"

    def read(self, case_id: str) -> dict:
        try:
            return json.loads(self._path(case_id).read_text())
        except (OSError, ValueError):
            return {}

    def write(self, case_id: str, entry: Mapping[str, Any]) -> None:
        data = json.dumps(dict(entry)).encode()
        atomic_write_bytes(self._path(case_id), lambda f: f.write(data))


def _load_row(row: dict[str, Any], *, loader: CaseLoader, ledger: str, max_attempts: int) -> dict[str, Any]:
    """Ray Data ``map``: a case as JSON -> the loaded :class:`PreparedCase` (a Python object column).

    A case whose loading killed its worker ``max_attempts`` times is passed on as a failure.
    """
    item = json.loads(row["case"])
    book = _Ledger(Path(ledger))
    entry = book.read(str(item["case_id"]))
    loads = int(entry.get("loads", 0)) + 1
    book.write(str(item["case_id"]), {**entry, "loads": loads})
    if loads > max_attempts:
        died = loads - 1
        prepared = PreparedCase(item=item, failure={"stage": "read", "error": (
            f"{item['image']}: the process loading this case died {died} time{'s' if died > 1 else ''} "
            f"(out of memory?); not retried again")})
    else:
        prepared = loader.load(item)
    return {"case_id": item["case_id"], "prepared": prepared, "loaded_by": _where()}


class CaseWorker:
    """A long-lived Ray actor: the bundles loaded once, then :meth:`BatchInference.finish_case` per case.

    Args:
        bundles: where to load each bundle from.
        output_dir: the shared output folder.
        model_keys: the driver's ``{bundle_id: model_key}``; a worker that loads different
            bundles (another file at the same path on its node) refuses to start.
        ledger: the run's attempt ledger folder.
        max_attempts: see :class:`RayConfig`.
        resume, figures, share_encoder: as for :class:`BatchInference`.
        gpus, cpus: this actor's share of the node.
    """

    def __init__(self, bundles: Sequence[BundleSource], output_dir: str, model_keys: dict[str, str], ledger: str,
                 max_attempts: int, resume: bool, figures: bool, gpus: float, cpus: float,
                 share_encoder: bool = True):
        import torch

        # torch would start one thread per core of the node; the actor owns only its share
        torch.set_num_threads(max(1, int(cpus)))
        device = torch.device("cuda", 0) if gpus > 0 else torch.device("cpu")  # Ray sets CUDA_VISIBLE_DEVICES
        self.runner = BatchInference([b.load(device) for b in bundles], output_dir, resume=resume, workers=0,
                                     figures=figures, progress=False, share_encoder=share_encoder)
        if self.runner.model_keys() != model_keys:
            raise VolumesError(f"worker {_where()}: the bundles at {[b.root for b in bundles]} differ from the "
                               f"driver's (version, weights or settings); every node must see the same files")
        self.ledger = _Ledger(Path(ledger))
        self.max_attempts = max_attempts
        self.where = _where()

    def _run(self, prepared: PreparedCase) -> tuple[str, int]:
        """Outcome and attempt number of one case, exactly once per run."""
        case_id = str(prepared.item["case_id"])
        entry = self.ledger.read(case_id)
        if "outcome" in entry:  # an earlier attempt finished, its worker died before reporting it
            return entry["outcome"], entry["attempts"]
        attempt = int(entry.get("attempts", 0)) + 1
        self.ledger.write(case_id, {**entry, "attempts": attempt})
        if attempt > self.max_attempts:
            died = attempt - 1
            prepared.failure = {"stage": "worker", "error": (
                f"{prepared.item['image']}: the worker process died {died} time{'s' if died > 1 else ''} while "
                f"running this case (out of memory? a crash in a native library?); not retried again")}
            prepared.skip, prepared.volume = False, None
        outcome = self.runner.finish_case(prepared)
        self.ledger.write(case_id, {**entry, "attempts": attempt, "outcome": outcome})
        return outcome, attempt

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        """One Ray Data batch (one case, see :meth:`RayInference.run`) -> its outcome row(s)."""
        out: dict[str, list] = {"case_id": [], "outcome": [], "attempt": [], "worker": [], "loaded_by": []}
        for case_id, prepared, loaded_by in zip(batch["case_id"], batch["prepared"], batch["loaded_by"]):
            outcome, attempt = self._run(prepared)
            for key, value in zip(out, (str(case_id), outcome, attempt, self.where, str(loaded_by))):
                out[key].append(value)
        return out


class RayInference:
    """:class:`BatchInference` over a Ray cluster: same outputs, cases streamed to free workers.

    Args:
        bundles: the bundles, in the order ``volumes infer --bundle`` gives them.
        output_dir: the output folder; on shared storage that every node mounts at this path.
        resume: skip cases whose outputs are complete for the same input hash and models.
        figures: draw ``overview.png`` per case.
        share_encoder: bundles with the same encoder run it once per case (as for
            :class:`BatchInference`; ``volumes infer --no-share-encoder`` sets False).
        progress: Ray Data's progress bars.
        config: cluster address and worker resources (:class:`RayConfig`).
        worker: the actor class, :class:`CaseWorker` or a subclass (the tests inject faults with one).
    """

    def __init__(self, bundles: Sequence[BundleSource], output_dir: str | Path, *, resume: bool = False,
                 figures: bool = True, progress: bool = True, config: RayConfig | None = None,
                 worker: type[CaseWorker] = CaseWorker, share_encoder: bool = True):
        self.bundles = [b if isinstance(b, BundleSource) else BundleSource(**b) for b in bundles]
        self.output_dir = Path(os.path.abspath(output_dir))
        self.resume = resume
        self.figures = figures
        self.share_encoder = share_encoder
        self.progress = progress
        self.config = config or RayConfig()
        self.worker = worker
        # the driver's own copy (CPU) gives the model keys, resume checks and the merge;
        # it runs no case
        self.runner = BatchInference([b.load("cpu") for b in self.bundles], self.output_dir, resume=resume,
                                     workers=0, figures=figures, progress=False)

    # ------------------------------------------------------------------ cluster
    def _connect(self, ray) -> bool:
        """Initialise Ray unless this process already has; returns whether it did (and must shut it down)."""
        if ray.is_initialized():
            return False
        config = self.config
        if config.address in (None, "local"):
            need = config.workers or 1
            cpus = config.local_cpus or max(os.cpu_count() or 1, int(need * config.num_cpus + config.load_cpus + 0.999))
            check_private_auth()
            # the node's address is the loopback interface; the token keeps other machines out
            ray.init(address="local", num_cpus=cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
                     configure_logging=False)
            return True
        try:
            ray.init(address=config.address, configure_logging=False)
        except Exception as exc:  # ConnectionError, a missing token, a version mismatch...
            raise VolumesError(f"--ray-address {config.address}: cannot join the Ray cluster "
                               f"({type(exc).__name__}: {exc})") from exc
        return True

    def _resources(self, ray) -> tuple[int, float]:
        """``(actors, GPUs per actor)`` for the cluster as it is now."""
        gpus_in_cluster = float(ray.cluster_resources().get("GPU", 0))
        per_actor = self.config.num_gpus
        if per_actor is None:
            per_actor = 1.0 if gpus_in_cluster > 0 else 0.0
        workers = self.config.workers
        if workers is None:
            workers = max(1, int(gpus_in_cluster // per_actor)) if per_actor > 0 else 1
        if per_actor > gpus_in_cluster and self.config.address in (None, "local"):
            raise VolumesError(f"--ray-num-gpus {per_actor}: this machine's Ray instance has {gpus_in_cluster:g} GPUs")
        memory = float(ray.cluster_resources().get("memory", 0))
        if memory and self.config.load_memory > memory:
            raise VolumesError(f"load tasks reserve {self.config.load_memory / 2**30:.1f} GiB each; the cluster "
                               f"has {memory / 2**30:.1f} GiB for tasks: lower load_memory")
        return workers, per_actor

    # ------------------------------------------------------------------ batch
    def run(self, items: Sequence[Mapping[str, Any]]) -> RaySummary:
        """Process every case on the cluster, then write the merged outputs on the driver."""
        ray = require_ray()
        items = normalize_items(items)
        for item in items:  # workers may run in another folder or on another node
            for key in ("image", "label"):
                if isinstance(item.get(key), (str, Path)):
                    item[key] = os.path.abspath(item[key])
        start = time.perf_counter()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        started = self._connect(ray)
        connected = time.perf_counter()
        sweep_ledgers(self.output_dir)
        ledger = self.output_dir / f".ray-run-~{os.getpid()}@{HOST}.{uuid.uuid4().hex[:12]}"
        try:
            ledger.mkdir()
            results = self._stream(ray, items, ledger) if items else []
            streamed = time.perf_counter()
        except Exception as exc:
            if isinstance(exc, VolumesError):
                raise
            raise VolumesError(f"the Ray run stopped ({type(exc).__name__}: {exc}); cases finished so far keep "
                               f"their outputs: run again with --resume") from exc
        finally:
            shutil.rmtree(ledger, ignore_errors=True)  # a later run keeps a ledger of its own
            if started:
                ray.shutdown()
        by_case = {r["case_id"]: r for r in results}
        missing = [item["case_id"] for item in items if item["case_id"] not in by_case]
        if missing or len(results) != len(items):
            raise VolumesError(f"Ray returned {len(results)} outcomes for {len(items)} cases (missing: {missing[:5]})")
        merging = time.perf_counter()  # after ray.shutdown of a private instance
        self.runner.merge(items)
        end = time.perf_counter()
        counts = {o: sum(r["outcome"] == o for r in results) for o in ("done", "skipped", "failed")}
        return RaySummary(total=len(items), succeeded=counts["done"], skipped=counts["skipped"],
                          failed=counts["failed"], seconds=end - start, output_dir=self.output_dir,
                          attempts={c: int(r["attempt"]) for c, r in by_case.items()},
                          workers={c: r["worker"] for c, r in by_case.items()},
                          loaded_by={c: r["loaded_by"] for c, r in by_case.items()},
                          connect_s=connected - start, stream_s=streamed - connected, merge_s=end - merging)

    def worker_args(self, ledger: Path, gpus: float) -> dict[str, Any]:
        """What every :class:`CaseWorker` actor is constructed with."""
        return {
            "bundles": self.bundles, "output_dir": str(self.output_dir), "model_keys": self.runner.model_keys(),
            "ledger": str(ledger), "max_attempts": self.config.max_attempts, "resume": self.resume,
            "figures": self.figures, "gpus": gpus, "cpus": self.config.num_cpus,
            "share_encoder": self.share_encoder,
        }

    def _stream(self, ray, items: list[dict], ledger: Path) -> list[dict]:
        import ray.data

        workers, gpus = self._resources(ray)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = self.progress
        rows = [{"case": json.dumps(item, default=str)} for item in items]
        # one block per case, so the load tasks run side by side instead of one task per block of cases
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        # the memory reservation of the load tasks also makes their remote arguments differ
        # from the actors', so Ray Data does not fuse loading into the actors (the loads would
        # then run on the model workers, one at a time, instead of ahead of them)
        load = functools.partial(_load_row, loader=self.runner.case_loader(), ledger=str(ledger),
                                 max_attempts=self.config.max_attempts)
        dataset = dataset.map(load, num_cpus=self.config.load_cpus, memory=self.config.load_memory,
                              compute=ray.data.TaskPoolStrategy(size=self.config.load_tasks))
        dataset = dataset.map_batches(
            self.worker, fn_constructor_kwargs=self.worker_args(ledger, gpus), batch_size=1, batch_format="numpy",
            # one case in flight per actor: a free actor takes the next case, none queues behind a slow one
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
            num_cpus=self.config.num_cpus, num_gpus=gpus,
        )
        logger.info("ray: %d cases, %d actors (%g GPU, %g CPU each)", len(items), workers, gpus, self.config.num_cpus)
        return dataset.take_all()

