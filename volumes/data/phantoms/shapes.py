"""Shapes in the body frame (mm): rotations, bumpy ellipsoids (:class:`_Blob`), the voxel grid, smooth fields.

Every function is pointwise in the body-frame coordinates it is given, so a shape drawn
on a few slices of a volume equals the same slices of the whole volume's drawing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def _fibonacci_sphere(n: int) -> np.ndarray:
    """``[n, 3]`` nearly uniform unit vectors (for volumes and bounding boxes)."""
    i = np.arange(n) + 0.5
    polar = np.arccos(1.0 - 2.0 * i / n)
    azimuth = np.pi * (1.0 + 5.0**0.5) * i
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1)


_SPHERE = _fibonacci_sphere(3000)


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation matrix ``Rz @ Ry @ Rx`` for angles in degrees."""
    a, b, c = np.deg2rad([rx, ry, rz])
    mx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    my = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    mz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return mz @ my @ mx


def _random_bumps(rng: np.random.Generator, k: int, amplitude: float) -> tuple[np.ndarray, np.ndarray]:
    dirs = rng.normal(size=(k, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return dirs, rng.uniform(-amplitude, amplitude, size=k)


@dataclass
class _Blob:
    """A star-shaped organ: an ellipsoid with smooth radial bumps, bend and taper.

    Body-frame point ``p`` -> local ``u = R^T (p - centre) / axes``; then taper
    (``u1, u2`` divided by ``1 + taper * u0``) and bend (``u[b0] += bend *
    u[b1]**2``, a shear, so it keeps the volume); inside where ``|u| <=
    rho(u / |u|)`` with ``rho = 1 + sum_k a_k exp((d . d_k - 1) / w^2)``.
    """

    centre: np.ndarray
    axes: np.ndarray
    rotation: np.ndarray
    bump_dirs: np.ndarray
    bump_amps: np.ndarray
    bump_width: float = 0.6
    bend: float = 0.0
    bend_axes: tuple[int, int] = (1, 0)
    taper: float = 0.0

    def _rho(self, d0: Any, d1: Any, d2: Any) -> Any:
        rho = 1.0
        inv_w2 = 1.0 / self.bump_width**2
        for (a, b, c), amp in zip(self.bump_dirs, self.bump_amps):
            rho = rho + amp * np.exp((d0 * a + d1 * b + d2 * c - 1.0) * inv_w2)
        return rho

    def level(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """``|u| / rho`` on broadcastable body-frame coordinates; < 1 inside."""
        dx, dy, dz = x - self.centre[0], y - self.centre[1], z - self.centre[2]
        r = self.rotation
        u = [(r[0, j] * dx + r[1, j] * dy + r[2, j] * dz) / self.axes[j] for j in range(3)]
        if self.taper:
            scale = np.maximum(1.0 + self.taper * u[0], 0.2)
            u[1], u[2] = u[1] / scale, u[2] / scale
        if self.bend:
            target, source = self.bend_axes
            u[target] = u[target] + self.bend * u[source] ** 2
        radius = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
        safe = np.maximum(radius, 1e-6)
        return (radius / self._rho(u[0] / safe, u[1] / safe, u[2] / safe)).astype(np.float32)

    def surface_points(self, scale: float = 1.0, every: int = 1) -> np.ndarray:
        """``[N, 3]`` body-frame points on the surface (inverse of :meth:`level`).

        ``scale < 1`` gives points on the inner level set ``level == scale``.
        """
        d = _SPHERE[::every]
        u = d * (scale * self._rho(d[:, 0], d[:, 1], d[:, 2]))[:, None]
        if self.bend:
            target, source = self.bend_axes
            u[:, target] -= self.bend * u[:, source] ** 2
        if self.taper:
            scale = np.maximum(1.0 + self.taper * u[:, 0], 0.2)
            u[:, 1] *= scale
            u[:, 2] *= scale
        return self.centre + (u * self.axes) @ self.rotation.T

    def volume_ml(self) -> float:
        """Exact (up to direction sampling) volume; valid without taper."""
        rho = self._rho(_SPHERE[:, 0], _SPHERE[:, 1], _SPHERE[:, 2])
        return float(np.prod(self.axes) * 4.0 / 3.0 * np.pi * np.mean(rho**3)) / 1000.0


class _Grid:
    """Body-frame voxel-centre coordinates of the volume, as 1D float32 axes.

    ``z_range`` is ``None`` for a whole volume and ``(z0, z1)`` for the slab of slices
    ``z0 .. z1 - 1`` of one (:meth:`slab`), which smooth fields evaluate on its own.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, spacing: tuple[float, float, float],
                 z_range: tuple[int, int] | None = None):
        self.x, self.y, self.z = (a.astype(np.float32) for a in (x, y, z))
        self.spacing = spacing
        self.shape = (len(x), len(y), len(z))
        self.z_range = z_range

    def slab(self, z0: int, z1: int) -> _Grid:
        """The slices ``z0 .. z1 - 1`` of this (whole-volume) grid."""
        return _Grid(self.x, self.y, self.z[z0:z1], self.spacing, z_range=(z0, z1))

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index box covering body-frame ``[lo, hi]`` (None when outside)."""
        out = []
        for axis, a, b in zip((self.x, self.y, self.z), lo, hi):
            i0, i1 = int(np.searchsorted(axis, a, "left")), int(np.searchsorted(axis, b, "right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)  # type: ignore[return-value]

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.x[box[0]][:, None, None], self.y[box[1]][None, :, None], self.z[box[2]][None, None, :]

    def blob(self, blob: _Blob) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """(index box, level array on it) for a blob; None when out of view."""
        pts = blob.surface_points()
        margin = 2.0 + max(self.spacing)
        box = self.box(pts.min(axis=0) - margin, pts.max(axis=0) + margin)
        if box is None:
            return None
        return box, blob.level(*self.coords(box))


class _SmoothField:
    """A float32 smooth random field over a volume, about unit std, features ~``cell_mm``.

    Random values on a coarse lattice blended with separable Gaussian weights: a few
    small matrix products, far cheaper than interpolating the full grid. The lattice is
    drawn from ``rng`` when the field is made; :meth:`on` evaluates it on the whole
    volume ``[X, Y, Z]`` or on a slab of its slices.
    """

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                 cell_mm: float):
        self.weights = []
        for n, step in zip(shape, spacing):
            pos = np.arange(n) * step
            knots = np.arange(-cell_mm, n * step + 2 * cell_mm, cell_mm)
            w = np.exp(-0.5 * ((pos[:, None] - knots[None, :]) / (0.6 * cell_mm)) ** 2)
            self.weights.append((w / w.sum(axis=1, keepdims=True)).astype(np.float32))
        self.coarse = rng.standard_normal([w.shape[1] for w in self.weights]).astype(np.float32)
        self._in_plane: np.ndarray | None = None  # [X, Y, knots along z], kept for slabs only
        self._stats: tuple[float, float] | None = None

    def _blend_in_plane(self, x_step: int = 1, y_step: int = 1) -> np.ndarray:
        out = np.einsum("ia,abc->ibc", self.weights[0][::x_step], self.coarse)
        return np.einsum("jb,ibc->ijc", self.weights[1][::y_step], out)

    def on(self, grid: _Grid) -> np.ndarray:
        """The field on ``grid``: the whole volume, or the slab ``grid.z_range`` of it."""
        if grid.z_range is None:
            return self.whole()
        return self.slab(*grid.z_range)

    def whole(self) -> np.ndarray:
        """``[X, Y, Z]``, standardised by the mean and std of every third voxel along each axis."""
        out = self._blend_in_plane() @ self.weights[2].T  # the big product last, as one matmul
        sample = out[::3, ::3, ::3]
        out -= sample.mean()
        out /= max(float(sample.std()), 1e-6)
        return out.astype(np.float32, copy=False)

    def slab(self, z0: int, z1: int) -> np.ndarray:
        """``[X, Y, z1 - z0]``: slices ``z0 .. z1 - 1``; the same values whatever slabs a volume is cut into.

        Standardised by statistics of the whole volume taken once, on a sample of at most
        about 64 slices, so the memory does not grow with the number of slices.
        """
        if self._in_plane is None:
            self._in_plane = self._blend_in_plane()
            z_step = max(3, len(self.weights[2]) // 64)
            sample = self._blend_in_plane(3, 3) @ self.weights[2][::z_step].T
            self._stats = float(sample.mean()), max(float(sample.std()), 1e-6)
        mean, std = self._stats  # type: ignore[misc]
        out = self._in_plane @ self.weights[2][z0:z1].T
        out -= mean
        out /= std
        return out.astype(np.float32, copy=False)


def _segment_distance(x: np.ndarray, y: np.ndarray, z: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance (mm) from broadcast points to the segment a-b."""
    ab = b - a
    t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / float(ab @ ab)
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt((x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2)


# ---------------------------------------------------------------- generator --

