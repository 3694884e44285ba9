"""Programmatic judges for the toy world: score images against captions from pixels alone.

Scorer convention (as in ddpo-pytorch): a factory returns ``fn(images, prompts) -> scores`` where
``images`` is a float numpy array or torch tensor of shape (B, 3, H, W) in [0, 1] (square, any
side >= 8; values are clipped to [0, 1]), ``prompts`` is a sequence of B captions in the grammar
of :mod:`snpo.toy.scenes`, and ``scores`` is a float64 numpy array of shape (B,); higher is better.

Two judges are deliberately computed in different ways:

* :func:`make_label_judge` plays the human raters that label preference pairs. It segments the
  foreground and measures interpretable attributes (colour, position, size, shape) plus image
  quality (sharpness, noise, contrast).
* :func:`make_heldout_judge` is never used for labelling; it compares the image with the
  canonical render of the prompt (registered structural similarity of the RGB image and of its
  layout map, plus colour-histogram overlap), so a policy that games the label judge's feature
  extractor should not also win here.

Both are vectorised numpy (torch input is converted at the boundary) and process the batch in
chunks of about a million pixels, so memory stays bounded for any batch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from snpo.toy.scenes import (
    BACKGROUND,
    COLOUR_RGB,
    COLOURS,
    POSITION_CENTRES,
    POSITIONS,
    SHAPE_AREA_FACTOR,
    SHAPES,
    SIZES,
    Scene,
    all_scenes,
    gaussian_blur,
    render,
    shape_coverage,
)

Scorer = Callable[[Any, Sequence[str]], np.ndarray]

_COLOUR_TABLE = np.array([COLOUR_RGB[c] for c in COLOURS], dtype=np.float64)  # (4, 3)
_CENTRE_TABLE = np.array([POSITION_CENTRES[p] for p in POSITIONS], dtype=np.float64)  # (5, 2)
_AREA_TABLE = np.array(  # canonical area fraction, indexed [shape, size]
    [[Scene(s, COLOURS[0], z, POSITIONS[0]).area for z in SIZES] for s in SHAPES],
    dtype=np.float64,
)
_SCENE_INDEX = {scene.caption: i for i, scene in enumerate(all_scenes())}
_ATTR_TABLE = np.array(  # (120, 4): shape, colour, size, position indices of each scene
    [
        (
            SHAPES.index(s.shape),
            COLOURS.index(s.colour),
            SIZES.index(s.size),
            POSITIONS.index(s.position),
        )
        for s in all_scenes()
    ],
    dtype=np.int64,
)

# ---------------------------------------------------------------------------------------------
# Label-judge constants (tolerances of the soft attribute scores).
# ---------------------------------------------------------------------------------------------
_SIGMA_COLOUR = 0.2  # RGB distance; canonical colours are >= 0.70 apart
_SIGMA_POSITION = 0.08  # fraction of the side; canonical centres are >= 0.23 apart
_SIGMA_LOG_AREA = 0.3  # log area; small vs large differs by log(3.41) = 1.23
_SHAPE_KAPPA = 25.0  # softmax sharpness over template IoUs
_PRESENCE_BASE, _PRESENCE_RAMP = 0.10, 0.10  # smoothed-contrast detection ramp (RGB units)
_NOISE_REF_STD = 0.04  # background noise std at which the noise factor is 1/2
_DETECT_SIGMA = 0.8  # px; pre-smoothing used only to *detect* the foreground


def _as_numpy(images: Any) -> np.ndarray:
    """(B, 3, H, W) float32 numpy copy clipped to [0, 1] (NaN -> 0); accepts numpy or torch."""
    if hasattr(images, "detach"):  # torch tensor: convert at the boundary, numpy from here on
        images = images.detach().to("cpu").float().numpy()
    x = np.array(images, dtype=np.float32)  # always a copy, so callers' arrays are untouched
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {x.shape}")
    if x.shape[2] != x.shape[3] or x.shape[2] < 8:
        raise ValueError(f"expected square images with side >= 8, got {x.shape[2:]}")
    x[np.isnan(x)] = 0.0
    return np.clip(x, 0.0, 1.0, out=x)


def _scene_ids(prompts: Sequence[str], batch: int) -> np.ndarray:
    """Index into :func:`all_scenes` for each prompt (ValueError on unknown captions)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of captions, not a single string")
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for {batch} images")
    ids = np.empty(batch, dtype=np.int64)
    for i, p in enumerate(prompts):
        idx = _SCENE_INDEX.get(p)
        if idx is None:
            Scene.from_caption(p)  # raises a ValueError naming the problem
            raise ValueError(f"caption {p!r} is not in the toy vocabulary")  # pragma: no cover
        ids[i] = idx
    return ids


def _dilate3(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation over the last two axes (out-of-image counts as False)."""
    pad = [(0, 0)] * (mask.ndim - 2) + [(1, 1), (1, 1)]
    p = np.pad(mask, pad, mode="constant", constant_values=False)
    h, w = mask.shape[-2:]
    out = np.zeros_like(mask)
    for i in range(3):
        for j in range(3):
            out |= p[..., i : i + h, j : j + w]
    return out


def _laplacian(x: np.ndarray) -> np.ndarray:
    """4-neighbour discrete Laplacian over the last two axes, valid region (H-2, W-2)."""
    c = x[..., 1:-1, 1:-1]
    return x[..., :-2, 1:-1] + x[..., 2:, 1:-1] + x[..., 1:-1, :-2] + x[..., 1:-1, 2:] - 4.0 * c


def high_frequency_energy(images: Any) -> np.ndarray:
    """Mean squared discrete-Laplacian response, a blur / noise measure, shape (B,).

    E = mean_{c, i, j} (L x)_{c,i,j}^2 with (L x)_{i,j} = x_{i-1,j} + x_{i+1,j} + x_{i,j-1}
    + x_{i,j+1} - 4 x_{i,j} over the valid interior (no padding). Blur lowers E; i.i.d. noise of
    std s adds 20 s^2.
    """
    lap = _laplacian(_as_numpy(images))
    return np.mean(lap * lap, axis=(1, 2, 3), dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Foreground segmentation shared by the label judge's terms.
# ---------------------------------------------------------------------------------------------


def _soft_peak(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum w v^17 / sum w v^16 over the last two axes: a smooth, outlier-tolerant maximum."""
    v = np.clip(values, 0.0, None)
    # Normalise by the hard maximum first so that v^16 cannot underflow for faint images.
    vmax = np.max(v * weights, axis=(-2, -1), keepdims=True)
    r = v / np.maximum(vmax, 1e-12)
    rp = r * r
    rp *= rp
    rp *= rp
    rp *= rp  # r^16 by repeated squaring (np.power with a float exponent is slow)
    rp *= weights
    peak = (rp * r).sum(axis=(-2, -1), dtype=np.float64) / np.maximum(
        rp.sum(axis=(-2, -1), dtype=np.float64), 1e-30
    )
    return peak * vmax[..., 0, 0]


def _segment(x: np.ndarray) -> dict[str, np.ndarray]:
    """Segment the single foreground shape of each image and measure its raw statistics.

    Steps (all per image):
      1. background b = per-channel median of the border pixels;
      2. direction u of the foreground colour: the d^4-weighted mean of the *smoothed* difference
         image g * (x - b) (Gaussian g, sigma 0.8 px, which suppresses i.i.d. noise), normalised;
      3. detection contrast D_s = soft-max over pixels of the smoothed projection <g*(x-b), u>;
      4. support M = pixels whose smoothed projection exceeds D_s / 4 (shape plus a ~1 px halo);
      5. foreground contrast D = soft-max of the unsmoothed projection p = <x - b, u> over M, and
         coverage alpha = clip(p / D, 0, 1) on M, 0 elsewhere (~ area coverage for a clean
         render, since a fully covered pixel has p = D);
      6. area = mean(alpha); centroid = alpha-weighted mean pixel centre (fractions of the side);
         colour m = b + alpha^4-weighted mean of the un-mixed pixel colours (x - b) / alpha.
    """
    b, _, h, w = x.shape
    border = np.concatenate(
        [x[:, :, 0, :], x[:, :, -1, :], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], axis=2
    )
    bg = np.median(border, axis=2)  # (B, 3)
    diff = x - bg[:, :, None, None]
    diff_s = gaussian_blur(diff, _DETECT_SIGMA)
    d4 = np.sum(diff_s * diff_s, axis=1)
    d4 *= d4  # (B, H, W)
    v = np.einsum("bchw,bhw->bc", diff_s, d4, dtype=np.float64)
    u = (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-20)).astype(np.float32)
    proj_s = np.einsum("bchw,bc->bhw", diff_s, u)
    contrast_s = _soft_peak(proj_s, np.ones_like(proj_s))
    support = proj_s > 0.25 * contrast_s[:, None, None].astype(np.float32)
    proj = np.einsum("bchw,bc->bhw", diff, u)
    contrast = _soft_peak(proj, support.astype(np.float32))
    scale = (1.0 / np.maximum(contrast, 1e-6)).astype(np.float32)[:, None, None]
    alpha = np.clip(proj * scale, 0.0, 1.0) * support
    mass = alpha.sum(axis=(1, 2), dtype=np.float64)
    safe_mass = np.maximum(mass, 1e-9)
    ty = (np.arange(h) + 0.5) / h
    tx = (np.arange(w) + 0.5) / w
    cx = (alpha.sum(axis=1, dtype=np.float64) * tx).sum(axis=1) / safe_mass
    cy = (alpha.sum(axis=2, dtype=np.float64) * ty).sum(axis=1) / safe_mass
    # Colour: un-mix partially covered pixels (x = b + alpha (c - b)  =>  c = b + (x - b) / alpha)
    # and average with weights alpha^4, so the few interior pixels of a 2-4 px shape dominate but
    # its edge pixels do not drag the estimate towards the background.
    a4 = alpha * alpha
    a4 *= a4
    unmixed = diff / np.maximum(alpha, 0.25)[:, None]
    colour = (
        bg
        + np.einsum("bchw,bhw->bc", unmixed, a4, dtype=np.float64)
        / np.maximum(a4.sum(axis=(1, 2), dtype=np.float64), 1e-12)[:, None]
    )
    return {
        "bg": bg,
        "u": u,
        "contrast_s": contrast_s,
        "contrast": contrast,
        "support": support,
        "alpha": alpha,
        "area": mass / (h * w),
        "cx": cx,
        "cy": cy,
        "colour": colour,
    }


def _template_ious(seg: dict[str, np.ndarray], resolution: int) -> np.ndarray:
    """Soft IoU of the measured coverage with each shape's template, shape (B, len(SHAPES)).

    The template of shape s is rendered at the measured centroid with the extent that gives the
    measured area, so the IoU isolates *shape* from position and size.
    """
    alpha = seg["alpha"]
    n = alpha.shape[0]
    area = np.maximum(seg["area"], 1e-6)
    ious = np.zeros((n, len(SHAPES)))
    for sid, name in enumerate(SHAPES):
        extent = np.sqrt(area / SHAPE_AREA_FACTOR[name])
        tmpl = shape_coverage(
            np.full(n, sid), seg["cx"], seg["cy"], extent, resolution, supersample=2
        )
        inter = np.minimum(alpha, tmpl).sum(axis=(1, 2), dtype=np.float64)
        union = np.maximum(alpha, tmpl).sum(axis=(1, 2), dtype=np.float64)
        ious[:, sid] = inter / np.maximum(union, 1e-9)
    return ious


@lru_cache(maxsize=8)
def _reference_sharpness(resolution: int) -> float:
    """Median edge sharpness of clean canonical renders at this resolution (normaliser)."""
    seg = _segment(render(all_scenes(), resolution))
    return float(np.median(_edge_sharpness(seg["alpha"])))


def _edge_sharpness(alpha: np.ndarray) -> np.ndarray:
    """Energy-weighted mean edge gradient sum |grad a|^2 / sum |grad a| of the coverage map.

    Scale-free in the perimeter; for an edge blurred by a Gaussian of sigma px it is about
    1 / (2 sqrt(pi) sigma), so it falls as edges get wider.
    """
    gx = np.diff(alpha, axis=2)
    gy = np.diff(alpha, axis=1)
    num = (gx * gx).sum(axis=(1, 2), dtype=np.float64) + (gy * gy).sum(
        axis=(1, 2), dtype=np.float64
    )
    den = np.abs(gx).sum(axis=(1, 2), dtype=np.float64) + np.abs(gy).sum(
        axis=(1, 2), dtype=np.float64
    )
    return np.where(den > 1e-9, num / np.maximum(den, 1e-9), 0.0)


def edge_sharpness(images: Any) -> np.ndarray:
    """Edge sharpness of each image's segmented shape relative to clean renders, (B,) float64.

    ``sum |grad a|^2 / sum |grad a|`` of the foreground coverage map ``a`` (see the label
    judge's segmentation), divided by the median of clean canonical renders at the same
    resolution: 1 = as sharp as a render, lower = blurrier edges. Unlike
    :func:`high_frequency_energy` it does not rise with background noise, so it separates
    blur from noise. An image with no foreground gets 0.
    """
    x = _as_numpy(images)
    step = max(1, (1 << 20) // (x.shape[2] * x.shape[3]))
    parts = [_edge_sharpness(_segment(x[i : i + step])["alpha"]) for i in range(0, x.shape[0], step)]
    sharp = np.concatenate(parts) if parts else np.zeros(0)
    return sharp.astype(np.float64) / _reference_sharpness(x.shape[-1])


def _chunked(
    fn: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]],
    images: Any,
    prompts: Sequence[str],
) -> dict[str, np.ndarray]:
    """Apply a per-chunk term function over ~1M-pixel chunks (bounded memory, cache-friendly)."""
    x = _as_numpy(images)
    ids = _scene_ids(prompts, x.shape[0])
    step = max(1, (1 << 20) // (x.shape[2] * x.shape[3]))
    parts = [fn(x[i : i + step], ids[i : i + step]) for i in range(0, x.shape[0], step)]
    if not parts:  # empty batch: run one dummy image for the keys, keep no rows
        dummy = fn(np.full((1, *x.shape[1:]), BACKGROUND, np.float32), np.zeros(1, np.int64))
        return {k: np.zeros(0) for k in dummy}
    return {k: np.concatenate([p[k] for p in parts]).astype(np.float64) for k in parts[0]}


def label_judge_terms(images: Any, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Every term of the label judge, each a float64 array (B,); ``"score"`` is the judge output.

    Useful for diagnostics (which attribute a policy gets wrong). See :func:`make_label_judge`
    for the formulas.
    """
    return _chunked(_label_terms, images, prompts)


def _label_terms(x: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    n, _, res, _ = x.shape
    attrs = _ATTR_TABLE[ids]
    shape_t, colour_t, size_t, pos_t = attrs.T
    seg = _segment(x)

    # Detection threshold grows with the noise level: smoothing (sigma 0.8 px) scales i.i.d.
    # noise std by 1 / (2 sqrt(pi) 0.8) = 0.35, and a maximum over pixels and colour directions
    # of smoothed noise reaches ~6 of those stds. Noise std from the median absolute Laplacian,
    # which the few edge pixels of a clean shape cannot move.
    lap = _laplacian(x)  # (B, 3, H-2, W-2)
    noise_mad = np.median(np.abs(lap).reshape(n, -1), axis=1) / (0.6745 * math.sqrt(20.0))
    threshold = _PRESENCE_BASE + 6.0 * 0.353 * noise_mad
    presence = np.clip((seg["contrast_s"] - threshold) / _PRESENCE_RAMP, 0.0, 1.0)

    colour_err2 = np.sum((seg["colour"] - _COLOUR_TABLE[colour_t]) ** 2, axis=1)
    colour = np.exp(-colour_err2 / (2 * _SIGMA_COLOUR**2))

    centre = _CENTRE_TABLE[pos_t]
    pos_err2 = (seg["cx"] - centre[:, 0]) ** 2 + (seg["cy"] - centre[:, 1]) ** 2
    position = np.exp(-pos_err2 / (2 * _SIGMA_POSITION**2))

    log_ratio = np.log(np.maximum(seg["area"], 1e-6) / _AREA_TABLE[shape_t, size_t])
    size = np.exp(-(log_ratio**2) / (2 * _SIGMA_LOG_AREA**2))

    ious = _template_ious(seg, res)
    logits = _SHAPE_KAPPA * ious
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    iou_t = ious[np.arange(n), shape_t]
    shape = probs[np.arange(n), shape_t] * iou_t

    fidelity = (colour + position + size + shape) / 4.0

    sharp = np.clip(_edge_sharpness(seg["alpha"]) / _reference_sharpness(res), 0.0, 1.0)

    # Noise: std estimated from the Laplacian (variance 20 s^2 for i.i.d. noise) on background
    # pixels at least 2 px from the detected support, so the shape's own edges do not count.
    far_bg = ~_dilate3(_dilate3(seg["support"]))[:, 1:-1, 1:-1]
    count = far_bg.sum(axis=(1, 2))
    lap2 = (lap**2).mean(axis=1)
    bg_energy = np.where(
        count >= 8,
        (lap2 * far_bg).sum(axis=(1, 2)) / np.maximum(count, 1),
        lap2.mean(axis=(1, 2)),
    )
    noise_std = np.sqrt(bg_energy / 20.0)
    noise = 1.0 / (1.0 + (noise_std / _NOISE_REF_STD) ** 2)

    # Contrast: foreground-background contrast relative to the canonical contrast of the
    # canonical colour whose direction (from the background) is closest; washout scales it by
    # the contrast factor, hue-independently.
    canon = _COLOUR_TABLE - BACKGROUND
    cos = seg["u"] @ (canon / np.linalg.norm(canon, axis=1, keepdims=True)).T
    ref = np.linalg.norm(canon, axis=1)[np.argmax(cos, axis=1)]
    contrast = np.clip(seg["contrast"] / ref, 0.0, 1.0)

    quality = (sharp + noise + contrast) / 3.0
    score = presence * (0.7 * fidelity + 0.3 * quality)
    return {
        "score": score,
        "presence": presence,
        "fidelity": fidelity,
        "quality": quality,
        "colour": colour,
        "position": position,
        "size": size,
        "shape": shape,
        "sharpness": sharp,
        "noise": noise,
        "contrast": contrast,
    }


def make_label_judge() -> Scorer:
    """Judge that labels preference pairs (stands in for human raters). Score in [0, 1].

    Foreground segmentation (details in ``_segment``): background b = border median; the shape's
    coverage alpha = clip(<x - b, u> / D, 0, 1) on a detected support, with u the foreground
    colour direction and D its contrast. From alpha: area A, centroid c, interior colour m.

    With the prompt's canonical colour C, centre p, area A0 (:attr:`Scene.area`) and shape t:

        colour    = exp(-|m - C|^2 / (2 * 0.2^2))
        position  = exp(-|c - p|^2 / (2 * 0.08^2))                (fractions of the side)
        size      = exp(-log(A / A0)^2 / (2 * 0.3^2))
        shape     = softmax_s(25 * IoU_s)[t] * IoU_t              (IoU_s: soft IoU of alpha with
                                                                  shape s rendered at c, area A)
        fidelity  = (colour + position + size + shape) / 4

        sharpness = min(1, S(alpha) / S_clean),  S = sum |grad alpha|^2 / sum |grad alpha|
        noise     = 1 / (1 + (s / 0.04)^2),  s = sqrt(mean background Laplacian^2 / 20)
        contrast  = min(1, D / |C_k - BG|),  C_k the canonical colour nearest in direction to u
        quality   = (sharpness + noise + contrast) / 3

        presence  = clip((D_s - 0.10 - 2.1 s_mad) / 0.10, 0, 1)
                    (D_s: soft-max foreground contrast after 0.8 px smoothing; s_mad: noise std
                    from the median |Laplacian|; 0 for an empty or pure-noise image)
        score     = presence * (0.7 * fidelity + 0.3 * quality)

    ``label_judge_terms`` returns every term for diagnostics.
    """

    def judge(images: Any, prompts: Sequence[str]) -> np.ndarray:
        return label_judge_terms(images, prompts)["score"]

    return judge


# ---------------------------------------------------------------------------------------------
# Held-out judge: compare with the canonical render.
# ---------------------------------------------------------------------------------------------
_SSIM_SIGMA = 1.0  # px, Gaussian window of the local statistics
_SSIM_C1 = 0.01**2
_SSIM_C2 = 0.03**2
_HIST_BINS = 4  # per channel, joint RGB histogram of 4^3 = 64 bins


def _max_shift(resolution: int) -> int:
    """Misregistration (px) the held-out SSIM forgives: 1 px up to 47 px images, then ~side/32."""
    return max(1, round(resolution / 32))


@lru_cache(maxsize=8)
def _canonical_renders(resolution: int) -> np.ndarray:
    """Canonical renders of all 120 scenes at ``resolution`` (read-only float64 array)."""
    ref = render(all_scenes(), resolution).astype(np.float64)
    ref.setflags(write=False)
    return ref


def _ssim_map(
    mx: np.ndarray, vx: np.ndarray, my: np.ndarray, vy: np.ndarray, cxy: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel SSIM and its information weight from local statistics (float32 maps)."""
    c1, c2 = np.float32(_SSIM_C1), np.float32(_SSIM_C2)
    spread = vx + vy
    ssim = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (spread + c2))
    return ssim, spread + np.float32(1e-8)


def _iw_mean(ssim: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """sum w * ssim / sum w over channels and pixels, shape (B,), float64."""
    num = (ssim * weight).sum(axis=(1, 2, 3), dtype=np.float64)
    return num / weight.sum(axis=(1, 2, 3), dtype=np.float64)


def _mean_var(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-window local mean and variance (per channel and pixel), float32."""
    x = np.asarray(x, dtype=np.float32)
    m = gaussian_blur(x, _SSIM_SIGMA)
    return m, np.maximum(gaussian_blur(x * x, _SSIM_SIGMA) - m * m, 0.0)


def _with_layout(x: np.ndarray) -> np.ndarray:
    """Append the layout channel |x - BG| (RGB distance from the background grey): (B, 4, H, W)."""
    layout = np.sqrt(np.sum((x - np.float32(BACKGROUND)) ** 2, axis=1, keepdims=True))
    return np.concatenate([x, layout], axis=1)


def structural_similarity(images: Any, references: Any) -> np.ndarray:
    """Information-weighted SSIM between images and references (both (B, 3, H, W)), shape (B,).

    With Gaussian-window (sigma 1 px, edge padding) local means mu, variances s^2 and covariance
    s_xy per channel and pixel,

        ssim = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))
        IW-SSIM = sum w * ssim / sum w,   w = s_x^2 + s_y^2 + 1e-8,

    C1 = 0.01^2, C2 = 0.03^2, sums over channels and pixels. The weights make the flat
    background, which every image shares, count for nothing, so the score is about the shape.
    Range [-1, 1]; 1 iff identical.
    """
    x = _as_numpy(images)
    y = _as_numpy(references)
    if x.shape != y.shape:
        raise ValueError(f"image and reference shapes differ: {x.shape} vs {y.shape}")
    mx, vx = _mean_var(x)
    my, vy = _mean_var(y)
    cxy = gaussian_blur(x * y, _SSIM_SIGMA) - mx * my
    return _iw_mean(*_ssim_map(mx, vx, my, vy, cxy))


@lru_cache(maxsize=4)
def _reference_bank(resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shifted canonical renders (RGB + layout channel) and their local mean / variance.

    Each array is (S, 120, 4, H, W). Shift s moves the render by (dy, dx) in [-k, k]^2 px,
    k = :func:`_max_shift`, filling with the background grey (the canonical background is
    flat, so this is the render of a shifted scene up to border clipping). Float32, read-only.
    """
    ref = _canonical_renders(resolution).astype(np.float32)
    k = _max_shift(resolution)
    padded = np.pad(ref, ((0, 0), (0, 0), (k, k), (k, k)), constant_values=BACKGROUND)
    shifted = np.stack(
        [
            _with_layout(padded[:, :, k + dy : k + dy + resolution, k + dx : k + dx + resolution])
            for dy in range(-k, k + 1)
            for dx in range(-k, k + 1)
        ]
    )
    mean, var = _mean_var(shifted)
    for a in (shifted, mean, var):
        a.setflags(write=False)
    return shifted, mean, var


def _registered_ssim(x: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(RGB IW-SSIM, layout IW-SSIM) of x against the registered canonical render of each prompt.

    The shift s* = argmax_s <L(x), L(T_s R)> (cross-correlation of the layout maps
    L = |x - BG|, so registration works whatever the colours) is chosen first; both SSIMs are
    then computed once, against T_s* R.
    """
    ref, ref_mean, ref_var = _reference_bank(x.shape[-1])
    n = x.shape[0]
    x4 = _with_layout(x)
    layout = x4[:, 3].reshape(n, -1)
    corr = np.stack(
        [np.einsum("bp,bp->b", layout, ref[s, ids, 3].reshape(n, -1)) for s in range(ref.shape[0])]
    )
    # Ties (e.g. an empty image) resolve to the first maximum; put the unshifted reference
    # first so they resolve to no shift.
    order = np.roll(np.arange(ref.shape[0]), -(ref.shape[0] // 2))
    best = order[np.argmax(corr[order], axis=0)]
    my = ref_mean[best, ids]
    mx, vx = _mean_var(x4)
    cxy = gaussian_blur(x4 * ref[best, ids], _SSIM_SIGMA) - mx * my
    ssim, weight = _ssim_map(mx, vx, my, ref_var[best, ids], cxy)
    return _iw_mean(ssim[:, :3], weight[:, :3]), _iw_mean(ssim[:, 3:], weight[:, 3:])


def _salient_histograms(x: np.ndarray) -> np.ndarray:
    """Joint RGB histograms (B, 64), each pixel weighted by its distance from the background.

    Trilinear soft binning over bin centres (k + 0.5) / 4 (tent weights max(0, 1 - |4 x - 0.5 -
    k|), clamped at the outer bins); weight |x - BG| (the world's constant background grey), so
    the shared background contributes nothing and a larger or brighter foreground contributes
    more. Normalised by the pixel count.
    """
    n = x.shape[0]
    k = _HIST_BINS
    pix = np.asarray(x, dtype=np.float32).reshape(n, 3, -1)  # (B, 3, P)
    weight = np.sqrt(np.sum((pix - np.float32(BACKGROUND)) ** 2, axis=1))  # (B, P)
    pos = np.clip(pix * k - 0.5, 0.0, k - 1.0)
    centres = np.arange(k, dtype=np.float32)
    tent = np.maximum(0.0, 1.0 - np.abs(pos[..., None] - centres))  # (B, 3, P, k)
    r, g, b = tent[:, 0] * weight[..., None], tent[:, 1], tent[:, 2]
    rg = (r[..., :, None] * g[..., None, :]).reshape(n, -1, k * k)  # (B, P, k^2)
    hist = np.matmul(rg.transpose(0, 2, 1), b)  # (B, k^2, k)
    return hist.reshape(n, k**3).astype(np.float64) / pix.shape[-1]


@lru_cache(maxsize=8)
def _canonical_histograms(resolution: int) -> np.ndarray:
    h = _salient_histograms(_canonical_renders(resolution))
    h.setflags(write=False)
    return h


def heldout_judge_terms(images: Any, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Terms of the held-out judge (float64 arrays (B,)); ``"score"`` is the judge output."""
    return _chunked(_heldout_terms, images, prompts)


def _heldout_terms(x: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    ssim_rgb, ssim_layout = _registered_ssim(x, ids)
    ssim = np.clip(ssim_rgb, 0.0, 1.0)
    layout = np.clip(ssim_layout, 0.0, 1.0)
    hx = _salient_histograms(x)
    hr = _canonical_histograms(x.shape[-1])[ids]
    hist = np.minimum(hx, hr).sum(axis=1) / np.maximum(np.maximum(hx, hr).sum(axis=1), 1e-12)
    score = 0.5 * ssim + 0.2 * layout + 0.3 * hist
    return {"score": score, "ssim": ssim, "layout": layout, "histogram": hist}


def make_heldout_judge() -> Scorer:
    """Held-out judge (never used for labelling; detects reward hacking). Score in [0, 1].

    With R the canonical render of the prompt's scene at the image's resolution, L(y) = |y - BG|
    the single-channel "layout" map (RGB distance from the background grey) and T_s the
    translation by s = (dy, dx) in [-k, k]^2 px, k = max(1, round(side / 32)) (so registration
    errors of about a pixel, e.g. from render jitter, are forgiven):

        s*        = argmax_s <L(x), L(T_s R)>             (cross-correlation registration)
        ssim      = clip(IW-SSIM(x, T_s* R), 0, 1)        (RGB; see :func:`structural_similarity`)
        layout    = clip(IW-SSIM(L(x), L(T_s* R)), 0, 1)  (where the shape is, whatever colour)
        histogram = sum_k min(h_x, h_R) / sum_k max(h_x, h_R)   (weighted Jaccard / Ruzicka)
        score     = 0.5 * ssim + 0.2 * layout + 0.3 * histogram

    where h is a 4x4x4 joint RGB histogram (trilinear soft binning) in which each pixel counts
    with weight |pixel - BG|, so it measures how much of which colour is in the foreground.
    Unlike the label judge there is no segmentation, no attribute model and no quality model:
    the image must look like the canonical render, pixel by pixel.
    """

    def judge(images: Any, prompts: Sequence[str]) -> np.ndarray:
        return heldout_judge_terms(images, prompts)["score"]

    return judge


# ---------------------------------------------------------------------------------------------
# Preference labels.
# ---------------------------------------------------------------------------------------------


def bradley_terry_labels(
    score_0: np.ndarray,
    score_1: np.ndarray,
    *,
    temperature: float,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Sample preference labels: 1 where image 0 is preferred, 0 where image 1 is. Shape (B,).

    P(label = 1) = sigmoid((score_0 - score_1) / temperature): the Bradley-Terry model, i.e. a
    rater who compares the scores after adding independent Gumbel noise of scale ``temperature``
    to each. ``temperature = 0`` is deterministic: label = [score_0 >= score_1], ties going to
    image 0, and ``rng`` is not needed.
    """
    s0 = np.asarray(score_0, dtype=np.float64).reshape(-1)
    s1 = np.asarray(score_1, dtype=np.float64).reshape(-1)
    if s0.shape != s1.shape:
        raise ValueError(f"score shapes differ: {s0.shape} vs {s1.shape}")
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if temperature == 0:
        return (s0 >= s1).astype(np.int64)
    if rng is None:
        raise ValueError("bradley_terry_labels(temperature > 0) needs an rng")
    z = (s0 - s1) / temperature
    # Numerically stable sigmoid for large |z|.
    e = np.exp(-np.abs(z))  # in (0, 1]: no overflow for any z
    p = np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return (rng.random(s0.shape[0]) < p).astype(np.int64)
