"""The MONAI Label app (``monailabel_app/``) with the real MONAI Label server and client.

Runs in the second environment only (``bash scripts/setup_monailabel.sh``, then
``.venv-monailabel/bin/python -m pytest tests/test_monailabel.py``): monailabel 0.8.5 needs
numpy 1.26, pydicom 2 and jsonschema 3, so the main environment skips this file.

A ``monailabel start_server`` subprocess serves both bundles (small random-initialised
networks: a 2-block ViT-S/14 at 56 px) on a free loopback port, with a datastore of six
small phantoms (three with ``final`` labels, one uploaded through the client), and is
stopped (its whole process group) at the end. Everything goes through
``monailabel.client.MONAILabelClient`` except the two endpoints it has no method for
(``PUT /datastore/image/info`` and ``POST /batch/infer``), called with ``requests``.

The training check: the chance level of the six-organ mean Dice on a held-out phantom is
measured in the test (uniform random labels, the best one-organ constant map and the
network before training: 0.04-0.06 here), and after one short training run (30 epochs of
3 steps, about 40 s on 2 cores) the mean Dice must reach 0.3 and three times the best
chance level (measured: 0.58).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "monailabel",
    reason="monailabel is not installed here: run `bash scripts/setup_monailabel.sh`, then "
    "`.venv-monailabel/bin/python -m pytest tests/test_monailabel.py`",
)

import nibabel as nib  # noqa: E402
import requests  # noqa: E402

with warnings.catch_warnings():  # the client imports cgi (deprecated, still in Python 3.11/3.12)
    warnings.simplefilter("ignore", DeprecationWarning)
    from monailabel.client import MONAILabelClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "monailabel_app"
LABELS = ["background", "liver", "spleen", "kidney_left", "kidney_right", "aorta", "vertebrae"]
CLASSES = ["normal_liver", "hepatomegaly"]
CASES = {f"p{i}": i % 2 == 0 for i in range(6)}  # case id -> hepatomegaly (classes balanced)
LABELLED = ["p0", "p1", "p2"]  # with a final label in the datastore from the start
UPLOADED = "p5"  # added through the client
SMALL = ["--conf", "encoder_depth", "2", "--conf", "size", "56"]
# short segmentation training that still learns: 2 slabs of 8 slices per image and step, a higher learning rate
SEG_TRAINING = {"samples_per_volume": 2, "learning_rate": 0.01, "validation_interval": 10}
TRAIN_EPOCHS = 30
STARTUP_TIMEOUT_S = 300
TRAIN_TIMEOUT_S = 900

if str(APP) not in sys.path:
    sys.path.insert(0, str(APP))  # the app's own modules (`lib.*`), for the in-process checks


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            "MONAI_LABEL_SESSION_PATH": str(tmp / "sessions"), "MONAI_LABEL_TRACKING_ENABLED": "false"}


def _monailabel() -> list[str]:
    """The ``monailabel`` command of this environment."""
    script = Path(sys.executable).parent / "monailabel"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "monailabel.main"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_phantoms(base: Path) -> tuple[Path, Path]:
    """Six phantoms: ``studies/`` (p0-p4, final labels for p0-p2) and ``truth/`` (all labels, p5's image)."""
    from volumes.data.phantoms import PhantomConfig, generate_phantom, write_case

    config = PhantomConfig.segmentation_demo(matrix=64, task="hepatomegaly")
    studies, truth, staging = base / "studies", base / "truth", base / "staging"
    (studies / "labels" / "final").mkdir(parents=True)
    truth.mkdir()
    for index, (case, positive) in enumerate(CASES.items()):
        phantom = generate_phantom(200 + index, config, positive=positive)
        assert phantom.class_label == int(positive)
        entry = write_case(phantom, staging, case)
        shutil.copy(staging / entry["label"], truth / f"{case}_label.nii.gz")
        shutil.copy(staging / entry["image"], (truth if case == UPLOADED else studies) / f"{case}.nii.gz")
        if case in LABELLED:
            shutil.copy(staging / entry["label"], studies / "labels" / "final" / f"{case}.nii.gz")
    return studies, truth


def _click_model(base: Path) -> Path:
    """A click model folder (1-block ViT-S/14 at 56 px, a few training steps) for the clicks and fewshot tasks."""
    from volumes.interactive.service import InteractiveConfig
    from volumes.interactive.workflow import train
    from volumes.data.phantoms import PhantomConfig, write_cohort
    from volumes.interactive import ClickTrainingConfig

    datalist = write_cohort(base / "click_data", 2, seed=5, config=PhantomConfig(matrix=64), splits=(1.0, 0.0, 0.0),
                            progress=False)
    out = base / "click_model"
    train(datalist, out, config=InteractiveConfig(encoder_model_kwargs={"depth": 1}, size=56),
          training=ClickTrainingConfig(window=(56, 56, 32), steps=3), progress=False)
    return out


def _stop(process: subprocess.Popen) -> None:
    """Stop the server and everything it started (training subprocesses): its process group."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("monailabel")
    studies, truth = _write_phantoms(base)
    click_model = _click_model(base)
    port = _free_port()
    log = base / "server.log"
    command = [*_monailabel(), "start_server", "--app", str(APP), "--studies", str(studies),
               "--host", "127.0.0.1", "--port", str(port),
               "--conf", "models", "all", "--conf", "zoo_source", "github", "--conf", "multi_gpu", "false",
               "--conf", "model_dir", str(base / "model"), *SMALL,
               "--conf", "segmentation_overrides", json.dumps(SEG_TRAINING),
               "--conf", "interactive_model", str(click_model)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_env(base),
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    client = MONAILabelClient(url, tmpdir=str(base / "client"))
    (base / "client").mkdir()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                client.info()
                break
            except (OSError, Exception):  # connection refused until uvicorn listens
                if time.monotonic() > deadline:
                    pytest.fail(f"server not up after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
                time.sleep(1)
        yield {"url": url, "client": client, "studies": studies, "truth": truth, "base": base, "log": log,
               "process": process}
    finally:
        _stop(process)


# ---------------------------------------------------------------------------- helpers


def _json(params):
    """The client returns a JSON-only infer response as raw bytes."""
    return json.loads(params) if isinstance(params, (bytes, str)) else params


def _mean_dice(pred: np.ndarray, truth_path: Path) -> tuple[float, dict[str, float]]:
    """Mean Dice over the six organs (organs absent from the truth left out) and Dice per organ."""
    from volumes.segmentation import per_case_metrics

    truth = nib.load(truth_path)
    spacing = [float(z) for z in truth.header.get_zooms()[:3]]
    with warnings.catch_warnings():  # HD95 of organs missing from a prediction: nan, with a warning each
        warnings.simplefilter("ignore")
        metrics = per_case_metrics(pred, np.asarray(truth.dataobj), spacing, LABELS)
    dice = {k[len("dice_"):]: v for k, v in metrics.items() if k.startswith("dice_")}
    return float(np.nanmean(list(dice.values()))), dice


def _train(client: MONAILabelClient, model: str, params: dict) -> dict:
    """Start a training task and wait for it (MONAI Label runs it in a subprocess); returns its final status."""
    task = client.train_start(model, params)
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while True:
        status = client.train_status()
        assert status["id"] == task["id"]
        if status["status"] not in ("SUBMITTED", "RUNNING"):
            break
        assert time.monotonic() < deadline, f"training still running after {TRAIN_TIMEOUT_S} s"
        time.sleep(2)
    assert status["status"] == "DONE", "\n".join(status.get("details", []))
    return status


def _infer_seg(client: MONAILabelClient, image_id: str) -> tuple[nib.Nifti1Image, dict]:
    path, params = client.infer("segmentation", image_id, {})
    return nib.load(path), _json(params)


# ---------------------------------------------------------------------------- the app in-process


def test_spacingd_with_image_path_fails_in_monai_but_not_in_the_app(tmp_path):
    """MONAI 1.6's Spacingd calls .update() on MONAI Label's ``image_path`` string; the app's transforms stash it."""
    import torch
    from lib.bundles import ModelBundle
    from lib.config import parse_conf
    from lib.infers import ClassificationInfer, SegmentationInfer
    from monai.transforms import Spacingd
    from volumes.data.io import LoadVolumed
    from volumes.data.phantoms import PhantomConfig, generate_phantom, write_case

    entry = write_case(generate_phantom(7, PhantomConfig.segmentation_demo(matrix=48)), tmp_path, "case")
    image = str(tmp_path / entry["image"])
    loaded = LoadVolumed("image")({"image": image, "image_path": image})
    with pytest.raises(AttributeError, match="update"):
        Spacingd("image", pixdim=(6.0, 6.0, 6.0))(loaded)

    spacing = json.dumps({"preprocessing_config#spacing": [6.0, 6.0, 6.0]})
    conf = {"model_dir": str(tmp_path / "model"), "encoder_depth": "2", "size": "56",
            "segmentation_overrides": spacing, "classification_overrides": spacing}
    settings = parse_conf(conf, APP)
    torch.set_num_threads(1)
    segmentation = SegmentationInfer(ModelBundle("segmentation", settings))
    segmentation.bundle.ensure_checkpoint()
    path, result = segmentation({"image": image, "device": "cpu"})  # BasicInferTask adds image_path
    written, source = nib.load(path), nib.load(image)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    assert set(result["organ_volumes_ml"]) == set(LABELS[1:])
    classification = ClassificationInfer(ModelBundle("classification", settings))
    classification.bundle.ensure_checkpoint()
    path, result = classification({"image": image, "device": "cpu"})
    assert path is None
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_a_published_checkpoint_carries_its_settings_and_never_a_stale_file(tmp_path):
    """model.settings.json travels with model.pt, so inference checks the app's settings against the weights."""
    import torch

    from lib.bundles import ModelBundle
    from lib.config import parse_conf

    from volumes.errors import VolumesError

    settings = parse_conf({"models": "segmentation", "model_dir": str(tmp_path / "model"), "encoder_depth": "1",
                           "size": "28"}, APP)
    bundle = ModelBundle("segmentation", settings)
    checkpoint = bundle.ensure_checkpoint()  # a fresh network: its settings are the config's
    published = checkpoint.with_name("model.settings.json")
    saved = json.loads(published.read_text())
    assert saved["preprocessing"]["size"] == 28 and saved["network"]["encoder_model_kwargs"]["depth"] == 1
    bundle.predictor("cpu")  # loads: the settings fit
    # served with other settings than the weights were trained with: refused, the key named
    other = ModelBundle("segmentation", parse_conf({"models": "segmentation", "model_dir": str(tmp_path / "model"),
                                                     "encoder_depth": "1", "size": "56"}, APP))
    with pytest.raises(VolumesError, match="preprocessing.size: trained with 28, configured 56"):
        other.predictor("cpu")
    # a checkpoint from elsewhere without settings: published without, the old file removed
    foreign = tmp_path / "foreign.pt"
    torch.save(torch.load(checkpoint, weights_only=True), foreign)
    stale = [checkpoint.with_name("model.qc.json"), checkpoint.with_name("model.qc_index.npy")]
    for path in stale:  # a quality-control reference fitted for the weights being replaced
        path.write_text("{}")
    bundle.publish_file(foreign)
    assert not published.exists() and checkpoint.read_bytes() == foreign.read_bytes()
    assert not any(path.exists() for path in stale)


def test_bind_host_check_and_training_split():
    from lib.security import BindAddressError, bind_host, check_bind_host
    from lib.trainers import class_index, split_items

    assert bind_host(["monailabel", "start_server", "--app", "a", "--studies", "s"]) == "0.0.0.0"
    assert bind_host(["monailabel", "start_server", "--host=127.0.0.1"]) == "127.0.0.1"
    assert bind_host(["-m", "monailabel.interfaces.utils.app", "-m", "train"]) is None
    assert check_bind_host(["m", "start_server", "-i", "127.0.0.2"], allow_remote=False) == "127.0.0.2"
    assert check_bind_host(["m", "start_server", "--host", "::1"], allow_remote=False) == "::1"
    with pytest.raises(BindAddressError, match="--host 127.0.0.1"):
        check_bind_host(["m", "start_server", "--host", "0.0.0.0"], allow_remote=False)
    assert check_bind_host(["m", "start_server", "--host", "0.0.0.0"], allow_remote=True) == "0.0.0.0"

    items = [{"case_id": f"c{i}", "class_label": i % 2} for i in range(6)]
    train, val = split_items(items, 0.2, seed=0, stratify="class_label")
    assert {i["class_label"] for i in val} == {0, 1} and len(train) == 4
    assert not {i["case_id"] for i in train} & {i["case_id"] for i in val}
    assert split_items(items[:1], 0.2, seed=0) == (items[:1], items[:1])
    assert [class_index(v, CLASSES) for v in ("hepatomegaly", 0, "1", 2, "x", None, True)] == [1, 0, 1, None, None,
                                                                                                None, None]


def test_server_refuses_to_listen_beyond_loopback_unless_allowed(tmp_path):
    """Without --host, monailabel would listen on 0.0.0.0: the app stops it before it opens a socket."""
    (tmp_path / "studies").mkdir()
    port = _free_port()
    result = subprocess.run(
        [*_monailabel(), "start_server", "--app", str(APP), "--studies", str(tmp_path / "studies"),
         "--port", str(port), "--conf", "models", "segmentation", "--conf", "model_dir", str(tmp_path / "model"),
         *SMALL], capture_output=True, text=True, env=_env(tmp_path), timeout=STARTUP_TIMEOUT_S)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "refusing to listen on 0.0.0.0" in output and "--conf allow_remote true" in output
    assert "Uvicorn running" not in output


# ---------------------------------------------------------------------------- the real server and client


def test_info_lists_both_models_and_their_labels(server):
    info = server["client"].info()
    models = info["models"]
    assert set(models) == {"segmentation", "classification", "clicks", "fewshot"}
    assert models["clicks"]["type"] == "deepgrow" and models["fewshot"]["type"] == "scribbles"
    assert set(models["clicks"]["labels"]) == set(LABELS[1:])
    assert models["segmentation"]["type"] == "segmentation"
    assert models["segmentation"]["labels"] == {name: i for i, name in enumerate(LABELS) if i > 0}
    assert models["classification"]["type"] == "classification"
    assert models["classification"]["labels"] == {name: i for i, name in enumerate(CLASSES)}
    assert info["labels"] == LABELS[1:]
    assert set(info["trainers"]) == {"segmentation", "classification"}
    assert info["trainers"]["segmentation"]["config"]["multi_gpu"] is False
    assert set(info["strategies"]) == {"random", "first", "uncertainty"}


def test_upload_and_datastore_list_images_and_labels(server):
    client = server["client"]
    upload = client.upload_image(str(server["truth"] / f"{UPLOADED}.nii.gz"), UPLOADED,
                                 {"class_label": CLASSES[int(CASES[UPLOADED])]})
    assert upload == {"image": UPLOADED}
    objects = client.datastore()["objects"]
    assert set(objects) == set(CASES)
    assert {k for k, v in objects.items() if "final" in v["labels"]} == set(LABELLED)
    assert objects[UPLOADED]["image"]["info"]["class_label"] == CLASSES[int(CASES[UPLOADED])]


def test_bad_uploads_are_refused_with_what_is_wrong_and_never_stored(server):
    """Issue 34: a 2D, truncated, text or NaN upload was stored and served as the next sample."""
    base, client = server["base"] / "bad_uploads", server["client"]
    base.mkdir(exist_ok=True)
    before = client.datastore()["objects"]
    good = nib.load(server["studies"] / "p3.nii.gz")
    files = {}
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4)), base / "flat.nii.gz")
    files["flat.nii.gz"] = "a volume needs 3 dimensions"
    whole = (server["studies"] / "p3.nii.gz").read_bytes()
    (base / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    files["cut.nii.gz"] = "is not a readable NIfTI volume"
    (base / "notes.txt").write_text("not an image")
    files["notes.txt"] = "the datastore holds NIfTI volumes"
    nans = np.asarray(good.dataobj, np.float32)
    nans[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nans, good.affine), base / "nan.nii.gz")
    files["nan.nii.gz"] = "1 voxels are NaN or infinite"
    for name, said in files.items():
        with open(base / name, "rb") as handle:
            response = requests.put(f"{server['url']}/datastore/image", params={"image": f"bad_{name.split('.')[0]}"},
                                    files={"file": (name, handle)}, data={"params": "{}"}, timeout=60)
        assert response.status_code == 422, (name, response.status_code, response.text)
        assert said in response.json()["detail"] and f"bad_{name.split('.')[0]}" in response.json()["detail"], \
            (name, response.text)
    # a label on another grid than its image
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), base / "small_label.nii.gz")
    with open(base / "small_label.nii.gz", "rb") as handle:
        response = requests.put(f"{server['url']}/datastore/label", params={"image": "p3", "tag": "bad"},
                                files={"label": ("small_label.nii.gz", handle)}, data={"params": "{}"}, timeout=60)
    assert response.status_code == 422 and "its image" in response.json()["detail"], response.text
    assert client.datastore()["objects"] == before  # nothing stored
    assert client.info()["name"]  # and the server goes on


def test_segmentation_infer_returns_a_label_volume_with_the_image_geometry(server):
    client = server["client"]
    label, params = _infer_seg(client, "p3")
    image = nib.load(server["studies"] / "p3.nii.gz")
    assert label.shape == image.shape
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-4)
    values = np.unique(np.asarray(label.dataobj))
    assert set(values.tolist()) <= set(range(len(LABELS)))
    assert params["label_names"] == {name: i for i, name in enumerate(LABELS) if i > 0}
    assert set(params["organ_volumes_ml"]) == set(LABELS[1:])

    # the same volume stored in another voxel order (P, L, S): the label map follows the file
    reoriented = image.as_reoriented(nib.orientations.ornt_transform(
        nib.io_orientation(image.affine), nib.orientations.axcodes2ornt(("P", "L", "S"))))
    other = server["base"] / "p3_pls.nii.gz"
    nib.save(reoriented, other)
    path, _ = client.infer("segmentation", "", {}, file=str(other))
    other_label = nib.load(path)
    assert other_label.shape == reoriented.shape
    np.testing.assert_allclose(other_label.affine, reoriented.affine, atol=1e-4)
    back = other_label.as_reoriented(nib.orientations.ornt_transform(
        nib.io_orientation(other_label.affine), nib.io_orientation(image.affine)))
    assert np.mean(np.asarray(back.dataobj) == np.asarray(label.dataobj)) > 0.999


def test_clicks_add_and_remove_and_the_second_click_reuses_the_features(server):
    """The deepgrow-type task: clicks in file indices in, a binary mask in the image's geometry out."""
    client = server["client"]
    image = nib.load(server["studies"] / "p3.nii.gz")
    truth = np.asarray(nib.load(server["truth"] / "p3_label.nii.gz").dataobj) == 1  # liver, file voxel order
    from volumes.interactive.simulate import centre_of

    spacing = [float(z) for z in image.header.get_zooms()[:3]]
    positive = list(centre_of(truth, spacing))
    path, params = client.infer("clicks", "p3", {"foreground": [positive], "background": [], "label": "liver"})
    first, result = nib.load(path), _json(params)
    assert first.shape == image.shape
    np.testing.assert_allclose(first.affine, image.affine, atol=1e-4)
    mask1 = np.asarray(first.dataobj) > 0
    assert mask1[tuple(positive)]  # the positive click's voxel is in the result
    assert result["feature_cache"] == "miss" and result["label"] == "liver" and "latencies" in result
    assert result["label_names"] == {"liver": 1}  # what was segmented, not every label the app knows
    # a negative click on a voxel the first result holds (far from the positive one) removes it
    inside = np.argwhere(mask1)
    negative = inside[np.argmax(np.abs(inside - positive).sum(axis=1))].tolist()
    path, params = client.infer("clicks", "p3", {"foreground": [positive], "background": [negative], "label": "liver"})
    mask2, result = np.asarray(nib.load(path).dataobj) > 0, _json(params)
    assert mask2[tuple(positive)] and not mask2[tuple(negative)]
    assert result["feature_cache"] == "hit" and result["clicks_run"] == 1  # the encoder did not run again
    with pytest.raises(Exception):
        client.infer("clicks", "p3", {"foreground": [], "background": [negative]})


def test_a_box_prompts_alone_and_with_clicks_and_nothing_leaves_it(server):
    """MONAI Label's 3D roi [x0, x1, y0, y1, z0, z1]: its centre is the first click, the mask stays inside."""
    client = server["client"]
    spleen = np.asarray(nib.load(server["truth"] / "p3_label.nii.gz").dataobj) == 2
    where = np.argwhere(spleen)
    low, high = np.maximum(where.min(0) - 2, 0), np.minimum(where.max(0) + 3, spleen.shape)
    roi = [int(v) for pair in zip(low, high) for v in pair]
    outside = np.ones(spleen.shape, bool)
    outside[low[0]:high[0], low[1]:high[1], low[2]:high[2]] = False
    path, params = client.infer("clicks", "p3", {"roi": roi, "label": "spleen_box"})
    alone, result = np.asarray(nib.load(path).dataobj) > 0, _json(params)
    assert result["box"] is True and alone.sum() > 0 and not (alone & outside).any()
    click = [int(v) for v in where[len(where) // 2]]
    path, params = client.infer("clicks", "p3", {"roi": roi, "foreground": [click], "label": "spleen_box2"})
    with_click = np.asarray(nib.load(path).dataobj) > 0
    assert with_click[tuple(click)] and not (with_click & outside).any()
    shape = list(spleen.shape)
    for bad, said in (([1, 2, 3, 4, 5], "6 numbers"), ([5, 2, 0, 4, 0, 4], "axis 0 runs 5..2"),
                      ([0, shape[0] + 4, 0, 4, 0, 4], f"<= {shape[0]}")):
        response = requests.post(f"{server['url']}/infer/clicks", params={"image": "p3", "output": "json"},
                                 data={"params": json.dumps({"roi": bad})}, timeout=300)
        assert response.status_code == 422 and said in response.json()["detail"], (bad, response.text)


def test_malformed_requests_get_a_4xx_that_says_what_is_wrong(server):
    """Issue 34: no bare HTTP 500 for a request the server cannot use; the server goes on answering."""
    shape = list(nib.load(server["studies"] / "p3.nii.gz").shape)
    centre = [n // 2 for n in shape]

    def post(model: str, params: dict, image: str = "p3") -> requests.Response:
        return requests.post(f"{server['url']}/infer/{model}", params={"image": image, "output": "json"},
                             data={"params": json.dumps(params)}, timeout=300)

    cases = {
        "outside": ({"foreground": [[shape[0] + 5, 1, 1]]}, f"outside the volume: indices run from 0 to "
                                                            f"{[n - 1 for n in shape]}"),
        "negative": ({"foreground": [[-1, 2, 2]]}, "outside the volume"),
        "empty": ({"foreground": [], "background": []}, "no foreground click"),
        "only background": ({"foreground": [], "background": [centre]}, "no foreground click"),
        "two coordinates": ({"foreground": [[3, 4]]}, "needs 3 voxel indices [i, j, k], got 2"),
        "not a list": ({"foreground": "middle"}, "expected a list of [i, j, k] voxel indices"),
        "fractional": ({"foreground": [[1.5, 2, 2]]}, "must be integers"),
    }
    for name, (params, said) in cases.items():
        response = post("clicks", params)
        assert response.status_code == 422, (name, response.status_code, response.text)
        assert said in response.json()["detail"], (name, response.text)
    unknown_label = post("fewshot", {"label_name": "no_such_label"})
    assert unknown_label.status_code == 422 and "no saved label 'no_such_label'" in unknown_label.json()["detail"]
    missing = post("clicks", {"foreground": [centre]}, image="no_such_image")
    assert missing.status_code == 404 and "not in the datastore" in missing.json()["detail"]
    assert post("no_such_model", {}).status_code in (400, 404)
    # and the server still answers a good request
    assert post("clicks", {"foreground": [centre], "label": "liver"}).status_code == 200


def test_fewshot_labels_from_one_painted_slice_and_saved_as_a_new_label(server):
    client = server["client"]
    truth_image = nib.load(server["truth"] / "p4_label.nii.gz")
    spleen = np.asarray(truth_image.dataobj) == 2
    z = int(np.argmax(spleen.sum(axis=(0, 1))))  # the slice with the most spleen
    painted = np.zeros(spleen.shape, np.uint8)
    painted[..., z] = spleen[..., z]
    painted_path = server["base"] / "p4_painted.nii.gz"
    nib.save(nib.Nifti1Image(painted, truth_image.affine), painted_path)
    path, params = client.infer("fewshot", "p4", {"label_name": "my_spleen", "save": True}, label_in=str(painted_path))
    result = _json(params)
    mask = np.asarray(nib.load(path).dataobj) > 0
    dice = 2 * (mask & spleen).sum() / (mask.sum() + spleen.sum())
    assert result["saved"] == "my_spleen.safetensors" and result["painted_slices"] == 1
    assert dice > 0.5, dice
    # clicks correct the fitted head in the same request: a background click on a false positive
    # takes voxels away around it, a foreground click on a missed voxel adds some
    def window(m, point):
        x, y, zz = point
        return int(m[max(x - 2, 0):x + 3, max(y - 2, 0):y + 3, zz].sum())

    wrong, missed = np.argwhere(mask & ~spleen), np.argwhere(spleen & ~mask)
    for name, points, key, sign in (("background", wrong, "background", -1), ("foreground", missed, "foreground", 1)):
        if len(points) == 0:
            continue
        point = [int(v) for v in points[len(points) // 2]]
        path, params = client.infer("fewshot", "p4", {"label_name": "corrected", key: [point]}, label_in=str(painted_path))
        corrected = np.asarray(nib.load(path).dataobj) > 0
        assert _json(params)["clicks"] == 1
        assert sign * (window(corrected, point) - window(mask, point)) > 0, (name, point)
    # scribbles (foreground 1, background 2) inside a box: the label stays in the box
    scribbles = painted.copy()
    scribbles[:3, :3, z] = 2  # a background stroke in the corner of the painted slice
    nib.save(nib.Nifti1Image(scribbles, truth_image.affine), server["base"] / "p4_scribbles.nii.gz")
    where = np.argwhere(spleen)
    low, high = np.maximum(where.min(0) - 1, 0), np.minimum(where.max(0) + 2, spleen.shape)
    roi = [int(v) for pair in zip(low, high) for v in pair]
    path, params = client.infer("fewshot", "p4", {"label_name": "boxed", "background_value": 2, "roi": roi},
                                label_in=str(server["base"] / "p4_scribbles.nii.gz"))
    boxed = np.asarray(nib.load(path).dataobj) > 0
    outside = np.ones(spleen.shape, bool)
    outside[low[0]:high[0], low[1]:high[1], low[2]:high[2]] = False
    assert _json(params)["box"] is True and boxed.any() and not (boxed & outside).any()
    # listed by /info at once, for both interactive tasks (no restart)
    models = client.info()["models"]
    assert "my_spleen" in models["fewshot"]["labels"] and "my_spleen" in models["clicks"]["labels"]
    # the saved label draws the very same mask again on the image it was fitted on
    path, params = client.infer("fewshot", "p4", {"label_name": "my_spleen"})
    again = np.asarray(nib.load(path).dataobj) > 0
    assert again.sum() == mask.sum() and np.array_equal(again, mask)
    # the saved label segments the next image without any painting
    path, params = client.infer("fewshot", "p3", {"label_name": "my_spleen"})
    assert _json(params)["label"] == "my_spleen" and nib.load(path).shape == nib.load(server["studies"] / "p3.nii.gz").shape
    # a CT-fitted label on an MR-like image (no negative intensities) is refused, unless asked for
    ct = nib.load(server["studies"] / "p3.nii.gz")
    mr_like = np.clip(np.asarray(ct.dataobj, np.float32) + 200.0, 0, None)
    mr_path = server["base"] / "p3_mr_like.nii.gz"
    nib.save(nib.Nifti1Image(mr_like, ct.affine), mr_path)
    client.upload_image(str(mr_path), "p3_mr_like")
    try:
        _check_modality_refusal(server, client)
    finally:  # the other tests see the datastore they were written for
        removed = requests.delete(f"{server['url']}/datastore/image", params={"id": "p3_mr_like"}, timeout=60)
        assert removed.status_code == 200, removed.text


def _check_modality_refusal(server, client):
    refused = requests.post(f"{server['url']}/infer/fewshot", params={"image": "p3_mr_like", "output": "json"},
                            data={"params": json.dumps({"label_name": "my_spleen"})}, timeout=300)
    assert refused.status_code == 422, refused.text
    assert "fitted on CT" in refused.json()["detail"] and "this image is MR" in refused.json()["detail"]
    path, params = client.infer("fewshot", "p3_mr_like", {"label_name": "my_spleen", "allow_other_modality": True})
    assert _json(params)["warning"] == "label fitted on CT, applied to MR"


def test_classification_infer_returns_probabilities_and_slice_importance(server):
    path, params = server["client"].infer("classification", "p3", {})
    result = _json(params)
    assert path is None  # JSON only
    assert set(result["probabilities"]) == set(CLASSES)
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert result["predicted"] == max(result["probabilities"], key=result["probabilities"].get)
    slices = nib.load(server["studies"] / "p3.nii.gz").shape[2]  # axial slices (the phantoms are RAS)
    assert len(result["importance"]) == slices
    top = [s["importance"] for s in result["top_slices"]]
    assert len(top) == 5 and top == sorted(top, reverse=True)


def test_active_learning_strategies(server):
    client = server["client"]
    unlabelled = sorted(set(CASES) - set(LABELLED))
    assert client.next_sample("first", {})["id"] == unlabelled[0]
    assert client.next_sample("random", {})["id"] in unlabelled
    first = client.next_sample("uncertainty", {})
    assert set(first["scores"]) == set(unlabelled) and first["cached"] == 0
    assert first["id"] == max(first["scores"], key=first["scores"].get)
    assert all(0.0 < s <= 1.0 for s in first["scores"].values())
    again = client.next_sample("uncertainty", {})
    assert again["cached"] == len(unlabelled) and again["scores"] == first["scores"]


def test_batch_infer_runs_on_a_cpu_with_the_clients_multi_gpu_defaults(server):
    """MONAI Label's batch request defaults (cuda, multi_gpu) would divide by zero GPUs; the app runs on the CPU."""
    params = {"device": "cuda", "multi_gpu": True, "gpus": "all", "logging": "WARNING", "label_tag": "original"}
    response = requests.post(f"{server['url']}/batch/infer/segmentation",
                             params={"images": "unlabeled", "run_sync": "true"}, json=params, timeout=600)
    assert response.status_code == 200, response.text
    unlabelled = set(CASES) - set(LABELLED)
    assert set(response.json()) == unlabelled
    objects = server["client"].datastore()["objects"]
    assert {k for k, v in objects.items() if "original" in v["labels"]} == unlabelled


def test_a_saved_label_is_used_by_the_next_training_and_dice_beats_chance(server):
    client, truth = server["client"], server["truth"]
    held_out = "p4"
    before, _ = _infer_seg(client, held_out)
    untrained, _ = _mean_dice(np.asarray(before.dataobj), truth / f"{held_out}_label.nii.gz")
    shape = before.shape
    uniform, _ = _mean_dice(np.random.default_rng(0).integers(0, len(LABELS), shape),
                            truth / f"{held_out}_label.nii.gz")
    constant = max(_mean_dice(np.full(shape, k), truth / f"{held_out}_label.nii.gz")[0] for k in range(1, len(LABELS)))
    chance = max(untrained, uniform, constant)
    assert chance <= 0.15, (untrained, uniform, constant)

    saved = client.save_label("p3", str(truth / "p3_label.nii.gz"), tag="final")
    assert saved["image"] == "p3"
    assert "final" in client.datastore()["objects"]["p3"]["labels"]

    started = time.monotonic()
    _train(client, "segmentation", {"max_epochs": TRAIN_EPOCHS})
    seconds = time.monotonic() - started
    stats = client.info()["train_stats"]["segmentation"]
    used = set(stats["train_images"]) | set(stats["val_images"])
    assert used == set(LABELLED) | {"p3"}  # the label saved through the client is part of the run
    assert held_out not in used and stats["epoch"] == TRAIN_EPOCHS

    after, after_params = _infer_seg(client, held_out)
    dice, per_organ = _mean_dice(np.asarray(after.dataobj), truth / f"{held_out}_label.nii.gz")
    print(f"\nsegmentation training: {seconds:.0f} s; mean Dice on {held_out}: {dice:.3f} "
          f"(untrained {untrained:.3f}, uniform random {uniform:.3f}, best constant {constant:.3f}); "
          + ", ".join(f"{k} {v:.2f}" for k, v in per_organ.items()))
    assert dice >= 0.3 and dice >= 3 * chance

    # a new checkpoint: the uncertainty scores are computed again
    assert client.next_sample("uncertainty", {})["cached"] == 0
    # its settings were published with it: the run's, as the served network was built
    served = server["base"] / "model" / "segmentation"
    settings = json.loads((served / "model.settings.json").read_text())
    run_settings = served / "runs" / stats["run_id"] / "models" / "model.settings.json"
    assert settings == json.loads(run_settings.read_text())
    assert settings["preprocessing"]["size"] == 56 and settings["labels"] == LABELS
    # the run fitted quality control for its best checkpoint; it was published with it and inference reports it
    assert (served / "model.qc.json").read_bytes() == (run_settings.parent / "model.qc.json").read_bytes()
    quality = after_params["quality"]
    assert quality["flag"] in ("pass", "review") and set(quality["organs"]) == set(LABELS[1:])


def test_classification_training_uses_the_class_labels_in_the_image_info(server):
    client = server["client"]
    _, before = client.infer("classification", "p1", {})
    for case, positive in CASES.items():
        if case == UPLOADED:
            continue  # its class came with the upload
        response = requests.put(f"{server['url']}/datastore/image/info", params={"image": case},
                                data={"info": json.dumps({"class_label": int(positive)})}, timeout=60)
        assert response.status_code == 200, response.text

    _train(client, "classification", {"max_epochs": 2})
    stats = client.info()["train_stats"]["classification"]
    assert sorted(stats["train_images"] + stats["val_images"]) == sorted(CASES)
    assert {int(CASES[c]) for c in stats["val_images"]} == {0, 1}  # stratified

    _, after = client.infer("classification", "p1", {})
    after = _json(after)
    assert sum(after["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert after["probabilities"] != _json(before)["probabilities"]  # the new checkpoint is served
