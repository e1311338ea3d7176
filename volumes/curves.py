"""Training curves as TensorBoard event files, for the trainers that are not MONAI engines.

The bundles' MONAI engines write theirs with MONAI's ``TensorBoardStatsHandler`` (and
MLflow with ``--tracking mlflow``); ``volumes pretrain`` and the click model's training
write theirs here, so every training run of the project is read the same way::

    tensorboard --logdir OUT        # then open http://127.0.0.1:6006
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

__all__ = ["TrainingCurves", "read_scalars"]


class TrainingCurves:
    """Numeric metrics of each logged step -> TensorBoard scalars under ``log_dir``.

    Args:
        log_dir: the folder of the event files (created).
        first_step: the step a resumed run starts from: the events a killed run wrote after
            it are purged (TensorBoard's ``purge_step``), so each step is drawn once.
        groups: tag prefix per metric name (``{"lr": "schedule"}`` writes ``schedule/lr``);
            other metrics keep their name.
    """

    def __init__(self, log_dir: str | Path, *, first_step: int = 0, groups: Mapping[str, str] | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.groups = dict(groups or {})
        self.writer = SummaryWriter(str(log_dir), purge_step=first_step + 1 if first_step > 0 else None)

    def tag(self, name: str) -> str:
        group = self.groups.get(name)
        return f"{group}/{name}" if group else name

    def add(self, metrics: Mapping[str, Any], step: int) -> None:
        """Every number of ``metrics`` (booleans and the ``step`` key left out) as a scalar at ``step``."""
        for name, value in metrics.items():
            if name == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(self.tag(name), float(value), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files under ``log_dir``: tag -> ``[(step, value), ...]`` in step order."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(log_dir))
    multiplexer.Reload()
    out: dict[str, list[tuple[int, float]]] = {}
    for run, tags in multiplexer.Runs().items():
        for tag in tags.get("scalars", []):
            out.setdefault(tag, []).extend((e.step, e.value) for e in multiplexer.Scalars(run, tag))
    return {tag: sorted(values) for tag, values in out.items()}
