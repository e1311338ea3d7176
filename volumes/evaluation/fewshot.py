"""Few-shot evaluation: ``n`` labelled examples per class, drawn again and again.

For every ``n`` (default 1, 2, 4, 8, 16) and every draw seed, :func:`fewshot_indices`
picks ``n`` training rows of each class (without replacement, seeded, reproducible); a
logistic regression with a fixed regularisation is fitted on those ``n * K`` rows and
scored on the test split. The spread over draws is the headline's ± (the few-shot
numbers of the DINOv2-for-radiology studies are means over such draws).

There is no validation-based choice of the regularisation: with one or two labelled
examples per class a validation split many times larger would be the real training
set. The fixed ``l2`` is an input (default 0.1 on standardised features).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from volumes.errors import ConfigError

__all__ = ["DEFAULT_DRAWS", "DEFAULT_FEWSHOT_L2", "DEFAULT_SHOTS", "fewshot_indices"]

DEFAULT_SHOTS: tuple[int, ...] = (1, 2, 4, 8, 16)
DEFAULT_DRAWS = 5
DEFAULT_FEWSHOT_L2 = 0.1


def fewshot_indices(labels: Sequence[int] | np.ndarray, n_per_class: int, seed: int) -> np.ndarray:
    """Row indices of a stratified draw: exactly ``n_per_class`` rows of every class, sorted.

    The same ``(labels, n_per_class, seed)`` always gives the same rows; another seed or
    ``n`` gives an independent draw.

    Raises:
        ConfigError: ``n_per_class < 1``, or a class with fewer rows than ``n_per_class``.
    """
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, (int, np.integer)) or n_per_class < 1:
        raise ConfigError("shots", n_per_class, "positive integers (examples per class)")
    labels = np.asarray(labels)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(n_per_class), 0xF3]))
    picked = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < n_per_class:
            raise ConfigError("shots", int(n_per_class),
                              f"at most {len(members)} (class {int(cls)} has {len(members)} training examples)")
        picked.append(rng.choice(members, size=int(n_per_class), replace=False))
    return np.sort(np.concatenate(picked))
