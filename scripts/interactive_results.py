#!/usr/bin/env python
"""Clicks and few-shot labels on frozen features, measured: writes docs/INTERACTIVE_RESULTS.md.

In one run, on this machine:

1. **Training**: the click model (frozen ViT-S/14 features + CT windows + DeepGrow click
   maps) and the DeepGrow 3D baseline (the same network and training without features),
   with the same steps, on the training split of the segmentation phantoms, clicking
   liver, spleen and both kidneys only.
2. **The click protocol** (:mod:`volumes.interactive.simulate`), 10 clicks per object:
   click model, DeepGrow 3D and an intensity GraphCut (training-free) on the phantoms'
   test split, for the seen classes and the unseen ones (aorta, vertebrae), and on the
   real example CT with its TotalSegmentator masks (when ``../shared`` is there).
   Few-shot from 1 and 3 painted slices.
3. **Speed**: a phantom resampled to 512 x 512 x 300: the first click (load, prepare,
   encode, click) and the later ones, peak memory; the encoder's share.

A benchmark, not a test: every figure is measured in the run that writes the file, with
the CPU named. From the repository root::

    .venv/bin/python scripts/interactive_results.py --work-dir /tmp/interactive_results
    .venv/bin/python scripts/interactive_results.py --encoder-weights runs/pretrain/encoder.safetensors \\
        --work-dir /tmp/interactive_pretrained --output /tmp/interactive_pretrained.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from volumes.reporting import command_line, machine_line  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "totalsegmentator_example"
SEEN = {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4}
UNSEEN = {"aorta": 5, "vertebrae": 6}
LABELS = ["background", "liver", "spleen", "kidney_left", "kidney_right", "aorta", "vertebrae"]
METHODS = ("clicks", "deepgrow", "graphcut")
NAMES = {"clicks": "click model (ours)", "deepgrow": "DeepGrow 3D (same network, no features)",
         "graphcut": "GraphCut (intensity, training-free)"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, required=True)
    p.add_argument("--output", type=Path, default=REPO / "docs" / "INTERACTIVE_RESULTS.md")
    p.add_argument("--encoder-weights", default=None, help="e.g. volumes pretrain's encoder.safetensors (default: random)")
    p.add_argument("--depth", type=int, default=4, help="ViT-S/14 blocks")
    p.add_argument("--cases", type=int, default=24, help="segmentation phantoms (60/20/20 split)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--clicks", type=int, default=10)
    p.add_argument("--speed-shape", type=int, nargs=3, default=[512, 512, 300])
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke run of the script")
    args = p.parse_args(argv)
    if args.quick:
        args.cases, args.steps, args.clicks, args.speed_shape = 8, 4, 3, [128, 128, 60]
    return args


def cached(path: Path, compute) -> Any:
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value, indent=1, default=float) + "\n")
    return value


def real_ct_datalist(work: Path) -> Path | None:
    """The example CT with its TotalSegmentator masks in our label values, as a one-case datalist."""
    if not (SHARED / "example_ct.nii.gz").is_file():
        return None
    import importlib.util

    import nibabel as nib

    spec = importlib.util.spec_from_file_location("segmentation_results", REPO / "scripts" / "segmentation_results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    mapping = module.label_mapping(SHARED / module.CLASS_MAP_FILE, LABELS)
    seg = nib.load(SHARED / module.SEG_FILE)
    values = np.asarray(seg.dataobj).astype(np.int64)
    lookup = np.zeros(int(values.max()) + 1, np.uint8)
    for ts_id, ours in mapping.items():
        if ts_id < len(lookup):
            lookup[ts_id] = ours
    reference = work / "real_ct_label.nii.gz"
    nib.save(nib.Nifti1Image(lookup[values], seg.affine), reference)
    datalist = work / "real_ct_datalist.json"
    datalist.write_text(json.dumps({"test": [{"image": str(SHARED / module.CT_FILE), "label": str(reference)}]}))
    return datalist


def speed(model_dir: Path, work: Path, shape: Sequence[int], clicks: int) -> dict[str, Any]:
    """First and later clicks on a large volume, in a fresh process (peak memory of that process)."""
    code = f"""
import json, resource, sys, time
import numpy as np, torch, nibabel as nib
sys.path.insert(0, {str(REPO)!r})
from volumes.data.phantoms import generate_phantom
from volumes.interactive.service import InteractiveModel, load_case
from volumes.interactive.simulate import centre_of, next_click, dice
shape = {list(shape)!r}
work = __import__('pathlib').Path({str(work)!r})
image_path, label_path = work / 'large_ct.nii.gz', work / 'large_label.nii.gz'
if not image_path.is_file():
    ph = generate_phantom(1234)
    extent = np.array(ph.image.shape) * np.array(ph.spacing)
    spacing = extent / np.array(shape)
    t = torch.from_numpy(ph.image)[None, None].float()
    big = torch.nn.functional.interpolate(t, size=tuple(shape), mode='trilinear', align_corners=False)[0, 0]
    lab = torch.nn.functional.interpolate(torch.from_numpy(ph.label)[None, None].float(), size=tuple(shape), mode='nearest')[0, 0]
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(big.numpy().astype(np.int16), affine), image_path)
    nib.save(nib.Nifti1Image(lab.numpy().astype(np.uint8), affine), label_path)
model = InteractiveModel({str(model_dir)!r})
start = time.perf_counter()
volume, spacing, label, _ = load_case(image_path, label_path)
load_s = time.perf_counter() - start
vf, hit = model.features(volume, spacing, key='large')
encode_s = vf.encode_s
prepare_s = time.perf_counter() - start - load_s - encode_s
truth = (label == 1).numpy()
fg, bg, order, rows = [centre_of(truth, spacing)], [], [True], []
for i in range({clicks}):
    t0 = time.perf_counter()
    mask, info = model.click(vf, fg, bg, key='liver', order=order)
    rows.append({{'seconds': time.perf_counter() - t0, 'dice': dice(mask, truth)}})
    step = next_click(truth, mask, spacing)
    if step is None:
        break
    (fg if step[1] else bg).append(step[0]); order.append(step[1])
# automatic segmentation of the same file, for comparison: the segmentation bundle's preparation (native slices,
# 112 px) and SliceSegmenter (this encoder + the light decoder; untrained weights cost the same) over every slice
from volumes.networks import SliceSegmenter
from volumes.transforms import preprocessing
segmenter = SliceSegmenter(encoder=model.encoder, num_classes=7).eval()
t0 = time.perf_counter()
volume2, _, _, _ = load_case(image_path)
auto_load_s = time.perf_counter() - t0
prepared = preprocessing(preset='ct_abdomen_windows', channel_mode='windows', size=112)({{'image': volume2}})['image']
with torch.inference_mode():
    segmenter.per_slice(torch.as_tensor(prepared).permute(3, 0, 1, 2).float())
auto_s = time.perf_counter() - t0
print(json.dumps({{'auto_s': auto_s, 'auto_load_s': auto_load_s, 'auto_slices': int(prepared.shape[-1]), 'shape': shape, 'grid': list(vf.grid.grid_shape), 'load_s': load_s, 'prepare_s': prepare_s,
                  'encode_s': encode_s, 'clicks': rows, 'features_mb': vf.nbytes / 1e6,
                  'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- summary
def table(rows: list[dict], labels: dict[str, int], clicks: int) -> tuple[list[str], list[list[str]]]:
    from volumes.interactive.simulate import clicks_to_reach, dice_at

    def as_rows(r):
        return [{"click": i + 1, "dice": d} for i, d in enumerate(r["dice"])]

    ks = sorted({1, 3, 5, clicks})
    header = ["method", "objects", *(f"Dice@{k}" for k in ks), "clicks to 0.85", "clicks to 0.90"]
    out = []
    for method in METHODS:
        group = [r for r in rows if r["method"] == method and r["label"] in labels]
        if not group:
            continue
        cells = [NAMES[method], str(len(group))]
        for k in ks:
            cells.append(f"{np.mean([dice_at(as_rows(r), k) for r in group]):.3f}")
        for target in (0.85, 0.90):
            reached = [clicks_to_reach(as_rows(r), target) for r in group]
            hit = [c for c in reached if c is not None]
            cells.append(f"{np.mean(hit):.1f} ({len(hit)}/{len(group)})" if hit else f"- (0/{len(group)})")
        out.append(cells)
    for k in (1, 3):
        group = [r for r in rows if r["method"] == f"fewshot-{k}" and r["label"] in labels]
        if group:
            value = f"{np.mean([r['dice'][0] for r in group]):.3f}"
            out.append([f"few-shot, {k} painted slice{'s' if k > 1 else ''}", str(len(group)), value,
                        *([""] * (len(header) - 3))])
    return header, out


def per_label(rows: list[dict], clicks: int) -> tuple[list[str], list[list[str]]]:
    from volumes.interactive.simulate import dice_at

    names = [n for n in LABELS[1:] if any(r["label"] == n for r in rows)]
    header = ["method"] + [f"{n} @5" for n in names]
    out = []
    for method in (*METHODS, "fewshot-1", "fewshot-3"):
        cells = [NAMES.get(method, method)]
        for n in names:
            group = [r for r in rows if r["method"] == method and r["label"] == n]
            if not group:
                cells.append("")
                continue
            k = 1 if method.startswith("fewshot") else 5
            cells.append(f"{np.mean([dice_at([{'click': i + 1, 'dice': d} for i, d in enumerate(r['dice'])], k) for r in group]):.3f}")
        out.append(cells)
    return header, out


def render(ctx: dict[str, Any]) -> str:
    from volumes.reporting import markdown_table

    lines = ["# Clicks and few-shot labels on frozen features: measured", "",
             f"Written by `{ctx['command']}` on {ctx['date']}.", "", f"Machine: {ctx['machine']}.", "",
             f"Encoder: {ctx['encoder']}. **{ctx['encoder_note']}**", ""]
    t = ctx["training"]
    lines += [f"Training (phantoms, training split: {t['cases']} volumes; clicked objects: liver, spleen, both kidneys): "
              f"{ctx['steps']} steps of batch 2 each; click model {t['click_model.safetensors']['seconds'] / 60:.1f} min, "
              f"DeepGrow 3D {t['deepgrow3d.safetensors']['seconds'] / 60:.1f} min"
              + (f" ({t['deepgrow3d.safetensors']['note']})" if t['deepgrow3d.safetensors'].get('note') else "")
              + f"; last training loss (Dice + CE, mean of the last 10 steps): click model "
              f"{t['click_model.safetensors']['last_loss']:.2f}, DeepGrow 3D {t['deepgrow3d.safetensors']['last_loss']:.2f}.", ""]
    for title, key in (("Phantoms, test split", "phantoms"), ("Real example CT (TotalSegmentator masks)", "real_ct")):
        if key not in ctx:
            continue
        rows = ctx[key]["rows"]
        lines += [f"## {title}", ""]
        for name, labels in (("seen in training (liver, spleen, kidneys)", SEEN), ("unseen (aorta, vertebrae)", UNSEEN)):
            header, body = table(rows, labels, ctx["clicks"])
            lines += [f"**Classes {name}**: mean Dice after k clicks of the standard protocol; few-shot rows: Dice "
                      "from the painted slices alone. \"clicks to 0.85\": mean over the objects that got there (how many did).", "",
                      markdown_table(header, body), ""]
        header, body = per_label(rows, ctx["clicks"])
        lines += ["Per object, Dice after 5 clicks (few-shot: from the painted slices):", "", markdown_table(header, body), ""]
    s = ctx["speed"]
    later = [r["seconds"] for r in s["clicks"][1:]]
    lines += ["## Speed", "",
              f"A phantom resampled to {' x '.join(map(str, s['shape']))} (working grid {' x '.join(map(str, s['grid']))}), "
              "one process, clicks on the liver by the protocol:", "",
              markdown_table(["step", "seconds"], [
                  ["load the NIfTI", f"{s['load_s']:.1f}"], ["prepare (z merge, windows, resize)", f"{s['prepare_s']:.1f}"],
                  ["encode every working slice (once per volume)", f"{s['encode_s']:.1f}"],
                  ["first click (network + mapping back)", f"{s['clicks'][0]['seconds']:.2f}"],
                  [f"later clicks (mean of {len(later)}, max)", f"{np.mean(later):.2f}, {np.max(later):.2f}" if later else "-"]]),
              "", f"Automatic segmentation of the same file for comparison (load, the segmentation bundle's "
              f"preparation of all {s['auto_slices']} native slices at 112 px, this encoder + the light decoder; "
              f"no inversion): {s['auto_s']:.1f} s, of which {s['auto_load_s']:.1f} s loading the (now cached) file, "
              f"against {s['load_s'] + s['prepare_s'] + s['encode_s'] + s['clicks'][0]['seconds']:.1f} s to the first "
              f"click's mask, of which {s['load_s']:.1f} s loading it the first time; without loading: "
              f"{s['auto_s'] - s['auto_load_s']:.1f} s against {s['prepare_s'] + s['encode_s'] + s['clicks'][0]['seconds']:.1f} s.",
              "", f"Features kept in memory for this volume: {s['features_mb']:.0f} MB; peak memory of the process: "
              f"{s['peak_rss_gb']:.1f} GB. Dice of the liver after {len(s['clicks'])} clicks: {s['clicks'][-1]['dice']:.3f}.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from volumes.interactive.service import InteractiveConfig
    from volumes.interactive.workflow import simulate, train
    from volumes.bundle import ensure_phantom_cohort
    from volumes.interactive import ClickTrainingConfig

    args = parse_args(argv)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    say = lambda text: print(f"[{datetime.now():%H:%M:%S}] {text}", flush=True)  # noqa: E731
    data = Path(ensure_phantom_cohort(work / "seg", n=args.cases, kind="segmentation"))
    model_dir = work / "model"
    config = InteractiveConfig(encoder_weights=args.encoder_weights, encoder_model_kwargs={"depth": args.depth})
    training = ClickTrainingConfig(labels=SEEN, steps=args.steps)
    say("training the click model and DeepGrow 3D")
    trained = cached(work / "training.json", lambda: train(data, model_dir, config=config, training=training,
                                                           baseline=True))
    everything = {**SEEN, **UNSEEN}
    say("the click protocol on the phantoms' test split")
    ctx: dict[str, Any] = {"training": trained, "steps": args.steps, "clicks": args.clicks}
    ctx["phantoms"] = cached(work / "phantoms.json", lambda: simulate(
        model_dir, data, labels=everything, clicks=args.clicks, methods=METHODS, fewshot=(1, 3)))
    real = real_ct_datalist(work)
    if real is not None:
        say("the click protocol on the real example CT")
        ctx["real_ct"] = cached(work / "real_ct.json", lambda: simulate(
            model_dir, real, labels=everything, clicks=args.clicks, methods=METHODS, fewshot=(1, 3)))
    say("speed on a large volume")
    ctx["speed"] = cached(work / "speed.json", lambda: speed(model_dir, work, args.speed_shape, min(args.clicks, 6)))
    ctx.update(command=command_line("interactive_results.py", argv), machine=machine_line(threads),
               date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               encoder=f"vit_small_patch14_dinov2 cut to {args.depth} blocks, 112 px slices, CT windows ct_abdomen_windows",
               encoder_note=("Random-initialised encoder: no pretrained weights reach this machine. Rerun with "
                             "--encoder-weights (timm/Meta/Hugging Face weights or `volumes pretrain`'s "
                             "encoder.safetensors) for real features.") if args.encoder_weights is None
               else f"Weights: {args.encoder_weights}.")
    args.output.write_text(render(ctx))
    say(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
