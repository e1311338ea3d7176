"""``python -m volumes bench``: speed and memory of slice encoding and of the pipeline around it.

    python -m volumes bench                                   # every section, default sizes
    python -m volumes bench --sections a b --slices 64 --size 224 --threads 16

One module per section (``encoder`` a, ``pipeline`` b, ``memory`` c, ``cache`` d, ``peers`` e,
``accelerator`` f), each a function of the parsed arguments returning measured numbers;
``timing`` times them side by side, ``report`` renders ``OUT/bench.md`` / ``.json`` and
``main`` runs the sections. What each section measures and how: ``docs/BENCH.md``.
Torch is imported only when a benchmark runs.
"""

from __future__ import annotations

from volumes.apps.bench.accelerator import KNOWN_PEAKS_TFLOPS, accelerator_variants, bench_accelerator, known_peak_tflops
from volumes.apps.bench.cache import bench_cache
from volumes.apps.bench.encoder import bench_encoder
from volumes.apps.bench.inputs import (
    BUNDLE_KEYS,
    SECTION_TITLES,
    SECTIONS,
    bench_infer_module,
    bundle_overrides,
    bundle_weights,
    parse_volume,
    synthetic_ct,
)
from volumes.apps.bench.main import SECTION_FUNCTIONS, bench_main, machine_info, reproduce_command
from volumes.apps.bench.memory import bench_memory
from volumes.apps.bench.peers import PEERS, bench_peers, child_main, peer_volume, run_child
from volumes.apps.bench.pipeline import bench_pipeline
from volumes.apps.bench.report import GOALS, markdown, section_markdown, summary_rows, write_report
from volumes.apps.bench.timing import (
    analytic_vit_flops,
    compare,
    count_flops,
    gemm_peak,
    raw_timm,
    synchronize,
    timed,
    vit_flops_formula,
)

__all__ = [
    "BUNDLE_KEYS", "GOALS", "KNOWN_PEAKS_TFLOPS", "PEERS", "SECTIONS", "SECTION_FUNCTIONS", "SECTION_TITLES",
    "accelerator_variants", "analytic_vit_flops", "bench_accelerator", "bench_cache", "bench_encoder",
    "bench_infer_module", "bench_main", "bench_memory", "bench_peers", "bench_pipeline", "bundle_overrides",
    "bundle_weights", "child_main", "compare", "count_flops", "gemm_peak", "known_peak_tflops", "machine_info",
    "markdown", "parse_volume", "peer_volume", "raw_timm", "reproduce_command", "run_child", "section_markdown",
    "summary_rows", "synchronize", "synthetic_ct", "timed", "vit_flops_formula", "write_report",
]
