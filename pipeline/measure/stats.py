"""How far to trust an accuracy: a 95% interval for each variant, a paired test for each change.

With 1,000 test images one image is 0.1 pp, so a quantized model that is "0.2 pp worse" may be
no worse at all. Two questions, two standard answers:
  - the accuracy itself: the Wilson score interval (Wilson 1927), which unlike the textbook normal
    approximation stays inside [0, 1] and keeps its coverage near 0% and 100% accuracy;
  - the change against fp32 on the same images: the exact McNemar test. Only images where the two
    models disagree about correctness say anything; under "no difference" each of those is equally
    likely to favour either model, so the count favouring fp32 is Binomial(disagreements, 1/2).
A run tests up to six variants against fp32 at once; at 5% each, one of six would be "significant"
by chance alone more often than one time in four. The p-values of a run are therefore adjusted
together by Holm's step-down method (Holm 1979; scipy has no Holm, only false discovery rates), which
keeps the chance of any false "significant" among them at most 5%.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal
ALPHA = 0.05


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for correct/n (both ends as fractions)."""
    if n <= 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (a right & b wrong, and the reverse)."""
    from scipy.stats import binomtest

    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def holm(p_values) -> list[float]:
    """Holm's adjusted p-values, in the order given: the k-th smallest of m multiplied by m - k + 1,
    then made non-decreasing in that order and capped at 1 (R's p.adjust(p, "holm"))."""
    p_values = [float(p) for p in p_values]
    m, adjusted, running = len(p_values), [0.0] * len(p_values), 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def adjust_across_variants(variants: dict) -> None:
    """Holm-adjust the McNemar tests against fp32 of one run's variants ({variant: evaluation entry})
    together: each test gets `p_holm`, `tests` (how many were adjusted together) and `significant`
    judged on p_holm. Idempotent: it starts from each raw p_value."""
    tests = [e["mcnemar_vs_fp32"] for e in variants.values() if e.get("mcnemar_vs_fp32")]
    for test, p in zip(tests, holm([t["p_value"] for t in tests])):
        test.update(p_holm=p, tests=len(tests), significant=p < ALPHA)


def paired_change(y, baseline_pred, pred) -> dict:
    """The change of `pred` against `baseline_pred` on the same images, with its exact McNemar test
    (`significant` for this test alone: adjust_across_variants judges it among the run's others)."""
    y, base, pred = (np.asarray(a).reshape(-1) for a in (y, baseline_pred, pred))
    base_right, right = base == y, pred == y
    only_base, only_this = int((base_right & ~right).sum()), int((~base_right & right).sum())
    p = mcnemar_exact(only_base, only_this)
    return {"n": int(len(y)), "baseline_only_correct": only_base, "variant_only_correct": only_this,
            "p_value": p, "significant": p < ALPHA}


def accuracy_with_interval(y, pred) -> dict:
    y, pred = np.asarray(y).reshape(-1), np.asarray(pred).reshape(-1)
    correct = int((y == pred).sum())
    low, high = wilson(correct, len(y))
    return {"correct": correct, "n": int(len(y)), "low": low, "high": high}


def change_words(variant: str, change_pp: float, test: dict) -> str:
    """One sentence on whether a change against fp32 is real, for the report's notes."""
    b, c, p = test["baseline_only_correct"], test["variant_only_correct"], test["p_value"]
    holm_p = (f"; {test['p_holm']:.3g} after Holm's adjustment for the {test['tests']} variants tested against "
              "fp32" if test.get("p_holm") is not None and test.get("tests", 1) > 1 else "")
    where = (f"fp32 alone was right on {b} and {variant} alone on {c} of {test['n']:,} test images "
             f"(exact McNemar p = {p:.3g}{holm_p})")
    if b + c == 0:
        return f"{variant}: exactly as accurate as fp32; both were right and wrong on the same {test['n']:,} images"
    if not test["significant"]:
        return (f"{variant}: the {change_pp:+.2f} pp change against fp32 is not statistically significant: {where}; "
                "on this test set it cannot be told apart from no change")
    direction = "drop" if change_pp < 0 else "gain"
    return f"{variant}: the {change_pp:+.2f} pp {direction} against fp32 is statistically significant: {where}"


def fill_missing(variants: dict, predictions: Path) -> None:
    """Intervals and paired tests for a run evaluated before they were recorded ({variant: evaluation entry}),
    from its saved predictions; a run without them keeps its entries as they are."""
    lacking = [v for v, e in variants.items() if "interval_95" not in e]
    if not lacking or not predictions.is_file():
        return
    with np.load(predictions) as saved:
        y, base = saved["y"], saved["probs_fp32"].argmax(1)
        for v in lacking:
            if f"probs_{v}" in saved.files:
                pred = saved[f"probs_{v}"].argmax(1)
                variants[v]["interval_95"] = accuracy_with_interval(y, pred)
                if v != "fp32":
                    variants[v]["mcnemar_vs_fp32"] = paired_change(y, base, pred)
