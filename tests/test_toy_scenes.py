"""The toy world's scenes (captions, renderer, degradations) and its two pixel judges.

What is checked against what:
* captions against the grammar written out literally here, for all 120 scenes, and WORDS
  against the words actually used;
* renders against facts derived here from the pixels alone: the background value, the shape's
  coverage alpha = <x - BG, C - BG> / |C - BG|^2 (C the canonical colour, numbers typed in from
  the spec), its centroid (canonical centre), area (pi r^2 for circles), orientation (upright
  triangle: wider rows further down) and interior colour;
* degradations against their closed forms (noise std on mid-grey, the Gaussian's variance on an
  impulse, washout of the background), and the Laplacian energy of i.i.d. noise (20 s^2);
* both judges: the right prompt beats every one-attribute-wrong prompt for every scene and every
  alternative value; clean beats blurred / noisy / washed-out; an empty image is the worst;
  jitter=0.05 renders (the pretraining data) still beat wrong prompts by a clear margin;
* Bradley-Terry label frequencies against the sigmoid with a binomial tolerance.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from snpo.toy.judges import (
    bradley_terry_labels,
    heldout_judge_terms,
    high_frequency_energy,
    label_judge_terms,
    make_heldout_judge,
    make_label_judge,
    structural_similarity,
)
from snpo.toy.scenes import (
    COLOURS,
    DEGRADATIONS,
    POSITIONS,
    SHAPES,
    SIZES,
    WORDS,
    Scene,
    all_scenes,
    corrupt_caption,
    degrade,
    render,
)

# Spec values, typed in independently of the module's tables.
SPEC_RGB = {
    "red": (0.9, 0.15, 0.15),
    "green": (0.15, 0.8, 0.2),
    "blue": (0.2, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
}
SPEC_CENTRE = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
SPEC_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
SPEC_RADIUS = {"small": 0.13, "large": 0.24}
ATTRIBUTES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}
JUDGES = {"label": make_label_judge(), "heldout": make_heldout_judge()}


def coverage(images: np.ndarray, scenes: list[Scene]) -> np.ndarray:
    """alpha = <x - BG, C - BG> / |C - BG|^2 per pixel, from the spec's colours and 0.15 grey."""
    c = np.array([SPEC_RGB[s.colour] for s in scenes]) - 0.15
    diff = images.astype(np.float64) - 0.15
    return np.einsum("bchw,bc->bhw", diff, c) / (c**2).sum(axis=1)[:, None, None]


# ------------------------------------------------------------------------------------ captions


def test_caption_grammar_and_round_trip_for_all_scenes():
    scenes = all_scenes()
    assert len(scenes) == 120 and len(set(scenes)) == 120
    assert scenes == all_scenes()  # deterministic order
    captions = [s.caption for s in scenes]
    assert len(set(captions)) == 120
    for s in scenes:
        expected = f"a {s.size} {s.colour} {s.shape} {SPEC_PHRASE[s.position]}"
        assert s.caption == expected
        assert Scene.from_caption(expected) == s
    assert Scene("circle", "red", "small", "left").caption == "a small red circle on the left"
    assert {(s.shape, s.colour, s.size, s.position) for s in scenes} == {
        (a, b, c, d) for a in SHAPES for b in COLOURS for c in SIZES for d in POSITIONS
    }


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a small red circle",
        "a small red circle on the middle",
        "a tiny red circle on the left",
        "a small purple circle on the left",
        "a small red hexagon on the left",
        "A small red circle on the left",
        "a small red circle  on the left",
        "a small red circle on the left please",
        "the small red circle on the left",
    ],
)
def test_from_caption_rejects_unparseable_captions_with_one_line(bad):
    with pytest.raises(ValueError) as info:
        Scene.from_caption(bad)
    assert "\n" not in str(info.value)


def test_words_is_exactly_the_caption_vocabulary():
    used = {w for s in all_scenes() for w in s.caption.split(" ")}
    assert isinstance(WORDS, tuple)
    assert list(WORDS) == sorted(set(WORDS))
    assert set(WORDS) == used


def test_corrupt_caption_changes_one_or_two_attributes():
    rng = np.random.default_rng(0)
    counts = {1: 0, 2: 0}
    changed = dict.fromkeys(ATTRIBUTES, 0)
    for i in range(600):
        scene = all_scenes()[i % 120]
        out = corrupt_caption(scene, rng)
        diffs = [a for a in ATTRIBUTES if getattr(out, a) != getattr(scene, a)]
        assert len(diffs) in (1, 2)
        assert Scene.from_caption(out.caption) == out
        counts[len(diffs)] += 1
        for a in diffs:
            changed[a] += 1
    assert min(counts.values()) > 200  # both equally likely (expected 300 each)
    assert min(changed.values()) > 100  # every attribute gets corrupted


# ------------------------------------------------------------------------------------ renderer


@pytest.mark.parametrize("resolution", [16, 24, 32])
def test_render_shape_dtype_range_background(resolution):
    scenes = all_scenes()
    images = render(scenes, resolution)
    assert images.shape == (120, 3, resolution, resolution)
    assert images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    # The corners are background for every canonical scene: exactly the 0.15 grey.
    for corner in (images[:, :, 0, 0], images[:, :, -1, -1], images[:, :, 0, -1]):
        np.testing.assert_allclose(corner, 0.15, atol=1e-6)
    # Every image holds exactly one shape: coverage reaches 1 (a fully covered pixel).
    alpha = coverage(images, scenes)
    assert alpha.min() > -1e-5 and alpha.max() < 1 + 1e-5
    assert np.all(alpha.max(axis=(1, 2)) > 0.99)


@pytest.mark.parametrize("resolution", [16, 32])
def test_rendered_shape_lands_at_canonical_centre_with_canonical_size(resolution):
    scenes = all_scenes()
    alpha = coverage(render(scenes, resolution), scenes)
    t = (np.arange(resolution) + 0.5) / resolution
    mass = alpha.sum(axis=(1, 2))
    cx = (alpha.sum(axis=1) * t).sum(axis=1) / mass
    cy = (alpha.sum(axis=2) * t).sum(axis=1) / mass
    expected = np.array([SPEC_CENTRE[s.position] for s in scenes])
    assert np.abs(cx - expected[:, 0]).max() < 0.01
    assert np.abs(cy - expected[:, 1]).max() < 0.01
    area = mass / resolution**2
    for i, s in enumerate(scenes):
        if s.shape == "circle":  # the spec's radius
            assert area[i] == pytest.approx(math.pi * SPEC_RADIUS[s.size] ** 2, rel=0.03)
    # The three shapes at one size are of comparable size, and large is much larger than small.
    by = {(s.shape, s.size): area[i] for i, s in enumerate(scenes) if s.position == "center"}
    for size in SIZES:
        areas = [by[(shape, size)] for shape in SHAPES]
        assert max(areas) / min(areas) < 2.2
    for shape in SHAPES:
        assert by[(shape, "large")] / by[(shape, "small")] > 3.0


def test_rendered_colour_and_upright_triangle():
    scenes = [Scene(s, c, "large", "center") for s in SHAPES for c in COLOURS]
    images = render(scenes, 32)
    for img, s in zip(images, scenes):
        np.testing.assert_allclose(img[:, 16, 16], SPEC_RGB[s.colour], atol=1e-5)

    def alpha_of(shape: str) -> np.ndarray:
        scene = Scene(shape, "red", "large", "center")
        return coverage(render([scene], 32), [scene])[0]

    widths = alpha_of("triangle").sum(axis=1)
    rows = np.flatnonzero(widths > 0.5)
    # Upright: the rows get wider towards the base (y grows downwards), then stop at the base.
    assert np.all(np.diff(widths[rows[0] : rows[-1]]) > 0)
    assert widths[rows[-1] + 1] < 0.5 * widths[rows[-1]]
    # A square is as wide near its top as in the middle; a circle is not.
    sq, ci = alpha_of("square"), alpha_of("circle")
    assert sq[10].sum() == pytest.approx(sq[16].sum(), rel=1e-3)
    assert ci[10].sum() < 0.9 * ci[16].sum()


def test_render_is_anti_aliased():
    images = render([Scene("circle", "blue", "large", "center")], 16)
    alpha = coverage(images, [Scene("circle", "blue", "large", "center")])[0]
    partial = (alpha > 0.02) & (alpha < 0.98)
    assert partial.sum() >= 8  # edge pixels carry fractional coverage


def test_render_jitter_is_seeded_bounded_and_needs_rng():
    scenes = all_scenes()
    a = render(scenes, 16, rng=np.random.default_rng(3), jitter=0.05)
    b = render(scenes, 16, rng=np.random.default_rng(3), jitter=0.05)
    c = render(scenes, 16, rng=np.random.default_rng(4), jitter=0.05)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    canonical = render(scenes, 16)
    assert 0 < np.abs(a - canonical).mean() < 0.05
    np.testing.assert_array_equal(render(scenes, 16, rng=np.random.default_rng(0)), canonical)
    with pytest.raises(ValueError):
        render(scenes, 16, jitter=0.05)


def test_render_ten_thousand_scenes_is_fast():
    rng = np.random.default_rng(0)
    scenes = [all_scenes()[i] for i in rng.integers(0, 120, 10_000)]
    start = time.perf_counter()
    images = render(scenes, 16, rng=rng, jitter=0.05)
    assert time.perf_counter() - start < 8.0  # typically ~0.4 s; slack for loaded CI machines
    assert images.shape == (10_000, 3, 16, 16)


# -------------------------------------------------------------------------------- degradations


def test_degrade_contract():
    rng = np.random.default_rng(0)
    images = render(all_scenes()[:10], 16)
    before = images.copy()
    for kind in DEGRADATIONS:
        out = degrade(images, kind, rng)
        assert out.shape == images.shape and out.dtype == np.float32
        assert out.min() >= 0 and out.max() <= 1
        assert not np.array_equal(out, images)
        np.testing.assert_array_equal(degrade(images, kind, rng, strength=0.0), images)
    np.testing.assert_array_equal(images, before)  # inputs untouched
    with pytest.raises(ValueError):
        degrade(images, "jpeg", rng)


def test_degrade_closed_forms():
    rng = np.random.default_rng(0)
    grey = np.full((64, 3, 16, 16), 0.5, dtype=np.float32)
    noisy = degrade(grey, "noise", rng)
    assert noisy.std() == pytest.approx(0.12, rel=0.03)
    assert degrade(grey, "noise", rng, strength=0.5).std() == pytest.approx(0.06, rel=0.03)
    # Washout: 50 % contrast towards mid-grey at strength 1, so background 0.15 -> 0.325.
    washed = degrade(render(all_scenes(), 16), "washout", rng)
    np.testing.assert_allclose(washed[:, :, 0, 0], 0.325, atol=1e-6)
    # Blur: an impulse spreads into a Gaussian of variance ~1 px^2 per axis (sigma ~1 px).
    impulse = np.zeros((1, 3, 17, 17), dtype=np.float32)
    impulse[..., 8, 8] = 1.0
    response = degrade(impulse, "blur", rng)[0, 0].astype(np.float64)
    assert response.sum() == pytest.approx(1.0, abs=1e-5)
    offsets = np.arange(17) - 8
    var_x = (response.sum(axis=0) * offsets**2).sum()
    assert 0.9 < var_x < 1.1
    flat = np.full((1, 3, 16, 16), 0.3, dtype=np.float32)
    np.testing.assert_allclose(degrade(flat, "blur", rng), 0.3, atol=1e-6)  # edge padding


def test_high_frequency_energy():
    rng = np.random.default_rng(0)
    images = render(all_scenes(), 16)
    clean = high_frequency_energy(images)
    assert clean.shape == (120,) and clean.dtype == np.float64
    assert np.all(high_frequency_energy(degrade(images, "blur", rng)) < clean)
    assert np.all(high_frequency_energy(degrade(images, "blur", rng, 2.0)) < 0.5 * clean)
    # i.i.d. noise of std s has Laplacian variance (16 + 4) s^2.
    grey = 0.5 + rng.normal(0, 0.05, size=(32, 3, 16, 16))
    assert high_frequency_energy(grey).mean() == pytest.approx(20 * 0.05**2, rel=0.05)
    np.testing.assert_allclose(high_frequency_energy(np.full((2, 3, 16, 16), 0.4)), 0.0)
    np.testing.assert_allclose(high_frequency_energy(torch.from_numpy(images)), clean)


# -------------------------------------------------------------------------------------- judges


@pytest.mark.parametrize("name", list(JUDGES))
def test_judge_contract(name):
    judge = JUDGES[name]
    scenes = all_scenes()[:7]
    prompts = [s.caption for s in scenes]
    images = render(scenes, 16)
    scores = judge(images, prompts)
    assert isinstance(scores, np.ndarray) and scores.shape == (7,) and scores.dtype == np.float64
    assert np.all((scores >= 0) & (scores <= 1))
    np.testing.assert_allclose(judge(torch.from_numpy(images), prompts), scores, atol=1e-6)
    np.testing.assert_allclose(judge(images.astype(np.float64), tuple(prompts)), scores, atol=1e-6)
    assert judge(images[:0], []).shape == (0,)
    with pytest.raises(ValueError):
        judge(images, prompts[:-1])
    with pytest.raises(ValueError):
        judge(images, prompts[:-1] + ["a small red star on the left"])


def _one_attribute_wrong(scenes: list[Scene]) -> tuple[list[int], list[str], list[str]]:
    """(image index, wrong caption, attribute) for every scene x attribute x alternative value."""
    idx, captions, kinds = [], [], []
    for i, s in enumerate(scenes):
        for attr, values in ATTRIBUTES.items():
            for v in values:
                if v != getattr(s, attr):
                    idx.append(i)
                    captions.append(replace(s, **{attr: v}).caption)
                    kinds.append(attr)
    return idx, captions, kinds


@pytest.mark.parametrize("resolution", [16, 32])
@pytest.mark.parametrize("name", list(JUDGES))
def test_right_prompt_beats_every_one_attribute_wrong_prompt(name, resolution):
    judge = JUDGES[name]
    scenes = all_scenes() if resolution == 16 else all_scenes()[::3]
    images = render(scenes, resolution)
    right = judge(images, [s.caption for s in scenes])
    idx, captions, kinds = _one_attribute_wrong(scenes)
    wrong = judge(images[idx], captions)
    margin = right[idx] - wrong
    for attr in ATTRIBUTES:
        sel = np.array([k == attr for k in kinds])
        assert margin[sel].min() > 0.02, (name, attr, margin[sel].min())
        assert margin[sel].mean() > 0.15, (name, attr, margin[sel].mean())


@pytest.mark.parametrize("name", list(JUDGES))
def test_degradations_lower_both_judges(name):
    judge = JUDGES[name]
    rng = np.random.default_rng(0)
    scenes = all_scenes()
    prompts = [s.caption for s in scenes]
    images = render(scenes, 16)
    clean = judge(images, prompts)
    for kind in DEGRADATIONS:
        worse = judge(degrade(images, kind, rng), prompts)
        assert np.all(worse < clean - 0.02), (kind, (clean - worse).min())
        much_worse = judge(degrade(images, kind, rng, strength=2.0), prompts)
        assert much_worse.mean() < worse.mean(), kind


@pytest.mark.parametrize("name", list(JUDGES))
def test_empty_image_scores_lowest(name):
    judge = JUDGES[name]
    rng = np.random.default_rng(0)
    scenes = all_scenes()
    prompts = [s.caption for s in scenes]
    images = render(scenes, 16)
    empty = np.full_like(images, 0.15)
    empty_scores = judge(empty, prompts)
    idx, captions, _ = _one_attribute_wrong(scenes)
    others = [judge(images[idx], captions)] + [
        judge(degrade(images, kind, rng), prompts) for kind in DEGRADATIONS
    ]
    assert empty_scores.max() < min(o.min() for o in others)
    assert empty_scores.max() < 0.1
    noise_only = degrade(empty, "noise", rng)
    assert judge(noise_only, prompts).max() < min(o.min() for o in others)


@pytest.mark.parametrize("name", list(JUDGES))
def test_jittered_renders_still_clearly_beat_wrong_prompts(name):
    judge = JUDGES[name]
    rng = np.random.default_rng(7)
    scenes = [all_scenes()[i] for i in rng.integers(0, 120, 1200)]
    images = render(scenes, 16, rng=rng, jitter=0.05)
    right = judge(images, [s.caption for s in scenes])
    wrong_scenes = [corrupt_caption(s, rng) for s in scenes]
    wrong = judge(images, [s.caption for s in wrong_scenes])
    assert right.mean() - wrong.mean() > 0.2
    assert np.mean(right > wrong) > 0.97
    # Per attribute kind (one attribute wrong), including the hardest: circle vs square.
    for attr, values in ATTRIBUTES.items():
        alt = [
            replace(s, **{attr: values[(values.index(getattr(s, attr)) + 1) % len(values)]})
            for s in scenes
        ]
        wrong_1 = judge(images, [s.caption for s in alt])
        assert right.mean() - wrong_1.mean() > 0.1, attr
        assert np.mean(right > wrong_1) > 0.95, attr
    # Jitter costs far less than a wrong attribute.
    clean = judge(render(scenes, 16), [s.caption for s in scenes])
    assert clean.mean() - right.mean() < right.mean() - wrong.mean()


def test_label_judge_terms_are_bounded_and_attribute_specific():
    scenes = all_scenes()
    images = render(scenes, 16)
    terms = label_judge_terms(images, [s.caption for s in scenes])
    for key, value in terms.items():
        assert value.shape == (120,) and np.all((value >= 0) & (value <= 1)), key
    assert terms["presence"].min() == 1.0
    for attr in ("colour", "position", "size", "shape"):
        assert terms[attr].min() > 0.8, attr
    # A wrong colour is seen by the colour term and not by the position term.
    wrong = [replace(s, colour=COLOURS[(COLOURS.index(s.colour) + 1) % 4]) for s in scenes]
    t = label_judge_terms(images, [s.caption for s in wrong])
    assert t["colour"].max() < 0.05 and t["position"].min() > 0.9


def test_heldout_judge_is_one_for_the_canonical_render_and_ssim_is_symmetric():
    scenes = all_scenes()
    images = render(scenes, 24)
    terms = heldout_judge_terms(images, [s.caption for s in scenes])
    np.testing.assert_allclose(terms["score"], 1.0, atol=1e-5)
    rng = np.random.default_rng(0)
    other = degrade(images, "noise", rng)
    a = structural_similarity(images, other)
    np.testing.assert_allclose(a, structural_similarity(other, images), atol=1e-5)
    np.testing.assert_allclose(structural_similarity(images, images), 1.0, atol=1e-5)
    assert np.all(a < 0.95)


# ------------------------------------------------------------------------------ Bradley-Terry


def test_bradley_terry_frequencies_match_sigmoid():
    rng = np.random.default_rng(1234)
    n = 20_000
    for diff, temperature in [(0.0, 0.1), (0.05, 0.1), (-0.2, 0.1), (0.3, 0.5), (1.0, 0.25)]:
        s0 = np.full(n, 0.5 + diff)
        s1 = np.full(n, 0.5)
        labels = bradley_terry_labels(s0, s1, temperature=temperature, rng=rng)
        assert labels.shape == (n,) and set(np.unique(labels)) <= {0, 1}
        p = 1.0 / (1.0 + math.exp(-diff / temperature))
        se = math.sqrt(p * (1 - p) / n)
        assert abs(labels.mean() - p) < 4 * se + 1e-9, (diff, temperature, labels.mean(), p)


def test_bradley_terry_temperature_zero_and_errors():
    s0 = np.array([0.1, 0.5, 0.9, 0.5])
    s1 = np.array([0.2, 0.5, 0.3, 0.49])
    expected = np.array([0, 1, 1, 1])  # the tie goes to image 0
    for seed in range(3):
        labels = bradley_terry_labels(s0, s1, temperature=0.0, rng=np.random.default_rng(seed))
        np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(bradley_terry_labels(s0, s1, temperature=0), expected)
    with np.errstate(over="raise"):
        extreme = bradley_terry_labels(
            np.array([1e6, -1e6]), np.zeros(2), temperature=1e-3, rng=np.random.default_rng(0)
        )
    np.testing.assert_array_equal(extreme, [1, 0])
    with pytest.raises(ValueError):
        bradley_terry_labels(s0, s1, temperature=-1.0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError):
        bradley_terry_labels(s0, s1[:2], temperature=0.1, rng=np.random.default_rng(0))
    with pytest.raises(ValueError):
        bradley_terry_labels(s0, s1, temperature=0.1)


def test_edge_sharpness_separates_blur_from_noise():
    """Blur lowers edge sharpness; noise raises high-frequency energy but not blur."""
    from snpo.toy.judges import edge_sharpness, high_frequency_energy
    from snpo.toy.scenes import all_scenes, degrade, render

    rng = np.random.default_rng(0)
    clean = render(all_scenes()[:40], 16)
    blurred = degrade(clean, "blur", rng, strength=1.2)
    noisy = degrade(clean, "noise", rng, strength=0.5)
    assert abs(np.mean(edge_sharpness(clean)) - 1.0) < 0.05  # normalised by all clean renders
    assert np.mean(edge_sharpness(blurred)) < 0.8 * np.mean(edge_sharpness(clean))
    assert np.mean(edge_sharpness(noisy)) > 0.8 * np.mean(edge_sharpness(clean))
    assert np.mean(high_frequency_energy(noisy)) > 2 * np.mean(high_frequency_energy(clean))
