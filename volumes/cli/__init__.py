"""The ``volumes`` command line: one module per command in this package.

    python -m volumes demo --out runs/demo          the main job: train both bundles briefly on
                                                    phantoms, then batch inference with a report
    python -m volumes infer --bundle B [--bundle B2] --input SRC --output DIR
                                                    batch inference: masks, DICOM SEG, predictions,
                                                    failures.csv, report.html (also under torchrun)
    python -m volumes datalist --data DIR --out FILE [--images T --labels T]
                                                    your labelled scans checked and dealt to k folds
                                                    by patient, one MONAI datalist (docs/REAL_DATA.md)
    python -m volumes pretrain --data SRC --out DIR self-supervised DINOv2 pretraining of the slice
                                                    encoder on unlabelled volumes (docs/PRETRAIN.md)
    python -m volumes interact train|simulate ...   clicks and few-shot labels on frozen features: train
                                                    the click model, run the click protocol (docs/INTERACTIVE.md)
    python -m volumes phantoms --out DIR --n N      write a synthetic CT cohort
    python -m volumes embed --input SRC --out DIR   embed every slice of every case
    python -m volumes cache info|prune              inspect or trim the embedding cache
    python -m volumes evaluate --protocol knn --encoder NAME --data DATALIST
                                                    kNN / few-shot / linear probe / fine-tune /
                                                    LoRA / BitFit on volume or slice labels
    python -m volumes bench [--sections a b c d e f] [--out runs/bench]
                                                    speed and memory: encoder vs timm, pipeline,
                                                    memory, cache, 3D peers, CUDA variants
    python -m volumes pacs listen|pull|run|status --config node.yaml
                                                    DICOM node: receive or pull studies from a PACS,
                                                    send DICOM SEG + SR back (docs/PACS.md)
    python -m volumes pacs viewer --dicomweb URL    OHIF beside the archive (scripts/setup_viewer.sh)

Each command module has ``add_parser(sub)`` and ``run(args) -> int`` and imports its
heavy modules only inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from volumes.errors import VolumesError

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = ("demo", "infer", "datalist", "pretrain", "interact", "phantoms", "embed", "cache", "evaluate", "bench", "pacs")
"""Module names under ``volumes.cli``, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="volumes", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"volumes.cli.{name}")
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit status (2: bad arguments or input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on errors; callers want a status
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        return args.run(args)
    except VolumesError as exc:
        print(f"volumes {args.command}: {exc}", file=sys.stderr)
        return 2
