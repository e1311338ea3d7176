"""The package itself: a light import, lazy public names, clear optional-import errors."""

from __future__ import annotations

import json
import subprocess
import sys

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
