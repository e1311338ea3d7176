"""Clinical-style batch inference: ``python -m volumes infer`` and the bundles' ``inference.json``.

* :mod:`~volumes.inference.predictors`: what a bundle does to one loaded case.
* :mod:`~volumes.inference.bundles`: a bundle loaded as a model (identity, weights hash).
* :mod:`~volumes.inference.runner`: the batch - prefetch, fault isolation, resume, torchrun.
* :mod:`~volumes.inference.ray_engine`: the same per-case stages and merge on a Ray cluster.
* :mod:`~volumes.inference.dicom_seg`: DICOM SEG output referencing the source series.
* :mod:`~volumes.inference.figures`: the figure of each case (views, mask, importance, QC badge).
* :mod:`~volumes.inference.report`: ``report.html``.
"""

from volumes.inference.bundles import BundleModel, load_bundle
from volumes.inference.predictors import ClassificationPredictor, SegmentationPredictor
from volumes.inference.runner import BatchInference, CaseLoader, InferenceSummary, PreparedCase

__all__ = [
    "BatchInference",
    "BundleModel",
    "CaseLoader",
    "ClassificationPredictor",
    "InferenceSummary",
    "PreparedCase",
    "SegmentationPredictor",
    "load_bundle",
]
