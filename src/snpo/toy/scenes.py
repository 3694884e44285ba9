"""Procedurally rendered toy scenes: one filled shape on a dark-grey background, with a caption.

This is the "image world" of the offline toy benchmark. A scene is four discrete attributes
(shape, colour, size, position); its caption follows one fixed grammar,

    "a {size} {colour} {shape} {phrase}",   phrase in {"on the left", "on the right",
                                                        "at the top", "at the bottom",
                                                        "in the center"},

so there are 3 * 4 * 2 * 5 = 120 distinct scenes and captions.

Geometry is expressed in fractions of the image side, with x to the right and y *down* (row
index), so a scene renders identically (up to sampling) at any resolution. Each shape has an
"extent" e derived from the size radius r:

    circle    radius            e = r                 area = pi e^2
    square    half-side         e = r sqrt(pi) / 2    area = 4 e^2          (= circle area)
    triangle  circumradius      e = 1.1 r             area = 3 sqrt(3)/4 e^2 (upright, centroid
                                                                            at the centre)

The triangle is not area-matched: an equal-area triangle (e = 1.56 r) would poke out of the
image at "top"/"left"; with e = 1.1 r its width (1.91 r) matches the circle's diameter, so the
three shapes at one size have comparable visual extent.

Rendering uses 4x4 supersampling and a box downsample (each sub-sample itself a one-sub-sample
linear ramp of the signed distance; squares exactly), so every pixel holds the area coverage
alpha of the shape to within ~1 %, and the image is ``BG * (1 - alpha) + colour * alpha``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
DEGRADATIONS: tuple[str, ...] = ("blur", "noise", "washout")

POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

# Every word a caption can contain, sorted (a fixed vocabulary for tokenizers).
WORDS: tuple[str, ...] = tuple(
    sorted(
        {"a"}
        | set(SHAPES)
        | set(COLOURS)
        | set(SIZES)
        | {w for phrase in POSITION_PHRASES.values() for w in phrase.split()}
    )
)

# Uniform background grey (all three channels).
BACKGROUND: float = 0.15

# Canonical saturated colours; pairwise RGB distances are >= 0.70 so they stay separable after
# jitter, blur and washout.
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.15, 0.15),
    "green": (0.15, 0.8, 0.2),
    "blue": (0.2, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
}

# Shape centre (x, y) as fractions of the image side; y grows downwards.
POSITION_CENTRES: dict[str, tuple[float, float]] = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}

SIZE_RADII: dict[str, float] = {"small": 0.13, "large": 0.24}

# Shape extent e = SHAPE_EXTENT_SCALE[shape] * size radius (see the module docstring).
SHAPE_EXTENT_SCALE: dict[str, float] = {
    "circle": 1.0,
    "square": math.sqrt(math.pi) / 2.0,
    "triangle": 1.1,
}

# area = SHAPE_AREA_FACTOR[shape] * e^2 (in units of the image area).
SHAPE_AREA_FACTOR: dict[str, float] = {
    "circle": math.pi,
    "square": 4.0,
    "triangle": 3.0 * math.sqrt(3.0) / 4.0,
}

SUPERSAMPLE: int = 4

_PHRASE_TO_POSITION = {phrase: pos for pos, phrase in POSITION_PHRASES.items()}


@dataclass(frozen=True)
class Scene:
    """One toy scene: a single filled shape described by four discrete attributes."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for value, allowed, name in (
            (self.shape, SHAPES, "shape"),
            (self.colour, COLOURS, "colour"),
            (self.size, SIZES, "size"),
            (self.position, POSITIONS, "position"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")

    @property
    def caption(self) -> str:
        """``"a {size} {colour} {shape} {phrase}"``, e.g. "a small red circle on the left"."""
        return f"a {self.size} {self.colour} {self.shape} {POSITION_PHRASES[self.position]}"

    @classmethod
    def from_caption(cls, caption: str) -> Scene:
        """Parse a caption produced by :attr:`caption` (exact grammar, lowercase)."""
        words = caption.split(" ")
        if len(words) != 7 or words[0] != "a":
            raise ValueError(f"unparseable caption {caption!r}: expected 'a SIZE COLOUR SHAPE ...'")
        size, colour, shape = words[1], words[2], words[3]
        position = _PHRASE_TO_POSITION.get(" ".join(words[4:]))
        if position is None or size not in SIZES or colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"unparseable caption {caption!r}: unknown word or phrase")
        return cls(shape=shape, colour=colour, size=size, position=position)

    @property
    def extent(self) -> float:
        """Shape extent e (radius / half-side / circumradius) as a fraction of the image side."""
        return SHAPE_EXTENT_SCALE[self.shape] * SIZE_RADII[self.size]

    @property
    def area(self) -> float:
        """Canonical shape area as a fraction of the image area (ignoring border clipping)."""
        return SHAPE_AREA_FACTOR[self.shape] * self.extent**2


def all_scenes() -> list[Scene]:
    """All 120 scenes, ordered by shape, colour, size, position (each in vocabulary order)."""
    return [
        Scene(shape, colour, size, position)
        for shape in SHAPES
        for colour in COLOURS
        for size in SIZES
        for position in POSITIONS
    ]


def _interval_overlap(lo: np.ndarray, hi: np.ndarray, res: int) -> np.ndarray:
    """Fraction of each of ``res`` unit pixels covered by [lo, hi] (fractions of the side)."""
    edges = np.arange(res + 1, dtype=np.float32) / res
    left = np.maximum(edges[None, :-1], lo[:, None])
    right = np.minimum(edges[None, 1:], hi[:, None])
    return (np.clip(right - left, 0.0, None) * res).astype(np.float32)


def shape_coverage(
    shape_ids: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    extent: np.ndarray,
    resolution: int,
    supersample: int = SUPERSAMPLE,
) -> np.ndarray:
    """Per-pixel area coverage alpha in [0, 1] of B shapes, shape (B, resolution, resolution).

    ``shape_ids`` indexes :data:`SHAPES`; centres and extents are fractions of the side. Each
    pixel is sampled on a ``supersample x supersample`` grid and box-averaged; each sub-sample
    holds clip(1/2 - sdf / delta, 0, 1), with delta the sub-sample spacing and sdf a signed
    distance to the boundary. With (dx, dy) the offset from the centre and e the extent:

        circle    sdf = sqrt(dx^2 + dy^2) - e
        square    |dx| <= e and |dy| <= e: separable, so the box-filtered coverage is computed
                  exactly as the product of per-axis interval overlaps
        triangle  sdf = max(dy - e/2, (sqrt(3)|dx| - dy - e) / 2)   (upright; the circumcentre,
                  which is also the centroid, at the centre)
    """
    shape_ids = np.asarray(shape_ids)
    n = shape_ids.shape[0]
    res, ss = int(resolution), int(supersample)
    out = np.zeros((n, res, res), dtype=np.float32)
    if n == 0:
        return out
    t = ((np.arange(res * ss, dtype=np.float32) + 0.5) / (res * ss))[None, :]
    cx = np.asarray(cx, dtype=np.float32)
    cy = np.asarray(cy, dtype=np.float32)
    extent = np.asarray(extent, dtype=np.float32)
    # Chunks keep the (n, res*ss, res*ss) float temporaries at a few tens of MB.
    chunk = max(1, (1 << 22) // (res * ss) ** 2)
    for sid, name in enumerate(SHAPES):
        idx = np.flatnonzero(shape_ids == sid)
        for start in range(0, idx.size, chunk):
            sel = idx[start : start + chunk]
            m = sel.size
            if name == "square":
                # Separable, so the box-filtered coverage is exact: the product of the per-axis
                # overlaps of [c - e, c + e] with each pixel's interval.
                cov_x = _interval_overlap(cx[sel] - extent[sel], cx[sel] + extent[sel], res)
                cov_y = _interval_overlap(cy[sel] - extent[sel], cy[sel] + extent[sel], res)
                out[sel] = cov_y[:, :, None] * cov_x[:, None, :]
                continue
            dx = t - cx[sel, None]  # (m, S) along columns
            dy = t - cy[sel, None]  # (m, S) along rows
            e3 = extent[sel, None, None]
            if name == "circle":
                sdf = np.sqrt(dx[:, None, :] ** 2 + dy[:, :, None] ** 2) - e3
            else:
                dyb = dy[:, :, None]
                slant = 0.5 * (math.sqrt(3.0) * np.abs(dx)[:, None, :] - dyb - e3)
                sdf = np.maximum(dyb - 0.5 * e3, slant)
            # Each sub-sample is itself anti-aliased with a one-sub-sample-wide linear ramp of the
            # signed distance; pure point samples would make the coverage of a 2-3 px shape jump
            # with sub-pixel shifts (visible aliasing, and unstable judge templates).
            sub = np.clip(0.5 - sdf * (res * ss), 0.0, 1.0)
            out[sel] = sub.reshape(m, res, ss, res, ss).mean(axis=(2, 4), dtype=np.float32)
    return out


def render(
    scenes: Sequence[Scene],
    resolution: int = 16,
    *,
    rng: np.random.Generator | None = None,
    jitter: float = 0.0,
) -> np.ndarray:
    """Render scenes to float32 images of shape (B, 3, resolution, resolution) in [0, 1].

    ``image = BACKGROUND * (1 - alpha) + rgb * alpha`` with alpha the anti-aliased coverage
    (:func:`shape_coverage`). With ``jitter = j > 0`` (requires ``rng``), each scene
    independently gets, with u ~ U(-1, 1) drawn per quantity:

        centre  += j * u                 (fractions of the side, per axis)
        extent  *= 1 + 2 j * u
        rgb     += j * u                 (per channel, clipped to [0, 1])

    Random draws happen in a fixed order (centre, extent, colour), so a seeded ``rng`` gives
    reproducible images.
    """
    if resolution < 2:
        raise ValueError(f"resolution must be >= 2, got {resolution}")
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    n = len(scenes)
    shape_ids = np.array([SHAPES.index(s.shape) for s in scenes], dtype=np.int64)
    centres = np.array([POSITION_CENTRES[s.position] for s in scenes], dtype=np.float64)
    centres = centres.reshape(n, 2)
    extent = np.array([s.extent for s in scenes], dtype=np.float64)
    rgb = np.array([COLOUR_RGB[s.colour] for s in scenes], dtype=np.float64).reshape(n, 3)
    if jitter > 0:
        if rng is None:
            raise ValueError("render(jitter > 0) needs an explicit rng for reproducibility")
        centres = centres + jitter * rng.uniform(-1.0, 1.0, size=(n, 2))
        extent = extent * (1.0 + 2.0 * jitter * rng.uniform(-1.0, 1.0, size=n))
        rgb = np.clip(rgb + jitter * rng.uniform(-1.0, 1.0, size=(n, 3)), 0.0, 1.0)
    alpha = shape_coverage(shape_ids, centres[:, 0], centres[:, 1], extent, resolution)
    rgb32 = rgb.astype(np.float32)[:, :, None, None]
    images = BACKGROUND + alpha[:, None] * (rgb32 - np.float32(BACKGROUND))
    return np.clip(images, 0.0, 1.0).astype(np.float32, copy=False)


@lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix G with (G v)_i = sum_k g_k v_clamp(i + k): 1-D blur with edge padding."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets.astype(np.float64) ** 2) / (2.0 * sigma * sigma))
    kernel /= kernel.sum()
    mat = np.zeros((n, n), dtype=np.float64)
    rows = np.arange(n)
    for off, k in zip(offsets, kernel):
        # Edge padding = clamping the source index, so mass beyond the border folds onto it.
        np.add.at(mat, (rows, np.clip(rows + off, 0, n - 1)), k)
    mat = mat.astype(np.float32)
    mat.setflags(write=False)
    return mat


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the last two axes (edge-replicate padding), in float32.

    Kernel g_k proportional to exp(-k^2 / (2 sigma^2)) for |k| <= ceil(3 sigma), normalised to
    sum 1; implemented as G_h @ x @ G_w^T with banded (H, H) and (W, W) matrices (BLAS-fast for
    the small images of the toy world).
    """
    x = np.asarray(images, dtype=np.float32)
    if sigma <= 0:
        return x.copy()
    h, w = x.shape[-2:]
    out = np.matmul(x, _blur_matrix(w, float(sigma)).T)
    return np.matmul(_blur_matrix(h, float(sigma)), out)


def degrade(
    images: np.ndarray, kind: str, rng: np.random.Generator, strength: float = 1.0
) -> np.ndarray:
    """Return a degraded copy of ``images`` (B, 3, H, W), float32 in [0, 1].

    With s = ``strength`` (0 leaves the image unchanged):

        "blur"     Gaussian blur with sigma = s pixels (separable, edge padding)
        "noise"    x + N(0, (0.12 s)^2) per pixel and channel, clipped to [0, 1]
        "washout"  0.5 + (x - 0.5) * (1 - 0.5 s): contrast reduced by 50 % * s towards mid-grey

    ``rng`` is only consumed by "noise".
    """
    x = np.asarray(images, dtype=np.float32)
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}; expected one of {DEGRADATIONS}")
    if strength == 0:
        return x.copy()
    if kind == "blur":
        out = gaussian_blur(x, sigma=1.0 * strength)
    elif kind == "noise":
        out = x + rng.normal(0.0, 0.12 * strength, size=x.shape).astype(np.float32)
    else:  # washout
        factor = max(0.0, 1.0 - 0.5 * strength)
        out = 0.5 + (x - 0.5) * np.float32(factor)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


_ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "size": SIZES,
    "position": POSITIONS,
}


def corrupt_caption(scene: Scene, rng: np.random.Generator) -> Scene:
    """A scene that differs from ``scene`` in exactly 1 or 2 (equally likely) random attributes.

    The attributes to change are drawn without replacement; each gets a value drawn uniformly
    from the *other* values of its vocabulary, so the result always differs where it should.
    """
    names = list(_ATTRIBUTE_VALUES)
    k = int(rng.integers(1, 3))
    chosen = rng.choice(len(names), size=k, replace=False)
    changes: dict[str, str] = {}
    for i in sorted(int(c) for c in chosen):
        name = names[i]
        others = [v for v in _ATTRIBUTE_VALUES[name] if v != getattr(scene, name)]
        changes[name] = others[int(rng.integers(len(others)))]
    return replace(scene, **changes)
