"""Latency, memory and size of every variant, measured through the device runner's core.

Each variant is timed in blocks of consecutive invokes, so it runs with warm caches as on a device
that runs one model; timed invoke by invoke in turn with the others, a model found its caches emptied
by them and measured up to 80% slower, depending on which other variants were built. The blocks
alternate between the variants over several rounds (A B A B ...) so that the drift of a noisy machine
lands on all of them alike; ratios inside one run are what the report compares.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import device
from device import timing
from device.core import Model, environment
from pipeline import console

RUNNER = Path(device.__file__).resolve().parent / "runner.py"
# Python's calls around each invoke (set_tensor, invoke, get_tensor) cost ~0.01-0.02 ms that the C++
# tool does not pay; beyond that and 15% the two measure different things.
CROSS_CHECK_RESOLUTION_MS = 0.025
CROSS_CHECK_TOLERANCE = 0.15
CROSS_CHECK_TIMEOUT_S = 600
MEMORY_TIMEOUT_S = 300
# Five rounds: drift over a benchmark of a few seconds is spread over all variants, and each block
# still holds dozens of invokes at the default --bench-runs.
BLOCK_ROUNDS = 5


def _blocks(runs: int, warmup: int, rounds: int = BLOCK_ROUNDS) -> tuple[list[int], int]:
    """Timed invokes per block, one block per round, and the warm-up invokes that open every block."""
    rounds = max(1, min(rounds, runs))
    return [runs // rounds + (r < runs % rounds) for r in range(rounds)], max(1, -(-warmup // rounds))


def _blocked(models: dict[str, Model], prepared: dict[str, np.ndarray], runs: int, warmup: int, advance,
             rounds: int = BLOCK_ROUNDS):
    """runs timed invokes of each model in `rounds` blocks, the models taking turns block by block.

    Each block starts with its share of the warm-up (at least one invoke), untimed for the result but
    kept apart, so that its first timed invoke does not pay for the model that ran before it.
    """
    clock = time.perf_counter
    sizes, block_warmup = _blocks(runs, warmup, rounds)
    warm = {v: [] for v in models}
    timed = {v: [] for v in models}
    for size in sizes:
        for v, model in models.items():
            x, invoke, w, t = prepared[v], model.invoke, warm[v], timed[v]
            for i in range(block_warmup + size):
                t0 = clock()
                invoke(x)
                (w if i < block_warmup else t).append(clock() - t0)
            advance(block_warmup + size)  # outside the timed region
    return warm, timed, {"method": "blocked", "rounds": len(sizes), "block_runs": sizes, "block_warmup": block_warmup}


def measure_latency(run_dir: Path, variants, metadata: dict, *, threads: int, xnnpack: bool,
                    runs: int, warmup: int, advance=lambda n: None) -> dict:
    pre = metadata["preprocess"]
    pixels = np.random.default_rng(0).integers(
        0, 256, size=(1, pre["height"], pre["width"], pre["channels"]), dtype=np.uint8)
    models, prepared, out = {}, {}, {}
    for v in variants:
        t0 = time.perf_counter()
        models[v] = Model(Path(run_dir) / f"model_{v}.tflite", threads=threads, xnnpack=xnnpack,
                          metadata=metadata)
        init_ms = (time.perf_counter() - t0) * 1e3
        prepared[v] = models[v].prepare(pixels)
        t0 = time.perf_counter()
        models[v].invoke(prepared[v])
        out[v] = {"init_ms": init_ms, "first_inference_ms": (time.perf_counter() - t0) * 1e3}
    warm, timed, how = _blocked(models, prepared, runs, warmup, advance)
    for v in variants:
        out[v].update({"warmup": timing.summarize(warm[v]), "latency": timing.summarize(timed[v]),
                       "samples_ms": [round(s * 1e3, 6) for s in timed[v]], "timing": how})
    return out


def fresh_process_memory(model_path: Path) -> dict:
    """Peak RSS and wall time of a new runner process that loads the model and runs it a few times."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(RUNNER), "bench", "--model", str(model_path), "--runs", "10",
                               "--warmup", "2", "--json"], capture_output=True, text=True, timeout=MEMORY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"the runner took over {MEMORY_TIMEOUT_S} s for 12 inferences; memory not measured"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "runner failed"}
    result = json.loads(proc.stdout)
    return {"peak_rss_mb": result["peak_rss_mb"], "process_wall_s": wall, "init_ms": result["init_ms"]}


def litert_benchmark(model_path: Path, threads: int, runs: int, warmup: int) -> dict:
    """Google's own `litert-benchmark` (CompiledModel API) on the same file, for a second opinion."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = ["litert-benchmark", "--model", str(model_path), "--num_runs", str(runs), "--warmup_runs",
               str(warmup), "--num_threads", str(threads), "--result_json", str(result_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CROSS_CHECK_TIMEOUT_S)
        except FileNotFoundError:
            return {"error": "litert-benchmark is not installed (it comes with ai-edge-litert)"}
        except subprocess.TimeoutExpired:
            return {"error": f"litert-benchmark took over {CROSS_CHECK_TIMEOUT_S} s and was stopped; "
                             "cross-check with fewer --runs"}
        if proc.returncode != 0 or not result_path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            return {"error": tail[-1] if tail else f"exit code {proc.returncode}"}
        raw = json.loads(result_path.read_text())
    median = raw.get("latency", {}).get("median_ms") if isinstance(raw, dict) else None
    if median is None:
        return {"raw": raw, "error": "no latency.median_ms in litert-benchmark's JSON; its schema changed"}
    return {"raw": raw, "median_ms": float(median)}


def op_profile_support() -> dict:
    """Whether a per-op profile can be had: LiteRT's Python Interpreter has no profiler, and the installed
    `litert-benchmark` offers one only if it has TFLite benchmark_model's --enable_op_profiling."""
    import importlib.util

    spec = importlib.util.find_spec("ai_edge_litert.tools.benchmark_litert_model")
    try:
        source = Path(spec.origin).read_text() if spec and spec.origin else ""
    except OSError:
        source = ""
    if "enable_op_profiling" in source:
        return {"available": True, "how": "litert-benchmark --model MODEL --num_threads 1 --enable_op_profiling"}
    tool = "the installed litert-benchmark has no --enable_op_profiling option" if spec else \
        "litert-benchmark is not installed"
    return {"available": False, "why": f"LiteRT's Python API has no per-op profiler and {tool}"}


def cross_check(run_dir: Path, variants, ours: dict, threads: int, runs: int, warmup: int) -> dict:
    out = {}
    for v in variants:
        theirs = litert_benchmark(Path(run_dir) / f"model_{v}.tflite", threads, runs, warmup)
        entry = {"litert_benchmark": theirs}
        median, our_p50 = theirs.get("median_ms"), ours[v]["latency"]["p50_ms"]
        if median is not None:
            allowed = CROSS_CHECK_RESOLUTION_MS + CROSS_CHECK_TOLERANCE * max(median, our_p50)
            entry.update({"their_median_ms": median, "our_p50_ms": our_p50, "residual_ms": our_p50 - median,
                          "allowed_ms": allowed, "agree": abs(median - our_p50) <= allowed})
            if not entry["agree"]:
                entry["why"] = ("litert-benchmark uses the CompiledModel API with its own CPU accelerator "
                                f"set-up; ours is the Interpreter API, {threads} thread(s), XNNPACK on both sides, "
                                "one image per invoke; the two also ran at different moments of a noisy machine")
        out[v] = entry
    return out


def benchmark_variants(run_dir: Path, variants, metadata: dict, *, threads_list, xnnpack: bool, runs: int,
                       warmup: int, macs: int | None = None, cross_check_litert: bool = False,
                       memory: bool = True, log=print) -> dict:
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    sizes = {v: (run_dir / f"model_{v}.tflite").stat().st_size for v in variants}
    # The load average says whether other work competed for the cores while we measured.
    blocks, block_warmup = _blocks(runs, warmup)
    result = {"schema": 1, "environment": {**environment(), "load_average_1m": os.getloadavg()[0]},
              "xnnpack": xnnpack, "runs": runs, "warmup": warmup,
              "timing": {"method": "blocked", "rounds": len(blocks), "block_warmup": block_warmup},
              "macs_per_inference": macs, "op_profile": op_profile_support(), "threads": {}, "variants": {}}
    for v in variants:
        result["variants"][v] = {"bytes": sizes[v], "size_ratio_vs_fp32": sizes[v] / sizes["fp32"]}
    env = result["environment"]
    log(f"benchmark on {env['cpu']} ({timing.features_words(env['cpu_features'])}): the speed-ups below hold "
        "on this machine")
    for threads in threads_list:
        with console.progress(f"benchmark @{threads} thread(s)",
                              total=(runs + len(blocks) * block_warmup) * len(variants), unit="invokes") as bar:
            lat = measure_latency(run_dir, variants, metadata, threads=threads, xnnpack=xnnpack, runs=runs,
                                  warmup=warmup, advance=bar.advance)
        base = lat["fp32"]["latency"]["p50_ms"]
        for v in variants:
            p50 = lat[v]["latency"]["p50_ms"]
            lat[v]["speedup_vs_fp32"] = base / p50 if p50 else None
            lat[v]["gmac_per_s"] = macs / (p50 * 1e6) if macs and p50 else None
            log(f"latency {v:>8} @{threads} thread(s): p50 {p50:.4f} ms, "
                f"p90 {lat[v]['latency']['p90_ms']:.4f} ms, {lat[v]['speedup_vs_fp32']:.2f}x fp32"
                + ("  [wide spread, see report]" if lat[v]["latency"].get("warning") else ""))
        result["threads"][str(threads)] = lat
    if memory:
        for v in variants:
            result["variants"][v]["fresh_process"] = fresh_process_memory(run_dir / f"model_{v}.tflite")
    if cross_check_litert:
        t1 = min(threads_list)
        # litert-benchmark always runs its CPU accelerator, XNNPACK: with --no-xnnpack ours are measured
        # again with XNNPACK for the comparison, so that like is compared with like.
        ours = result["threads"][str(t1)] if xnnpack else measure_latency(
            run_dir, variants, metadata, threads=t1, xnnpack=True, runs=runs, warmup=warmup)
        result["cross_check"] = {"threads": t1, "xnnpack": True, "remeasured_with_xnnpack": not xnnpack,
                                 "variants": cross_check(run_dir, variants, ours, t1, runs, warmup)}
    result["seconds"] = time.perf_counter() - t_start
    return result
