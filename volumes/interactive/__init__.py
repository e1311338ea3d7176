"""Interactive and few-shot segmentation on frozen foundation features (``docs/INTERACTIVE.md``).

* :mod:`~volumes.interactive.grid`: the working grid and its exact mapping to the loaded grid;
* :mod:`~volumes.interactive.session`: features encoded once per volume, kept in an LRU;
* :mod:`~volumes.interactive.model`: the click model (and, without features, DeepGrow 3D);
* :mod:`~volumes.interactive.segmenter`: clicks in, mask out, window by window, with guarantees;
* :mod:`~volumes.interactive.fewshot`: a new label from one to three painted slices;
* :mod:`~volumes.interactive.training`: simulated clicks by MONAI's DeepGrow transforms;
* :mod:`~volumes.interactive.simulate`: the standard click protocol;
* :mod:`~volumes.interactive.graphcut`: a training-free baseline (intensity GraphCut);
* :mod:`~volumes.interactive.service`: a click model folder loaded (:class:`InteractiveModel`),
  the one session the MONAI Label app, the CLI and the bundle call;
* :mod:`~volumes.interactive.workflow`: train a folder, run the click protocol on it.
"""

from volumes.interactive.fewshot import FewShotHead
from volumes.interactive.grid import WorkGrid
from volumes.interactive.model import ClickNet
from volumes.interactive.segmenter import ClickSegmenter, ClickState
from volumes.interactive.session import FeatureStore, VolumeFeatures, encode_volume
from volumes.interactive.training import ClickTrainingConfig, load_click_model, save_click_model, train_click_model

__all__ = ["WorkGrid", "FeatureStore", "VolumeFeatures", "encode_volume", "ClickNet", "ClickSegmenter", "ClickState",
           "FewShotHead", "ClickTrainingConfig", "train_click_model", "save_click_model", "load_click_model"]
