"""Painting a case on a voxel grid: tissues and labels, the liver lesion, scanner blur and noise.

:func:`generate_phantom` draws one whole case in memory; ``streaming.py`` paints the same
case a few slices at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from volumes.data.phantoms.anatomy import _draw_case
from volumes.data.phantoms.config import _HU_MAX, _HU_MIN, CLASS_NAMES, HU_RANGES, ORGANS, Phantom, PhantomConfig
from volumes.data.phantoms.shapes import _Blob, _Grid, _random_bumps, _rotation, _segment_distance, _SmoothField


def generate_phantom(seed: int, config: PhantomConfig | None = None, *, positive: bool | None = None) -> Phantom:
    """Draw one synthetic abdominal CT case.

    Args:
        seed: the case's seed; the same seed and config give identical arrays.
        config: ranges to draw from (default: the small preset, splenomegaly).
        positive: force the class; ``None`` draws it with ``config.prevalence``.
            Forcing it changes only the class-specific part, so ``seed`` with
            ``positive=True`` / ``False`` is a matched pair: for ``"lesion"`` the
            two images differ only around the lesion; for ``"splenomegaly"`` the
            spleen differs, and with it the left kidney's displacement and the
            scan length when the bigger spleen needs more slices; for
            ``"hepatomegaly"`` the liver's span differs (and the portal vessels
            that hang from it), the scan geometry does not.

    Returns:
        A :class:`Phantom`: ``image`` ``[X, Y, Z]`` float32 HU and ``label``
        ``[X, Y, Z]`` uint8 on a RAS grid with ``affine``; X = Y = the in-plane
        matrix, Z = the number of slices (inferior to superior).
    """
    config = config or PhantomConfig()
    case = _draw_case(seed, config, positive)
    positive, anatomy, geo, hu = case.positive, case.anatomy, case.geometry, case.hu
    sxy, sz = geo["sxy"], geo["sz"]
    spacing = (sxy, sxy, sz)
    affine, grid, body_to_world = _body_grid(geo, geo["matrix"], geo["nz"], sxy, sz)

    image, label = _paint(grid, anatomy, hu, _draw_texture(case.texture_rng, grid))

    spleen_voxels = int(np.count_nonzero(label == ORGANS["spleen"]))
    spleen_ml = spleen_voxels * float(np.prod(spacing)) / 1000.0
    liver_span = _extent_along_z(label == ORGANS["liver"], sz)
    if config.task == "splenomegaly":
        class_label = int(spleen_ml > config.spleen_threshold_ml)
    elif config.task == "hepatomegaly":
        class_label = int(liver_span > config.liver_span_threshold_mm)
    else:
        class_label = int(positive)

    lesion_info, lesion_mask = None, None
    if config.task == "lesion" and positive:
        lesion_info, lesion_mask = _add_lesion(case.lesion_rng, config, grid, image, label, hu, affine)
        if lesion_mask is None:  # no room in the liver (it never happens with the default anatomy)
            class_label = 0

    image, noise_sigma = _acquire(image, grid, config, case.texture_rng)

    organ_ml = {name: float(np.count_nonzero(label == value)) * float(np.prod(spacing)) / 1000.0
                for name, value in ORGANS.items() if value}
    info: dict[str, Any] = {
        "seed": int(seed),
        "task": config.task,
        "class_label": class_label,
        "class_name": CLASS_NAMES[config.task][class_label],
        "positive": positive,
        "spacing_mm": [float(s) for s in spacing],
        "shape": [int(s) for s in image.shape],
        "organ_ml": organ_ml,
        "spleen_ml": spleen_ml,
        "spleen_target_ml": anatomy["spleen_target_ml"],
        "spleen_threshold_ml": config.spleen_threshold_ml,
        "spleen_length_mm": _extent_along_z(label == ORGANS["spleen"], sz),
        "liver_span_mm": liver_span,
        "liver_span_target_mm": anatomy["liver_span_target_mm"],
        "lesion": lesion_info,
        "noise_hu": noise_sigma,
        "hu": hu,
        "body_centre_mm": [float(body_to_world[0]), float(body_to_world[1])],
        "kidney_left_shift_mm": anatomy["kidney_left_shift_mm"],
    }
    return Phantom(image=image, label=label, affine=affine, spacing=spacing, class_label=class_label,
                   info=info, lesion_mask=lesion_mask)


def _body_grid(geo: dict[str, Any], n: int, nz: int, sxy: float, sz: float
               ) -> tuple[np.ndarray, _Grid, np.ndarray]:
    """RAS affine, body-frame grid and body origin in world of an ``n x n x nz`` scan of ``geo``.

    The field of view is centred on the scanner isocentre and the top slice lies
    ``geo["top"]`` above the liver dome, whatever the spacing: a scan of the same case
    at another matrix or slice count shows the same anatomy.
    """
    # Voxel (0, 0, 0) in world.
    origin = np.array([-(n - 1) / 2.0 * sxy, -(n - 1) / 2.0 * sxy, geo["table_z"] + geo["top"] - (nz - 1) * sz])
    affine = np.diag([sxy, sxy, sz, 1.0])
    affine[:3, 3] = origin
    body_to_world = np.array([geo["offset"][0], geo["offset"][1], geo["table_z"]])
    grid = _Grid(
        origin[0] - body_to_world[0] + np.arange(n) * sxy,
        origin[1] - body_to_world[1] + np.arange(n) * sxy,
        origin[2] - body_to_world[2] + np.arange(nz) * sz,
        (sxy, sxy, sz),
    )
    return affine, grid, body_to_world


@dataclass
class _Texture:
    """The random textures of a case: bowel loops against visceral fat, parenchymal inhomogeneity."""

    loops: _SmoothField
    parenchyma: _SmoothField
    bowel_cut: float  # loops above it are bowel, below it fat


def _draw_texture(rng: np.random.Generator, grid: _Grid) -> _Texture:
    """The textures of a case on the whole-volume ``grid`` (the draws come before the noise's)."""
    loops = _SmoothField(rng, grid.shape, grid.spacing, 14.0)
    parenchyma = _SmoothField(rng, grid.shape, grid.spacing, 8.0)  # slow parenchymal inhomogeneity
    return _Texture(loops, parenchyma, float(rng.uniform(-0.3, 0.3)))


def _extent_along_z(mask: np.ndarray, sz: float) -> float:
    slices = np.flatnonzero(mask.any(axis=(0, 1)))
    return float((slices[-1] - slices[0] + 1) * sz) if slices.size else 0.0


def _paint(grid: _Grid, anatomy: dict[str, Any], hu: dict[str, float], fields: _Texture
           ) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free HU image and label ``[X, Y, Z]`` on ``grid``, structures painted back to front (later wins).

    Every value depends only on its voxel's body-frame position, so painting a slab of
    slices (``grid.slab``) gives the same slices as painting the whole volume.
    """
    x, y, z = grid.x[:, None, None], grid.y[None, :, None], grid.z[None, None, :]
    body = anatomy["body"]
    # Body outline: ellipse per slice, slowly tapering along z.
    widen = (1.0 + body["taper"] * (-grid.z / 200.0)).astype(np.float32)[None, None, :]

    def ellipse(a: float, b: float) -> np.ndarray:
        return (x / (a * widen)) ** 2 + (y / (b * widen)) ** 2 < 1.0

    image = np.full(grid.shape, HU_RANGES["air"][0], dtype=np.float32)
    label = np.zeros(grid.shape, dtype=np.uint8)
    skin = ellipse(body["a"], body["b"])
    image[skin] = hu["fat"]
    inner_a, inner_b = body["cavity_a"] + body["muscle"], body["cavity_b"] + body["muscle"]
    image[ellipse(inner_a, inner_b)] = hu["muscle"]
    cavity = ellipse(body["cavity_a"], body["cavity_b"])
    del skin

    # Bowel loops and visceral fat from a smooth random field; gas floats anteriorly.
    loops = fields.loops.on(grid)
    texture = fields.parenchyma.on(grid)
    mix = np.where(loops > fields.bowel_cut, hu["bowel"] + 6.0 * texture, hu["fat"] + 8.0 * texture)
    gas = (loops > 1.9) & (y > -10.0)
    mix = np.where(gas, hu["gas"], mix)
    image[cavity] = mix[cavity]
    del mix, gas, loops
    # Lung bases above the diaphragm, lowest in the postero-lateral recesses;
    # the organs painted below cover the dome.
    radius2 = (x / body["cavity_a"]) ** 2 + (y / body["cavity_b"]) ** 2
    lung = cavity & (z > 12.0 + 18.0 * (1.0 - radius2) + 12.0 * (y / body["cavity_b"]))
    image[lung] = hu["lung"] + 15.0 * texture[lung]
    del lung, radius2

    def paint_blob(blob: _Blob, value: float | None, organ: str | None, clip: np.ndarray | None = None,
                   level: float = 1.0) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        found = grid.blob(blob)
        if found is None:
            return None
        box, lev = found
        mask = lev < level
        if clip is not None:
            mask &= clip[box]
        if value is not None:
            image[box][mask] = value + 4.0 * texture[box][mask]
        if organ is not None:
            label[box][mask] = ORGANS[organ]
        return box, lev

    stomach = paint_blob(anatomy["stomach"], hu["muscle"] - 10.0, None, cavity)
    if stomach is not None:
        box, lev = stomach
        st = anatomy["stomach"]
        inner = (lev < 0.85) & cavity[box]
        local_y = (st.rotation[0, 1] * (grid.x[box[0]][:, None, None] - st.centre[0])
                   + st.rotation[1, 1] * (grid.y[box[1]][None, :, None] - st.centre[1])
                   + st.rotation[2, 1] * (grid.z[box[2]][None, None, :] - st.centre[2])) / st.axes[1]
        image[box][inner] = hu["stomach_content"]
        image[box][inner & (local_y > anatomy["stomach_gas"])] = hu["gas"]

    spine = anatomy["spine"]
    # The spine curves a little (lordosis) along z.
    sy = spine["y"] + spine["lordosis"] * np.sin(grid.z / 120.0)[None, None, :]
    canal_y = spine["canal_y"] + (sy - spine["y"])
    for side in (-1.0, 1.0):
        para = ((x - side * (spine["canal_r"] + 22.0)) / 26.0) ** 2 + ((y - (canal_y - 14.0)) / 20.0) ** 2 < 1.0
        image[np.broadcast_to(para, grid.shape)] = hu["muscle"]
    period = spine["height"] + spine["disc"]
    in_body_segment = (((grid.z + spine["phase"]) % period) < spine["height"])[None, None, :]
    canal_d = np.sqrt((x - spine["x"]) ** 2 + (y - canal_y) ** 2)
    arch = (canal_d < spine["canal_r"] + 5.0) | (
        (np.abs(x - spine["x"]) < 4.0) & (y < canal_y) & (y > canal_y - spine["canal_r"] - 28.0))
    image[arch & in_body_segment] = hu["bone_cortical"] * 0.7
    image[np.broadcast_to(canal_d < spine["canal_r"], grid.shape)] = hu["csf"]
    del canal_d, arch

    liver = anatomy["liver"]
    found = paint_blob(liver, hu["liver"], "liver", cavity)
    if found is not None:
        box, lev = found
        in_liver = label[box] == ORGANS["liver"]
        bx, by, bz = grid.coords(box)
        for a, b, radius in anatomy["branches"]:
            vessel = (_segment_distance(bx, by, bz, a, b) < radius) & in_liver
            image[box][vessel] = hu["portal_vessels"]

    vessels = anatomy["vessels"]
    ivc = ((x - vessels["ivc_x"]) / vessels["ivc_a"]) ** 2 + ((y - vessels["ivc_y"] - (sy - spine["y"])) / vessels["ivc_b"]) ** 2 < 1.0
    ivc = np.broadcast_to(ivc, grid.shape)
    image[ivc] = hu["ivc"]
    label[ivc] = 0  # the IVC runs through the liver but is not liver

    for name, kidney in anatomy["kidneys"].items():
        found = paint_blob(kidney, hu["kidney_medulla"], name)
        if found is not None:
            box, lev = found
            cortex = (lev < 1.0) & (lev > 0.72)
            image[box][cortex] = hu["kidney_cortex"]

    aorta_x = vessels["aorta_x"] + vessels["aorta_wiggle"] * np.sin(grid.z / 90.0)[None, None, :]
    aorta_y = vessels["aorta_y"] + (sy - spine["y"])
    aorta = ((x - aorta_x) ** 2 + (y - aorta_y) ** 2) < vessels["aorta_r"] ** 2
    image[aorta] = hu["aorta"] + 3.0 * texture[aorta]
    label[aorta] = ORGANS["aorta"]
    del aorta

    # Vertebral column: cortical rim, cancellous core; discs between bodies.
    column = ((x - spine["x"]) / spine["a"]) ** 2 + ((y - sy) / spine["b"]) ** 2
    vertebra = (column < 1.0) & in_body_segment
    dist_to_disc = np.minimum((grid.z + spine["phase"]) % period, spine["height"] - (grid.z + spine["phase"]) % period)
    rim = (column > 0.72) | (dist_to_disc < 1.5)[None, None, :]
    image[(column < 1.0) & ~in_body_segment] = hu["disc"]
    image[vertebra] = hu["bone_cancellous"] + 15.0 * texture[vertebra]
    image[vertebra & rim] = hu["bone_cortical"]
    label[vertebra] = ORGANS["vertebrae"]
    del column, vertebra, rim

    # Spleen last: nothing may cut into it, so its labelled volume is the drawn one.
    paint_blob(anatomy["spleen"], hu["spleen"], "spleen")
    return image, label


def _add_lesion(rng: np.random.Generator, config: PhantomConfig, grid: _Grid, image: np.ndarray, label: np.ndarray,
                hu: dict[str, float], affine: np.ndarray) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """Put one hypodense lesion deep enough in the liver; returns (info, mask)."""
    liver = label == ORGANS["liver"]
    if not liver.any():
        return None, None
    idx = np.argwhere(liver)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    depth = ndimage.distance_transform_edt(np.pad(liver[box], 1), sampling=grid.spacing)[1:-1, 1:-1, 1:-1]
    diameter = rng.uniform(*config.lesion_diameter_mm)
    radius = diameter / 2.0
    candidates = np.argwhere(depth >= radius + 4.0)
    if len(candidates) == 0:
        candidates = np.argwhere(depth >= min(radius, float(depth.max())))
    pick = candidates[rng.integers(len(candidates))] + lo
    centre = np.array([grid.x[pick[0]], grid.y[pick[1]], grid.z[pick[2]]], dtype=np.float64)
    dirs, amps = _random_bumps(rng, 3, 0.08)
    blob = _Blob(centre, radius * rng.uniform(0.85, 1.15, size=3), _rotation(*rng.uniform(-90, 90, size=3)), dirs, amps)
    found = grid.blob(blob)
    if found is None:
        return None, None
    lbox, lev = found
    mask = np.zeros(grid.shape, dtype=bool)
    mask[lbox] = (lev < 1.0) & liver[lbox]
    if not mask.any():
        return None, None
    contrast = rng.uniform(*config.lesion_contrast_hu)
    image[mask] = hu["liver"] - contrast + 2.0 * rng.standard_normal(int(mask.sum())).astype(np.float32)
    slices = np.flatnonzero(mask.any(axis=(0, 1)))
    voxel = pick.astype(np.float64)
    world = (affine @ np.array([*voxel, 1.0]))[:3]
    info = {
        "center_mm": [float(v) for v in world],
        "center_voxel": [int(v) for v in pick],
        "diameter_mm": float(diameter),
        "contrast_hu": float(contrast),
        "volume_ml": float(mask.sum() * np.prod(grid.spacing) / 1000.0),
        "slices": [int(s) for s in slices],
    }
    return info, mask


def _psf_voxels(spacing: tuple[float, float, float]) -> tuple[float, float, float]:
    """Scanner blur (partial volume) as Gaussian sigmas in voxels along x, y, z."""
    sxy, _, sz = spacing
    # At least half a voxel of blur: point-sampled edges would otherwise be too crisp.
    return max(0.5, 0.7 / sxy), max(0.5, 0.7 / sxy), max(0.4, 0.5 / sz)


def _correlated_noise(rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, float, float],
                      config: PhantomConfig) -> np.ndarray:
    """``shape`` float32 noise of unit std, correlated in-plane over ``config.noise_correlation_mm``."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    corr = config.noise_correlation_mm / spacing[0]
    if corr > 0.25:  # below a quarter voxel the correlation is invisible
        noise = ndimage.gaussian_filter(noise, (corr, corr, 0.0))
        noise /= max(float(noise[::3, ::3, ::2].std()), 1e-6)
    return noise


def _acquire(image: np.ndarray, grid: _Grid, config: PhantomConfig, rng: np.random.Generator
             ) -> tuple[np.ndarray, float]:
    """Scanner blur (partial volume) and correlated noise; clip to the CT range."""
    image = ndimage.gaussian_filter(image, _psf_voxels(grid.spacing), mode="nearest")
    sigma = float(rng.uniform(*config.noise_hu))
    image += sigma * _correlated_noise(rng, image.shape, grid.spacing, config)
    np.clip(image, _HU_MIN, _HU_MAX, out=image)
    return image.astype(np.float32, copy=False), sigma


def _image_int16(image: np.ndarray) -> np.ndarray:
    """HU rounded to int16 and clipped to the range a 12-bit CT stores."""
    return np.clip(np.rint(image), _HU_MIN, _HU_MAX).astype(np.int16)
