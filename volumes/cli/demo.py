"""``volumes demo``: the main job (see :mod:`volumes.apps.demo`)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    demo = sub.add_parser("demo", help="the main job: train both bundles briefly on phantoms, then volumes infer")
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument("--quick", action="store_true",
                      help="tiny networks and cohorts (a smoke test, about a minute on 2 cores)")
    demo.add_argument("--workers", type=int, default=None,
                      help="prefetch threads of volumes infer (default: 1 on CUDA, 0 on CPU)")
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from volumes.apps.demo import run_demo

    return run_demo(args.out, quick=args.quick, workers=args.workers)
