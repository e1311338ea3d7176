#!/usr/bin/env python
"""Draw the TensorBoard curves of a training run as one PNG (for the docs, or where TensorBoard is not at hand).

Reads every scalar under ``LOGDIR`` (``volumes pretrain``'s ``OUT/tensorboard``, a click model
folder's ``tensorboard/click_model``, a bundle's ``eval/``) and draws one panel per tag,
the panels of a section (``loss/``, ``schedule/``, ``collapse/``, ...) side by side::

    .venv/bin/python scripts/plot_curves.py runs/ssl/tensorboard --out docs/pretrain_curves.png \\
        --tags loss/loss loss/dino loss/ibot loss/koleo schedule/lr schedule/teacher_temp \\
               collapse/cls_std collapse/effective_rank collapse/teacher_entropy
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logdir", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--tags", nargs="+", default=None, help="the tags to draw, in order (default: every one)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--columns", type=int, default=3)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from volumes.atomic import atomic_path
    from volumes.curves import read_scalars

    scalars = read_scalars(args.logdir)
    if not scalars:
        parser.error(f"{args.logdir}: no TensorBoard scalars found")
    tags = args.tags or sorted(scalars)
    missing = [t for t in tags if t not in scalars]
    if missing:
        parser.error(f"{args.logdir}: no scalars {missing}; it has {sorted(scalars)}")
    columns = min(args.columns, len(tags))
    rows = math.ceil(len(tags) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.8 * rows), squeeze=False)
    for axis, tag in zip(axes.flat, tags):
        steps, values = zip(*scalars[tag])
        axis.plot(steps, values, linewidth=1.2)
        axis.set_title(tag, fontsize=10)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=8)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(tags):]:
        axis.axis("off")
    figure.suptitle(args.title or str(args.logdir), fontsize=11)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    print(f"wrote {args.out} ({len(tags)} curves from {args.logdir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
