"""The toy study's instruments: intervals and verdict rules against hand-computed cases,
per-draw implicit accuracy against a float64 evaluation, and the pair pool's sources."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from snpo.evaluate.implicit_accuracy import accuracy_from_margins
from snpo.toy import stats as S
from snpo.toy.demo_report import Table, instrument, judge_claim
from snpo.toy.study import RunResult, RunSpec


# ---- intervals -----------------------------------------------------------------------------
def test_a_constant_difference_has_a_point_interval():
    interval = S.bootstrap_interval([np.full(7, 0.25), np.full(3, 0.25)])
    assert (interval.estimate, interval.low, interval.high) == (0.25, 0.25, 0.25)
    assert interval.worlds == 2 and interval.units == 10


def test_two_prompts_bootstrap_to_their_extremes():
    """Resampling 2 prompts gives mean d1 (p = 1/4), (d1 + d2) / 2 (p = 1/2) or d2 (p = 1/4):
    the 2.5% and 97.5% quantiles of that distribution are exactly d1 and d2."""
    interval = S.bootstrap_interval([np.array([-0.1, 0.3])], resamples=4000)
    assert interval.low == pytest.approx(-0.1) and interval.high == pytest.approx(0.3)
    assert interval.estimate == pytest.approx(0.1)


def test_the_bootstrap_distribution_matches_an_exact_enumeration():
    """Three prompts: 27 equally likely resamples, enumerated by hand; the bootstrap's
    interval lies at the enumeration's 2.5% / 97.5% quantiles (to Monte Carlo error)."""
    d = np.array([0.0, 0.1, 0.5])
    means = np.sort([np.mean(c) for c in itertools.product(d, repeat=3)])
    cdf = np.arange(1, 28) / 27
    exact_low = means[np.searchsorted(cdf, 0.025)]
    exact_high = means[np.searchsorted(cdf, 0.975)]
    interval = S.bootstrap_interval([d], resamples=20000, seed=3)
    assert interval.low == pytest.approx(exact_low, abs=0.02)
    assert interval.high == pytest.approx(exact_high, abs=0.02)


def test_worlds_weigh_the_same_whatever_their_prompt_counts():
    interval = S.bootstrap_interval([np.zeros(2), np.ones(4)])
    assert interval.estimate == pytest.approx(0.5)  # not 4/6


def test_paired_differences_average_seeds_first():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])  # (seeds, prompts)
    b = np.array([[0.0, 0.0], [1.0, 1.0]])
    (d,) = S.paired_differences([a], [b])
    np.testing.assert_allclose(d, [1.5, 2.5])
    with pytest.raises(ValueError):
        S.paired_differences([a], [b[:, :1]])
    with pytest.raises(ValueError, match="NaN"):
        S.bootstrap_interval([np.array([0.1, np.nan])])


@pytest.mark.parametrize(("low", "high", "superiority", "noninferior"), [
    (0.001, 0.02, S.HOLDS, S.HOLDS),
    (0.0, 0.02, S.NOT_SHOWN, S.HOLDS),  # touching zero is not above it
    (-0.005, 0.02, S.NOT_SHOWN, S.HOLDS),  # inside the noise: never "better", but not worse than -0.01
    (-0.01, 0.02, S.NOT_SHOWN, S.NOT_SHOWN),  # touching the margin is not above it
    (-0.03, -0.001, S.REVERSED, S.NOT_SHOWN),
])
def test_verdict_rules_on_both_sides(low, high, superiority, noninferior):
    interval = S.Interval((low + high) / 2, low, high, 1, 10)
    assert S.superiority(interval) == superiority
    assert S.noninferiority(interval, 0.01) == noninferior
    assert S.both([superiority, S.HOLDS]) == (S.HOLDS if superiority == S.HOLDS else
                                              S.NOT_SHOWN)


# ---- implicit accuracy -----------------------------------------------------------------------
def test_per_draw_implicit_accuracy_against_a_float64_hand_count():
    margins = np.array([[1.0, -1.0, 0.0, 2.0],
                        [1.0, 1.0, -1.0, -0.5],
                        [-3.0, 0.5, 0.0, 0.1]])
    out = accuracy_from_margins(margins)
    hits = [[1, 0, 0.5, 1], [1, 1, 0, 0], [0, 1, 0.5, 1]]  # ties count one half
    assert out["accuracy"] == pytest.approx(sum(map(sum, hits)) / 12)
    np.testing.assert_allclose(out["per_pair"], np.mean(hits, axis=0))
    # means over draws: -1/3, 1/6, -1/3, 8/15 -> 2 of 4 positive
    assert out["accuracy_averaged_margin"] == pytest.approx(0.5)
    assert (out["draws"], out["pairs"]) == (3, 4)


def test_averaging_the_margin_first_inflates_the_accuracy():
    """A per-draw accuracy of 57% reads far higher once margins are averaged over 8 draws."""
    rng = np.random.default_rng(0)
    margins = rng.normal(0.18, 1.0, size=(8, 4000))  # P(m > 0) = 0.571
    out = accuracy_from_margins(margins)
    assert out["accuracy"] == pytest.approx(0.571, abs=0.01)
    assert out["accuracy_averaged_margin"] > 0.65


# ---- the report's rules on constructed results ------------------------------------------------
def _result(name: str, pool: str, label: np.ndarray, heldout: np.ndarray, world: int = 0) -> RunResult:
    arrays = {"label": label, "heldout": heldout, "sharpness": np.ones_like(label)}
    return RunResult(RunSpec(name, None if name == "reference" else name, pool,
                             "reference" if name == "reference" else "main"), world,
                     {"train_seconds": 1.0}, arrays)


def test_the_instrument_check_gates_the_verdicts():
    rng = np.random.default_rng(1)
    base = rng.normal(0.6, 0.05, size=(4, 24))
    results = [_result("reference", "p", base, base),
               _result("dpo", "p", base + 0.03, base + 0.02),  # clearly better on both judges
               _result("snpo", "p", base + 0.03 + rng.normal(0, 0.001, base.shape), base + 0.02),
               _result("bdpo", "p", base + 0.001, base - 0.02)]
    table = Table(results, "p")
    check = instrument(table, "p")
    assert check["passed"] and check["verdict"] == S.HOLDS
    assert judge_claim(table, "p", "snpo", "dpo", kind="superiority")["verdict"] == S.NOT_SHOWN
    assert judge_claim(table, "p", "snpo", "dpo", kind="noninferiority", margin=0.01)["verdict"] == S.HOLDS
    assert judge_claim(table, "p", "snpo", "bdpo", kind="superiority")["verdict"] == S.HOLDS
    assert judge_claim(table, "p", "bdpo", "snpo", kind="superiority")["verdict"] == S.REVERSED

    flat = Table([_result("reference", "p", base, base), _result("dpo", "p", base + 0.03, base)], "p")
    assert not instrument(flat, "p")["passed"]  # better on one judge only: the check fails


# ---- the pair pool ---------------------------------------------------------------------------
def test_the_pickapic_like_pool_draws_images_from_every_generator_in_its_proportions(tmp_path):
    from math import comb

    from conftest import TINY
    from snpo.backbones.toy import ToyBackbone
    from snpo.toy import scenes
    from snpo.toy.tokenizer import build_toy_tokenizer
    from snpo.toy.world import GENERATORS, PairPool, ToyWorldConfig, make_pairs

    tokenizer = build_toy_tokenizer(scenes.WORDS, tmp_path / "tok", max_length=TINY.max_prompt_tokens)
    generators = {name: ToyBackbone.create(tokenizer, TINY, seed=i) for i, name in enumerate(GENERATORS)}
    pool = PairPool("test", (("reference", 0.5), ("strong", 0.3), ("weak", 0.2)))
    config = ToyWorldConfig(model=TINY, pair_sampling_steps=2, pair_guidance_scales=(1.5, 7.5))
    prompts = [s.caption for s in scenes.all_scenes()[:4]]
    pairs = make_pairs(generators, pool, prompts, 50, config, seed_offset=1, show_progress=False)
    n_images = 2 * len(pairs.prompts)
    report = pairs.source_report()

    def binomial_interval(p: float, n: int, level: float = 0.999) -> tuple[float, float]:
        """The central interval of Binomial(n, p) holding at least `level` (exact sums)."""
        pmf = [comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
        cdf = np.cumsum(pmf)
        low = int(np.searchsorted(cdf, (1 - level) / 2))
        high = int(np.searchsorted(cdf, 1 - (1 - level) / 2))
        return low / n, high / n

    for name, p in pool.probabilities().items():
        low, high = binomial_interval(p, n_images)
        assert low <= report[f"images/{name}"] <= high, (name, report)
    assert sum(report[f"images/{g}"] for g in GENERATORS) == pytest.approx(1.0)
    assert sum(report[f"chosen/{g}"] for g in GENERATORS) == pytest.approx(1.0)
    assert 0.3 < report["pairs/mixed"] < 0.9  # expected 1 - (0.25 + 0.09 + 0.04) = 0.62
    assert pairs.sources.shape == (len(pairs.prompts), 2)
