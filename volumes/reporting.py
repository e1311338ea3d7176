"""Small helpers shared by the results scripts in ``scripts/`` (machine description, quick subsets)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask on Linux, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def quick_subset(items: list[dict], per_class: int, label_key: str = "class_label") -> list[dict]:
    """The first ``per_class`` items of each label, file order kept (every class stays present)."""
    counts: dict[int, int] = {}
    out = []
    for item in items:
        label = item[label_key]
        if counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            out.append(item)
    return out
