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
    assert s["warning"].startswith("wide spread")  # lognormal sigma 0.3: std is ~30% of the mean
    assert "warning" not in timing.summarize(np.full(50, 1e-3) + rng.normal(0, 1e-6, 50))


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
    assert lat["int8"]["speedup_vs_fp32"] == pytest.approx(lat["fp32"]["latency"]["p50_ms"] / lat["int8"]["latency"]["p50_ms"])
    assert result["environment"]["cores"] >= 1 and result["interleaved"] is True
