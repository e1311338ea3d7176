"""Small helpers the MONAI bundles call from their JSON configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from volumes.errors import ConfigError


def ensure_phantom_cohort(dataset_dir: str | Path, n: int = 40, seed: int = 0, task: str = "hepatomegaly",
                          kind: str = "classification") -> str:
    """The datalist of ``dataset_dir``; writes a synthetic phantom cohort there first if it has none.

    Lets ``python -m monai.bundle run`` train out of the box; point ``dataset_dir`` at a
    folder with your own ``datalist.json`` to train on real data. The cohort is
    :meth:`PhantomConfig.classification_demo` (``kind="classification"``) or
    :meth:`PhantomConfig.segmentation_demo` (``kind="segmentation"``) with ``task``.
    """
    if kind not in ("classification", "segmentation"):
        raise ConfigError("kind", kind, ["classification", "segmentation"])
    dataset_dir = Path(dataset_dir)
    datalist = dataset_dir / "datalist.json"
    if not datalist.is_file():
        from volumes.data.phantoms import PhantomConfig, write_cohort

        config = getattr(PhantomConfig, f"{kind}_demo")(task=task)
        write_cohort(dataset_dir, n=n, seed=seed, config=config, progress=False)
    return str(datalist)


def datalist_section(datalist: str | Path, section: str) -> list[dict[str, Any]]:
    """Items of one section of a MONAI datalist, with paths made absolute and a ``case_id``."""
    datalist = Path(datalist)
    if not datalist.is_file():
        raise FileNotFoundError(f"{datalist}: datalist not found (set dataset_dir to a folder with datalist.json)")
    content = json.loads(datalist.read_text())
    if section not in content:
        raise ConfigError("datalist section", section, [k for k, v in content.items() if isinstance(v, list)])
    items = []
    for item in content[section]:
        item = {"image": item} if isinstance(item, str) else dict(item)
        for key in ("image", "label"):
            if isinstance(item.get(key), str):
                item[key] = str((datalist.parent / item[key]).resolve())
        item.setdefault("case_id", Path(item["image"]).name.split(".")[0])
        items.append(item)
    return items


def load_network_weights(network, checkpoint: str | Path, key: str = "model"):
    """Load a bundle checkpoint (``{"model": state_dict}`` or a bare state dict) into ``network``.

    Loaded before anything runs the network: with a frozen random-initialised encoder the
    encoder weights in the checkpoint are part of what the aggregator was trained on.
    """
    import torch

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: checkpoint not found; train first or set ckpt_path")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and key in state and isinstance(state[key], dict):
        state = state[key]
    network.load_state_dict(state, strict=True)
    return network


def input_items(source: str | Path, section: str = "test") -> list[dict[str, Any]]:
    """Inference inputs: a datalist JSON (its ``section``), a CSV or a folder of volumes / DICOM series."""
    source = Path(source)
    if source.suffix == ".json":
        return datalist_section(source, section)
    from volumes.data.discovery import discover_cases

    return [case.to_dict() | {"image": str(case.image)} for case in discover_cases(source)]
