"""The benchmarks' child processes: one measurement per fresh process, so each has its own peak memory.

The parent runs ``python -m MODULE --child SPEC_JSON`` (:func:`run_child`); the child reads
its spec with :func:`child_spec`, measures, and prints one result line
(:func:`print_result`): :data:`RESULT_MARKER` then JSON. Everything else it prints comes
back to the parent as ordinary lines.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from volumes.paths import CHECKOUT

__all__ = ["MIB", "RESULT_MARKER", "ChildRun", "child_spec", "peak_rss_mib", "print_result", "rss_mib", "run_child"]

RESULT_MARKER = "VOLUMES_BENCH_RESULT "
MIB = 2**20


def rss_mib() -> float:
    """Current resident set size of this process (``VmRSS``; Linux), else its peak so far."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mib()


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


@dataclass
class ChildRun:
    """What one child process left: its result (None when it printed none) and its other output."""

    result: dict[str, Any] | None
    lines: list[str] = field(default_factory=list)  # stdout lines other than the result line
    returncode: int = 0
    wall_s: float = 0.0
    stderr_tail: str = ""  # last line of stderr when it was captured

    def failure(self) -> str:
        """Why there is no result: ``the child gave no result (exit code 1): last stderr line``."""
        rc = self.returncode
        how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        text = f"the child gave no result ({how}{'; out of memory?' if rc == -9 else ''})"
        return f"{text}: {self.stderr_tail}" if self.stderr_tail else text


def run_child(module: str, spec: Mapping[str, Any], threads: int, *, capture_stderr: bool = True) -> ChildRun:
    """``python -m MODULE --child SPEC`` from the checkout with ``threads`` OpenMP / MKL threads.

    With ``capture_stderr=False`` the child's stderr (warnings, tracebacks) goes to this
    process's stderr as it runs.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, "--child", json.dumps(spec)], cwd=CHECKOUT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE if capture_stderr else None, text=True)
    run = ChildRun(None, returncode=proc.returncode, wall_s=time.perf_counter() - start)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            run.result = json.loads(line[len(RESULT_MARKER):])
        else:
            run.lines.append(line)
    if capture_stderr:
        run.stderr_tail = (proc.stderr.strip().splitlines() or [""])[-1]
    return run


def child_spec(argv: Sequence[str]) -> dict[str, Any] | None:
    """The spec of ``--child SPEC_JSON`` arguments, or None when ``argv`` is not a child's."""
    if list(argv[:1]) != ["--child"] or len(argv) < 2:
        return None
    return json.loads(argv[1])


def print_result(result: Mapping[str, Any]) -> None:
    """The child's one result line, flushed at once."""
    print(RESULT_MARKER + json.dumps(result), flush=True)
