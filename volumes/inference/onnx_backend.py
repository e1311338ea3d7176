"""A CPU path through ONNX Runtime: the slice encoder and the 2D decoder exported to ONNX.

``volumes infer --backend onnxruntime`` (or :func:`use_backend`) replaces a bundle's
encoder (and a segmenter's 2D decoder) by modules that run an ONNX Runtime
``InferenceSession`` on the CPU; the aggregator, the 1x1 head, the 3D refinement and
everything around them stay in torch. ``onnxruntime-int8`` also quantises the encoder's
weights to int8 (``onnxruntime.quantization.quantize_dynamic``; the decoder stays fp32).
``openvino`` compiles the same ONNX files with OpenVINO for the CPU (``pip install
'volumes[openvino]'``).

Export: ``torch.onnx.export`` (TorchScript exporter, opset 17) with a dynamic slice axis, on
the first batch of each slice size (the position grid is resampled for that size and
recorded as a constant, so a file is valid for one slice size and any slice count). The
file is cached beside the bundle's weights, ``models/onnx/<part>-<key>.onnx``, keyed by a
hash of the parameters, the options that change the outputs, the slice size, the opset and
the torch version; it is written under a temporary name and renamed.

Parity: fp32 features within 1e-4 of torch (tests/test_onnx_backend.py). Not covered:
DINOv3 (rotary position embeddings) and encoders over 2 GB (ONNX's protobuf limit).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from volumes.atomic import atomic_path
from volumes.encoders.slice_encoder import SliceEncoder, SliceFeatures
from volumes.errors import VolumesError

__all__ = ["BACKENDS", "OPSET", "OnnxDecoder", "OnnxSliceEncoder", "require_onnxruntime", "require_openvino",
           "use_backend"]

BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8", "openvino")
OPSET = 17


def _require(runtime: str, extra: str) -> Any:
    """The ``runtime`` module (and onnx, which ``torch.onnx.export`` writes through), or a
    :class:`VolumesError` naming the extra to install."""
    try:
        __import__("onnx")
        return __import__(runtime)
    except ImportError as exc:
        raise VolumesError(f"--backend {runtime} needs onnx and {runtime} ({exc.name} is not installed): "
                           f"pip install 'volumes[{extra}]'") from exc


def require_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or a :class:`VolumesError` naming the ``onnx`` extra."""
    return _require("onnxruntime", "onnx")


def require_openvino() -> Any:
    """The ``openvino`` module, or a :class:`VolumesError` naming the ``openvino`` extra."""
    return _require("openvino", "openvino")


class _OpenVinoSession:
    """An ONNX file compiled by OpenVINO for the CPU, with ONNX Runtime's ``run(outputs, feeds)``."""

    def __init__(self, path: Path):
        ov = require_openvino()
        core = ov.Core()
        # the cores torch would use; latency: one request at a time, as the slab loop calls it; fp32
        # (OpenVINO computes in bf16 by default on CPUs with AVX512-BF16: features off by ~1e-2)
        config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32"}
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def run(self, outputs: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.request.infer(feeds)
        return [np.array(results[self.compiled.output(name)]) for name in outputs]


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _state_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _Exported:
    """One exported part: an ONNX file per slice size, cached on disk, and its session."""

    def __init__(self, module: nn.Module, cache_dir: Path, kind: str, identity: str, outputs: Sequence[str],
                 inputs: Sequence[str], quantize: bool, runtime: str = "onnxruntime"):
        self.runtime = runtime
        self.ort = require_openvino() if runtime == "openvino" else require_onnxruntime()
        self.module, self.cache_dir, self.kind = module, Path(cache_dir), kind
        self.identity, self.outputs, self.inputs, self.quantize = identity, list(outputs), list(inputs), quantize
        self.sessions: dict[tuple, Any] = {}
        self.paths: dict[tuple, Path] = {}

    def path_for(self, size: tuple) -> Path:
        key = _digest(self.kind, self.identity, size, OPSET, torch.__version__, self.quantize)
        return self.cache_dir / f"{self.kind}-{'int8-' if self.quantize else ''}{key[:20]}.onnx"

    def _export(self, path: Path, example: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            self.module(*example)  # warm-up: caches the position grid for this size (a constant in the graph)
            with atomic_path(path, suffix=".onnx") as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about sizes taken as constants
                axes = {name: {0: "slices"} for name in (*self.inputs, *self.outputs)}
                torch.onnx.export(self.module, tuple(example), str(tmp), opset_version=OPSET, dynamo=False,
                                  input_names=self.inputs, output_names=self.outputs, dynamic_axes=axes)
                if self.quantize:
                    from onnxruntime.quantization import QuantType, quantize_dynamic

                    fp32 = tmp.with_name(tmp.name + ".fp32.onnx")
                    tmp.rename(fp32)
                    try:
                        quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8)
                    finally:
                        fp32.unlink(missing_ok=True)

    def session(self, example: Sequence[torch.Tensor]) -> Any:
        size = tuple(tuple(t.shape[1:]) for t in example)
        if size not in self.sessions:
            path = self.path_for(size)
            if not path.is_file():
                try:
                    self._export(path, example)
                except OSError as exc:
                    raise VolumesError(f"{path}: cannot write the ONNX export ({exc})") from exc
            if self.runtime == "openvino":
                self.sessions[size] = _OpenVinoSession(path)
            else:
                options = self.ort.SessionOptions()
                options.intra_op_num_threads = torch.get_num_threads()  # the cores torch would use
                # no busy-waiting after a call: torch runs next (aggregator, 3D refinement) on the same cores
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                self.sessions[size] = self.ort.InferenceSession(str(path), options,
                                                                providers=["CPUExecutionProvider"])
            self.paths[size] = path
        return self.sessions[size]

    def run(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        session = self.session(tensors)
        feeds = {name: np.ascontiguousarray(t.detach().float().cpu().numpy()) for name, t in zip(self.inputs, tensors)}
        return [torch.from_numpy(out) for out in session.run(self.outputs, feeds)]


class _EncoderGraph(nn.Module):
    """What is exported: slices ``[n, 3, h, w]`` -> cls ``[n, E]``, patch mean ``[n, E]``, grids ``[n, E, h/p, w/p]``."""

    def __init__(self, encoder: SliceEncoder, layers: Sequence[int]):
        super().__init__()
        self.encoder, self.layers = encoder, tuple(layers)

    def forward(self, slices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        saved = self.encoder.layers
        self.encoder.layers = self.layers
        try:
            features = self.encoder._encode_chunk(slices, True)
        finally:
            self.encoder.layers = saved
        return (features.cls, features.patch_mean, *features.patch_grids)


class OnnxSliceEncoder(nn.Module):
    """A :class:`SliceEncoder` run by ONNX Runtime: ``forward(slices [N, 3, h, w], with_grids)`` -> :class:`SliceFeatures`.

    ``chunk_size`` slices per session call, as the torch encoder. The exported graph returns
    the grids of the encoder's ``layers``; ``layers`` may be set to a subset of them. Other
    attributes are the torch encoder's (which stays for them and for the export).
    """

    def __init__(self, encoder: SliceEncoder, cache_dir: str | Path, *, quantize: bool = False,
                 runtime: str = "onnxruntime"):
        super().__init__()
        if encoder.num_registers:
            raise VolumesError(f"--backend {runtime}: {encoder.name} has register tokens, not exported yet")
        if quantize and runtime != "onnxruntime":
            raise VolumesError(f"--backend {runtime}: int8 quantisation is done with onnxruntime only")
        self.torch_encoder = encoder
        self.exported_layers = tuple(sorted(set(encoder.layers)))
        self.layers = tuple(encoder.layers)
        self.backend = "onnxruntime-int8" if quantize else runtime
        outputs = ["cls", "patch_mean", *(f"grid_{i}" for i in self.exported_layers)]
        identity = _digest(encoder.fingerprint(), encoder.name, self.exported_layers, encoder.norm_intermediates,
                           encoder.pos_embed_interpolation)
        self.graph = _Exported(_EncoderGraph(encoder, self.exported_layers), cache_dir, "encoder", identity, outputs,
                               ["slices"], quantize, runtime)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("torch_encoder"), name)

    def forward(self, slices: torch.Tensor, *, with_grids: bool = True) -> SliceFeatures:
        self.torch_encoder.check_input(slices)
        missing = [i for i in self.layers if i not in self.exported_layers]
        if with_grids and missing:
            raise VolumesError(f"the ONNX export of {self.name} has the grids of blocks {list(self.exported_layers)}; "
                               f"asked for {missing}")
        parts = []
        for start in range(0, len(slices), self.chunk_size):
            cls, mean, *grids = self.graph.run(slices[start : start + self.chunk_size])
            by_layer = dict(zip(self.exported_layers, grids))
            chosen = tuple(by_layer[i].to(slices.device) for i in self.layers) if with_grids else ()
            parts.append(SliceFeatures(cls=cls.to(slices.device), registers=cls.new_zeros(len(cls), 0, cls.shape[1]),
                                       patch_mean=mean.to(slices.device), patch_grids=chosen))
        return SliceFeatures.cat(parts)


class _DecoderGraph(nn.Module):
    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, g0: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, g3: torch.Tensor,
                slices: torch.Tensor) -> torch.Tensor:
        return self.decoder([g0, g1, g2, g3], slices)


class OnnxDecoder(nn.Module):
    """A :class:`~volumes.decoders.SliceUNetDecoder` run by ONNX Runtime.

    ``forward(grids 4 x [n, E, h/p, w/p], slices [n, 3, h, w]) -> features [n, F, h, w]``.
    """

    def __init__(self, decoder: nn.Module, cache_dir: str | Path, *, runtime: str = "onnxruntime"):
        super().__init__()
        self.torch_decoder = decoder
        identity = _digest(_state_digest(decoder), type(decoder).__name__)
        self.graph = _Exported(_DecoderGraph(decoder), cache_dir, "decoder", identity, ["features"],
                               ["g0", "g1", "g2", "g3", "slices"], False, runtime)

    def forward(self, grids: Sequence[torch.Tensor], slices: torch.Tensor) -> torch.Tensor:
        if len(grids) != 4:
            raise ValueError(f"the decoder needs 4 patch grids (shallow to deep), got {len(grids)}")
        (features,) = self.graph.run(*grids, slices)
        return features.to(slices.device)


def use_backend(model: Any, backend: str, cache_dir: str | Path | None = None) -> Any:
    """Run ``model`` (a :class:`~volumes.inference.bundles.BundleModel`) on ``backend``; returns it.

    ``torch`` changes nothing. ``onnxruntime`` / ``onnxruntime-int8`` / ``openvino`` replace the
    network's encoder (and a segmenter's decoder) in place, exported to ``cache_dir`` (default:
    ``onnx/`` beside the weights); the backend joins the model's settings, so ``--resume``
    redoes cases run with another one.

    Raises:
        VolumesError: an unknown backend, its runtime missing, or a network that does not run on the CPU.
    """
    if backend not in BACKENDS:
        raise VolumesError(f"--backend {backend!r}: choose one of {list(BACKENDS)}")
    if backend == "torch":
        return model
    runtime = "openvino" if backend == "openvino" else "onnxruntime"
    require_openvino() if runtime == "openvino" else require_onnxruntime()
    predictor = model.predictor
    network = predictor.network
    if torch.device(predictor.device).type != "cpu":
        raise VolumesError(f"--backend {backend} is a CPU path; run it with --device cpu")
    encoder = getattr(network, "encoder", None)
    if not isinstance(encoder, SliceEncoder):
        raise VolumesError(f"{model.bundle_id}: --backend {backend} needs a network with a SliceEncoder")
    cache = Path(cache_dir) if cache_dir is not None else Path(model.weights).parent / "onnx"
    network.encoder = OnnxSliceEncoder(encoder, cache, quantize=backend == "onnxruntime-int8", runtime=runtime)
    if model.task == "segmentation":
        network.decoder = OnnxDecoder(network.decoder, cache, runtime=runtime)
    model.settings = {**model.settings, "backend": backend}
    model.__dict__.pop("model_key", None)  # recomputed with the backend
    return model
