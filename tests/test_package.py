"""The package itself: a light import, lazy public names, clear optional-import errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "timm", "monai", "itk", "torch_geometric", "peft", "highdicom", "pydicom", "transformers", "SimpleITK")


def test_import_is_light():
    script = (
        "import sys, time; t = time.perf_counter(); import volumes; dt = time.perf_counter() - t;"
        f"import json; print(json.dumps({{'seconds': dt, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout)
    assert report["heavy"] == []
    assert report["seconds"] < 2.0


def test_public_names_resolve_lazily():
    import volumes

    assert volumes.SliceEncoder.__name__ == "SliceEncoder"
    assert "SliceEncoder" in dir(volumes)
    with pytest.raises(AttributeError):
        volumes.NoSuchThing  # noqa: B018


def test_missing_optional_package_names_the_extra():
    from volumes._optional import require

    with pytest.raises(ImportError, match=r"pip install 'volumes\[dicom\]'"):
        require("highdicom.not_a_module", purpose="DICOM SEG output")


def test_every_documented_monailabel_start_command_binds_to_loopback():
    """The app refuses a server that listens beyond 127.0.0.1, so a command copied from the docs must pass --host."""
    import re

    root = Path(__file__).resolve().parents[1]
    documents = [root / "README.md", *root.glob("docs/*.md"), *root.glob("bundles/*/docs/README.md")]
    commands = []
    for document in documents:
        lines = document.read_text().splitlines()
        for i, line in enumerate(lines):
            if not re.match(r"\s*\S*monailabel start_server", line):  # a command, not prose about one
                continue
            command = [line]
            while command[-1].rstrip().endswith("\\"):
                i += 1
                command.append(lines[i])
            commands.append((document.relative_to(root), " ".join(command)))
    assert len(commands) >= 4
    for document, command in commands:
        assert "--host 127.0.0.1" in command or "--host 0.0.0.0 --conf allow_remote true" in command, (
            f"{document}: {command!r} has no --host 127.0.0.1")
