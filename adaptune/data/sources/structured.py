"""Structured built-in tasks: procedurally generated, VTAB-1k-shaped, in the spirit of VTAB's Structured group.

VTAB-1k (Zhai et al. 2019, https://arxiv.org/abs/1910.04867) groups its tasks into Natural, Specialized and
Structured; the Structured ones ask for counts, positions, angles and depths rather than object identity, the cues a
frozen ImageNet backbone with a linear probe does worst on (global pooling throws position away). These tasks rebuild
that kind of question without a download. Each has 800 train, 200 val and 2,000 test images, 64x64 RGB, and is
generated with numpy on first use (one to a few seconds per task on 2 cores), then kept in memory
(`functools.cache`, about 37 MB per task).

| name | like VTAB's | classes | label |
|---|---|---|---|
| ``count-1k`` | clevr_count | 8 | number of objects, 3..10 (circles, squares, triangles; disjoint) |
| ``orientation-1k`` | dsprites_ori, smallnorb_azi | 16 | rotation of an arrow / L / T in 22.5-degree bins |
| ``location-1k`` | dsprites_loc | 16 | horizontal position of one shape, 16 bins of 2.9 px |
| ``distance-1k`` | clevr_dist, kitti | 6 | depth bin of the nearest object on a ground plane |
| ``elevation-1k`` | smallnorb_ele | 9 | camera elevation over a shaded cylinder, 5..85 degrees |
| ``shapes-1k`` | (dSprites shape) | 8 | which of 8 shapes, at any pose, size and colour |

Geometry (pixel units, image 64x64, x right, y down, angles counter-clockwise as displayed)::

    shape at centre c, scale s, angle t:   (u, v) = R(-t) (p - c) / s, inside if canonical(u, v); |(u, v)| <= 1
    count:     one object per chosen cell of a 5x5 grid, radius 3..4.6 px, >= 1.6 px between any two
    location:  centre x = 9 + (k + 0.5 + j) * 46 / 16 for class k, j ~ U(-0.3, 0.3); scale 5..8 px
    orientation: t = (k + j) * 22.5 deg; arrow / L / T, scale 13..20 px
    distance:  horizon y_h ~ 14 +- 2;  object at depth z stands on y_base = y_h + 48 / z, radius 9 (+-15%) / z
               bins of the nearest depth: geomspace(1, 6, 7); painter's order, far to near
    elevation: cylinder radius r, height h = a r (a in {1.2, 1.8, 2.4}), viewed from elevation e (orthographic):
               cap = ellipse with semi-axes (r, r sin e) centred h cos e / 2 above the centre; silhouette height
               h cos e + 2 r sin e

Every shape is drawn at 2x supersampling and box-filtered (anti-aliased coverage), composited over a random
background (tinted gray with a gradient and pixel noise; sky and ground for ``distance-1k``). A class's continuous
parameter is drawn from the middle of its bin (orientation and location: within +-0.3 of a bin width of the bin's
centre; distance: the middle 60% of the log-depth bin; elevation: +-2.5 degrees), so labels are unambiguous while the
values still vary. Labels are balanced (counts differ by at most one) and in random order.

Determinism: split ``k`` of a task comes from ``np.random.default_rng([data.builtin.seed, crc32(name), k])`` alone,
so the splits are independent streams and each is the same whatever is generated first; the same seed and numpy
version give the same bytes. Deviations from VTAB: no real photographs or 3D renderer (procedural 2D drawings with
perspective and shading cues), native 64 px, a 2,000-image test split instead of VTAB's full test sets.

Horizontal flips change what ``orientation-1k`` and ``location-1k`` ask (a mirrored arrow points elsewhere, a mirrored
shape sits in the mirrored bin): train them with ``data.hflip: false``.
"""

from __future__ import annotations

import functools
import itertools
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from adaptune.data.sources.builtin import ArraySplits, BuiltinConfig, BuiltinDataset, register_dataset

SIDE = 64  # native image side (px)
SUPER = 2  # supersampling per axis
SPLIT_SIZES = {"train": 800, "val": 200, "test": 2000}
_STREAM = {"train": 1, "val": 2, "test": 3}
_CHUNK = 200  # images rendered at once (memory: about 200 x 128 x 128 float32 per array)

SHAPES = ("circle", "square", "triangle", "cross", "arrow", "L", "T", "ring")
# CLEVR-like colours (gray left out: it would vanish into the background)
PALETTE = np.array(
    [
        (0.85, 0.20, 0.20),  # red
        (0.20, 0.35, 0.90),  # blue
        (0.20, 0.75, 0.30),  # green
        (0.60, 0.40, 0.20),  # brown
        (0.60, 0.25, 0.80),  # purple
        (0.20, 0.80, 0.85),  # cyan
        (0.95, 0.85, 0.20),  # yellow
        (0.92, 0.92, 0.92),  # white
    ],
    dtype=np.float32,
)
DEPTH_EDGES = np.geomspace(1.0, 6.0, 7)  # distance-1k: the 6 bins of the nearest object's depth
HORIZON_K = 48.0  # distance-1k: y_base = y_horizon + HORIZON_K / depth
ELEVATIONS = tuple(5 + 10 * k for k in range(9))  # elevation-1k: class centres in degrees
CYLINDER_ASPECTS = (1.2, 1.8, 2.4)  # elevation-1k: height / radius of the three object "instances"


# ----------------------------------------------------------------------------------------------------------------
# drawing primitives


def _pool(mask: np.ndarray) -> np.ndarray:
    """Box-filter supersampled (n, h*k, w*k) to (n, h, w) float32 coverage in [0, 1]."""
    n, hk, wk = mask.shape
    return mask.reshape(n, hk // SUPER, SUPER, wk // SUPER, SUPER).mean(axis=(2, 4), dtype=np.float32)


@dataclass(frozen=True)
class Patch:
    """Coverage of one region per image, held in a square window: ``alpha`` (n, w, w) at rows ``y0 + [0, w)`` and
    columns ``x0 + [0, w)`` of image ``i`` (zero elsewhere)."""

    alpha: np.ndarray
    y0: np.ndarray
    x0: np.ndarray

    def index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fancy index (images (n, 1, 1), rows (n, w, 1), columns (n, 1, w)) of the windows in (n, SIDE, SIDE)."""
        n, w = self.alpha.shape[:2]
        ar = np.arange(w)
        return np.arange(n)[:, None, None], (self.y0[:, None] + ar)[:, :, None], (self.x0[:, None] + ar)[:, None, :]

    def full(self) -> np.ndarray:
        """The coverage as (n, SIDE, SIDE) float32."""
        out = np.zeros((len(self.alpha), SIDE, SIDE), dtype=np.float32)
        out[self.index()] = self.alpha
        return out


def coverage(
    inside: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    cx: np.ndarray,
    cy: np.ndarray,
    extent: np.ndarray,
) -> Patch:
    """Anti-aliased coverage of one region per image, sampled only in a window around it.

    The region of image ``i`` lies within ``extent[i]`` pixels of ``(cx[i], cy[i])``; a square window around it is
    supersampled ``SUPER`` x ``SUPER`` per pixel and box-filtered.

    Args:
        inside: ``inside(dx, dy, idx) -> bool``: whether sample offsets ``(dx, dy)`` (m, h, w) from the centre (x
            right, y down, pixels) are inside the regions of images ``idx`` (m,).
        cx: (n,) centre x in pixels.
        cy: (n,) centre y in pixels.
        extent: (n,) radius of a disc (or half side of a square) holding the region.
    """
    n = len(cx)
    win = min(SIDE, math.ceil(2 * float(np.max(extent, initial=0.0))) + 3)  # window side in pixels
    x0 = np.clip(np.floor(cx - extent).astype(np.int64) - 1, 0, SIDE - win)  # (n,) window origin
    y0 = np.clip(np.floor(cy - extent).astype(np.int64) - 1, 0, SIDE - win)
    t = ((np.arange(win * SUPER) + 0.5) / SUPER).astype(np.float32)  # sample offsets inside the window
    dx = (x0 - cx).astype(np.float32)[:, None, None] + t[None, None, :]  # (n, 1, w*k)
    dy = (y0 - cy).astype(np.float32)[:, None, None] + t[None, :, None]  # (n, h*k, 1)
    shape = (n, win * SUPER, win * SUPER)
    return Patch(_pool(inside(np.broadcast_to(dx, shape), np.broadcast_to(dy, shape), np.arange(n))), y0, x0)


_CANONICAL: tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], ...] = (
    lambda u, v: u * u + v * v <= 0.85**2,  # circle
    lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.7,  # square
    lambda u, v: (v >= -0.8) & (v <= 0.6) & (np.abs(u) <= 0.8 * (v + 0.8) / 1.4),  # triangle, apex up
    lambda u, v: ((np.abs(u) <= 0.25) & (np.abs(v) <= 0.85)) | ((np.abs(v) <= 0.25) & (np.abs(u) <= 0.85)),  # cross
    lambda u, v: (  # arrow, pointing up: shaft and head
        ((np.abs(u) <= 0.2) & (v >= -0.1) & (v <= 0.9)) | ((v >= -0.9) & (v < -0.1) & (np.abs(u) <= 0.75 * (v + 0.9)))
    ),
    lambda u, v: ((u >= -0.55) & (u <= -0.1) & (np.abs(v) <= 0.8)) | ((np.abs(u) <= 0.55) & (v >= 0.38) & (v <= 0.8)),
    lambda u, v: ((np.abs(u) <= 0.6) & (v >= -0.8) & (v <= -0.4)) | ((np.abs(u) <= 0.2) & (np.abs(v) <= 0.8)),  # T
    lambda u, v: (u * u + v * v <= 0.85**2) & (u * u + v * v >= 0.45**2),  # ring
)
SHAPE_AREAS = (  # area of each canonical shape in units of scale^2 (for checks)
    math.pi * 0.85**2,
    1.4**2,
    0.5 * 1.6 * 1.4,
    2 * 0.5 * 1.7 - 0.5**2,
    0.4 * 1.0 + 0.5 * 1.2 * 0.8,
    0.45 * 1.6 + 0.65 * 0.42,
    1.2 * 0.4 + 0.4 * 1.2,
    math.pi * (0.85**2 - 0.45**2),
)


def canonical(shape: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether local points ``(u, v)`` lie inside shape ``shape`` (ids into `SHAPES`); every shape fits the unit disc.

    Args:
        shape: (n,) int shape ids.
        u: (n, h, w) local x (right), in units of the object's scale.
        v: (n, h, w) local y (down); the shapes' "up" is -v (the arrow points there, the T's bar is there).

    Returns:
        (n, h, w) bool.
    """
    out = np.zeros(u.shape, dtype=bool)
    for k in np.unique(shape).tolist():
        sel = shape == k
        out[sel] = _CANONICAL[k](u[sel], v[sel])
    return out


def shape_coverage(shape: np.ndarray, cx: np.ndarray, cy: np.ndarray, scale: np.ndarray, angle: np.ndarray) -> Patch:
    """Anti-aliased coverage of one posed shape per image.

    Args:
        shape: (n,) ids into `SHAPES`.
        cx: (n,) centre x in pixels.
        cy: (n,) centre y in pixels.
        scale: (n,) radius of the shape's unit disc in pixels.
        angle: (n,) rotation in radians, counter-clockwise as displayed.
    """
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    inv = (1.0 / np.asarray(scale)).astype(np.float32)

    def inside(dx: np.ndarray, dy: np.ndarray, idx: np.ndarray) -> np.ndarray:
        c, s, k = cos[idx, None, None], sin[idx, None, None], inv[idx, None, None]
        return canonical(shape[idx], (dx * c - dy * s) * k, (dx * s + dy * c) * k)  # R(-angle), y down

    return coverage(inside, cx, cy, np.asarray(scale))


def _ellipse_coverage(cx: np.ndarray, cy: np.ndarray, ax: np.ndarray, ay: np.ndarray) -> Patch:
    """Anti-aliased coverage of axis-aligned ellipses with semi-axes (ax, ay)."""
    ix, iy = (1.0 / ax).astype(np.float32), (1.0 / ay).astype(np.float32)

    def inside(dx: np.ndarray, dy: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return (dx * ix[idx, None, None]) ** 2 + (dy * iy[idx, None, None]) ** 2 <= 1.0

    return coverage(inside, cx, cy, np.maximum(ax, ay))


def _box_coverage(cx: np.ndarray, cy: np.ndarray, hx: np.ndarray, hy: np.ndarray) -> Patch:
    """Anti-aliased coverage of axis-aligned rectangles with half sides (hx, hy)."""
    hx32, hy32 = hx.astype(np.float32), hy.astype(np.float32)

    def inside(dx: np.ndarray, dy: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return (np.abs(dx) <= hx32[idx, None, None]) & (np.abs(dy) <= hy32[idx, None, None])

    return coverage(inside, cx, cy, np.maximum(hx, hy))


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, SIDE, SIDE, 3) float32: a tinted gray with a linear gradient and pixel noise."""
    t = (np.arange(SIDE, dtype=np.float32) + 0.5) / SIDE - 0.5
    base = (rng.uniform(0.3, 0.55, (n, 1, 1, 1)) + rng.uniform(-0.05, 0.05, (n, 1, 1, 3))).astype(np.float32)
    gx, gy = rng.uniform(-0.15, 0.15, (2, n, 1, 1, 1)).astype(np.float32)
    image = rng.standard_normal((n, SIDE, SIDE, 1), dtype=np.float32) * np.float32(0.025)
    image = image + gy * t[None, :, None, None] + gx * t[None, None, :, None]  # (n, H, W, 1)
    return image + base  # (n, H, W, 3)


def _colours(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Palette colours with a brightness jitter: ``shape + (3,)`` float32."""
    picks = PALETTE[rng.integers(0, len(PALETTE), shape)]
    return (picks * rng.uniform(0.8, 1.1, (*shape, 1))).astype(np.float32)


def _over(image: np.ndarray, patch: Patch, colour: np.ndarray, weight: np.ndarray | float = 1.0) -> np.ndarray:
    """Composite a flat ``colour`` (n, 3) in place through ``patch``'s coverage times ``weight`` (n,) or a scalar:
    ``image = image (1 - a) + colour a``. Returns the weighted window coverage ``a`` (n, w, w)."""
    a = patch.alpha * np.asarray(weight, dtype=np.float32).reshape(-1, 1, 1)  # (n, w, w)
    at = patch.index()
    image[at] = image[at] * (1.0 - a[..., None]) + colour[:, None, None, :] * a[..., None]
    return a


def _over_full(image: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """Composite per-pixel ``colour`` (n, H, W, 3) (or broadcastable) in place through ``alpha`` (n, H, W)."""
    a = alpha[..., None]
    image *= 1.0 - a
    image += colour * a


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    """(n,) int64: every class ``n // C`` or ``n // C + 1`` times, in random order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _jitter(rng: np.random.Generator, n: int, half_width: float = 0.3) -> np.ndarray:
    return rng.uniform(-half_width, half_width, n)


# ----------------------------------------------------------------------------------------------------------------
# the tasks: render(rng, labels) -> (uint8 images (n, 64, 64, 3), info: per-image parameters and "alpha" coverage)

Info = dict[str, np.ndarray]


def _count(rng: np.random.Generator, labels: np.ndarray) -> tuple[np.ndarray, Info]:
    """3..10 disjoint objects: one per cell of a 5x5 grid, jittered, with at least 1.6 px between any two."""
    n, most, cells = len(labels), 10, 5
    cell = SIDE / cells
    slots = np.argsort(rng.random((n, cells * cells)), axis=1)[:, :most]  # distinct cells
    present = np.arange(most)[None] < (labels + 3)[:, None]  # (n, 10)
    radius = rng.uniform(3.0, 4.6, (n, most))
    room = cell / 2 - radius - 0.8  # centre offset that keeps 0.8 px to the cell's edge
    cx = (slots % cells + 0.5) * cell + rng.uniform(-1, 1, (n, most)) * room
    cy = (slots // cells + 0.5) * cell + rng.uniform(-1, 1, (n, most)) * room
    shape = rng.integers(0, 3, (n, most))  # circle, square, triangle
    angle = rng.uniform(0, 2 * math.pi, (n, most))
    colour = _colours(rng, (n, most))
    image = _background(rng, n)
    alpha = np.zeros((n, SIDE, SIDE), dtype=np.float32)
    for j in range(most):
        patch = shape_coverage(shape[:, j], cx[:, j], cy[:, j], radius[:, j], angle[:, j])
        alpha[patch.index()] += _over(image, patch, colour[:, j], present[:, j])
    return _to_uint8(image), {"cx": cx, "cy": cy, "radius": radius, "present": present, "alpha": alpha}


def _one_shape(rng: np.random.Generator, *pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One coloured shape per image over a background: (uint8 images, coverage (n, SIDE, SIDE)); ``pose`` is
    `shape_coverage`'s (shape, cx, cy, scale, angle)."""
    n = len(pose[0])
    image = _background(rng, n)
    patch = shape_coverage(*pose)
    _over(image, patch, _colours(rng, (n,)))
    return _to_uint8(image), patch.full()


def _orientation(rng: np.random.Generator, labels: np.ndarray) -> tuple[np.ndarray, Info]:
    """One arrow, L or T (no rotational symmetry), rotated into one of 16 bins of 22.5 degrees."""
    n, bins = len(labels), 16
    angle = (labels + _jitter(rng, n)) * (2 * math.pi / bins)
    shape = rng.choice(np.array([SHAPES.index("arrow"), SHAPES.index("L"), SHAPES.index("T")]), n)
    scale = rng.uniform(13.0, 20.0, n)
    cx, cy = rng.uniform(scale + 2, SIDE - scale - 2, (2, n))
    images, alpha = _one_shape(rng, shape, cx, cy, scale, angle)
    return images, {"angle": angle, "shape": shape, "cx": cx, "cy": cy, "scale": scale, "alpha": alpha}


LOCATION_RANGE = (9.0, 55.0)  # location-1k: centre x spans this, in 16 equal bins


def _location(rng: np.random.Generator, labels: np.ndarray) -> tuple[np.ndarray, Info]:
    """One shape (any of 8, any rotation, scale 5..8 px) whose centre x falls in one of 16 bins; y is free."""
    n, bins = len(labels), 16
    lo, hi = LOCATION_RANGE
    cx = lo + (labels + 0.5 + _jitter(rng, n)) * ((hi - lo) / bins)
    cy = rng.uniform(lo, hi, n)
    shape = rng.integers(0, len(SHAPES), n)
    scale = rng.uniform(5.0, 8.0, n)
    images, alpha = _one_shape(rng, shape, cx, cy, scale, rng.uniform(0, 2 * math.pi, n))
    return images, {"cx": cx, "cy": cy, "shape": shape, "scale": scale, "alpha": alpha}


def _shapes(rng: np.random.Generator, labels: np.ndarray) -> tuple[np.ndarray, Info]:
    """One of 8 shapes at a random position, rotation (any angle), scale (12..22 px) and colour."""
    n = len(labels)
    scale = rng.uniform(12.0, 22.0, n)
    cx, cy = rng.uniform(scale + 1, SIDE - scale - 1, (2, n))
    images, alpha = _one_shape(rng, labels, cx, cy, scale, rng.uniform(0, 2 * math.pi, n))
    return images, {"scale": scale, "cx": cx, "cy": cy, "alpha": alpha}


def _sky_and_ground(rng: np.random.Generator, horizon: np.ndarray) -> np.ndarray:
    """(n, SIDE, SIDE, 3) float32: bluish sky above ``horizon`` (n,), a textured ground below, lighter near."""
    n = len(horizon)
    y = np.arange(SIDE, dtype=np.float32)[None, :, None, None] + 0.5  # (1, H, 1, 1)
    h = horizon.astype(np.float32)[:, None, None, None]
    sky = (rng.uniform(0.55, 0.75, (n, 1, 1, 1)) * np.array([0.85, 0.92, 1.0])).astype(np.float32)
    ground = (rng.uniform(0.3, 0.45, (n, 1, 1, 1)) * np.array([1.0, 0.92, 0.8])).astype(np.float32)
    shade = 0.75 + 0.25 * np.clip((y - h) / 40.0, 0, 1)  # (n, H, 1, 1)
    noise = rng.standard_normal((n, SIDE, SIDE, 1), dtype=np.float32) * np.float32(0.03)
    return np.where(y < h, sky, ground * shade + noise)


def _standing(cx: np.ndarray, foot: np.ndarray, r: np.ndarray, half_height: np.ndarray, box: np.ndarray) -> Patch:
    """Coverage of objects standing on ``foot`` (n,): boxes of half sides (r, half_height) where ``box``, else balls
    of radius r (then half_height == r: the centre is one radius above the foot)."""
    r32, hh32 = r.astype(np.float32), half_height.astype(np.float32)

    def inside(dx: np.ndarray, dy: np.ndarray, idx: np.ndarray) -> np.ndarray:
        rr, hy = r32[idx, None, None], hh32[idx, None, None]
        in_box = (np.abs(dx) <= rr) & (np.abs(dy) <= hy)
        return np.where(box[idx, None, None], in_box, dx * dx + dy * dy <= rr * rr)

    return coverage(inside, cx, foot - half_height, np.maximum(r, half_height))


def _distance(rng: np.random.Generator, labels: np.ndarray) -> tuple[np.ndarray, Info]:
    """2..5 balls and boxes standing on a ground plane in perspective; label: depth bin of the nearest one."""
    n, most = len(labels), 5
    lo, hi = np.log(DEPTH_EDGES[labels]), np.log(DEPTH_EDGES[labels + 1])
    nearest = np.exp(lo + rng.uniform(0.2, 0.8, n) * (hi - lo))
    others = np.exp(rng.uniform(np.log(nearest * 1.15)[:, None], np.log(9.0), (n, most - 1)))
    depth = np.concatenate([nearest[:, None], others], axis=1)  # (n, 5); column 0 is the nearest
    present = np.arange(most)[None] < rng.integers(2, most + 1, n)[:, None]
    horizon = 14.0 + rng.uniform(-2, 2, n)
    base = horizon[:, None] + HORIZON_K / depth  # (n, 5): y of each object's foot
    radius = 9.0 * rng.uniform(0.85, 1.15, (n, most)) / depth
    cx = rng.uniform(4, SIDE - 4, (n, most))
    half_height = radius * np.where(rng.random((n, most)) < 0.5, rng.uniform(0.8, 1.6, (n, most)), 1.0)
    is_box = half_height != radius
    colour = _colours(rng, (n, most))
    image = _sky_and_ground(rng, horizon)
    alpha = np.zeros((n, SIDE, SIDE), dtype=np.float32)
    black = np.zeros((n, 3), dtype=np.float32)
    for j in range(most - 1, -1, -1):  # far to near: column 0, the nearest, is drawn last and never hidden
        r = radius[:, j]
        shadow = _ellipse_coverage(cx[:, j], base[:, j], 1.2 * r, 0.3 * r + 0.3)
        _over(image, shadow, black, 0.5 * present[:, j])
        patch = _standing(cx[:, j], base[:, j], r, half_height[:, j], is_box[:, j])
        a = _over(image, patch, colour[:, j], present[:, j])
        at = patch.index()
        alpha[at] = alpha[at] * (1 - a) + a
    info = {"depth": depth, "present": present, "horizon": horizon, "base": base, "alpha": alpha}
    return _to_uint8(image), info


def _elevation(rng: np.random.Generator, labels: np.ndarray) -> tuple[np.ndarray, Info]:
    """A shaded cylinder seen from one of 9 elevations (5..85 degrees), with a lit cap and a Lambertian side."""
    n = len(labels)
    elev = np.radians(np.array(ELEVATIONS, dtype=np.float64)[labels] + rng.uniform(-2.5, 2.5, n))
    aspect = np.array(CYLINDER_ASPECTS)[rng.integers(0, len(CYLINDER_ASPECTS), n)]
    r = rng.uniform(9.0, 13.0, n)
    h = aspect * r
    half = h * np.cos(elev) / 2 + r * np.sin(elev)  # half the silhouette height
    cx = rng.uniform(r + 3, SIDE - r - 3)
    cy = rng.uniform(half + 3, SIDE - half - 3)
    top, bottom = cy - h * np.cos(elev) / 2, cy + h * np.cos(elev) / 2  # cap centres
    minor = r * np.sin(elev)
    cap = _ellipse_coverage(cx, top, r, minor).full()
    side_box = _box_coverage(cx, cy, r, h * np.cos(elev) / 2).full()
    body = np.maximum(side_box, _ellipse_coverage(cx, bottom, r, minor).full())
    body = np.maximum(body - cap, 0.0)  # the cap is in front of the side wherever both cover a pixel
    light_el = np.radians(rng.uniform(40, 70, n))[:, None, None]
    light_az = np.radians(rng.uniform(-60, 60, n))[:, None, None]
    x = (np.arange(SIDE, dtype=np.float32) + 0.5)[None, None, :]
    phi = np.arcsin(np.clip((x - cx[:, None, None]) / r[:, None, None], -1, 1))  # side normal's azimuth (n, 1, W)
    side = 0.25 + 0.65 * np.clip(np.cos(phi - light_az), 0, None) * np.cos(light_el)  # (n, 1, W)
    lit_cap = 0.5 + 0.45 * np.sin(light_el)  # (n, 1, 1)
    colour = _colours(rng, (n,))[:, None, None, :]  # (n, 1, 1, 3)
    image = _background(rng, n)
    _over_full(image, body, (colour * side[..., None]).astype(np.float32))
    _over_full(image, cap, (colour * lit_cap[..., None]).astype(np.float32))
    info = {"elevation": elev, "radius": r, "height": h, "cx": cx, "cy": cy, "alpha": np.minimum(cap + body, 1.0)}
    return _to_uint8(image), info


# ----------------------------------------------------------------------------------------------------------------
# registration


@dataclass(frozen=True)
class StructuredTask:
    """A procedurally generated built-in task: its classes and its renderer ``render(rng, labels)``."""

    name: str
    summary: str
    class_names: tuple[str, ...]
    render: Callable[[np.random.Generator, np.ndarray], tuple[np.ndarray, Info]]


def _deg(x: float) -> str:
    return f"{x:g}deg"


TASKS: dict[str, StructuredTask] = {
    t.name: t
    for t in (
        StructuredTask(
            "count-1k",
            "object counting (clevr_count-like): 3..10 shapes, 8 classes, 64 px RGB, generated",
            tuple(str(k) for k in range(3, 11)),
            _count,
        ),
        StructuredTask(
            "orientation-1k",
            "orientation (dsprites_ori-like): an arrow / L / T in 16 bins of 22.5 deg, 64 px RGB, generated",
            tuple(_deg(22.5 * k) for k in range(16)),
            _orientation,
        ),
        StructuredTask(
            "location-1k",
            "location (dsprites_loc-like): a shape's x position in 16 bins, 64 px RGB, generated",
            tuple(f"x{k:02d}" for k in range(16)),
            _location,
        ),
        StructuredTask(
            "distance-1k",
            "distance (clevr_dist/kitti-like): depth bin of the nearest object on a ground plane, 6 classes, generated",
            tuple(f"{a:.2f}-{b:.2f}" for a, b in itertools.pairwise(DEPTH_EDGES)),
            _distance,
        ),
        StructuredTask(
            "elevation-1k",
            "elevation (smallnorb_ele-like): a cylinder seen from 5..85 deg, 9 classes, 64 px RGB, generated",
            tuple(_deg(e) for e in ELEVATIONS),
            _elevation,
        ),
        StructuredTask(
            "shapes-1k",
            "shape classes: 8 shapes at random pose, size and colour, 64 px RGB, generated",
            SHAPES,
            _shapes,
        ),
    )
}


def _stream(name: str, split: str, seed: int) -> np.random.Generator:
    """The generator of one split: its own stream, whatever else is generated."""
    return np.random.default_rng([seed & (2**63 - 1), zlib.crc32(name.encode()), _STREAM[split]])


def split_labels(name: str, split: str, seed: int = 0) -> np.ndarray:
    """The labels (n,) of a split without rendering its images (the first draw of its stream)."""
    return _balanced_labels(_stream(name, split, seed), SPLIT_SIZES[split], len(TASKS[name].class_names))


def generate(
    name: str, split: str, seed: int = 0, n: int | None = None, with_info: bool = True
) -> tuple[np.ndarray, np.ndarray, Info]:
    """Render split ``split`` of task ``name``: uint8 images (n, 64, 64, 3), int64 labels (n,) and the per-image
    parameters (``info``, for checks). Uncached. ``n`` (default: the split's size) renders only the first ``n``
    labels, for quick looks and tests: the labels are the split's, the images are not (the stream is consumed in
    other shapes)."""
    task = TASKS[name]
    rng = _stream(name, split, seed)
    labels = _balanced_labels(rng, SPLIT_SIZES[split], len(task.class_names))[:n]
    parts = [task.render(rng, labels[lo : lo + _CHUNK]) for lo in range(0, len(labels), _CHUNK)]
    images = np.concatenate([p[0] for p in parts])
    info = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]} if with_info else {}
    return images, labels, info


@functools.cache
def split_arrays(name: str, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The cached, read-only (images, labels) of one split."""
    images, labels, _ = generate(name, split, seed, with_info=False)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _maker(task: StructuredTask) -> Callable[[BuiltinConfig], ArraySplits]:
    def make(options: BuiltinConfig) -> ArraySplits:
        return ArraySplits(
            task.name, task.class_names, lambda split: split_arrays(task.name, options.seed, split), dict(SPLIT_SIZES)
        )

    return make


for _task in TASKS.values():
    register_dataset(BuiltinDataset(name=_task.name, summary=_task.summary, make=_maker(_task)))
