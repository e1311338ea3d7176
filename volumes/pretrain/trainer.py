"""The DINOv2 recipe, scaled to fit: one training step, its schedules, checkpoints, metrics and collapse checks.

Per step (:meth:`Pretrainer.step`), on a batch of multi-crop views of slices
(:mod:`volumes.pretrain.data`):

* the teacher (an EMA of the student) encodes the 2 global views; its class tokens go
  through the DINO head, its patch tokens at the masked positions through the iBOT head;
* the student encodes the global views with block masks on half of them (ratio 0.1-0.5,
  lightly's ``random_block_mask``) and the local views unmasked;
* loss = DINO (class tokens, every student view against the other global teacher view)
  + ``ibot_weight`` x iBOT (masked patches) + ``koleo_weight`` x KoLeo (the student's global
  class tokens), with the teacher's targets centred (running mean) or balanced by
  Sinkhorn-Knopp (``centering="sinkhorn"``);
* AdamW with layer-wise lr decay, lr warm-up then cosine, weight decay cosine up, the
  heads' last layers frozen for the first steps, the backbone frozen for the first
  ``freeze_backbone_steps`` (continued pretraining), gradient clipping; then the teacher
  follows the student with a momentum that goes cosine to 1, and the teacher temperature
  warms up linearly.

bf16 autocast (SDPA comes with timm's attention) on CUDA, fp32 on a CPU. Under torchrun
the student is wrapped in DistributedDataParallel (gloo on CPUs, NCCL on GPUs), each
rank streams its share of the cases, the loss centres are all-reduced (lightly), and
rank 0 writes the outputs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from volumes.atomic import atomic_path, atomic_write_bytes, sweep_temporaries
from volumes.curves import TrainingCurves
from volumes.errors import ConfigError, VolumesError
from volumes.pretrain.config import RESUMABLE, PretrainConfig
from volumes.pretrain.recipe import (ADVICE, collapse_metrics, collapse_signs, cosine, cross_entropy, learning_rate,
                                     teacher_temperature)

__all__ = ["CollapseError", "PretrainResult", "Pretrainer", "bundle_arguments", "pretrain", "run"]

CHECKPOINT = "checkpoint.pt"
ENCODER = "encoder.safetensors"
ENCODER_JSON = "encoder.json"
METRICS = "metrics.jsonl"
#: TensorBoard event files of the same metrics: ``tensorboard --logdir OUT/tensorboard``
TENSORBOARD = "tensorboard"
#: their TensorBoard sections: the losses, the schedules, the collapse signs, the speed
CURVE_GROUPS = {**dict.fromkeys(("loss", "dino", "ibot", "koleo", "grad_norm"), "loss"),
                **dict.fromkeys(("lr", "weight_decay", "momentum", "teacher_temp"), "schedule"),
                **dict.fromkeys(("cls_std", "effective_rank", "teacher_entropy", "teacher_marginal_entropy"),
                                "collapse"),
                **dict.fromkeys(("slices_per_s", "images_per_s", "seconds"), "speed")}
FORMAT = 1


class CollapseError(VolumesError):
    """The representation collapsed for ``collapse_patience`` steps: the run stopped."""


@dataclass
class PretrainResult:
    """What a run left: the encoder for the bundles, the metrics, the cost."""

    out: Path
    encoder: Path
    steps: int
    seconds: float
    slices_per_s: float
    images_per_s: float
    last: dict[str, float]
    skipped: int
    #: the step this process started from (0, or the checkpoint's step when resumed)
    first_step: int = 0

    def line(self) -> str:
        ran = self.steps - self.first_step
        which = f"{ran} steps" if self.first_step == 0 else (
            f"{ran} steps (resumed at step {self.first_step}, now {self.steps} of {self.steps})")
        return (f"{which} in {self.seconds:.0f} s ({self.slices_per_s:.1f} slices/s, "
                f"{self.images_per_s:.1f} views/s); loss {self.last.get('loss', float('nan')):.3f}; "
                f"encoder: {self.encoder}; {self.skipped} case(s) skipped")


# ---------------------------------------------------------------------- the trainer
def data_fingerprint(cases: Sequence[dict[str, Any]]) -> str:
    """sha256 of the case list: ids, paths and file sizes (MedMNIST: the arrays' bytes)."""
    digest = hashlib.sha256()
    for case in cases:
        digest.update(str(case["case_id"]).encode())
        if "array" in case:
            digest.update(memoryview(case["array"].tobytes()))
            continue
        path = Path(case["image"])
        digest.update(str(path).encode())
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in files:
            try:
                digest.update(f"{f.name}:{f.stat().st_size}".encode())
            except OSError:
                digest.update(f"{f.name}:missing".encode())
    return digest.hexdigest()


def _check_modalities(cases: list[dict], source: str) -> None:
    """Under ``preset="auto"`` every case must say CT or MR before training starts (DICOM series say it themselves)."""
    from volumes.data.labelled import modality_of

    unknown, wrong = [], []
    for case in cases:
        if "modality" not in case:
            if not Path(case.get("image", "")).is_dir():  # a DICOM series folder carries its Modality tag
                unknown.append(str(case.get("image", case["case_id"])))
            continue
        try:
            modality_of(case["modality"])
        except ConfigError:
            wrong.append(f"{case.get('image')}: {case['modality']!r}")
    if unknown or wrong:
        listed = "; ".join((wrong + unknown)[:5]) + (f" and {len(wrong) + len(unknown) - 5} more" if len(wrong) + len(unknown) > 5 else "")
        raise VolumesError(f"{source}: --preset auto prepares each volume by its modality, and {len(unknown) + len(wrong)} "
                           f"case(s) have no CT or MR modality ({listed}); give a datalist with a 'modality' field "
                           "(volumes datalist writes one) or --modality CT|MR|PATTERN=CT,PATTERN=MR")


class Pretrainer:
    """One pretraining run: build or resume, :meth:`run` the steps, write the encoder.

    Args:
        config: the settings.
        resume: continue from ``OUT/checkpoint.pt`` (refused when a setting other than
            :data:`RESUMABLE` differs; the message names it).
    """

    def __init__(self, config: PretrainConfig, *, resume: bool = False):
        from volumes.devices import resolve_device, torchrun_rank
        from volumes.pretrain.data import SliceSpec, list_cases

        self.config = config
        self.settings = config.resolved()
        self.out = Path(config.out)
        self.rank, self.world = torchrun_rank(timeout_minutes=30)
        self.device = torch.device(resolve_device(config.device, distributed=self.world > 1))
        self.spec = SliceSpec(preset=config.preset, channel_mode=config.channel_mode, size=config.size,
                              planes=tuple(config.planes), min_foreground=config.min_foreground, jitter=config.jitter)
        self.cases = list_cases(config.data, config.modality)
        if config.preset == "auto":
            _check_modalities(self.cases, config.data)
        self.settings["data_fingerprint"] = data_fingerprint(self.cases)
        # a refused --resume says so before the model's imports and build (lightly alone takes seconds)
        checkpoint = self._read_checkpoint() if resume else None
        if checkpoint is None:
            torch.manual_seed(config.seed)
        # the output folder only once the model is built: a failed start (bad --weights) leaves no empty folder
        self._build()
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:  # a killed run's half-written checkpoint or encoder; only rank 0 writes here
            for folder in (self.out, self.out / "skipped"):
                sweep_temporaries(folder, unknown_after_s=0)
        self.step_index = 0
        self.slices_seen = 0
        self.collapsed_for = 0
        if checkpoint is not None:
            self._restore(checkpoint)

    def _build(self) -> None:
        """Student and teacher, multi-crop, optimiser, losses (and DDP under torchrun)."""
        from volumes.pretrain.data import MultiCrop
        from volumes.pretrain.model import PretrainModel, parameter_groups

        config = self.config
        self.model = PretrainModel(config.encoder, weights=config.weights, pretrained=config.pretrained,
                                   model_kwargs=config.model_kwargs, prototypes=config.prototypes,
                                   ibot_prototypes=config.ibot_prototypes, separate_ibot_head=config.separate_ibot_head,
                                   head_hidden=config.head_hidden, head_bottleneck=config.head_bottleneck,
                                   drop_path=config.drop_path, layer_scale=config.layer_scale).to(self.device)
        self.crops = MultiCrop(self.spec, patch_size=self.model.patch_size, local_crops=config.local_crops)
        self.groups = parameter_groups(self.model, config.layer_decay)
        self.optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in self.groups],
                                           lr=self.settings["lr"], betas=(0.9, 0.999))
        from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss

        self.dino_loss = DINOLoss(output_dim=config.prototypes, student_temp=config.student_temp).to(self.device)
        self.ibot_loss = IBOTPatchLoss(output_dim=config.ibot_prototypes, student_temp=config.student_temp).to(self.device)
        self.koleo_loss = KoLeoLoss()
        self.student = self.model.student
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # a batch without a masked image leaves the mask token unused
            self.student = DistributedDataParallel(self.model.student, device_ids=ids, find_unused_parameters=True)

    # ------------------------------------------------------------------ checkpoints
    def _read_checkpoint(self) -> dict[str, Any] | None:
        path = self.out / CHECKPOINT
        if not path.is_file():
            raise VolumesError(f"--resume: {path} does not exist (nothing to resume; run without --resume)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise VolumesError(f"--resume: {path} cannot be read ({type(exc).__name__}: {exc})") from exc
        if state.get("format") != FORMAT:
            raise VolumesError(f"--resume: {path} has format {state.get('format')!r}, this version reads {FORMAT}")
        saved = state["settings"]
        for key in sorted(set(saved) | set(self.settings)):
            if key in RESUMABLE:
                continue
            if saved.get(key) != self.settings.get(key):
                raise VolumesError(f"--resume: {key} was {saved.get(key)!r} in {path}, now {self.settings.get(key)!r}; "
                                   f"resume with the same {key} or start a new run in another --out")
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.dino_loss.load_state_dict(state["dino_loss"])
        self.ibot_loss.load_state_dict(state["ibot_loss"])
        torch.set_rng_state(state["rng"])
        self.step_index = int(state["step"])
        self.slices_seen = int(state["slices_seen"])
        self.collapsed_for = int(state["collapsed_for"])

    def save_checkpoint(self) -> Path:
        """The full state, atomically: a kill loses at most ``checkpoint_every`` steps."""
        state = {"format": FORMAT, "settings": self.settings, "step": self.step_index,
                 "slices_seen": self.slices_seen, "collapsed_for": self.collapsed_for,
                 "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "dino_loss": self.dino_loss.state_dict(), "ibot_loss": self.ibot_loss.state_dict(),
                 "rng": torch.get_rng_state()}
        path = self.out / CHECKPOINT
        with atomic_path(path, suffix=".pt") as tmp:
            torch.save(state, tmp)
        return path

    def save_encoder(self) -> Path:
        """``OUT/encoder.safetensors`` (the teacher's ViT, timm keys) and ``OUT/encoder.json`` (what it is)."""
        from safetensors.torch import save_file

        path = self.out / ENCODER
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(self.model.teacher_backbone_state(), str(tmp), metadata={"format": "pt"})
        from volumes.pretrain.data import merge_skipped

        skipped = merge_skipped(self.out)
        s = self.settings
        info = {
            "encoder": s["encoder"], "model_kwargs": s["model_kwargs"], "patch_size": self.model.patch_size,
            "embed_dim": self.model.embed_dim, "depth": self.model.depth,
            "preprocessing_config": self.spec.preprocessing_config(), "planes": list(self.spec.planes),
            "steps": self.step_index, "of_steps": s["steps"], "slices_seen": self.slices_seen,
            "started_from": s["weights"] or ("timm hub" if s["pretrained"] else "random initialisation"),
            "data": s["data"], "data_fingerprint": s["data_fingerprint"], "cases": len(self.cases),
            "skipped_cases": len(skipped),
            "recipe": {k: s[k] for k in ("batch_size", "lr", "layer_decay", "prototypes", "ibot_prototypes",
                                         "centering", "koleo_weight", "ibot_weight", "local_crops", "momentum",
                                         "teacher_temp", "drop_path")},
            "bundle_settings": {"encoder": s["encoder"], "encoder_weights": str(path.resolve()),
                                "encoder_model_kwargs": s["model_kwargs"],
                                "preprocessing_config": self.spec.preprocessing_config()},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        text = json.dumps(info, indent=1) + "\n"
        atomic_write_bytes(self.out / ENCODER_JSON, lambda f: f.write(text.encode()))
        return path

    # ------------------------------------------------------------------ data
    def loader(self) -> torch.utils.data.DataLoader:
        from volumes.pretrain.data import SliceStream

        c = self.config
        stream = SliceStream(self.cases, self.crops, patch_size=self.model.patch_size, seed=c.seed, rank=self.rank,
                             world=self.world, restart=self.step_index, cache_volumes=c.cache_volumes,
                             slices_per_volume=c.slices_per_volume, skipped_dir=self.out / "skipped")
        workers = c.num_workers if c.num_workers is not None else max(1, min(4, (os.cpu_count() or 2) - 1))
        return torch.utils.data.DataLoader(stream, batch_size=c.batch_size, num_workers=workers,
                                           pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                                           prefetch_factor=2 if workers > 0 else None)

    # ------------------------------------------------------------------ one step
    def _set_schedules(self, step: int) -> dict[str, float]:
        s = self.settings
        lr = learning_rate(step, s)
        wd = cosine(step, s["steps"], *s["weight_decay"])
        frozen_backbone = step < s["freeze_backbone_steps"]
        frozen_last = step < s["freeze_last_layer_steps"]
        for group in self.optimizer.param_groups:
            off = (group["backbone"] and frozen_backbone) or (group["last_layer"] and frozen_last)
            group["lr"] = 0.0 if off else lr * group["lr_scale"]
            group["weight_decay"] = wd * group["wd_scale"]
        return {"lr": lr, "weight_decay": wd, "momentum": cosine(step, s["steps"], *s["momentum"]),
                "teacher_temp": teacher_temperature(step, s)}

    def _masks(self, n: int, grid: tuple[int, int]) -> torch.Tensor:
        from lightly.models.utils import random_block_mask

        low, high = self.config.mask_ratio
        # blocks of at least 4 patches (DINOv2), fewer on a small grid where the lowest ratio masks fewer
        smallest = max(1, min(4, int(low * grid[0] * grid[1])))
        return random_block_mask(size=(n, *grid), batch_mask_ratio=self.config.mask_probability,
                                 min_image_mask_ratio=low, max_image_mask_ratio=high,
                                 min_num_masks_per_block=smallest, max_num_masks_per_block=grid[0] * grid[1],
                                 device=self.device)

    def _targets(self, logits: torch.Tensor, temp: float, loss: Any) -> torch.Tensor:
        """The teacher's target distribution: centred softmax (the loss's running centre) or Sinkhorn-Knopp."""
        if self.config.centering == "sinkhorn":
            from lightly.loss.swav_loss import sinkhorn

            return sinkhorn(logits.float(), iterations=3, epsilon=temp, gather_distributed=True)
        center = loss.center if isinstance(loss.center, torch.Tensor) else loss.center.value
        return F.softmax((logits.float() - center.reshape(1, -1)) / temp, dim=-1)

    def step(self, views: Sequence[torch.Tensor]) -> dict[str, float]:
        """One optimisation step on one batch of views (2 global, then the local ones)."""
        c = self.config
        sched = self._set_schedules(self.step_index)
        temp = sched["teacher_temp"]
        views = [v.to(self.device, non_blocking=True) for v in views]
        batch = views[0].shape[0]
        global_views = torch.cat(views[:2])
        prefix = self.model.num_prefix_tokens
        cuda = self.device.type == "cuda"
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
        grid = (global_views.shape[-2] // self.model.patch_size, global_views.shape[-1] // self.model.patch_size)
        block_mask = self._masks(len(global_views), grid)
        mask = torch.zeros((len(global_views), prefix + grid[0] * grid[1]), dtype=torch.bool, device=self.device)
        mask[:, prefix:] = block_mask.flatten(1)
        local = torch.cat(views[2:]) if len(views) > 2 else None
        with autocast:
            with torch.no_grad():
                teacher_cls, t_dino, t_ibot = self.model.teacher(global_views, select=mask)
            s_global_cls, s_dino, s_ibot = self.student(global_views, mask, mask, local)
        t_probs = self._targets(t_dino, temp, self.dino_loss)
        n_views = len(views)
        student_chunks = s_dino.float().chunk(n_views)
        if c.centering == "sinkhorn":
            dino = cross_entropy(list(t_probs.chunk(2)), list(student_chunks), c.student_temp)
        else:
            dino = self.dino_loss(teacher_out=list(t_dino.float().chunk(2)), student_out=list(student_chunks),
                                  teacher_temp=temp)
        ibot = torch.zeros((), device=self.device)
        if s_ibot is not None and c.ibot_weight > 0:
            if c.centering == "sinkhorn":
                targets = self._targets(t_ibot, temp, self.ibot_loss)
                per_token = -(targets * F.log_softmax(s_ibot.float() / c.student_temp, dim=-1)).sum(dim=-1)
                weight = (1.0 / block_mask.sum(dim=(1, 2), keepdim=True).clamp(min=1.0)).expand_as(block_mask)[block_mask]
                ibot = (per_token * weight).sum() / len(block_mask)
            else:
                ibot = self.ibot_loss(teacher_out=t_ibot.float(), student_out=s_ibot.float(), mask=block_mask,
                                      teacher_temp=temp)
        koleo = sum(self.koleo_loss(t) for t in s_global_cls.float().chunk(2)) if c.koleo_weight > 0 else torch.zeros(())
        loss = dino + c.ibot_weight * ibot + c.koleo_weight * koleo
        if not torch.isfinite(loss):
            raise VolumesError(f"step {self.step_index}: the loss is {float(loss)} (dino {float(dino):.3f}, "
                               f"ibot {float(ibot):.3f}, koleo {float(koleo):.3f}); lower --lr or --clip-grad")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.student.parameters(), c.clip_grad)
        self.optimizer.step()
        self.model.update_teacher(sched["momentum"])
        self.step_index += 1
        self.slices_seen += batch * self.world
        loss, dino, ibot, koleo = (float(torch.as_tensor(v).detach()) for v in (loss, dino, ibot, koleo))
        metrics = {"loss": loss, "dino": dino, "ibot": ibot, "koleo": koleo,
                   "grad_norm": float(grad_norm), **sched}
        metrics.update(collapse_metrics(teacher_cls, t_probs))
        return metrics


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of steps up to ``step`` (a resumed run rewrites what the killed one logged after it)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write_bytes(path, lambda f: f.write("".join(kept).encode()))


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: GPU memory allocated on CUDA, the resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _any_rank(flag: bool, world: int) -> bool:
    if world <= 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def teacher_fingerprint(model: Any) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.teacher_backbone_state().items():
        digest.update(name.encode())
        digest.update(tensor.float().numpy().tobytes())
    return digest.hexdigest()


def _check_ranks_agree(model: Any, world: int) -> str:
    """The teacher's fingerprint, the same on every rank (raises when the ranks drifted apart)."""
    mine = teacher_fingerprint(model)
    if world <= 1:
        return mine
    import torch.distributed as dist

    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine)
    if len(set(every)) != 1:
        raise VolumesError(f"the ranks ended with different teachers ({every}); DDP lost synchronisation")
    return mine


def run(trainer: Pretrainer) -> PretrainResult:
    """Run the remaining steps of ``trainer`` with an Ignite engine; checkpoints, metrics, collapse checks."""
    from ignite.engine import Engine, Events
    from tqdm.auto import tqdm

    s, out, rank = trainer.settings, trainer.out, trainer.rank
    total, first = s["steps"], trainer.step_index
    views_per_slice = 2 + trainer.config.local_crops
    if rank == 0:
        _truncate_metrics(out / METRICS, first)
    bar = tqdm(total=total, initial=first, desc="pretrain", unit="step",
               disable=not trainer.config.progress or rank != 0)
    curves = TrainingCurves(out / TENSORBOARD, first_step=first, groups=CURVE_GROUPS) if rank == 0 else None
    started = time.perf_counter()
    state = {"last": {}, "slices": 0}

    def process(engine: Any, views: list[torch.Tensor]) -> dict[str, float]:
        return trainer.step(views)

    engine = Engine(process)

    @engine.on(Events.ITERATION_COMPLETED)
    def after_step(engine: Any) -> None:
        metrics = engine.state.output
        step = trainer.step_index
        state["slices"] += trainer.config.batch_size * trainer.world
        elapsed = time.perf_counter() - started
        rate = state["slices"] / max(elapsed, 1e-9)
        metrics.update(step=step, slices_per_s=rate, images_per_s=rate * views_per_slice, seconds=elapsed)
        state["last"] = metrics
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", slices_s=f"{rate:.1f}", images_s=f"{rate * views_per_slice:.0f}",
                        refresh=False)
        signs = collapse_signs(metrics, s["prototypes"], s["collapse_std"]) if step > s["warmup_steps"] else []
        trainer.collapsed_for = trainer.collapsed_for + 1 if _any_rank(bool(signs), trainer.world) else 0
        log = step % s["log_every"] == 0 or step == total or trainer.collapsed_for >= s["collapse_patience"]
        if log and rank == 0:
            line = json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}) + "\n"
            with open(out / METRICS, "a") as handle:
                handle.write(line)
            curves.add(metrics, step)
        if trainer.collapsed_for >= s["collapse_patience"]:
            what = "; ".join(signs) or "another rank's class tokens collapsed"
            raise CollapseError(f"pretraining stopped at step {step}: for {trainer.collapsed_for} steps {what}. "
                                f"The last checkpoint before it is {out / CHECKPOINT}; to go on, {ADVICE}")
        if (step % s["checkpoint_every"] == 0 or step == total) and rank == 0:
            trainer.save_checkpoint()
            trainer.save_encoder()

    try:
        if total > first:
            engine.run(trainer.loader(), max_epochs=1, epoch_length=total - first)
        elif rank == 0:
            trainer.save_encoder()
    finally:
        bar.close()
        if curves is not None:
            curves.close()
    from volumes.pretrain.data import merge_skipped

    skipped = merge_skipped(out) if rank == 0 else []
    if trainer.step_index < total:  # the stream ended: every reader ran out of readable cases
        raise VolumesError(f"{trainer.config.data}: no readable case (after {trainer.step_index} of {total} steps; "
                           f"the reasons are in {out / 'skipped.csv'})")
    fingerprint = _check_ranks_agree(trainer.model, trainer.world)
    if trainer.world > 1:
        import torch.distributed as dist

        dist.barrier()
    elapsed = time.perf_counter() - started
    rate = state["slices"] / max(elapsed, 1e-9)
    last = dict(state["last"], peak_memory_mb=peak_memory_mb(trainer.device), teacher_sha256=fingerprint)
    return PretrainResult(out=out, encoder=out / ENCODER, steps=trainer.step_index, seconds=elapsed,
                          slices_per_s=rate, images_per_s=rate * views_per_slice, last=last, skipped=len(skipped),
                          first_step=first)


def bundle_arguments(encoder_json: str | Path) -> str:
    """The ``monai.bundle run`` arguments that give a bundle the encoder of ``OUT/encoder.json``.

    Every setting the bundle needs, not only the weights: a 4-block encoder or another slice
    size fails in a bundle that keeps its own ``encoder_model_kwargs`` or ``preprocessing_config``.
    Values are Python literals, as ``fire`` (monai.bundle's argument parser) reads them.
    """
    import shlex

    def literal(value: Any) -> str:  # a Python literal with double-quoted strings (reads like the JSON it came from)
        if isinstance(value, dict):
            return "{" + ", ".join(f"{json.dumps(str(k))}: {literal(v)}" for k, v in value.items()) + "}"
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(literal(v) for v in value) + "]"
        return json.dumps(value) if isinstance(value, str) else repr(value)

    settings = json.loads(Path(encoder_json).read_text())["bundle_settings"]
    return " ".join(f"--{key} {shlex.quote(value if isinstance(value, str) else literal(value))}"
                    for key, value in settings.items())


def pretrain(config: PretrainConfig, *, resume: bool = False) -> PretrainResult:
    """``volumes pretrain``: build (or resume) and run; the encoder lands in ``OUT/encoder.safetensors``."""
    return run(Pretrainer(config, resume=resume))
