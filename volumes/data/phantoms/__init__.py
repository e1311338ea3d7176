"""Synthetic abdominal CT phantoms: organ labels plus a volume-level diagnosis (``docs/PHANTOMS.md``).

Every case is drawn from one integer seed in physical millimetres (RAS+), so its anatomy
does not depend on the voxel grid it is sampled on::

    from volumes.data.phantoms import PhantomConfig, generate_phantom, write_cohort
    ph = generate_phantom(7)                     # ph.image [X, Y, Z] HU, ph.label
    datalist = write_cohort("out/spleen", n=40, seed=0)
    # python -m volumes phantoms --out out/spleen --n 40 --seed 0

Modules: ``config`` (labels, tasks, HU ranges, :class:`PhantomConfig`), ``shapes``,
``anatomy``, ``rendering`` (:func:`generate_phantom`), ``cohort`` (writers) and
``streaming`` (a case of any size painted and written a few slices at a time).
"""

from __future__ import annotations

from volumes.data.phantoms.cohort import SPLIT_NAMES, case_seed, cohort_summary, write_case, write_cohort
from volumes.data.phantoms.cohort import _stratified_splits  # noqa: F401  (tests import it from here)
from volumes.data.phantoms.config import (
    CLASS_NAMES,
    HU_RANGES,
    LABEL_NAMES,
    ORGANS,
    PORTAL_VENOUS_HU,
    TASKS,
    Phantom,
    PhantomConfig,
)
from volumes.data.phantoms.rendering import generate_phantom

__all__ = [
    "ORGANS",
    "LABEL_NAMES",
    "TASKS",
    "CLASS_NAMES",
    "HU_RANGES",
    "PORTAL_VENOUS_HU",
    "SPLIT_NAMES",
    "PhantomConfig",
    "Phantom",
    "generate_phantom",
    "write_case",
    "write_cohort",
    "case_seed",
    "cohort_summary",
]
