"""nnU-Net v2 itself as the baseline of scripts/real_results.py: its raw layout, its planning, a budgeted training.

    python scripts/nnunet_baseline.py convert --datalist D --modality CT --dataset-id 501
    python scripts/nnunet_baseline.py train --dataset-id 501 --modality CT --fold 0 --budget-s 200

The caller sets ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results``. Planning,
preprocessing and prediction are nnU-Net's own commands (``nnUNetv2_plan_and_preprocess``,
``nnUNetv2_predict``); this file only writes the raw dataset (with our folds as
``splits_final.json``, so nnU-Net sees the same patients as ours) and trains the
3d_fullres configuration within a wall-clock budget: nnU-Net's trainer unchanged except for
the length of its schedule (its default, 1000 epochs x 250 iterations, would take months on
2 CPU cores at about 40 s per iteration).
A dataset holds one modality (nnU-Net normalises by channel name: CT by the dataset's
HU percentiles, anything else by z-score per image).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def dataset_name(dataset_id: int, modality: str) -> str:
    return f"Dataset{dataset_id:03d}_STS{modality}"


def convert(datalist: Path, modality: str, dataset_id: int) -> Path:
    """nnU-Net raw dataset of one modality's cases (links to the files) and our folds as its splits."""
    from volumes.data.labelled import fold_items, read_datalist

    content = read_datalist(datalist)
    raw = Path(os.environ["nnUNet_raw"]) / dataset_name(dataset_id, modality)
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    cases = [e for e in content["training"] if e["modality"] == modality]
    for entry in cases:
        for source, target in ((entry["image"], raw / "imagesTr" / f"{entry['case_id']}_0000.nii.gz"),
                               (entry["label"], raw / "labelsTr" / f"{entry['case_id']}.nii.gz")):
            if not target.exists():
                target.symlink_to(Path(source).resolve())
    labels = {name: int(value) for value, name in content["labels"].items()}
    spec = {"channel_names": {"0": modality}, "labels": labels, "numTraining": len(cases), "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps(spec, indent=1) + "\n")
    # nnU-Net trains on the other folds' patients (no inner validation) and its "val" is our test fold
    splits = []
    for fold in range(content["num_folds"]):
        test = [e["case_id"] for e in fold_items(datalist, fold, "test", modality=modality)]
        splits.append({"train": sorted(e["case_id"] for e in cases if e["case_id"] not in test), "val": sorted(test)})
    (raw / "splits_final.json").write_text(json.dumps(splits, indent=1) + "\n")
    return raw


def train(dataset_id: int, modality: str, fold: int, budget_s: float, iterations: int) -> Path:
    """nnU-Net's 3d_fullres trainer on the CPU for ``budget_s`` seconds of training; returns its checkpoint.

    Epochs of ``iterations`` iterations (and one validation iteration) until the budget is
    spent. After the first epoch the number of epochs is set to what fits the budget, so
    nnU-Net's poly learning-rate schedule runs to its end within it. What was done is
    written to ``budget.json`` beside the checkpoint.
    """
    import shutil
    import time

    import torch
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerBudget(nnUNetTrainer):
        """The stock trainer (architecture, augmentation, loss, poly schedule) within a wall-clock budget."""

        # nnU-Net records its init arguments by name (inspect.signature): the same explicit signature
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cpu")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = 1
            self.num_epochs = 10_000  # until the first epoch says how many fit

        def run_training(self):  # nnU-Net's hooks, in nnU-Net's order, with a clock
            self.on_train_start()
            start = time.perf_counter()
            while self.current_epoch < self.num_epochs:
                self.on_epoch_start()
                self.on_train_epoch_start()
                outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
                self.on_train_epoch_end(outputs)
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    self.on_validation_epoch_end([self.validation_step(next(self.dataloader_val))])
                self.on_epoch_end()
                if self.current_epoch == 1:  # the schedule's length: the epochs that fit the budget
                    fit = int(budget_s // (time.perf_counter() - start))
                    self.num_epochs = max(1, fit)
                    self.lr_scheduler.max_steps = self.num_epochs
            self.train_seconds = time.perf_counter() - start
            self.on_train_end()

    name = dataset_name(dataset_id, modality)
    preprocessed = Path(nnUNet_preprocessed) / name
    shutil.copy(Path(os.environ["nnUNet_raw"]) / name / "splits_final.json", preprocessed / "splits_final.json")
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    torch.set_num_threads(os.cpu_count() or 1)
    trainer = nnUNetTrainerBudget(plans=plans, configuration="3d_fullres", fold=fold, dataset_json=dataset_json,
                                  device=torch.device("cpu"))
    trainer.run_training()
    checkpoint = Path(trainer.output_folder) / "checkpoint_final.pth"
    # nnUNetv2_predict rebuilds the network through the trainer class named in the checkpoint,
    # looked up inside the nnunetv2 package: name the stock class, whose architecture this is
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)  # nnU-Net's own file, written above
    state["trainer_name"] = "nnUNetTrainer"
    torch.save(state, checkpoint)
    (checkpoint.parent / "budget.json").write_text(json.dumps({
        "budget_s": budget_s, "epochs": trainer.current_epoch, "iterations_per_epoch": iterations,
        "train_iterations": trainer.current_epoch * iterations, "train_s": round(trainer.train_seconds, 1)}) + "\n")
    return checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--datalist", type=Path, required=True)
    c.add_argument("--modality", choices=["CT", "MR"], required=True)
    c.add_argument("--dataset-id", type=int, required=True)
    t = sub.add_parser("train")
    t.add_argument("--dataset-id", type=int, required=True)
    t.add_argument("--modality", choices=["CT", "MR"], required=True)
    t.add_argument("--fold", type=int, required=True)
    t.add_argument("--budget-s", type=float, required=True, help="training wall-clock, seconds")
    t.add_argument("--iterations", type=int, default=2, help="training iterations per epoch")
    args = parser.parse_args(argv)
    if args.command == "convert":
        print(convert(args.datalist, args.modality, args.dataset_id))
    else:
        print(train(args.dataset_id, args.modality, args.fold, args.budget_s, args.iterations))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
