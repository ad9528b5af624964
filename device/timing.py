"""Latency measurement shared by the runner's `bench` and the host benchmark.

Warm-up runs are timed but kept apart from the measured ones, raw samples are kept, and a wide
spread is reported rather than averaged away (the way pyperf does it).
"""
from __future__ import annotations

import os
import time

import numpy as np

# Above this ratio of interquartile range to median a median is not worth quoting without a warning.
# Median and IQR, not mean and std: one descheduled run of 50 ms among 0.05 ms ones moves the std
# by orders of magnitude but the quartiles not at all (pyperf and Google's benchmark do the same).
WIDE_SPREAD_IQR = 0.15

# The /proc/cpuinfo flags that decide which XNNPACK kernels run, and of those the ones that give int8
# a dot-product instruction (4 int8 multiply-adds into an int32 per lane). Without one, XNNPACK's int8
# kernels widen to int16 and lose to its fp32 FMA kernels on x86; on ARM, Cortex-A72 (Pi 4) lacks
# asimddp, Cortex-A76 (Pi 5) has it. XNNPACK also has AMX kernels for int8 (Intel since Sapphire Rapids), so
# amx_int8 is recorded too: a Xeon with it timed ResNet-8 int8 at 0.19 ms where AMD EPYCs with the other four
# flags timed 0.038 ms (the cause not isolated), and the records could not tell the machines apart.
CPU_FLAGS = {"x86": ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"),
             "arm": ("asimd", "neon", "asimddp", "i8mm")}
INT8_DOT_FLAGS = {"x86": ("avx512_vnni", "avx_vnni"), "arm": ("asimddp", "i8mm")}


def summarize(samples_s) -> dict:
    """n, mean, std, min/max, quartiles and percentiles of samples in seconds, reported in milliseconds."""
    a = np.asarray(samples_s, dtype=np.float64) * 1e3
    if a.size == 0:
        return {"n": 0}
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    p25, p50, p75, p90, p99 = (float(v) for v in np.percentile(a, [25, 50, 75, 90, 99]))
    out = {"n": int(a.size), "mean_ms": mean, "std_ms": std, "p25_ms": p25, "p50_ms": p50, "p75_ms": p75,
           "iqr_ms": p75 - p25, "p90_ms": p90, "p99_ms": p99, "min_ms": float(a.min()), "max_ms": float(a.max()),
           "throughput_per_s": 1e3 / p50 if p50 > 0 else None}
    if wide_spread(out):
        out["warning"] = (f"wide spread: the interquartile range is {100 * (p75 - p25) / p50:.0f}% of the median; "
                          "the machine was busy or throttling, compare medians of variants measured together only")
    return out


def wide_spread(summary: dict) -> bool:
    """IQR above WIDE_SPREAD_IQR of the median (summaries from before the quartiles were kept: never)."""
    p50, iqr = summary.get("p50_ms") or 0, summary.get("iqr_ms")
    return iqr is not None and p50 > 0 and iqr / p50 > WIDE_SPREAD_IQR


def time_calls(fn, runs: int, warmup: int) -> tuple[list[float], list[float]]:
    """Call fn warmup + runs times; return (warm-up samples, measured samples) in seconds."""
    clock = time.perf_counter
    warm, timed = [], []
    for i in range(warmup + runs):
        t0 = clock()
        fn()
        (warm if i < warmup else timed).append(clock() - t0)
    return warm, timed


def cpu_features(cpuinfo: str | None = None) -> dict:
    """{family, flags (the relevant ones present), int8_dot_product}; family None where nothing says.

    Read from /proc/cpuinfo (x86's "flags", ARM's "Features"); elsewhere the features are unknown,
    which the report says rather than guessing.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return {"family": None, "flags": [], "int8_dot_product": None}
    present: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            present.update(value.split())
    family = "x86" if "sse2" in present else "arm" if present & {"asimd", "neon", "fp"} else None
    if family is None:
        return {"family": None, "flags": [], "int8_dot_product": None}
    return {"family": family, "flags": [f for f in CPU_FLAGS[family] if f in present],
            "int8_dot_product": any(f in present for f in INT8_DOT_FLAGS[family])}


def features_words(features: dict | None) -> str:
    """A CPU's relevant features in words: 'x86 avx2, no int8 dot-product instructions'."""
    if not features or not features.get("family"):
        return "CPU features unknown"
    dot = "int8 dot-product instructions" if features["int8_dot_product"] else "no int8 dot-product instructions"
    return f"{features['family']} {' '.join(features['flags']) or '(none of the SIMD extensions checked)'}, {dot}"


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far, in MB.

    Linux's VmHWM belongs to the current program image; getrusage's ru_maxrss survives exec, so a
    runner started by a big parent (the host pipeline with TensorFlow loaded) would report the
    parent's size. ru_maxrss is the fallback elsewhere (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if os.uname().sysname == "Darwin" else peak / 1024
