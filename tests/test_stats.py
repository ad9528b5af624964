"""Accuracy intervals and paired tests against values worked out by hand or published."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.measure import stats


@pytest.mark.parametrize("k, n, low, high", [
    # Newcombe (1998), Statistics in Medicine 17:857, table I, method 3 (Wilson score, no correction).
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_newcombe(k, n, low, high):
    got = stats.wilson(k, n)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_wilson_zero_images_and_all_right():
    assert stats.wilson(0, 0) == (0.0, 1.0)
    low, high = stats.wilson(1000, 1000)
    # All right: the upper end is 1 and the lower end is n / (n + z^2).
    assert high == 1.0 and low == pytest.approx(1000 / (1000 + stats.Z95 ** 2))


def test_exact_mcnemar_by_hand():
    # 2 vs 10 discordant pairs: p = 2 * P(X <= 2 | Binomial(12, 1/2)) = 2 * (1 + 12 + 66) / 4096.
    assert stats.mcnemar_exact(2, 10) == pytest.approx(158 / 4096)
    assert stats.mcnemar_exact(10, 2) == pytest.approx(158 / 4096)
    assert stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(3, 3) == 1.0
    # 0 vs 6: 2 / 64, the smallest p six disagreements can give.
    assert stats.mcnemar_exact(0, 6) == pytest.approx(2 / 64)


def test_paired_change_counts_only_disagreements():
    y = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 10)
    base = y.copy()
    pred = y.copy()
    base[:3] = (y[:3] + 1) % 10      # fp32 wrong on 3 images where the variant is right
    pred[50:60] = (y[50:60] + 1) % 10  # the variant wrong on 10 where fp32 is right
    base[90], pred[90] = 0, 0          # both wrong on the same image: says nothing about the change
    y[90] = 5
    t = stats.paired_change(y, base, pred)
    assert (t["baseline_only_correct"], t["variant_only_correct"], t["n"]) == (10, 3, 100)
    assert t["p_value"] == pytest.approx(stats.mcnemar_exact(10, 3)) and t["significant"] is False
    words = stats.change_words("int8", -7.0, t)
    assert "not statistically significant" in words and "10" in words and "3" in words


def test_significant_drop_is_said_so():
    t = {"n": 1000, "baseline_only_correct": 30, "variant_only_correct": 2, "p_value": 1e-7, "significant": True}
    assert "statistically significant" in stats.change_words("int8", -2.8, t)
    assert "not" not in stats.change_words("int8", -2.8, t)


@pytest.mark.parametrize("p, adjusted", [
    # R: p.adjust(c(0.01, 0.04, 0.03, 0.005), "holm") -> 0.03 0.06 0.06 0.02
    ([0.01, 0.04, 0.03, 0.005], [0.03, 0.06, 0.06, 0.02]),
    # Capped at 1, and one test alone is left as it is.
    ([0.4, 0.9], [0.8, 0.9]),
    ([0.2], [0.2]),
    ([], []),
])
def test_holm_matches_r(p, adjusted):
    assert stats.holm(p) == pytest.approx(adjusted)


def test_a_runs_variants_are_judged_together():
    # Two changes each "significant" at 5% on their own are not once the run's three tests are counted.
    variants = {"fp32": {}, **{v: {"mcnemar_vs_fp32": {"n": 1000, "baseline_only_correct": b, "variant_only_correct": c,
                                                       "p_value": p, "significant": p < 0.05}}
                               for v, b, c, p in (("int8", 14, 4, 0.03), ("dynamic", 13, 4, 0.049),
                                                  ("float16", 0, 0, 1.0))}}
    stats.adjust_across_variants(variants)
    stats.adjust_across_variants(variants)  # idempotent: it starts from the raw p-values
    tests = {v: e["mcnemar_vs_fp32"] for v, e in variants.items() if e}
    assert {v: t["p_holm"] for v, t in tests.items()} == pytest.approx({"int8": 0.09, "dynamic": 0.098, "float16": 1})
    assert not any(t["significant"] for t in tests.values()) and {t["tests"] for t in tests.values()} == {3}
    words = stats.change_words("int8", -1.0, tests["int8"])
    assert "not statistically significant" in words and "0.09 after Holm's adjustment for the 3 variants" in words
