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


def test_a_thread_count_given_twice_is_measured_once(mnist_run, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    run = shutil.copytree(mnist_run, tmp_path / "run")
    result = CliRunner().invoke(main, ["benchmark", str(run), "--runs", "5", "--warmup", "1", "--threads", "2",
                                       "--threads", "1", "--threads", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.count("fp32 @2 thread(s)") == 1 and result.output.count("fp32 @1 thread(s)") == 1
    assert list(json.loads((run / "benchmark.json").read_text())["threads"]) == ["2", "1"]


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
    assert result["environment"]["cores"] >= 1 and result["timing"]["method"] == "blocked"


def test_each_model_is_timed_in_warm_blocks_taking_turns(mnist_run):
    """Consecutive invokes per model (warm caches), models alternating block by block over the rounds,
    every timed sample kept: the order of the real invokes is recorded, not the clock."""
    from device.core import Model
    from pipeline.measure import benchmark

    order = []

    class Recorded(Model):
        def invoke(self, prepared):
            order.append(self.path.stem.removeprefix("model_"))
            return super().invoke(prepared)

    meta = json.loads((mnist_run / "metadata.json").read_text())
    models = {v: Recorded(mnist_run / f"model_{v}.tflite", threads=1, metadata=meta) for v in ("fp32", "int8")}
    pixels = np.zeros((1, 28, 28, 1), np.uint8)
    prepared = {v: m.prepare(pixels) for v, m in models.items()}
    warm, timed, how = benchmark._blocked(models, prepared, runs=23, warmup=7, advance=lambda n: None, rounds=5)
    assert how == {"method": "blocked", "rounds": 5, "block_runs": [5, 5, 5, 4, 4], "block_warmup": 2}
    runs_of_same = [order[0]]
    lengths = [1]
    for v in order[1:]:
        if v == runs_of_same[-1]:
            lengths[-1] += 1
        else:
            runs_of_same.append(v)
            lengths.append(1)
    assert runs_of_same == ["fp32", "int8"] * 5  # A B A B ..., never invoke by invoke
    assert lengths == [7, 7, 7, 7, 7, 7, 6, 6, 6, 6]  # 2 warm-up + the block's timed runs
    assert {v: len(t) for v, t in timed.items()} == {"fp32": 23, "int8": 23}
    assert {v: len(w) for v, w in warm.items()} == {"fp32": 10, "int8": 10}


@pytest.mark.parametrize("cpuinfo, expected", [
    ("processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n", ("x86", ["avx2"], False)),
    ("flags\t: sse2 avx2 avx512f avx512bw avx512_vnni\n", ("x86", ["avx2", "avx512f", "avx512_vnni"], True)),
    ("flags\t: sse2 avx2 avx_vnni\n", ("x86", ["avx2", "avx_vnni"], True)),
    ("flags\t: sse2 avx2 avx512f avx512_vnni avx_vnni avx512_fp16 amx_bf16 amx_tile amx_int8\n",
     ("x86", ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"], True)),
    # Raspberry Pi 4 (Cortex-A72) and Pi 5 (Cortex-A76), as their kernels print them.
    ("Features\t: fp asimd evtstrm crc32 cpuid\nCPU part\t: 0xd08\n", ("arm", ["asimd"], False)),
    ("Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
     "asimddp\n", ("arm", ["asimd", "asimddp"], True)),
    ("Features\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt\n", ("arm", ["neon"], False)),
    ("", (None, [], None)),
])
def test_cpu_features_from_cpuinfo(cpuinfo, expected):
    f = timing.cpu_features(cpuinfo)
    assert (f["family"], f["flags"], f["int8_dot_product"]) == expected


def test_environment_of_host_and_runner_carries_cpu_features(mnist_run):
    """The host benchmark's and the board runner's environment name the features read from /proc/cpuinfo."""
    import subprocess
    import sys
    from pathlib import Path

    from device.core import environment

    try:
        flags = {w for line in open("/proc/cpuinfo") if line.lower().startswith(("flags", "features"))
                 for w in line.split(":", 1)[1].split()}
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    host = environment()["cpu_features"]
    assert host["flags"] and set(host["flags"]) <= flags
    assert host["int8_dot_product"] == bool(flags & {"avx512_vnni", "avx_vnni", "asimddp", "i8mm"})
    runner = Path(__file__).resolve().parent.parent / "device" / "runner.py"
    for cmd in (["bench", "--runs", "3", "--warmup", "1"], ["info"]):
        proc = subprocess.run([sys.executable, str(runner), *cmd, "--model", str(mnist_run / "model_int8.tflite"),
                               "--json"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["environment"]["cpu_features"] == host, cmd
