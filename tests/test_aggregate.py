"""The report arithmetic (``snpo.evaluate.aggregate``: what ``snpo report`` and the toy report
print) on constructed numbers: seed means, spreads, win rates on both sides, ties, NaN and
formatting, each against a value worked out by hand in the test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from snpo.errors import ConfigError
from snpo.evaluate.aggregate import (
    fmt,
    fmt_mean_std,
    fmt_seed_mean_std,
    markdown_table,
    mean_std,
    seed_mean_std,
    seed_means,
    smooth,
    win_rate,
    write_csv,
)


def test_seed_means_average_prompts_first_then_seeds():
    # 2 seeds x 3 prompts: seed means 2 and 5, so mean 3.5 and population std 1.5
    table = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert seed_means(table).tolist() == [2.0, 5.0]
    assert seed_mean_std(table) == (3.5, 1.5)
    assert fmt_seed_mean_std(table) == "3.500 ± 1.500"
    assert fmt_seed_mean_std(table, digits=1) == "3.5 ± 1.5"
    # not the spread of the cells (std of 1..6 = 1.708) and not a sample std (2.121)
    assert seed_mean_std(table)[1] != pytest.approx(np.std(table))
    assert mean_std([7.0]) == (7.0, 0.0)  # one seed: no spread
    assert seed_mean_std(np.array([[0.25, 0.75]])) == (0.5, 0.0)
    with pytest.raises(ConfigError, match="seeds, prompts"):
        seed_means(np.arange(4.0))


def test_a_missing_score_is_not_silently_averaged_away():
    table = np.array([[1.0, np.nan], [2.0, 3.0]])
    mean, std = seed_mean_std(table)
    assert math.isnan(mean) and math.isnan(std)
    assert fmt(mean) == "n/a" and fmt(None) == "n/a" and fmt(float("inf")) == "n/a"


@pytest.mark.parametrize("scores, baseline, expected", [
    ([[3.0, 1.0], [2.0, 2.0]], [[1.0, 3.0], [1.0, 2.0]], (1 + 0 + 1 + 0.5) / 4),  # win, loss, win, tie
    ([[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]], 0.5),  # all ties: one half
    ([[2.0, 2.0, 2.0]], [[1.0, 1.0, 1.0]], 1.0),  # every cell won
    ([[0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0]], 0.0),  # every cell lost
    ([[1.0, 5.0, 5.0]], [[1.0, 1.0, 9.0]], (0.5 + 1 + 0) / 3),
])
def test_win_rate_counts_cells_with_ties_as_half(scores, baseline, expected):
    scores, baseline = np.array(scores), np.array(baseline)
    rate = win_rate(scores, baseline)
    assert rate == pytest.approx(expected, abs=1e-15)
    cells = scores.size
    assert (2 * cells * rate) == pytest.approx(round(2 * cells * rate), abs=1e-9)  # a multiple of 1/(2 cells)
    assert win_rate(baseline, scores) == pytest.approx(1 - rate, abs=1e-15)  # the other side


def test_win_rate_pairs_cells_not_sorted_values():
    """Cell (s, p) against cell (s, p): the same values in another order give another rate."""
    base = np.array([[1.0, 2.0, 3.0]])
    assert win_rate(np.array([[2.0, 3.0, 4.0]]), base) == 1.0
    assert win_rate(np.array([[4.0, 0.0, 0.0]]), base) == pytest.approx(1 / 3)
    with pytest.raises(ConfigError, match="shapes differ"):
        win_rate(np.zeros((2, 3)), np.zeros((3, 2)))


def test_formatting():
    assert fmt(0.12345) == "0.123" and fmt(0.12345, digits=1) == "0.1"
    assert fmt(0.625, percent=True) == "62.5%"
    assert fmt_mean_std([1.0, 3.0], digits=2) == "2.00 ± 1.00"
    assert markdown_table(["a", "b"], [["1", "x"], [2, 3.5]]) == "| a | b |\n|---|---|\n| 1 | x |\n| 2 | 3.5 |"


def test_write_csv_round_trips(tmp_path):
    import csv

    write_csv(tmp_path / "t.csv", ["run", "score"], [["a", 0.5], ["b", None]])
    with open(tmp_path / "t.csv") as f:
        assert list(csv.reader(f)) == [["run", "score"], ["a", "0.5"], ["b", ""]]


def test_smoothing_is_a_trailing_mean_that_skips_nan():
    values = [1.0, np.nan, 3.0, 5.0, np.nan, np.nan, np.nan]
    out = smooth(values, window=2)
    # windows: [1], [1, nan], [nan, 3], [3, 5], [5, nan], [nan, nan], [nan, nan]
    expected = [1.0, 1.0, 3.0, 4.0, 5.0, np.nan, np.nan]
    np.testing.assert_array_equal(out, np.array(expected))
    np.testing.assert_array_equal(smooth([2.0, 4.0, 6.0], window=1), [2.0, 4.0, 6.0])
    np.testing.assert_allclose(smooth([2.0, 4.0, 6.0], window=10), [2.0, 3.0, 4.0])
