"""Interactive and few-shot segmentation (volumes.interactive, its service and workflow, volumes interact).

Small encoders (a 1-block ViT-S/14) and synthetic volumes with a known answer keep every
test to seconds; the figures of real runs are in docs/INTERACTIVE.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from volumes.interactive.service import InteractiveConfig, InteractiveModel, file_to_ras, load_case
from volumes.interactive.workflow import train
from volumes.encoders import SliceEncoder
from volumes.interactive import (
    ClickNet,
    ClickSegmenter,
    ClickTrainingConfig,
    FeatureStore,
    FewShotHead,
    WorkGrid,
    encode_volume,
    train_click_model,
)
from volumes.interactive.simulate import centre_of, dice, next_click, run_protocol

SMALL_WINDOW = (56, 56, 32)


@pytest.fixture(scope="module")
def encoder() -> SliceEncoder:
    torch.manual_seed(0)
    return SliceEncoder("vit_small_patch14_dinov2", model_kwargs={"depth": 1}).eval()


def blob_volume(shape=(90, 90, 40), centre=(45, 45, 20), radii=(14, 12, 8), seed=0, hu=(40.0, 160.0)):
    """A bright ellipsoid (``hu[1]``) in noisy soft tissue (``hu[0]``): image [1, X, Y, Z] and its mask."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0
    image = np.full(shape, hu[0], np.float32) + rng.normal(0, 8, shape).astype(np.float32)
    image[inside] += hu[1] - hu[0]
    return torch.from_numpy(image)[None], inside


# ---------------------------------------------------------------- grid
def test_the_grid_maps_clicks_and_values_as_the_resampling_does():
    grid = WorkGrid((100, 80, 60), (1.0, 1.0, 0.5), size=56, patch_size=14)
    (h, w), padded, pad = grid.geometry
    assert (h, w) == (56, 45) and padded == (56, 56) and pad == ((0, 0), (5, 6))
    # slices of 0.5 mm are merged to the working in-plane spacing (100 mm / 56 = 1.79 mm): 60 * 0.5 / 1.79 -> 17
    assert grid.slices == 17 and grid.grid_shape == (56, 56, 17)
    assert WorkGrid((100, 80, 60), (1.0, 1.0, 0.5), size=56, resample_z=False).slices == 60
    assert WorkGrid((100, 80, 20), (1.0, 1.0, 5.0), size=56).slices == 20  # thick slices are never interpolated up
    # a click lands on the working voxel whose centre is nearest
    np.testing.assert_array_equal(grid.to_grid([(0, 0, 0), (99, 79, 59), (50, 40, 30)]),
                                  [[0, 5, 0], [55, 49, 16], [28, 27, 8]])
    # sampling a linear ramp back is exact (linear interpolation of a linear function) inside the clamped range
    ramp = torch.arange(56, dtype=torch.float32)[:, None, None].expand(56, 56, 17)
    back = grid.sample(ramp)
    expected = np.clip((np.arange(100) + 0.5) * 56 / 100 - 0.5, 0, 55)
    np.testing.assert_allclose(back[:, 10, 5].numpy(), expected, atol=1e-5)
    # box_of: exactly the loaded voxels whose nearest working voxel is inside the window
    window = [(14, 42), (0, 28), (4, 9)]
    box = grid.box_of(window)
    for axis, ((a, b), (lo, hi)) in enumerate(zip(window, box)):
        points = np.zeros((grid.shape[axis], 3), int)
        points[:, axis] = np.arange(grid.shape[axis])
        nearest = grid.to_grid(points)[:, axis]
        inside = np.flatnonzero((nearest >= a) & (nearest < b))
        assert (lo, hi) == (inside[0], inside[-1] + 1), axis


def test_the_grid_prepares_slices_as_the_segmentation_bundle_does():
    from volumes.transforms import preprocessing

    volume, _ = blob_volume()
    grid = WorkGrid((90, 90, 40), (1.0, 1.0, 2.0), size=56)
    image, _ = grid.prepare(volume)
    reference = preprocessing(preset="ct_abdomen_windows", channel_mode="windows", size=56)({"image": volume})["image"]
    assert image.shape == (3, 56, 56, 40)
    torch.testing.assert_close(image, torch.as_tensor(reference).float())


# ---------------------------------------------------------------- features
def test_the_feature_store_encodes_once_and_keeps_the_most_recent_within_its_budget(encoder):
    volume, _ = blob_volume()
    first = encode_volume(encoder, volume, (1.0, 1.0, 2.0), size=56)
    assert first.features.shape == (384, 4, 4, 40) and first.features.dtype == torch.float16
    assert first.image.shape == (3, 56, 56, 40)
    store = FeatureStore(budget_bytes=int(first.nbytes * 2.5))
    calls = []

    def compute(name):
        def run():
            calls.append(name)
            return encode_volume(encoder, volume, (1.0, 1.0, 2.0), size=56)
        return run

    a, hit = store.get_or_compute("a", compute("a"))
    assert not hit
    again, hit = store.get_or_compute("a", compute("a"))
    assert hit and again is a and calls == ["a"]
    torch.testing.assert_close(a.features, first.features)  # the same input, the same features
    store.get_or_compute("b", compute("b"))
    store.get_or_compute("a", compute("a"))  # a is now the most recent
    store.get_or_compute("c", compute("c"))  # over budget: b goes
    assert "a" in store and "c" in store and "b" not in store and len(store) == 2
    assert store.nbytes <= store.budget_bytes and (store.hits, store.misses) == (2, 3)


# ---------------------------------------------------------------- clicks
def test_clicks_keep_their_promises(encoder):
    """Positive click's voxel in, negative click's voxel out, nothing outside the new click's window changes."""
    volume, truth = blob_volume(shape=(110, 110, 48), centre=(55, 55, 24), radii=(30, 30, 14))
    vf = encode_volume(encoder, volume, (1.0, 1.0, 2.0), size=112)
    torch.manual_seed(0)
    segmenter = ClickSegmenter(ClickNet(384), window=SMALL_WINDOW)
    first = (55, 55, 24)
    mask1, state, info = segmenter.segment(vf, [first])
    assert mask1[first] and info["clicks_run"] == 1
    negative = (40, 60, 10)
    mask2, state, info = segmenter.segment(vf, [first], [negative], state=state)
    assert info["clicks_run"] == 1  # only the new click ran
    assert not mask2[negative] and mask2[first]
    window = segmenter.window_of(vf, vf.grid.to_grid([negative])[0])
    box = vf.grid.box_of([(a, min(b, n)) for (a, b), n in zip(window, vf.grid.grid_shape)])
    outside = np.ones(vf.grid.shape, bool)
    outside[box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]] = False
    assert outside.sum() > 0.5 * outside.size  # the window is a small part of this volume
    np.testing.assert_array_equal(mask2[outside], mask1[outside])
    # the same clicks in one request replay them in order: the same mask as click by click
    replay, _, info = segmenter.segment(vf, [first], [negative], order=[True, False])
    assert info["clicks_run"] == 2
    np.testing.assert_array_equal(replay, mask2)
    with pytest.raises(ValueError, match="positive"):
        segmenter.segment(vf, [], [negative])
    with pytest.raises(ValueError, match=r"click \[200, 0, 0\] is outside"):
        segmenter.segment(vf, [(200, 0, 0)])


def test_the_intensity_cue_marks_voxels_that_look_like_the_clicked_one():
    """1 at the click and wherever the (3 x 3 x 3 mean) intensities equal it, about 0 far from it, 0 with no click."""
    from volumes.interactive.model import click_maps, guidance_json, intensity_similarity

    image = torch.zeros(1, 3, 20, 20, 10)
    image[:, :, :10] = 0.5  # two flat halves: 0.5 and 0
    image[:, 1, 15:, 15:] = 0.05  # a corner 0.05 away from 0 in one window
    maps = torch.from_numpy(click_maps((20, 20, 10), guidance_json([(4, 4, 5)], [])))[None]
    cue = intensity_similarity(image, maps)
    assert cue.shape == (1, 2, 20, 20, 10)
    assert float(cue[0, 0, 4, 4, 5]) == pytest.approx(1.0) and float(cue[0, 0, 2, 7, 1]) == pytest.approx(1.0)
    assert float(cue[0, 0, 16, 4, 5]) < 1e-6  # 0.5 away in each of 3 windows
    assert float(cue[0, 1].abs().max()) == 0.0  # no negative click
    both = torch.from_numpy(click_maps((20, 20, 10), guidance_json([(4, 4, 5)], [(12, 4, 5)])))[None]
    cue = intensity_similarity(image, both)
    assert float(cue[0, 1, 16, 4, 5]) == pytest.approx(1.0) and float(cue[0, 1, 17, 17, 5]) == pytest.approx(
        float(np.exp(-0.05 ** 2 / (2 * 0.1 ** 2))), rel=1e-4)
    assert ClickNet(384).body.conv_0.conv_0.conv.in_channels == 16 + 2 + 3 + 2 + 4
    assert ClickNet(384, intensity_cue=False, use_features=False).body.conv_0.conv_0.conv.in_channels == 5  # DeepGrow's


def test_the_click_model_learns_to_segment_what_is_clicked(encoder):
    """Trained on ellipsoids for 60 steps with simulated clicks, one click segments an unseen one (measured: 0.86)."""
    volumes = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        centre = tuple(int(v) for v in rng.integers([35, 35, 14], [55, 55, 26]))
        volume, inside = blob_volume(centre=centre, radii=tuple(int(v) for v in rng.integers([9, 9, 5], [15, 15, 8])),
                                     seed=seed)
        volumes.append(encode_volume(encoder, volume, (1.0, 1.0, 2.0), size=56, label=torch.from_numpy(inside.astype(np.int64))))
    config = ClickTrainingConfig(labels={"blob": 1}, window=SMALL_WINDOW, steps=60, learning_rate=1e-2)
    untrained = ClickSegmenter(ClickNet(384), window=SMALL_WINDOW)
    log: list = []
    model = train_click_model(volumes, config, progress=False, log=log)
    assert np.mean([r["loss"] for r in log[-5:]]) < 0.8 * np.mean([r["loss"] for r in log[:5]])
    volume, truth = blob_volume(centre=(48, 40, 18), radii=(12, 10, 6), seed=9)
    vf = encode_volume(encoder, volume, (1.0, 1.0, 2.0), size=56)
    click = centre_of(truth, (1.0, 1.0, 2.0))
    trained_dice = dice(ClickSegmenter(model, window=SMALL_WINDOW).segment(vf, [click])[0], truth)
    untrained_dice = dice(untrained.segment(vf, [click])[0], truth)
    assert trained_dice > 0.7 and trained_dice > untrained_dice + 0.3, (trained_dice, untrained_dice)


# ---------------------------------------------------------------- few-shot
def test_a_new_label_from_one_painted_slice(encoder, tmp_path):
    volume, truth = blob_volume()
    vf = encode_volume(encoder, volume, (1.0, 1.0, 2.0), size=56, label=torch.from_numpy(truth.astype(np.int64)))
    label = (vf.label == 1).numpy()
    painted = np.zeros_like(label)
    painted[..., 20] = True
    head = FewShotHead().fit_slices(vf, label & painted)
    prob = head.probability(vf)
    grid_dice = dice(prob.numpy() > 0.5, label)
    assert grid_dice > 0.85, grid_dice
    # a click adds samples of its kind and refits
    before = float(prob[28, 28, 20])
    head.add_click(vf, (28, 28, 20), positive=False)
    assert float(head.probability(vf)[28, 28, 20]) < before
    # saved as a label of the model: the same probabilities back, refused for another encoder
    path = head.save(tmp_path / "blob", name="blob", encoder_fingerprint="abc" * 10, grid={"size": 56})
    loaded = FewShotHead.load(path, "abc" * 10)
    torch.testing.assert_close(loaded.probability(vf), head.probability(vf), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="another encoder"):
        FewShotHead.load(path, "def" * 10)
    with pytest.raises(ValueError, match="no painted voxel"):
        FewShotHead().fit_slices(vf, np.zeros_like(label))


def test_a_new_label_between_a_darker_and_a_brighter_structure():
    """The squared intensities let the linear head draw a band: a 50 HU organ between 0 HU and 100 HU tissue.

    Features are zeroed, so only the intensities can answer. Every value lies inside every
    window (no clipping), so without the squares the head has a single threshold on HU and
    cannot keep both sides out (measured: Dice 0.92 with the squares, 0.31 without them).
    """
    from volumes.interactive import WorkGrid
    from volumes.interactive.session import VolumeFeatures

    volume, truth = blob_volume(shape=(56, 56, 30), centre=(28, 28, 15), radii=(12, 12, 8), hu=(0.0, 50.0))
    bright = np.zeros(truth.shape, bool)
    bright[:, 44:, :] = True  # a 100 HU slab beside it
    volume[0][torch.from_numpy(bright)] += 100.0
    grid = WorkGrid((56, 56, 30), (1.0, 1.0, 1.0), size=56)
    image, _ = grid.prepare(volume)
    vf = VolumeFeatures(grid=grid, image=image.half(), features=torch.zeros(4, 4, 4, 30, dtype=torch.float16),
                        label=torch.from_numpy(truth.astype(np.int64)))
    painted = np.zeros_like(truth)
    painted[..., 15] = True
    head = FewShotHead().fit_slices(vf, truth & painted)
    band_dice = dice(head.probability(vf).numpy() > 0.5, truth)
    assert band_dice > 0.9, band_dice


# ---------------------------------------------------------------- protocol
def test_the_click_protocol_clicks_the_centre_of_the_largest_error():
    truth = np.zeros((20, 20, 20), bool)
    truth[2:12, 2:12, 2:12] = True
    assert centre_of(truth, (1, 1, 1)) in {(6, 6, 6), (7, 7, 7), (6, 6, 7), (7, 6, 6)} or max(
        abs(v - 6.5) for v in centre_of(truth, (1, 1, 1))) <= 0.5
    pred = truth.copy()
    pred[2:12, 2:12, 2:5] = False  # missed 300 voxels
    pred[14:18, 14:18, 14:18] = True  # 64 wrong voxels
    point, positive = next_click(truth, pred, (1, 1, 1))
    assert positive and truth[point] and not pred[point]
    pred[2:12, 2:12, 2:5] = True
    point, positive = next_click(truth, pred, (1, 1, 1))
    assert not positive and point == (15, 15, 15) or (not positive and pred[point] and not truth[point])
    assert next_click(truth, truth, (1, 1, 1)) is None
    # run_protocol drives any method: a perfect one stops after the first click
    rows = run_protocol(lambda fg, bg, order: truth, truth, (1, 1, 1), clicks=5)
    assert len(rows) == 1 and rows[0]["dice"] == 1.0


# ---------------------------------------------------------------- file indices
def test_clicks_in_file_indices_map_to_the_loaded_grid(tmp_path):
    """3D Slicer and MONAI Label send indices of the file as stored; an LPS-stored file is flipped on loading."""
    data = np.arange(12 * 10 * 8, dtype=np.float32).reshape(12, 10, 8)
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])  # LPS
    path = tmp_path / "lps.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    volume, spacing, _, loaded = load_case(path)
    points = [(0, 0, 0), (11, 3, 7), (5, 9, 2)]
    mapped = file_to_ras(points, loaded.meta["original_affine"], loaded.affine, volume.shape[1:])
    for p, q in zip(points, mapped):
        assert data[p] == float(volume[0][q])
    with pytest.raises(ValueError, match=r"click \[12, 0, 0\] is outside"):
        file_to_ras([(12, 0, 0)], loaded.meta["original_affine"], loaded.affine, volume.shape[1:])


# ---------------------------------------------------------------- model folder and CLI
def test_a_trained_folder_serves_clicks_reusing_the_features_and_the_cli_simulates(tmp_path, encoder):
    from volumes.bundle import datalist_section
    from volumes.cli import main
    from volumes.data.phantoms import PhantomConfig, write_cohort

    datalist = write_cohort(tmp_path / "data", 3, seed=3, config=PhantomConfig(matrix=64), splits=(0.67, 0.0, 0.33),
                            progress=False)
    out = tmp_path / "model"
    config = InteractiveConfig(encoder_model_kwargs={"depth": 1}, size=56)
    summary = train(datalist, out, config=config, baseline=True, progress=False,
                    training=ClickTrainingConfig(window=SMALL_WINDOW, steps=3))
    assert summary["cases"] == 2 and (out / "encoder.safetensors").is_file() and (out / "deepgrow3d.safetensors").is_file()
    from volumes.curves import read_scalars

    for name in ("click_model", "deepgrow3d"):  # the training curves, one TensorBoard run per network
        scalars = read_scalars(out / "tensorboard" / name)
        assert [step for step, _ in scalars["loss"]] == [1, 2, 3] and len(scalars["lr"]) == 3
        assert all(np.isfinite(v) for _, v in scalars["loss"])
    model = InteractiveModel(out)
    # given weights are copied in: the folder stays the whole model
    again = train(datalist, tmp_path / "model2", config=InteractiveConfig(
        encoder_weights=str(out / "encoder.safetensors"), encoder_model_kwargs={"depth": 1}, size=56),
        training=ClickTrainingConfig(window=SMALL_WINDOW, steps=1), progress=False)
    assert again["cases"] == 2
    assert InteractiveModel(tmp_path / "model2").fingerprint == model.fingerprint
    item = datalist_section(datalist, "test")[0]
    volume, spacing, label, _ = load_case(item["image"], item["label"])
    vf, hit = model.features(volume, spacing, key="case")
    assert not hit
    liver = (label == 1).numpy()
    click = centre_of(liver, spacing)
    mask, info = model.click(vf, [click], key=("case", "liver"))
    assert mask[click] and mask.shape == liver.shape
    vf2, hit = model.features(volume, spacing, key="case")
    assert hit and vf2 is vf  # the second click reuses the encoded volume
    result = tmp_path / "sim.json"
    status = main(["interact", "simulate", "--model", str(out), "--data", str(datalist), "--labels", "liver=1,aorta=5",
                   "--clicks", "2", "--methods", "clicks", "deepgrow", "graphcut", "--fewshot", "1", "--out", str(result)])
    assert status == 0
    rows = json.loads(result.read_text())["rows"]
    methods = {(r["method"], r["label"]) for r in rows}
    assert methods == {(m, o) for m in ("clicks", "deepgrow", "graphcut", "fewshot-1") for o in ("liver", "aorta")}
    assert all(0.0 <= d <= 1.0 for r in rows for d in r["dice"])
    assert all(len(r["dice"]) <= 2 for r in rows)

    # one image, one label file per structure (as many datasets ship them): each item is scored on its own
    # label, and the image is encoded once (the store used to be keyed by path and kept the first item's label)
    from volumes.interactive.workflow import simulate

    source = nib.load(item["label"])
    items = []
    for organ, value in (("liver", 1), ("spleen", 2)):
        path = tmp_path / f"{organ}.nii.gz"
        nib.save(nib.Nifti1Image((np.asanyarray(source.dataobj) == value).astype(np.uint8), source.affine), path)
        items.append({"image": item["image"], "label": str(path), "case_id": organ})
    shared = simulate(out, None, labels={"organ": 1}, methods=(), fewshot=(1,), items=items, progress=False)
    alone = simulate(out, None, labels={"organ": 1}, methods=(), fewshot=(1,), items=items[1:], progress=False)
    spleen = [r for r in shared["rows"] if r["case"] == "spleen"]
    assert spleen[0]["dice"] == alone["rows"][0]["dice"] and alone["rows"][0]["dice"][0] > 0.1
    assert len(shared["encode_s"]) == 1 and shared["store"] == {"hits": 1, "misses": 1}


# ---------------------------------------------------------------- the bundle
BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "dinov2_interactive_segmentation"


def test_the_bundle_trains_a_click_model_folder_the_app_serves(tmp_path):
    """``monai.bundle run`` on train.json with tiny settings writes a folder InteractiveModel loads."""
    import shutil

    from monai.bundle import run as bundle_run

    root = tmp_path / "bundle"
    shutil.copytree(BUNDLE, root)
    bundle_run(config_file=str(root / "configs" / "train.json"), meta_file=str(root / "configs" / "metadata.json"),
               logging_file=str(root / "configs" / "logging.conf"), bundle_root=str(root), phantom_cases=3,
               steps=2, window=list(SMALL_WINDOW), encoder_model_kwargs={"depth": 1},
               **{"preprocessing_config#size": 56})
    settings = json.loads((root / "models" / "click_model.json").read_text())
    assert settings["training"]["steps"] == 2 and settings["interactive"]["size"] == 56
    model = InteractiveModel(root / "models")
    assert model.window == SMALL_WINDOW and model.encoder.depth == 1


def test_bundle_metadata_passes_the_monai_schema(verify_bundle_metadata):
    verify_bundle_metadata(BUNDLE / "configs" / "metadata.json")


def _dijkstra(image: np.ndarray, seed: tuple, gamma: float) -> np.ndarray:
    """Reference: 6-neighbour geodesic distances by Dijkstra's algorithm (heapq), image ``[C, X, Y, Z]``."""
    import heapq

    shape = image.shape[1:]
    dist = np.full(shape, np.inf)
    dist[seed] = 0.0
    heap = [(0.0, seed)]
    while heap:
        d, p = heapq.heappop(heap)
        if d > dist[p]:
            continue
        for axis in range(3):
            for step in (-1, 1):
                q = list(p)
                q[axis] += step
                q = tuple(q)
                if not 0 <= q[axis] < shape[axis]:
                    continue
                diff = image[(slice(None), *q)] - image[(slice(None), *p)]
                nd = d + np.sqrt(1.0 + gamma ** 2 * float((diff ** 2).sum()))
                if nd < dist[q]:
                    dist[q] = nd
                    heapq.heappush(heap, (nd, q))
    return dist


def test_geodesic_distance_matches_dijkstra_and_stops_at_edges():
    """Raster scans converge to Dijkstra's 6-neighbour geodesic (exact after 6 rounds here; the default 2 are an
    upper bound within 5%, measured 4.7%); on a flat image it is the city-block distance."""
    from volumes.interactive.geodesic import geodesic_distance

    rng = np.random.default_rng(0)
    image = rng.random((2, 9, 8, 6)).astype(np.float32) * 0.2
    image[:, 5:] += 1.0  # an edge across X
    seeds = np.zeros((9, 8, 6), bool)
    seeds[2, 3, 1] = True
    reference = _dijkstra(image, (2, 3, 1), 5.0)
    exact = geodesic_distance(torch.from_numpy(image)[None], torch.from_numpy(seeds)[None], gamma=5.0, iterations=6)[0]
    np.testing.assert_allclose(exact.numpy(), reference, rtol=1e-5)
    ours = geodesic_distance(torch.from_numpy(image)[None], torch.from_numpy(seeds)[None], gamma=5.0)[0]
    assert (ours.numpy() >= reference - 1e-4).all() and (ours.numpy() <= reference * 1.05 + 1e-4).all()
    # crossing the edge costs at least sqrt(1 + 25 * 2 * 0.8^2) = 5.7 voxel lengths; a flat step costs about 1
    assert float((exact[5] - exact[4]).min()) > 5.6 and float((exact[4] - exact[3]).abs().max()) < 2.5
    flat = geodesic_distance(torch.zeros(1, 1, 9, 8, 6), torch.from_numpy(seeds)[None], gamma=5.0)[0]
    grid = np.indices((9, 8, 6))
    np.testing.assert_allclose(flat.numpy(), np.abs(grid - np.array([2, 3, 1])[:, None, None, None]).sum(0))
    assert torch.isinf(geodesic_distance(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 4, 4, 4, dtype=torch.bool))).all()
