"""``dciodvfy`` (dicom3tools) on the DICOM files the tests write; imported by the DICOM tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def dciodvfy_errors(path: str | Path) -> list[str]:
    """The ``Error`` lines ``dciodvfy`` prints for ``path``; skips the test without dicom3tools."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian dicom3tools: bash scripts/setup_pacs.sh)")
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
