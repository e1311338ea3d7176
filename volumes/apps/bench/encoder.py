"""Section a of ``volumes bench``: the SliceEncoder against timm's own forward on the same batch."""

from __future__ import annotations

import argparse
from typing import Any

from volumes.apps.bench.timing import analytic_vit_flops, compare, count_flops, gemm_peak, raw_timm
from volumes.devices import resolve_device


def bench_encoder(args: argparse.Namespace, device=None) -> dict[str, Any]:
    """SliceEncoder vs timm's ``forward_features`` on the same ``--slices`` x 3 x ``--size`` batch.

    Variants, timed side by side under ``torch.inference_mode`` and the encoder's autocast:
    timm on the whole batch, timm on the encoder's chunks, the encoder without grids
    (class token, registers, mean patch token: what classification uses), timm's
    ``forward_intermediates`` at the encoder's layers and the encoder with grids (what
    segmentation uses). ``encoder_vs_timm`` = timm time / encoder time (1 = no overhead).
    """
    import torch

    from volumes.encoders import SliceEncoder

    device = device or resolve_device(args.device)
    n, size = args.slices, args.size
    encoder = SliceEncoder(args.encoder, chunk_size=args.chunk_size, autocast=args.autocast,
                           model_kwargs=args.model_kwargs).to(device).eval()
    timm_model = raw_timm(args.encoder, args.model_kwargs, encoder.backbone.state_dict()).to(device)
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    autocast = lambda: encoder._autocast_context(x.device)  # noqa: E731  (the encoder's own dtype choice)
    unique_layers = sorted(set(encoder.layers))

    def timm_batch():
        with torch.inference_mode(), autocast():
            return timm_model.forward_features(x)

    def timm_chunks():
        with torch.inference_mode(), autocast():
            return [timm_model.forward_features(part) for part in x.split(encoder.chunk_size)]

    def timm_intermediates():
        with torch.inference_mode(), autocast():
            return timm_model.forward_intermediates(x, indices=unique_layers, norm=encoder.norm_intermediates,
                                                    output_fmt="NCHW")

    variants = {
        "timm forward_features (one batch)": timm_batch,
        f"timm forward_features (chunks of {encoder.chunk_size})": timm_chunks,
        "SliceEncoder (no grids)": lambda: encoder(x, with_grids=False),
        "timm forward_intermediates (one batch)": timm_intermediates,
        "SliceEncoder (with grids)": lambda: encoder(x, with_grids=True),
    }
    times = compare(variants, repeats=args.repeats, warmup=args.warmup, device=device)

    # the same input through both: do they compute the same features?
    with torch.inference_mode():
        reference = timm_batch().float()
        ours = encoder(x, with_grids=False)
    prefix = encoder.num_prefix_tokens
    parity = {
        "max_abs_diff_cls": float((reference[:, 0] - ours.cls).abs().max()),
        "max_abs_diff_patch_mean": float((reference[:, prefix:].mean(dim=1) - ours.patch_mean).abs().max()),
    }
    flops, per_op = count_flops(timm_model.forward_features, x[:1])
    analytic = analytic_vit_flops(timm_model, size, size)
    gemm = gemm_peak(device, n=args.gemm_size or (8192 if device.type == "cuda" else 2048), repeats=args.repeats)
    timm_key, enc_key = "timm forward_features (one batch)", "SliceEncoder (no grids)"
    rows = {}
    for name, result in times.items():
        if "median_s" in result:
            rate = n * flops / result["median_s"]
            rows[name] = {**result, "slices_per_s": n / result["median_s"], "flop_per_s": rate,
                          "fraction_of_gemm_peak": rate / gemm["flop_per_s"],
                          "vs_timm_batch": times[timm_key].get("median_s", float("nan")) / result["median_s"]}
        else:
            rows[name] = result
    grids_ratio = (times["timm forward_intermediates (one batch)"].get("median_s", float("nan"))
                   / times["SliceEncoder (with grids)"].get("median_s", float("nan")))
    return {
        "encoder": args.encoder, "model_kwargs": args.model_kwargs, "slices": n, "size": size,
        "chunk_size": encoder.chunk_size, "dtype": "bfloat16" if _uses_bf16(encoder, device) else "float32",
        "device": str(device), "tokens_per_slice": (size // encoder.patch_size) ** 2 + prefix,
        "flops_per_slice": flops, "flops_per_slice_by_op": per_op, "flops_per_slice_analytic": analytic,
        "gemm": gemm, "variants": rows, "parity": parity,
        "encoder_vs_timm": rows[enc_key].get("vs_timm_batch"),
        "encoder_vs_timm_chunks": (times[f"timm forward_features (chunks of {encoder.chunk_size})"].get("median_s", float("nan"))
                                   / times[enc_key].get("median_s", float("nan"))),
        "grids_encoder_vs_timm": grids_ratio,
        "fraction_of_gemm_peak": rows[enc_key].get("fraction_of_gemm_peak"),
    }


def _uses_bf16(encoder, device) -> bool:
    return encoder.autocast == "bf16" or (encoder.autocast == "auto" and device.type == "cuda")
