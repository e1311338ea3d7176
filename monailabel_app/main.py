"""MONAI Label app serving the repository's two bundles to 3D Slicer and other MONAI Label clients.

Start it (see docs/MONAI_LABEL.md)::

    .venv-monailabel/bin/monailabel start_server --app monailabel_app --studies /path/to/niftis \\
        --host 127.0.0.1 --port 8000 --conf models all --conf zoo_source github

Models (``--conf models segmentation,classification`` or ``all``):

* ``segmentation``: bundles/dinov2_unet_segmentation, a segmentation infer task (label
  names from the bundle's config) and a train task on the images with a ``final`` label;
* ``classification``: bundles/dinov2_slice_classification, a classification infer task
  (JSON probabilities and slice importance) and a train task on the images whose
  datastore info has a ``class_label``.

With ``--conf interactive_model DIR`` (a click model folder, docs/INTERACTIVE.md) two more
infer tasks: ``clicks`` (type deepgrow: positive and negative clicks on any structure) and
``fewshot`` (type scribbles: a new label from one to three painted slices).

Active learning strategies: ``random`` and ``first`` (MONAI Label's) and ``uncertainty``
(the segmentation model's mean softmax entropy). The datastore is MONAI Label's
:class:`LocalDatastore` over the ``--studies`` folder's NIfTI volumes, each upload read and
checked before it is stored (:mod:`lib.uploads`: 422 for a 2D, truncated, non-NIfTI or NaN file).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

import torch
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.batch_infer import BatchInferTask
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from lib.bundles import ModelBundle
from lib.config import KNOWN_KEYS, AppConfig, ConfError, parse_conf
from lib.infers import ClassificationInfer, SegmentationInfer
from lib.security import check_bind_host
from lib.strategies import Uncertainty
from lib.trainers import ClassificationTrain, SegmentationTrain
from lib.uploads import CheckedDatastore

logger = logging.getLogger(__name__)

#: ``--conf`` keys MONAI Label itself reads; not reported as unknown.
MONAILABEL_KEYS = frozenset({"zoo_source", "zoo_repo", "server_mode"})

#: The NIfTI volumes the datastore lists.
NIFTI_EXTENSIONS = ("*.nii.gz", "*.nii")


class SingleDeviceBatchInfer(BatchInferTask):
    """MONAI Label's batch inference, kept off multi-GPU unless the app allows it and GPUs exist.

    With ``multi_gpu`` (the request's default) MONAI Label spreads images over
    ``cuda:0..N-1`` and, with no GPU, over an empty list; here each image runs on the
    request's device instead.
    """

    def __init__(self, multi_gpu: bool, device: str | None) -> None:
        super().__init__()
        self.multi_gpu = multi_gpu
        self.device = device

    def __call__(self, request: dict[str, Any], datastore: Datastore, infer: Callable) -> dict[str, Any]:
        request = dict(request)
        if not (self.multi_gpu and torch.cuda.device_count() > 1):
            request["multi_gpu"] = False
        if not torch.cuda.is_available():
            request["device"] = "cpu"
        elif self.device and "device" not in request:
            request["device"] = self.device
        return super().__call__(request, datastore, infer)


class VolumesApp(MONAILabelApp):
    """The app: infer and train tasks for both bundles, three strategies, a local NIfTI datastore."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        try:
            self.settings: AppConfig = parse_conf(conf or {}, app_dir)
        except ConfError as exc:
            raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, str(exc)) from exc
        check_bind_host(sys.argv, self.settings.allow_remote)
        unknown = sorted(set(conf or {}) - KNOWN_KEYS - MONAILABEL_KEYS)
        if unknown:
            logger.warning("unknown --conf keys (ignored): %s", unknown)

        self.bundles = {name: ModelBundle(name, self.settings) for name in self.settings.models}
        for bundle in self.bundles.values():
            bundle.ensure_checkpoint()
        labels = self.bundles["segmentation"].labels()[1:] if "segmentation" in self.bundles else []
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="volumes: DINOv2 slice models",
            description="Organ segmentation and volume classification of CT with the volumes bundles",
            version=", ".join(f"{b.root.name} {b.version()}" for b in self.bundles.values()),
            labels=labels,
        )

    def init_datastore(self) -> Datastore:
        """MONAI Label's local datastore over the ``--studies`` folder's NIfTI volumes; uploads checked first."""
        if self.studies.startswith(("http://", "https://")):
            raise MONAILabelException(MONAILabelError.APP_INIT_ERROR,
                                      "this app serves a local folder of NIfTI volumes; --studies must be a path")
        logger.info("datastore: %s (NIfTI volumes, labels under labels/<tag>/)", self.studies)
        return CheckedDatastore(
            self.studies,
            extensions=NIFTI_EXTENSIONS,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        device = self.settings.device
        infers: dict[str, InferTask] = {}
        if "segmentation" in self.bundles:
            infers["segmentation"] = SegmentationInfer(self.bundles["segmentation"], device=device)
        if "classification" in self.bundles:
            infers["classification"] = ClassificationInfer(self.bundles["classification"], device=device)
        if self.settings.interactive_model is not None:
            from lib.interactive import ClickInfer, FewShotInfer, InteractiveService

            service = InteractiveService(self.settings.interactive_model, self.settings.interactive_cache_mb, device)
            names = list(self.bundles["segmentation"].labels()[1:]) if "segmentation" in self.bundles else []
            names += [n for n in service.model.saved_labels() if n not in names]
            infers["clicks"] = ClickInfer(service, names or ["object"])
            infers["fewshot"] = FewShotInfer(service, names or ["object"])
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        s = self.settings
        trainers: dict[str, TrainTask] = {}
        if "segmentation" in self.bundles:
            trainers["segmentation"] = SegmentationTrain(
                self.bundles["segmentation"], "Fine-tune the segmentation bundle on the final labels",
                epochs=s.epochs, val_split=s.val_split, seed=s.seed, device=s.device)
        if "classification" in self.bundles:
            trainers["classification"] = ClassificationTrain(
                self.bundles["classification"], "Fine-tune the classification bundle on the images' class_label",
                epochs=s.epochs, val_split=s.val_split, seed=s.seed, device=s.device)
        return trainers

    def init_strategies(self) -> dict[str, Strategy]:
        strategies: dict[str, Strategy] = {"random": Random(), "first": First()}
        infer = self._infers.get("segmentation")
        if isinstance(infer, SegmentationInfer):
            cache = self.settings.uncertainty_cache or self.settings.model_dir / "uncertainty.json"
            strategies["uncertainty"] = Uncertainty(infer, cache, device=self.settings.device)
        return strategies

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's infer; a request our tasks cannot use is answered 422 with what is wrong (not a bare 500)."""
        from fastapi import HTTPException

        from volumes.errors import VolumesError

        bad_input: tuple = (VolumesError,)
        if "clicks" in self._infers:
            from lib.interactive import PromptError

            bad_input += (PromptError,)
        image = request.get("image")
        if isinstance(image, str) and image and not os.path.exists(image) and \
                not (datastore or self.datastore()).get_image_uri(image):
            raise HTTPException(status_code=404, detail=f"image {image!r} is not in the datastore "
                                                        "(GET /datastore/?output=all lists its images)")
        try:
            return super().infer(request, datastore)
        except bad_input as exc:
            logger.info("infer %s: bad request: %s", request.get("model"), exc)
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        except MONAILabelException as exc:  # an unknown model, or an image the datastore does not hold
            raise HTTPException(status_code=404 if "not" in str(exc).lower() else 400, detail=str(exc)) from exc

    def init_batch_infer(self) -> Callable:
        return SingleDeviceBatchInfer(self.settings.multi_gpu, self.settings.device)
