"""Benchmark statistics and the cross-check against Google's litert-benchmark."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from device import timing
from pipeline.measure.benchmark import benchmark_variants


def test_summarize_matches_numpy():
    rng = np.random.default_rng(1)
    samples = rng.lognormal(-9, 0.3, 500)
    s = timing.summarize(samples)
    ms = samples * 1e3
    assert s["n"] == 500
    assert s["p50_ms"] == pytest.approx(np.median(ms))
    assert s["p90_ms"] == pytest.approx(np.percentile(ms, 90))
    assert s["p99_ms"] == pytest.approx(np.percentile(ms, 99))
    assert s["mean_ms"] == pytest.approx(ms.mean()) and s["std_ms"] == pytest.approx(ms.std(ddof=1))
    assert s["p25_ms"] == pytest.approx(np.percentile(ms, 25)) and s["iqr_ms"] == pytest.approx(
        np.percentile(ms, 75) - np.percentile(ms, 25))
    assert s["warning"].startswith("wide spread")  # lognormal sigma 0.3: the IQR is ~40% of the median
    assert "warning" not in timing.summarize(np.full(50, 1e-3) + rng.normal(0, 1e-6, 50))


def test_one_outlier_is_not_a_wide_spread():
    # One descheduled run 1000x slower: std is 14x the mean, the quartiles do not move.
    samples = np.full(200, 1e-4) + np.random.default_rng(2).normal(0, 1e-6, 200)
    samples[17] = 0.1
    s = timing.summarize(samples)
    assert s["std_ms"] > 10 * s["mean_ms"] and "warning" not in s


def test_default_threads_fit_a_pi(monkeypatch):
    from pipeline.config import BuildConfig

    for cores, expected in ((1, (1,)), (2, (1, 2)), (4, (1, 4)), (64, (1, 4))):
        monkeypatch.setattr("os.cpu_count", lambda cores=cores: cores)
        assert BuildConfig(dataset="digits").threads == expected


def test_summarize_known_values():
    """Figures worked out by hand, so the test checks the statistics and not numpy against itself."""
    s = timing.summarize([0.001, 0.002, 0.003, 0.004, 0.005])  # seconds
    assert s["n"] == 5 and s["p50_ms"] == pytest.approx(3.0) and s["mean_ms"] == pytest.approx(3.0)
    assert s["p90_ms"] == pytest.approx(4.6)  # linear interpolation: 4 + 0.6 * (5 - 4)
    assert s["p99_ms"] == pytest.approx(4.96)
    assert s["std_ms"] == pytest.approx(2.5 ** 0.5)  # sample std of 1..5
    assert s["min_ms"] == 1.0 and s["max_ms"] == 5.0 and s["throughput_per_s"] == pytest.approx(1000 / 3)
    hundred = timing.summarize(np.arange(1, 101) * 1e-3)  # 1..100 ms
    assert hundred["p50_ms"] == pytest.approx(50.5) and hundred["p90_ms"] == pytest.approx(90.1)
    assert hundred["p99_ms"] == pytest.approx(99.01)
    assert timing.summarize([]) == {"n": 0}


def test_warmup_is_kept_apart():
    calls = []
    warm, timed = timing.time_calls(lambda: calls.append(1), runs=7, warmup=3)
    assert len(calls) == 10 and len(warm) == 3 and len(timed) == 7


def test_benchmark_with_cross_check(mnist_run, tmp_path):
    if shutil.which("litert-benchmark") is None:
        pytest.skip("litert-benchmark is not installed")
    meta = json.loads((mnist_run / "metadata.json").read_text())
    result = benchmark_variants(mnist_run, ["fp32", "int8"], meta, threads_list=[1], xnnpack=True, runs=50,
                                warmup=5, macs=1000, cross_check_litert=True, memory=True, log=lambda *a: None)
    lat = result["threads"]["1"]
    for v in ("fp32", "int8"):
        assert lat[v]["latency"]["n"] == 50 and len(lat[v]["samples_ms"]) == 50
        assert lat[v]["latency"]["p50_ms"] == pytest.approx(np.median(lat[v]["samples_ms"]), rel=1e-4)
        assert result["variants"][v]["bytes"] == (mnist_run / f"model_{v}.tflite").stat().st_size
        assert 1 < result["variants"][v]["fresh_process"]["peak_rss_mb"] < 500
        check = result["cross_check"]["variants"][v]
        assert check["their_median_ms"] > 0 and isinstance(check["agree"], bool)
        assert check["litert_benchmark"]["raw"]["num_threads"] == 1
    assert lat["int8"]["speedup_vs_fp32"] == pytest.approx(
        lat["fp32"]["latency"]["p50_ms"] / lat["int8"]["latency"]["p50_ms"])
    assert result["environment"]["cores"] >= 1 and result["interleaved"] is True
