"""Section f of ``volumes bench``: CUDA variants of ViT inference (TF32, bf16, SDPA, flash, compile, graphs) and MFU."""

from __future__ import annotations

import argparse
import contextlib
from typing import Any, Callable, Iterator

from volumes.apps.bench.timing import compare, count_flops, gemm_peak, raw_timm, synchronize
from volumes.devices import resolve_device

MIB = 2**20
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name();
# the first match wins, so the more specific names come first.
KNOWN_PEAKS_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)


@contextlib.contextmanager
def _attention(model, fused: bool) -> Iterator[None]:
    """Set timm's ``fused_attn`` (SDPA) on every attention module for one call, then restore it."""
    modules = [m for m in model.modules() if hasattr(m, "fused_attn")]
    before = [m.fused_attn for m in modules]
    for m in modules:
        m.fused_attn = fused
    try:
        yield
    finally:
        for m, value in zip(modules, before):
            m.fused_attn = value


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    import torch

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def known_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU named like ``torch.cuda.get_device_name()``, when known."""
    for needle, peak in KNOWN_PEAKS_TFLOPS:
        if needle.lower() in device_name.lower():
            return peak
    return None


def accelerator_variants(model, x, device, *, encoder=None, compile: bool = True,
                         cuda_graphs: bool = True) -> tuple[dict[str, Callable[[], Any]], dict[str, int]]:
    """The variants of section f as callables (and extra warm-up counts for the compiled ones).

    ``model`` is a timm ViT; every variant runs ``forward_features`` on ``x`` under
    ``torch.inference_mode``. Works on CPU too (without the TF32 and CUDA graph variants).
    """
    import copy

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = torch.device(device).type == "cuda"
    bf16 = lambda: torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)  # noqa: E731

    def call(fn=model.forward_features, *, autocast=False, fused=True, backend=None, tf32=False, inputs=x):
        def run():
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.inference_mode())
                if cuda:
                    stack.enter_context(_tf32(tf32))
                if autocast:
                    stack.enter_context(bf16())
                if backend is not None:
                    stack.enter_context(sdpa_kernel(backend))
                stack.enter_context(_attention(model, fused))
                return fn(inputs)
        return run

    variants: dict[str, Callable[[], Any]] = {"fp32": call()}
    if cuda:
        variants["fp32 + TF32 matmuls"] = call(tf32=True)
    variants["bf16 autocast, explicit attention (no SDPA)"] = call(autocast=True, fused=False)
    variants["bf16 autocast + SDPA (auto kernel)"] = call(autocast=True)
    variants["bf16 autocast + SDPA flash kernel"] = call(autocast=True, backend=SDPBackend.FLASH_ATTENTION)
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    x_bf16 = x.to(torch.bfloat16)
    variants["bf16 weights + SDPA"] = lambda: _bf16_weights(model_bf16, x_bf16)
    warmups: dict[str, int] = {}
    if compile:
        compiled = torch.compile(model.forward_features, dynamic=False)
        variants["bf16 autocast + torch.compile"] = call(compiled, autocast=True)
        warmups["bf16 autocast + torch.compile"] = 3
        if cuda and cuda_graphs:
            graphed = torch.compile(model.forward_features, mode="reduce-overhead", dynamic=False)
            variants["bf16 autocast + torch.compile + CUDA graphs"] = call(graphed, autocast=True)
            warmups["bf16 autocast + torch.compile + CUDA graphs"] = 3
    if encoder is not None:
        variants[f"SliceEncoder (autocast {encoder.autocast}, no grids)"] = lambda: encoder(x, with_grids=False)
    return variants, warmups


def _bf16_weights(model, x):
    import torch

    with torch.inference_mode():
        return model.forward_features(x)


def bench_accelerator(args: argparse.Namespace, device=None) -> dict[str, Any]:
    """CUDA variants of ViT inference on ``--slices`` x ``--size``^2 slices; skipped without CUDA.

    MFU = achieved FLOP/s (FlopCounterMode FLOPs per slice x slices/s) / peak: ``--peak-tflops``
    or the dense bf16 peak of a known GPU (:data:`KNOWN_PEAKS_TFLOPS`). The measured bf16
    GEMM peak of the same run is reported beside it.
    """
    import torch

    device = device or resolve_device(args.device)
    if device.type != "cuda":
        return {"skipped": "no CUDA device"}
    from volumes.encoders import SliceEncoder

    name = torch.cuda.get_device_name(device)
    peak = args.peak_tflops or known_peak_tflops(name)
    encoder = SliceEncoder(args.encoder, chunk_size=max(args.chunk_size, args.slices), autocast="auto",
                           model_kwargs=args.model_kwargs).to(device).eval()
    model = raw_timm(args.encoder, args.model_kwargs, encoder.backbone.state_dict()).to(device)
    x = torch.randn(args.slices, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
    flops, per_op = count_flops(model.forward_features, x[:1])
    variants, warmups = accelerator_variants(model, x, device, encoder=encoder, compile=not args.no_compile,
                                             cuda_graphs=not args.no_compile)
    times = compare(variants, repeats=args.repeats, warmup=args.warmup, device=device, warmups=warmups)
    rows = {}
    for variant, result in times.items():
        if "median_s" not in result:
            rows[variant] = result
            continue
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        variants[variant]()
        synchronize(device)
        rate = args.slices * flops / result["median_s"]
        rows[variant] = {**result, "slices_per_s": args.slices / result["median_s"], "flop_per_s": rate,
                         "mfu": rate / (peak * 1e12) if peak else None,
                         "peak_memory_mib": (torch.cuda.max_memory_allocated(device) - before) / MIB}
    gemm_bf16 = gemm_peak(device, n=args.gemm_size or 8192, dtype=torch.bfloat16, repeats=args.repeats)
    gemm_fp32 = gemm_peak(device, n=args.gemm_size or 8192, dtype=torch.float32, repeats=args.repeats)
    for row in rows.values():
        if "flop_per_s" in row:
            row["fraction_of_bf16_gemm"] = row["flop_per_s"] / gemm_bf16["flop_per_s"]
    best = max((r for r in rows.values() if "mfu" in r and r["mfu"] is not None), key=lambda r: r["mfu"], default=None)
    best_name = next((k for k, r in rows.items() if r is best), None)
    return {"gpu": name, "peak_tflops": peak, "peak_source": "--peak-tflops" if args.peak_tflops else
            ("known GPU table" if peak else "unknown GPU: pass --peak-tflops"),
            "encoder": args.encoder, "model_kwargs": args.model_kwargs, "slices": args.slices, "size": args.size,
            "flops_per_slice": flops, "flops_per_slice_by_op": per_op, "variants": rows,
            "gemm_bf16": gemm_bf16, "gemm_fp32": gemm_fp32, "best": best_name,
            "best_mfu": best["mfu"] if best else None}
