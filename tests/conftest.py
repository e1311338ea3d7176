"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (or ``$VOLUMES_SHARED_DATA``); skips when absent."""
    from volumes.paths import shared_data_dir

    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip("../shared/data not found: real-data tests need the shared folder beside the checkout")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on a shared 2-core machine a second thread waits on a busy core."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def classification_cohort(tmp_path_factory) -> Path:
    """The datalist of a 48-case hepatomegaly phantom cohort (half training), written once per session."""
    from volumes.data.phantoms import PhantomConfig, write_cohort

    root = tmp_path_factory.mktemp("classification_cohort")
    return write_cohort(root / "phantoms", 48, seed=0, config=PhantomConfig.classification_demo(),
                        splits=(0.5, 0.25, 0.25), progress=False)
