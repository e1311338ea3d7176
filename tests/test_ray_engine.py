"""``volumes infer --engine ray``: the local engine's outputs, worker deaths, bad cases, resume.

A private Ray instance on 127.0.0.1 (3 logical CPUs: 2 model actors and one load task at a
time), started once for the module and stopped at the end. The bundles are the small
random-initialised ones of tests/test_infer.py (2-block ViT-S/14 at 56 px). The worker
death comes from :class:`ray_faults.CrashingWorker`, whose process ``os._exit``s in the
middle of a marker case (its files written, no record.json). The reference is the local
engine in a process that, like Ray's workers, starts with ``OMP_NUM_THREADS=1``: the
label maps are then identical, bit for bit (another thread count at start-up changes
float rounding, which flips a few near-tied voxels of these random networks).

The attempt ledger, which keeps a case from running twice when its worker dies after
finishing it and gives up on a case that keeps killing its worker, is tested in-process.
Every worker process imports MONAI (seconds each), so the Ray tests start as few as they can.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from test_infer import BUNDLES, ENV, SMALL, _checkpoints, _infer_args, _rows
from volumes.atomic import is_temporary
from volumes.cli import main

TESTS = Path(__file__).resolve().parent
OVERRIDES = {"encoder_model_kwargs": {"depth": 2}, "preprocessing_config#size": 56}
GOOD = ("p0", "p1", "crash_mid")


def _inputs(folder: Path) -> Path:
    """Two NIfTI phantoms (the marker case one of them), a DICOM phantom and a corrupt file."""
    from volumes.data.phantoms import PhantomConfig, generate_phantom, write_case

    config = PhantomConfig.segmentation_demo(matrix=64)
    folder.mkdir()
    staging = folder.parent / "staging"
    for seed, (name, fmt) in enumerate({"p0": "nifti", "p1": "dicom", "crash_mid": "nifti"}.items()):
        entry = write_case(generate_phantom(50 + seed, config), staging, name, fmt=fmt)
        source = staging / entry["image"]
        if fmt == "nifti":
            shutil.copy(source, folder / f"{name}.nii.gz")
        else:
            shutil.copytree(source, folder / name)
    (folder / "corrupt.nii.gz").write_bytes(b"\x00 not a volume " * 64)
    return folder


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A private Ray instance on the loopback interface; its workers can import ray_faults."""
    ray = pytest.importorskip("ray", reason="the Ray engine needs Ray Data (pip install 'volumes[ray]')")
    faults = tmp_path_factory.mktemp("faults")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "VOLUMES_TEST_FAULTS", "OMP_NUM_THREADS")}
    # the workers inherit this environment from the instance ray.init starts
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), saved["PYTHONPATH"]) if p)
    os.environ["VOLUMES_TEST_FAULTS"] = str(faults)
    os.environ["OMP_NUM_THREADS"] = ENV["OMP_NUM_THREADS"]  # as the reference process starts
    ray.init(address="local", num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=256 * 2**20, configure_logging=False)
    try:
        yield {"ray": ray, "faults": faults}
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> dict:
    """The input folder, the bundles' random weights and the bundles as the engine takes them."""
    from volumes.inference.ray_engine import BundleSource

    base = tmp_path_factory.mktemp("ray")
    weights = _checkpoints(base)
    return {"base": base, "inputs": _inputs(base / "input"), "weights": weights,
            "bundles": [BundleSource(str(b), str(w), OVERRIDES) for b, w in zip(BUNDLES.values(), weights)]}


@pytest.fixture(scope="module")
def runs(cluster, material):
    """The same cases through the local engine and through Ray, one worker dying mid-case."""
    from ray_faults import CrashingWorker

    from volumes.data.discovery import discover_cases
    from volumes.inference.ray_engine import RayConfig, RayInference

    base, inputs, weights = material["base"], material["inputs"], material["weights"]
    local = base / "local"
    command = [sys.executable, "-m", "volumes", *_infer_args(inputs, local, weights, "--no-figures")]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]  # the corrupt case fails
    distributed = base / "ray"
    engine = RayInference(material["bundles"], distributed, figures=False, progress=False, worker=CrashingWorker,
                          config=RayConfig(workers=2, load_tasks=1))
    summary = engine.run([case.to_dict() for case in discover_cases(inputs)])
    return {"inputs": inputs, "weights": weights, "local": local, "ray": distributed, "summary": summary,
            "faults": cluster["faults"]}


def test_ray_writes_the_local_engines_masks_and_probabilities(runs):
    local, distributed = _rows(runs["local"]), _rows(runs["ray"])
    assert [(r["case_id"], r["bundle"]) for r in distributed] == [(r["case_id"], r["bundle"]) for r in local]
    assert len(local) == 2 * len(GOOD)
    for a, b in zip(local, distributed):
        assert a["input_sha256"] == b["input_sha256"] and a["outputs"] == b["outputs"]
        if a["task"] == "segmentation":
            x = np.asarray(nib.load(runs["local"] / a["outputs"]["segmentation"]).dataobj)
            y = np.asarray(nib.load(runs["ray"] / b["outputs"]["segmentation"]).dataobj)
            assert x.shape == y.shape and np.array_equal(x, y), a["case_id"]
            assert a["organ_volumes_ml"] == b["organ_volumes_ml"]
        else:
            assert a["probabilities"].keys() == b["probabilities"].keys()
            for name, p in a["probabilities"].items():
                assert b["probabilities"][name] == pytest.approx(p, abs=1e-5)
            assert a["predicted"] == b["predicted"]
    with open(runs["ray"] / "predictions.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(local)


def test_cases_are_loaded_in_cpu_tasks_and_run_in_the_actors(runs):
    summary = runs["summary"]
    actors = {w.rsplit(":", 1)[1] for w in summary.workers.values()}
    loaders = {w.rsplit(":", 1)[1] for w in summary.loaded_by.values()}
    assert actors and loaders and not actors & loaders  # Ray Data did not fuse loading into the actors
    assert set(summary.workers) == {*GOOD, "corrupt"}


def test_a_dead_worker_costs_no_case_and_duplicates_none(runs):
    summary = runs["summary"]
    assert (summary.succeeded, summary.failed, summary.skipped) == (len(GOOD), 1, 0)
    assert (runs["faults"] / "crash_mid").exists()  # the worker did die
    assert summary.retried == {"crash_mid": 2}  # and its case was run again, on a live actor
    completed = [line.split()[0] for line in (runs["faults"] / "completed.log").read_text().splitlines()]
    assert sorted(completed) == sorted([*GOOD, "corrupt"])  # each case written exactly once
    rows = _rows(runs["ray"])
    assert len({(r["case_id"], r["bundle"]) for r in rows}) == len(rows)
    for case in GOOD:
        record = json.loads((runs["ray"] / case / "record.json").read_text())
        assert all((runs["ray"] / rel).is_file() for rel in record["files"])
    assert not list(runs["ray"].rglob(".*"))  # no temporary file and no ledger left behind
    orphan = Path((runs["faults"] / "orphan").read_text())  # what the SIGKILLed worker was writing
    assert orphan.parent == runs["ray"] / "crash_mid" and is_temporary(orphan.name) and not orphan.exists()


def test_a_killed_drivers_ledger_is_removed_by_the_next_run(tmp_path):
    from volumes.atomic import HOST
    from volumes.inference.ray_engine import sweep_ledgers

    driver = subprocess.Popen([sys.executable, "-c", "pass"])
    driver.wait()  # a process that is gone
    dead = tmp_path / f".ray-run-~{driver.pid}@{HOST}.0123456789ab"
    live = tmp_path / f".ray-run-~{os.getpid()}@{HOST}.0123456789ab"
    elsewhere = tmp_path / ".ray-run-~1@ffffffff.0123456789ab" if HOST != "ffffffff" else tmp_path / "x"
    for folder in (dead, live, elsewhere):
        (folder / "p0.json").parent.mkdir()
        (folder / "p0.json").write_text("{}")
    assert sweep_ledgers(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, elsewhere.name])


def test_a_bad_case_lands_in_failures_csv(runs):
    with open(runs["ray"] / "failures.csv") as handle:
        failures = {row["case_id"]: row for row in csv.DictReader(handle)}
    assert set(failures) == {"corrupt"}
    assert "not a gzip file" in failures["corrupt"]["error"]
    assert str(runs["inputs"] / "corrupt.nii.gz") in failures["corrupt"]["error"]
    assert not (runs["ray"] / "corrupt" / "record.json").exists()
    assert "corrupt" in (runs["ray"] / "report.html").read_text()


def test_cli_resume_on_ray_skips_the_complete_cases(runs, capsys):
    output = runs["ray"]
    stamps = {case: (output / case / "record.json").stat().st_mtime_ns for case in GOOD}
    before = _rows(output)
    args = _infer_args(runs["inputs"], output, runs["weights"], "--no-figures", "--engine", "ray",
                       "--ray-workers", "1", "--resume")
    assert main(args) == 1  # the corrupt file fails again
    out = capsys.readouterr().out
    assert f"{len(GOOD)} already complete" in out and "1 failed" in out
    assert {case: (output / case / "record.json").stat().st_mtime_ns for case in GOOD} == stamps
    assert _rows(output) == before


def test_engine_ray_without_ray_names_the_extra(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    args = ["infer", "--input", str(tmp_path), "--output", str(tmp_path / "out"), "--engine", "ray",
            "--bundle", str(BUNDLES["dinov2_unet_segmentation"])]
    for override in SMALL:
        args += ["--set", override]
    assert main(args) == 2
    assert "pip install 'volumes[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _worker(material, output: Path, ledger: Path, max_attempts: int = 3, **kwargs):
    """A :class:`CaseWorker` in this process, as a restarted actor would build it (``kwargs``: RayInference's)."""
    import torch

    from volumes.inference.ray_engine import CaseWorker, RayConfig, RayInference

    engine = RayInference(material["bundles"], output, figures=False, config=RayConfig(max_attempts=max_attempts),
                          **kwargs)
    threads = torch.get_num_threads()
    try:
        return CaseWorker(**engine.worker_args(ledger, gpus=0))
    finally:
        torch.set_num_threads(threads)  # the worker takes one thread; the rest of the suite wants all


def test_a_case_finished_before_its_worker_died_is_not_run_again(material, tmp_path):
    first = _worker(material, tmp_path / "out", tmp_path / "ledger")
    item = {"case_id": "p0", "image": str(material["inputs"] / "p0.nii.gz")}
    assert first._run(first.runner.case_loader().load(dict(item))) == ("done", 1)
    record = tmp_path / "out" / "p0" / "record.json"
    stamp = record.stat().st_mtime_ns
    # the worker died before Ray heard of the outcome: Ray gives the same case to a new worker
    second = _worker(material, tmp_path / "out", tmp_path / "ledger")
    second.runner.finish_case = lambda prepared: pytest.fail("the finished case ran again")
    assert second._run(second.runner.case_loader().load(dict(item))) == ("done", 1)
    assert record.stat().st_mtime_ns == stamp
    assert json.loads(record.read_text())["rows"][0]["case_id"] == "p0"


def test_no_share_encoder_reaches_the_ray_workers(material, tmp_path, monkeypatch):
    from volumes.inference import ray_engine

    assert _worker(material, tmp_path / "out", tmp_path / "ledger").runner.sharing.enabled
    assert not _worker(material, tmp_path / "out", tmp_path / "ledger", share_encoder=False).runner.sharing.enabled
    seen = {}

    class Engine:  # what the CLI builds, stopped before it runs
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            raise SystemExit(0)

    monkeypatch.setattr(ray_engine, "require_ray", lambda: None)
    monkeypatch.setattr(ray_engine, "RayInference", Engine)
    args = _infer_args(material["inputs"], tmp_path / "cli", material["weights"], "--engine", "ray")
    for flags, shared in (([], True), (["--no-share-encoder"], False)):
        with pytest.raises(SystemExit):
            main([*args, *flags])
        assert seen.pop("share_encoder") is shared


def test_a_case_that_keeps_killing_its_worker_becomes_a_failure(material, tmp_path):
    from volumes.inference.ray_engine import _Ledger

    worker = _worker(material, tmp_path / "out", tmp_path / "ledger", max_attempts=2)
    source = str(material["inputs"] / "p1")
    _Ledger(tmp_path / "ledger").write("p1", {"attempts": 2})  # two workers died running it
    assert worker._run(worker.runner.case_loader().load({"case_id": "p1", "image": source})) == ("failed", 3)
    failure = json.loads((tmp_path / "out" / "p1" / "failure.json").read_text())
    assert failure["stage"] == "worker" and "died 2 times" in failure["error"] and source in failure["error"]
    assert not (tmp_path / "out" / "p1" / "record.json").exists()


def test_a_case_that_keeps_killing_its_loading_worker_becomes_a_failure(material, tmp_path):
    from volumes.inference.ray_engine import CaseLoader, _Ledger, _load_row

    loader, ledger = CaseLoader(tmp_path / "out", {"b": "key"}), tmp_path / "ledger"
    source = str(material["inputs"] / "p0.nii.gz")
    row = {"case": json.dumps({"case_id": "p0", "image": source})}
    loaded = _load_row(row, loader=loader, ledger=str(ledger), max_attempts=2)["prepared"]
    assert loaded.failure is None and sorted(loaded.volume.shape[1:]) == sorted(nib.load(source).shape)
    _Ledger(ledger).write("p0", {"loads": 2})  # two loading workers died on it
    failed = _load_row(row, loader=loader, ledger=str(ledger), max_attempts=2)["prepared"]
    assert failed.volume is None and failed.failure["stage"] == "read"
    assert "died 2 times" in failed.failure["error"] and source in failed.failure["error"]


def test_bench_rates_from_completion_times(tmp_path):
    from volumes.apps.bench_ray import efficiencies, steady_rate

    for index, seconds in enumerate([100.0, 101.0, 130.0, 160.0, 190.0]):  # completions, 30 s apart after 2
        record = tmp_path / f"c{index}" / "record.json"
        record.parent.mkdir()
        record.write_text("{}")
        os.utime(record, (seconds, seconds))
    ids = [f"c{i}" for i in range(5)]
    assert steady_rate(tmp_path, ids, 1) == pytest.approx(4 / 90 * 60)
    assert steady_rate(tmp_path, ids, 2) == pytest.approx(3 / 89 * 60)
    assert steady_rate(tmp_path, ids, 5) is None
    rows = [{"engine": "ray", "workers": 1, "cases_per_min_run": 2.0, "cases_per_min_steady": 3.0},
            {"engine": "ray", "workers": 2, "cases_per_min_run": 3.0, "cases_per_min_steady": None}]
    efficiencies(rows)
    assert rows[1]["efficiency_run"] == pytest.approx(0.75) and rows[1]["efficiency_steady"] is None
    assert rows[0]["efficiency_run"] == pytest.approx(1.0)


def test_a_private_instance_needs_token_authentication(monkeypatch):
    from volumes.errors import VolumesError
    from volumes.inference.ray_engine import check_private_auth

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    check_private_auth()
    monkeypatch.delenv("RAY_AUTH_MODE")
    check_private_auth()  # Ray's default for a new local instance: token
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(VolumesError, match="token authentication"):
        check_private_auth()


def test_engine_ray_rejects_local_engine_options(tmp_path, capsys):
    pytest.importorskip("ray", reason="the Ray engine needs Ray Data (pip install 'volumes[ray]')")
    base = ["infer", "--input", str(tmp_path), "--output", str(tmp_path / "out"), "--engine", "ray",
            "--bundle", str(BUNDLES["dinov2_unet_segmentation"])]
    assert main([*base, "--workers", "2"]) == 2
    assert "--workers (prefetch threads) is for --engine local" in capsys.readouterr().err
    assert main([*base, "--device", "cpu", "--ray-num-gpus", "1"]) == 2
    assert "--device cpu with --ray-num-gpus 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
