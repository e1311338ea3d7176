"""``volumes phantoms``: write a synthetic CT cohort (see :mod:`volumes.data.phantoms`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from volumes.errors import VolumesError

# kept here so ``--help`` needs no numpy; test_cli checks it equals volumes.data.phantoms.TASKS
TASKS = ("splenomegaly", "lesion", "hepatomegaly")


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "phantoms", help="write a synthetic CT phantom cohort",
        description="Write a cohort of synthetic abdominal CT phantoms (NIfTI + organ labels + a volume-level "
                    "class) with a MONAI datalist.json.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--n", required=True, type=int, help="number of cases")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (case i uses seed (seed, i))")
    parser.add_argument("--task", choices=TASKS, default="splenomegaly", help="what class_label means")
    parser.add_argument("--prevalence", type=float, default=0.5, help="probability of a positive case")
    parser.add_argument("--realistic", action="store_true",
                        help="clinical geometry: 0.6-1.0 mm pixels, 512x512, 1.5-5 mm slices (slower, larger files)")
    parser.add_argument("--dicom", type=int, default=0, metavar="K", help="also write K cases as DICOM series")
    parser.add_argument("--splits", type=float, nargs=3, default=(0.6, 0.2, 0.2),
                        metavar=("TRAIN", "VAL", "TEST"), help="split fractions (stratified by class)")
    parser.add_argument("--name", default=None, help="datalist name")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from volumes.data.phantoms import PhantomConfig, cohort_summary, write_cohort

    try:
        factory = PhantomConfig.realistic if args.realistic else PhantomConfig
        config = factory(task=args.task, prevalence=args.prevalence)
        path = write_cohort(args.out, args.n, args.seed, config, splits=tuple(args.splits), dicom_cases=args.dicom,
                            name=args.name, progress=False if args.no_progress else None)
    except ImportError as exc:  # an optional writer (DICOM) is not installed
        raise VolumesError(str(exc)) from exc
    print(cohort_summary(path))
    return 0
