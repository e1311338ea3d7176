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


@pytest.fixture
def verify_bundle_metadata(tmp_path, shared_data):
    """``verify(metadata_json)``: MONAI's verify_metadata against the schema in ``../shared/monai`` (skips without it)."""
    import shutil

    schema = shared_data.parent / "monai" / "meta_schema_20240725.json"
    if not schema.is_file():
        pytest.skip(f"{schema} not found")
    local = tmp_path / "schema.json"
    shutil.copy(schema, local)  # verify_metadata writes beside the schema

    def verify(meta_file: Path) -> None:
        from monai import bundle as monai_bundle

        monai_bundle.verify_metadata(meta_file=str(meta_file), filepath=str(local))
    return verify
