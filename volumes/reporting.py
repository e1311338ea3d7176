"""Small helpers shared by the results scripts in ``scripts/`` (machine description, quick subsets)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Sequence


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask on Linux, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A markdown table; ``align`` has one ``l`` or ``r`` per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_json_and_markdown(out: Path, stem: str, report: Any, text: str) -> None:
    """``OUT/STEM.json`` (the report) and ``OUT/STEM.md`` (the text), each written atomically."""
    import json

    from volumes.atomic import atomic_write_bytes

    data = json.dumps(report, indent=1, default=str).encode()
    atomic_write_bytes(out / f"{stem}.json", lambda f: f.write(data))
    atomic_write_bytes(out / f"{stem}.md", lambda f: f.write(text.encode()))


def format_params(n: int) -> str:
    """A parameter count for a table: ``86.39 M``, ``523.4 k`` or ``385``."""
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} k"
    return str(n)


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, ``"2.1, 1.9, 1.5"`` (``n/a`` off Unix)."""
    return ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def machine_line(threads: int) -> str:
    """The machine a figure was measured on, for a results page: cores, CPU model, GPU, load, torch threads."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{available_cores()} CPU cores ({cpu_model()}), {gpu}, load average {load_average()} at the start; "
            f"torch uses {threads} thread(s)")


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces a run of ``scripts/<script>`` (``argv`` None: this process's arguments)."""
    import shlex
    import sys

    parts = list(sys.argv[1:] if argv is None else argv)
    return " ".join([f".venv/bin/python scripts/{script}", *map(shlex.quote, parts)]).strip()


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
