"""The report of ``volumes bench``: the summary against the goals and one markdown table per section."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from volumes.apps.bench.inputs import SECTION_TITLES
from volumes.apps.bench.peers import PEERS
from volumes.reporting import format_params, markdown_table, write_json_and_markdown

GOALS = {"encoder_vs_timm": 0.95, "pipeline_ratio": 1.3, "cache_speedup": 10.0, "mfu": 0.40}


def _num(value: Any, fmt: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return fmt.format(value)


def _rate(flop_per_s: float | None) -> str:
    if flop_per_s is None:
        return "-"
    return f"{flop_per_s / 1e12:.2f} TFLOP/s" if flop_per_s >= 1e12 else f"{flop_per_s / 1e9:.1f} GFLOP/s"


def _met(value: float | None, goal: float, higher: bool = True) -> str:
    if value is None or value != value:
        return "-"
    return "yes" if (value >= goal if higher else value <= goal) else "no"


def summary_rows(sections: Mapping[str, Any]) -> list[list[str]]:
    """One line per goal of the issue: what was measured, the goal, whether it is met."""
    rows: list[list[str]] = []
    a = sections.get("a")
    if a and "error" not in a:
        rows.append(["a. SliceEncoder throughput / timm forward_features", _num(a["encoder_vs_timm"], "{:.3f}x"),
                     ">= 0.95x", _met(a["encoder_vs_timm"], GOALS["encoder_vs_timm"])])
        rows.append(["a. SliceEncoder with grids / timm forward_intermediates", _num(a["grids_encoder_vs_timm"], "{:.3f}x"),
                     "-", "-"])
        rows.append(["a. encoder FLOP/s / measured GEMM peak", _num(a["fraction_of_gemm_peak"], "{:.1%}"), "-", "-"])
    b = sections.get("b")
    if b and "error" not in b:
        for entry in b["bundles"].values():
            rows.append([f"b. {entry['bundle']}: end to end / pure encoder", _num(entry["ratio"], "{:.2f}x"),
                         "<= 1.3x", _met(entry["ratio"], GOALS["pipeline_ratio"], higher=False)])
            if entry.get("network_ratio") is not None:
                rows.append([f"b. {entry['bundle']}: end to end / whole network", _num(entry["network_ratio"], "{:.2f}x"),
                             "-", "-"])
    c = sections.get("c")
    if c and "error" not in c:
        for row in c["rows"]:
            if "growth_per_volume" in row:
                rows.append([f"c. peak RSS growth / float32 volume, {row['slices']} slices",
                             _num(row["growth_per_volume"], "{:.2f}x"), "~1x", "-"])
        if c.get("peak_per_volume_slope") is not None:
            rows.append(["c. peak RSS slope per MiB of volume", _num(c["peak_per_volume_slope"], "{:.2f}"), "~1", "-"])
    d = sections.get("d")
    if d and "error" not in d:
        rows.append(["d. cached second run speed-up", _num(d["speedup"], "{:.2f}x"), ">= 10x",
                     _met(d["speedup"], GOALS["cache_speedup"])])
    e = sections.get("e")
    if e and "error" not in e:
        for name in PEERS[1:]:
            peer = e["models"].get(name, {})
            failed = peer.get("error") or e["models"].get("ours", {}).get("error")
            measured = (f"error: {failed}" if failed else
                        f"{_num(peer.get('time_vs_ours'), '{:.2f}x')}, {_num(peer.get('memory_vs_ours'), '{:.2f}x')}")
            rows.append([f"e. {name} / ours: time, memory", measured, "-", "-"])
    f = sections.get("f")
    if f and "error" not in f:
        if "skipped" in f:
            rows.append(["f. best MFU (CUDA)", f"skipped: {f['skipped']}", ">= 40% (ViT-B/14, 518 px, H100)", "-"])
        else:
            rows.append([f"f. best MFU: {f['best']}", _num(f["best_mfu"], "{:.1%}"), ">= 40% (ViT-B/14, 518 px, H100)",
                         _met(f["best_mfu"], GOALS["mfu"])])
    for key, section in sections.items():
        if section and "error" in section:
            rows.append([f"{key}. {SECTION_TITLES[key]}", f"error: {section['error']}", "-", "-"])
    return rows


def section_markdown(key: str, s: Mapping[str, Any]) -> list[str]:
    """The detail table of one section."""
    title = f"## {key}. {SECTION_TITLES[key]}"
    if "error" in s:
        return [title, "", f"error: {s['error']}"]
    if "skipped" in s:
        return [title, "", f"skipped: {s['skipped']}"]
    if key == "a":
        gemm = s["gemm"]
        lines = [title, "",
                 f"{s['encoder']} {s['model_kwargs'] or ''} on {s['slices']} slices of {s['size']} x {s['size']} "
                 f"({s['tokens_per_slice']} tokens), {s['dtype']}, {s['device']}, chunk size {s['chunk_size']}; "
                 f"{s['flops_per_slice'] / 1e9:.3f} GFLOP per slice counted "
                 f"(analytic {_num(s['flops_per_slice_analytic'] and s['flops_per_slice_analytic'] / 1e9)}); "
                 f"GEMM {gemm['n']}^2 {gemm['dtype']}: {_rate(gemm['flop_per_s'])}. Features vs timm: max |diff| "
                 f"class token {s['parity']['max_abs_diff_cls']:.2e}, mean patch token "
                 f"{s['parity']['max_abs_diff_patch_mean']:.2e}.", ""]
        rows = []
        for name, r in s["variants"].items():
            if "error" in r:
                rows.append([name, f"error: {r['error']}", "-", "-", "-", "-"])
            else:
                rows.append([name, f"{r['median_s']:.4f}", f"{r['slices_per_s']:.1f}", _rate(r["flop_per_s"]),
                             f"{r['fraction_of_gemm_peak']:.1%}", f"{r['vs_timm_batch']:.3f}x"])
        header = ["variant", "median s", "slices/s", "achieved", "of GEMM peak", "timm batch time / this"]
        return lines + [markdown_table(header, rows)]
    if key == "b":
        names = ["hash", "load", "preprocess", "encode", "decode", "aggregate", "invert", "write", "figure", "other"]
        rows = []
        for e in s["bundles"].values():
            stages = e["stages_s"]
            network = e.get("pure_network")
            rows.append([e["bundle"], f"{e['wall_s']:.3f}", f"{e['pure_encoder']['median_s']:.3f}", f"{e['ratio']:.2f}x",
                         f"{network['median_s']:.3f}" if network else "-",
                         f"{e['network_ratio']:.2f}x" if network else "-",
                         f"{e['encoded_slices']} / {e['slices']}",
                         *(f"{stages[n]:.3f}" if n in stages else "-" for n in names)])
        return [title, "",
                f"One {s['volume']} synthetic CT per run, `BatchInference` (workers 0, figures {s['figures']}), "
                f"{s['device']}; seconds, median of the repeats. pure encoder: the encoder on the prepared "
                "volume's slices, each once; whole network: the bundle's network (and, for segmentation, its "
                "slab inferer) on the prepared volume. encoded / slices: slices through the encoder against "
                "the volume's slices.", "",
                markdown_table(["bundle", "end to end s", "pure encoder s", "ratio", "whole network s",
                                "end to end / network", "encoded / slices", *names], rows)]
    if key == "c":
        lines = [title, "",
                 f"`volumes.apps.bench_infer` children: bundles {', '.join(s['bundles'])}, {s['cases']} case(s) of "
                 f"{s['size']} x {s['size']} x N; peak RSS slope per MiB of float32 volume: "
                 f"{_num(s['peak_per_volume_slope'], '{:.2f}')}.", "", s["table"]]
        return lines + ([""] + s["errors"] if s["errors"] else [])
    if key == "d":
        names = ["source_hash", "load_preprocess", "voxel_hash", "encode", "cache_io", "classify"]
        rows = [[run, f"{s[run]['total_s']:.3f}", *(f"{s[run]['stages_s'][n]:.3f}" for n in names),
                 f"{s[run]['hits']} / {s[run]['misses']}"] for run in ("cold", "warm")]
        return [title, "",
                f"{s['cases']} distinct {s['volume']} synthetic CTs classified twice through a fresh cache "
                f"({s['encoder']}, {s['encoder_depth']} blocks, {s['aggregator']} aggregator, {s['device']}); "
                f"speed-up {s['speedup']:.2f}x.", "",
                markdown_table(["run", "total s", *(n + " s" for n in names), "hits / misses"], rows)]
    if key == "e":
        rows = []
        for name, m in s["models"].items():
            if "error" in m:
                rows.append([name, f"error: {m['error']}", *["-"] * 7])
                continue
            flops = m.get("flops_per_volume")
            rows.append([name, "x".join(map(str, m["input_shape"])), format_params(m['parameters']),
                         _num(flops and flops / 1e9, "{:.0f}"), f"{m['prepare_s']:.2f}", f"{m['infer_s']:.2f}",
                         f"{m['growth_mib']:.0f}", _num(m.get("time_vs_ours"), "{:.2f}x"),
                         _num(m.get("memory_vs_ours"), "{:.2f}x")])
        return [title, "",
                f"CT {s['volume']} ({s['volume_source']}), {s['device']}; peers: "
                f"{s['roi']}^3 windows, sw batch {s['sw_batch']}, SwinUNETR feature size {s['feature_size']}. "
                "Each model in its own process; growth = peak memory - memory after building the model.", "",
                markdown_table(["model", "input", "parameters", "GFLOP / volume", "prepare s", "infer s", "growth MiB",
                        "time vs ours", "memory vs ours"], rows)]
    if key == "f":
        rows = []
        for name, r in s["variants"].items():
            if "error" in r:
                rows.append([name, f"error: {r['error']}", *["-"] * 5])
            else:
                rows.append([name, f"{r['median_s']:.4f}", f"{r['slices_per_s']:.0f}", _rate(r["flop_per_s"]),
                             _num(r["mfu"], "{:.1%}"), f"{r['fraction_of_bf16_gemm']:.1%}",
                             f"{r['peak_memory_mib']:.0f}"])
        return [title, "",
                f"{s['gpu']}; {s['encoder']} on {s['slices']} slices of {s['size']}^2, "
                f"{s['flops_per_slice'] / 1e9:.1f} GFLOP per slice; peak {_num(s['peak_tflops'], '{:.0f}')} TFLOP/s "
                f"({s['peak_source']}); measured GEMM bf16 {_rate(s['gemm_bf16']['flop_per_s'])}, "
                f"fp32 {_rate(s['gemm_fp32']['flop_per_s'])}.", "",
                markdown_table(["variant", "median s", "slices/s", "achieved", "MFU", "of bf16 GEMM", "peak MiB"], rows)]
    return [title]


def markdown(report: Mapping[str, Any]) -> str:
    m = report["machine"]
    gpu = f", GPU {m['gpu']} ({m['gpu_memory_gib']} GiB, CUDA {m['cuda']})" if "gpu" in m else ", no CUDA device"
    lines = [
        "# volumes bench", "",
        f"- machine: {m['cpu']} ({m['cores']} cores available){gpu}; device {m['device']}",
        f"- torch {m['torch']}, timm {m['timm']}, MONAI {m['monai']}, Python {m['python']}, {m['threads']} threads",
        f"- reproduce: `{report['command']}`",
        f"- timing: {report['settings']['warmup']} warm-up, median of {report['settings']['repeats']} repeats",
        "", "## Summary", "",
        markdown_table(["measurement", "measured", "goal", "met"], summary_rows(report["sections"]), align="lrll"),
    ]
    for key, section in report["sections"].items():
        lines += [""] + section_markdown(key, section)
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: Mapping[str, Any]) -> str:
    text = markdown(report)
    write_json_and_markdown(out, "bench", report, text)
    return text
