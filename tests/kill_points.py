"""Stop a process at a known point of a write, for tests that kill it there with SIGKILL.

``python tests/kill_points.py MARKER NAME [--] COMMAND...`` runs ``python -m volumes COMMAND...``
in this process, with ``os.replace`` wrapped: the first rename onto a file called ``NAME``
(a relative path such as ``p0/overview.png`` matches the last parts of the target) finds
the temporary file complete and not yet renamed; the process then touches ``MARKER`` and
sleeps until it is killed. :func:`stop_before_rename` does the same inside another
program (a Ray worker, see ray_faults.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

TESTS = Path(__file__).resolve().parent


def _matches(target: str, name: str) -> bool:
    return Path(target).parts[-len(Path(name).parts):] == Path(name).parts


def stop_before_rename(name: str, marker: Path, then: Callable[[], None] | None = None) -> None:
    """Wrap ``os.replace``: before the first rename onto ``name``, touch ``marker`` and call ``then``.

    ``then`` defaults to sleeping for an hour (the test kills the process meanwhile).
    """
    real = os.replace
    fired = []

    def replace(src, dst, *args, **kwargs):
        if not fired and _matches(os.fspath(dst), name):
            fired.append(True)
            assert Path(src).is_file(), src
            Path(marker).touch()
            (then or (lambda: time.sleep(3600)))()
        return real(src, dst, *args, **kwargs)

    os.replace = replace


def run_until(marker: Path, name: str, command: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen:
    """Start ``python -m volumes COMMAND...`` stopped before the first rename onto ``name`` (see the module docstring)."""
    env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)}
    return subprocess.Popen([sys.executable, str(TESTS / "kill_points.py"), str(marker), name, "--", *command],
                            env=env, stderr=subprocess.PIPE)


def wait_for(marker: Path, process: subprocess.Popen, what: str, seconds: float = 300) -> None:
    """Wait until ``process`` touched ``marker``; fail with its stderr if it exited, or with ``what`` on time-out."""
    deadline = time.time() + seconds
    while not marker.exists():
        if process.poll() is not None:
            error = process.stderr.read().decode()[-3000:] if process.stderr else ""
            raise AssertionError(f"the process exited ({process.returncode}) before its stop point: {error}")
        assert time.time() < deadline, what
        time.sleep(0.02)


def kill(process: subprocess.Popen) -> None:
    """SIGKILL, then reap (no zombie left)."""
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


if __name__ == "__main__":
    marker, name, *command = sys.argv[1:]
    if command and command[0] == "--":
        command = command[1:]
    stop_before_rename(name, Path(marker))
    from volumes.cli import main

    sys.exit(main(command))
