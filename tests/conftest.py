"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (or ``$VOLUMES_SHARED_DATA``); skips when absent."""
    override = os.environ.get("VOLUMES_SHARED_DATA")
    path = Path(override) if override else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip("../shared/data not found: real-data tests need the shared folder beside the checkout")
    return path
