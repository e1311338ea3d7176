"""Timing and FLOP helpers of ``volumes bench``: side-by-side timing, FLOP counts, the GEMM peak, stage timers."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping, Sequence


def synchronize(device) -> None:
    import torch

    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _stats(times: Sequence[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "repeats": len(times), "times_s": [round(t, 6) for t in times]}


def _error(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def compare(fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1, device=None,
            warmups: Mapping[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """Time several variants side by side: warm each up, then ``repeats`` rounds in rotating order.

    Returns per variant ``median_s``, ``min_s``, ``max_s``, ``times_s`` - or ``error`` when
    its warm-up raised (a ``torch.compile`` that fails, say); the others still run.
    """
    results: dict[str, dict[str, Any]] = {}
    live: dict[str, Callable[[], Any]] = {}
    for name, fn in fns.items():
        try:
            for _ in range((warmups or {}).get(name, warmup)):
                fn()
            synchronize(device)
            live[name] = fn
        except Exception as exc:  # a variant that cannot run is a result, not a crash
            results[name] = {"error": _error(exc)}
    names = list(live)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(max(1, repeats)):
        shift = index % len(names) if names else 0
        for name in names[shift:] + names[:shift]:  # no variant always runs first (caches, clocks)
            synchronize(device)
            start = time.perf_counter()
            live[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    for name in names:
        results[name] = _stats(times[name])
    return {name: results[name] for name in fns}


def best_of(run: Callable[[], Any], repeat: int, *, reset: Callable[[], Any] | None = None,
            warmup: bool = True) -> dict[str, Any]:
    """One warm-up (unless ``warmup`` is False), then ``repeat`` timed calls (``reset`` untimed before each).

    Returns the best (``seconds``), all (``times_s``) and the warm-up's (``warmup_s``). The
    warm-up takes first-call costs (ONNX export, allocator, position grid).
    """
    reset = reset or (lambda: None)
    warmup_s = None
    if warmup:
        reset()
        start = time.perf_counter()
        run()
        warmup_s = round(time.perf_counter() - start, 4)
    times = []
    for _ in range(repeat):
        reset()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "times_s": [round(t, 4) for t in times], "warmup_s": warmup_s}


def best_time(run: Callable[[], Any], repeat: int) -> float:
    """Seconds of the fastest of ``repeat`` calls after one warm-up (:func:`best_of`)."""
    return best_of(run, repeat)["seconds"]


def timed(fn: Callable[[], Any], *, repeats: int, warmup: int = 1, device=None) -> dict[str, Any]:
    """Warm-up, then the median of ``repeats`` calls of ``fn``."""
    return compare({"fn": fn}, repeats=repeats, warmup=warmup, device=device)["fn"]


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
    """FLOPs of one call (``torch.utils.flop_counter.FlopCounterMode``): total and per aten op.

    Counts matmuls, convolutions and attention (2 FLOPs per multiply-add); element-wise
    work (norms, activations) is not counted.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    per_op = {str(op).removeprefix("aten."): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


def vit_flops_formula(tokens: int, dim: int, depth: int, patches: int = 0, patch_size: int = 0,
                      channels: int = 3, mlp_hidden: int | None = None) -> int:
    """Matmul FLOPs of one image through a ViT: ``depth * (24 N D^2 + 4 N^2 D)`` with an MLP ratio of 4.

    Per block: qkv ``6ND^2``, projection ``2ND^2``, MLP ``4 N D H`` (``H = 4D``: ``16ND^2``),
    attention scores and weighted sum ``4N^2D``; plus the patch embedding
    ``2 * patches * (channels p^2) * D``. ``N`` counts every token (class and registers too).
    """
    hidden = 4 * dim if mlp_hidden is None else mlp_hidden
    block = 8 * tokens * dim * dim + 4 * tokens * dim * hidden + 4 * tokens * tokens * dim
    return depth * block + 2 * patches * channels * patch_size * patch_size * dim


def analytic_vit_flops(backbone, height: int, width: int) -> int | None:
    """:func:`vit_flops_formula` for a timm ViT at ``height x width`` (None for other MLPs)."""
    try:
        p = backbone.patch_embed.patch_size[0]
        patches = (height // p) * (width // p)
        dim = backbone.embed_dim
        total = 2 * patches * 3 * p * p * dim
        tokens = patches + backbone.num_prefix_tokens
        for block in backbone.blocks:
            fc1, fc2 = block.mlp.fc1, block.mlp.fc2  # SwiGLUPacked: fc1 -> 2H, fc2 H -> D
            mlp = 2 * tokens * dim * fc1.out_features + 2 * tokens * fc2.in_features * dim
            total += 8 * tokens * dim * dim + mlp + 4 * tokens * tokens * dim
        return total
    except AttributeError:
        return None


def gemm_peak(device, *, n: int = 2048, dtype=None, repeats: int = 5) -> dict[str, Any]:
    """FLOP/s of a square ``n x n`` matmul (``2 n^3`` FLOPs) on ``device``: the machine's matmul peak."""
    import torch

    dtype = dtype or torch.float32
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device, dtype)
    b = torch.randn(n, n, generator=generator).to(device, dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    with torch.inference_mode():
        result = timed(lambda: torch.matmul(a, b, out=out), repeats=repeats, device=device)
    result.update({"n": n, "dtype": str(dtype).removeprefix("torch."), "flop_per_s": 2 * n**3 / result["median_s"]})
    return result


def raw_timm(name: str, model_kwargs: Mapping[str, Any] | None = None, state_dict=None):
    """timm's own model as :class:`SliceEncoder` builds it (``num_classes=0``, ``dynamic_img_size``), unwrapped."""
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **dict(model_kwargs or {}))
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()


class _StageTimer:
    """Forward hooks that add up the time spent inside one module (and the slices it saw)."""

    def __init__(self, module, device):
        self.device = device
        self.seconds = 0.0
        self.calls = 0
        self.items = 0
        self._start = 0.0
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, module, args) -> None:
        synchronize(self.device)
        self.items += int(args[0].shape[0]) if args and hasattr(args[0], "shape") else 0
        self._start = time.perf_counter()

    def _post(self, module, args, output) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls, self.items = 0.0, 0, 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _TimedCall:
    """Wraps a callable attribute (a predictor's postprocessing, an embedder's step) and adds up its time."""

    def __init__(self, fn: Callable[..., Any], device=None):
        self.fn = fn
        self.device = device
        self.seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        synchronize(self.device)
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            synchronize(self.device)
            self.seconds += time.perf_counter() - start


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
