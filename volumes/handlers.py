"""Handlers the bundles' training configs attach to MONAI's engines (kept apart so ``volumes.bundle`` stays light)."""

from __future__ import annotations

import logging
from typing import Any

from monai.handlers import ValidationHandler as MonaiValidationHandler

__all__ = ["ValidationHandler"]

logger = logging.getLogger(__name__)


class ValidationHandler(MonaiValidationHandler):
    """MONAI's ``ValidationHandler`` that also validates once when training ends between two intervals.

    With MONAI's own, a run shorter than ``interval`` (``--epochs 1`` with the default
    ``validation_interval`` 5) never validates, so the checkpoint saver, which keeps the best
    validated weights, writes no ``model.pt``; nor do the last epochs after the final interval
    count. Here the validator also runs on ``COMPLETED`` when the last iteration was not
    validated, before the handlers attached after this one (quality control, calibration),
    so every finished run leaves its checkpoint.
    """

    _validated_at: int | None = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        super().attach(engine)
        engine.add_event_handler(Events.COMPLETED, self._at_end)

    def __call__(self, engine: Any) -> None:
        super().__call__(engine)
        self._validated_at = engine.state.iteration

    def _at_end(self, engine: Any) -> None:
        if self._validated_at != engine.state.iteration and engine.state.iteration > 0:
            logger.info(
                "training ended at epoch %d, between two validations (every %d %s): validating the last weights",
                engine.state.epoch, self.interval, "epochs" if self.epoch_level else "iterations")
            self(engine)
