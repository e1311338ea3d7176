"""``python -m volumes bench``: its measuring pieces compute the right numbers on tiny models.

No timing is asserted (timings depend on the machine); what is asserted is what the
benchmark claims beside them: FLOP counts against the ViT formula, the encoder's features
against timm's on the same batch, the cache's hits and misses, the section tables.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from volumes.apps import bench
from volumes.cli import bench as bench_command

ROOT = Path(__file__).resolve().parents[1]
TINY = {"depth": 2, "embed_dim": 96, "num_heads": 2}


def test_compare_rotates_variants_and_keeps_going_after_a_failing_one():
    calls: list[str] = []

    def broken():
        raise RuntimeError("no kernel for this\nsecond line")

    result = bench.compare({"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "bad": broken},
                           repeats=4, warmup=1)
    assert result["bad"] == {"error": "RuntimeError: no kernel for this"}
    assert result["a"]["repeats"] == result["b"]["repeats"] == 4
    assert calls[:2] == ["a", "b"]  # warm-up, in order
    assert calls[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # rotating: neither always runs first
    assert list(result) == ["a", "b", "bad"]


def test_flop_count_matches_the_vit_formula():
    model = bench.raw_timm("vit_small_patch14_dinov2", TINY)
    counted, per_op = bench.count_flops(model.forward_features, torch.randn(1, 3, 56, 56))
    tokens = (56 // 14) ** 2 + model.num_prefix_tokens
    formula = bench.vit_flops_formula(tokens, 96, 2, patches=16, patch_size=14)
    assert bench.analytic_vit_flops(model, 56, 56) == formula
    assert counted == formula, per_op
    assert per_op["convolution"] == 2 * 16 * 3 * 14 * 14 * 96  # the patch embedding


def test_gemm_peak_reports_two_n_cubed_over_time():
    result = bench.gemm_peak(torch.device("cpu"), n=64, repeats=2)
    assert result["n"] == 64 and result["dtype"] == "float32"
    assert result["flop_per_s"] == pytest.approx(2 * 64**3 / result["median_s"])


def _args(tmp_path: Path, *argv: str) -> argparse.Namespace:
    from volumes.cli import build_parser

    args = build_parser().parse_args(["bench", "--out", str(tmp_path), "--threads", "1", "--repeats", "2", *argv])
    args.sections = list(dict.fromkeys(args.sections))
    return args


def test_encoder_section_measures_the_same_features_as_timm(tmp_path):
    args = _args(tmp_path, "--model-kwargs", json.dumps(TINY), "--slices", "5", "--size", "56", "--chunk-size", "2",
                 "--gemm-size", "128")
    result = bench.bench_encoder(args, torch.device("cpu"))
    assert result["parity"]["max_abs_diff_cls"] < 1e-5
    assert result["parity"]["max_abs_diff_patch_mean"] < 1e-5
    assert result["tokens_per_slice"] == 16 + 1  # patches and the class token (no registers in this model)
    assert result["flops_per_slice"] == result["flops_per_slice_analytic"]
    assert result["dtype"] == "float32" and result["chunk_size"] == 2
    for name, row in result["variants"].items():
        assert row["slices_per_s"] == pytest.approx(5 / row["median_s"]), name
        assert row["flop_per_s"] == pytest.approx(5 * result["flops_per_slice"] / row["median_s"]), name
    assert result["encoder_vs_timm"] > 0


def test_accelerator_variants_agree_with_fp32_on_cpu():
    model = bench.raw_timm("vit_small_patch14_dinov2", TINY)
    x = torch.randn(2, 3, 28, 28)
    variants, warmups = bench.accelerator_variants(model, x, "cpu", compile=False)
    assert warmups == {}
    assert "fp32 + TF32 matmuls" not in variants  # CUDA only
    outputs = {name: fn().float() for name, fn in variants.items() if "flash" not in name}
    reference = outputs.pop("fp32")
    explicit = outputs.pop("bf16 autocast, explicit attention (no SDPA)")
    assert torch.allclose(explicit, outputs["bf16 autocast + SDPA (auto kernel)"], atol=0.1)
    for name, out in outputs.items():
        assert out.shape == reference.shape, name
        assert (out - reference).abs().mean() < 0.05, name  # bf16 rounding, same function


def test_accelerator_section_is_skipped_without_cuda(tmp_path):
    assert bench.bench_accelerator(_args(tmp_path), torch.device("cpu")) == {"skipped": "no CUDA device"}


@pytest.mark.parametrize("roi", ["32", "80"])
def test_peer_window_errors(tmp_path, roi):
    from volumes.errors import VolumesError

    args = _args(tmp_path, "--peer-roi", roi)
    with pytest.raises(VolumesError, match=f"--peer-roi {roi}: SwinUNETR needs a multiple of 32, at least 64"):
        bench_command.run(args)


def test_known_gpu_peaks():
    assert bench.known_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.known_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.known_peak_tflops("Quadro P400") is None


@pytest.mark.parametrize("text", ["512x512", "512x256x10", "axbxc", "64x64x1", "0x0x4"])
def test_volume_argument_errors(text):
    with pytest.raises(argparse.ArgumentTypeError, match=text):
        bench.parse_volume(text)
    assert bench.parse_volume("64X64x9") == (64, 64, 9)


def test_cache_section_encodes_cold_and_reads_warm(tmp_path):
    args = _args(tmp_path, "--model-kwargs", json.dumps({"depth": 1}), "--volume", "48x48x6", "--cache-cases", "2",
                 "--repeats", "1", "--warmup", "0")
    result = bench.bench_cache(args, torch.device("cpu"))
    assert (result["cold"]["hits"], result["cold"]["misses"]) == (0, 2)
    assert (result["warm"]["hits"], result["warm"]["misses"]) == (2, 0)
    cold, warm = result["cold"]["stages_s"], result["warm"]["stages_s"]
    assert cold["encode"] > 0 and cold["load_preprocess"] > 0
    assert warm["encode"] == warm["load_preprocess"] == warm["voxel_hash"] == 0  # found by the file's bytes
    assert warm["source_hash"] > 0
    assert result["speedup"] == pytest.approx(result["cold"]["total_s"] / result["warm"]["total_s"])


def test_bench_command_writes_json_and_markdown(tmp_path):
    """The command end to end, with sections a, b and f on tiny settings, in a fresh process."""
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "volumes", "bench", "--sections", "a", "b", "f", "--model-kwargs",
         json.dumps({"depth": 1}), "--slices", "4", "--size", "28", "--volume", "64x64x30", "--bundle-size", "28",
         "--no-figures", "--gemm-size", "64", "--threads", "1", "--repeats", "1", "--warmup", "0", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert list(report["sections"]) == ["a", "b", "f"]
    assert report["sections"]["f"]["skipped"] == "no CUDA device"
    pipeline = report["sections"]["b"]["bundles"]
    assert set(pipeline) == {"seg", "cls"}
    for entry in pipeline.values():
        assert entry["slices"] == 30 and entry["slice_size"] == [28, 28]
        assert entry["ratio"] == pytest.approx(entry["wall_s"] / entry["pure_encoder"]["median_s"])
        assert entry["network_ratio"] == pytest.approx(entry["wall_s"] / entry["pure_network"]["median_s"])
        assert entry["stages_s"]["encode"] > 0
        assert sum(entry["stages_s"].values()) == pytest.approx(entry["wall_s"], rel=1e-6)
        # each slice through the encoder once: classification, and segmentation's three
        # overlapping 16-slice slabs (starts 0, 12, 14) that share their slices' features
        assert entry["encoded_slices"] == 30
    markdown = (out / "bench.md").read_text()
    assert "| a. SliceEncoder throughput / timm forward_features |" in markdown
    assert "skipped: no CUDA device" in markdown
    assert "--sections a b f" in report["command"]
    assert markdown in proc.stdout


def test_memory_and_peer_sections_measure_in_child_processes(tmp_path):
    """Sections c and e on tiny volumes: every child reports, and the ratios are its numbers."""
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "volumes", "bench", "--sections", "c", "e", "--model-kwargs", json.dumps({"depth": 1}),
         "--bundle-size", "28", "--memory-slices", "4", "8", "--memory-size", "32", "--peer-volume", "32x32x8",
         "--peer-roi", "64", "--peer-feature-size", "12", "--no-figures", "--threads", "1", "--repeats", "1",
         "--warmup", "0", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    memory = report["sections"]["c"]
    assert [row["slices"] for row in memory["rows"]] == [4, 8]
    for row in memory["rows"]:
        assert row["done"] == 1 and row["failed"] == 0
        assert row["growth_mib"] == pytest.approx(row["peak_rss_mib"] - row["baseline_rss_mib"])
        assert row["volume_mib_float32"] == pytest.approx(32 * 32 * row["slices"] * 4 / 2**20)
    peers = report["sections"]["e"]["models"]
    assert set(peers) == {"ours", "swinunetr", "unet3d"}
    assert peers["ours"]["input_shape"] == [3, 28, 28, 8]  # the bundle's own preprocessing
    assert peers["swinunetr"]["input_shape"] == peers["unet3d"]["input_shape"] == [1, 32, 32, 8]
    for name in ("swinunetr", "unet3d"):
        assert peers[name]["time_vs_ours"] == pytest.approx(peers[name]["infer_s"] / peers["ours"]["infer_s"])
    assert "| e. swinunetr / ours: time, memory |" in (out / "bench.md").read_text()


def test_a_failed_peer_shows_its_error_in_the_summary():
    sections = {"e": {"models": {"ours": {"infer_s": 1.0, "growth_mib": 10.0},
                                 "swinunetr": {"error": "the child gave no result (exit code 1): ValueError: x"},
                                 "unet3d": {"infer_s": 2.0, "time_vs_ours": 2.0, "memory_vs_ours": 1.5}}}}
    rows = {row[0]: row[1] for row in bench.summary_rows(sections)}
    assert rows["e. swinunetr / ours: time, memory"] == "error: the child gave no result (exit code 1): ValueError: x"
    assert rows["e. unet3d / ours: time, memory"] == "2.00x, 1.50x"


def test_child_protocol_reports_why_a_child_gave_no_result():
    from volumes.apps import child

    assert child.child_spec(["--child", '{"a": 1}']) == {"a": 1}
    assert child.child_spec(["--out", "x"]) is None
    run = child.run_child("volumes.apps.bench", {"model": "ours"}, threads=1)  # no "threads": the child fails
    assert run.result is None and run.returncode == 1 and run.wall_s > 0
    assert run.failure() == "the child gave no result (exit code 1): KeyError: 'threads'"
    killed = child.ChildRun(None, returncode=-9)
    assert killed.failure() == "the child gave no result (killed by signal 9; out of memory?)"


def test_runtime_table_measures_every_cell_in_its_own_process(tmp_path):
    """``volumes.apps.bench_runtime`` on tiny CTs: every cell reports seconds and peak RSS, the table has its rows."""
    import importlib.util

    out = tmp_path / "runtime"
    proc = subprocess.run(
        [sys.executable, "-m", "volumes.apps.bench_runtime", "--slices", "8", "12", "--matrix", "64", "--size", "28",
         "--depth", "1", "--repeat", "1", "--roi", "64", "--feature-size", "12", "--threads", "1", "--launch", "fork",
         "--work", str(out), "--json", str(out / "runtime.json"), "--markdown", str(out / "runtime.md")],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "runtime.json").read_text())
    runtimes = {m: all(importlib.util.find_spec(x) is not None for x in ("onnx", m)) for m in ("onnxruntime", "openvino")}
    assert len(report["cells"]) == 12  # 4 backends x 2 head counts, encoder, network, 2 peers
    for key, by_size in report["cells"].items():
        assert list(by_size) == ["8", "12"], key
        for n, cell in by_size.items():
            runtime = next((m for m in runtimes if key.startswith(m)), None)
            if runtime is not None and not runtimes[runtime]:
                assert runtime in cell["error"], (key, n, cell)
                continue
            assert cell["seconds"] > 0 and cell["peak_rss_mib"] > 0, (key, n, cell)
            assert cell["seconds"] == min(cell["times_s"]) or abs(cell["seconds"] - min(cell["times_s"])) < 1e-3
    for n in (8, 12):  # the same voxels: our encoder's grid (three windows) and the peers' (one channel)
        assert report["cells"]["encoder"][str(n)]["input_shape"] == [3, 28, 28, n]
        assert report["cells"]["swinunetr"][str(n)]["input_shape"] == [1, 28, 28, n]
        assert report["cells"]["unet3d"][str(n)]["input_shape"] == [1, 28, 28, n]
    assert len(report["cells"]["torch-2"]["8"]["shared_encoder_groups"]) == 1  # the two heads share one encoder
    assert report["parameters"]["swinunetr"] > 0 and report["parameters"]["unet3d"] > 0
    ratios = {row["name"]: row["values"] for row in report["ratios"]}
    cells = report["cells"]
    assert ratios["end to end / encoder alone (torch, 1 head)"]["8"] == pytest.approx(
        cells["torch-1"]["8"]["seconds"] / cells["encoder"]["8"]["seconds"])
    markdown = (out / "runtime.md").read_text()
    for label in report["configurations"].values():
        assert f"| {label} |" in markdown
    assert "| configuration | 8 slices: s | 8 slices: peak RAM GiB | 12 slices: s |" in markdown
    assert "--slices 8 12" in markdown and "Machine: " in markdown
    assert markdown in proc.stdout


def test_runtime_table_reports_a_failed_cell_and_goes_on(tmp_path):
    from volumes.apps import bench_runtime

    cell = bench_runtime._cell(bench_runtime.Launcher("exec", 1, tmp_path), {"kind": "nope", "threads": 1})
    assert cell["error"] == "the child gave no result (exit code 1): ValueError: unknown cell kind 'nope'"
    args = bench_runtime.build_parser().parse_args([])
    configs = bench_runtime.configurations(args)
    cells = {key: {"100": {"seconds": 2.0, "peak_rss_mib": 1024.0}} for key in configs}
    cells["encoder"]["100"]["seconds"] = 1.0
    cells["onnxruntime-1"]["100"] = cell
    report = {"slices": [100], "matrix": 512, "size": 112, "depth": 12, "repeat": 2, "roi": 96, "sw_batch": 1,
              "configurations": configs, "cells": cells, "onnx_export": {"onnxruntime": {"seconds": 3.0}},
              "parameters": {}, "ratios": bench_runtime.goal_ratios(cells, [100]), "machine": "m", "command": "c",
              "date": "d", "launch": "exec"}
    text = bench_runtime.markdown(report)
    assert "| ours, onnxruntime, 1 head (segmenter) | error | error |" in text
    assert "| end to end / encoder alone (torch, 1 head) | <= 1.3 | 2.00 (missed) |" in text
    assert "| torch / onnxruntime, 1 head | >= 1.5 | n/a |" in text
    assert "| 2 heads / 1 head, torch | <= 1.15 | 1.00 (met) |" in text
    assert f"* {configs['onnxruntime-1']}, 100 slices: {cell['error']}" in text
