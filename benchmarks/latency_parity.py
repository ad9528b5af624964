"""Our benchmark's p50 against Google's `litert-benchmark` median, for every zoo model, in one run.

Issue 20.1: timed invoke by invoke in turn with the other variants, a model ran with cold caches and
its latency depended on which other variants were built. Now each variant is timed in warm blocks.
For every model of the zoo (untrained: latency does not depend on the weights) at its standard input
size, fp32 and int8 at 1 thread are measured
  a. by the pipeline's benchmark with only fp32 and int8 built (`--quantize int8`),
  b. by the pipeline's benchmark with all five variants built (`--quantize all`; a variant the untrained
     model cannot run, int16x8 overflowing on random weights, is left out and named),
  c. by `litert-benchmark --result_json` (C++, no Python around each invoke),
alternating a, c, b over --rounds rounds; the medians of the rounds are compared.
Goal: a and b within 15% + 0.025 ms (Python's per-invoke cost) of c, for every model and both variants.

    python benchmarks/latency_parity.py [--models ...] [--runs 1000] [--rounds 3] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from portable import portable_tree
from spread import median

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from device.core import DeviceError, Model  # noqa: E402
from pipeline.measure.benchmark import (  # noqa: E402
    CROSS_CHECK_RESOLUTION_MS,
    CROSS_CHECK_TOLERANCE,
    benchmark_variants,
    litert_benchmark,
)

PAIR, ALL = ["fp32", "int8"], ["fp32", "dynamic", "float16", "int8", "int16x8"]


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build_variants(name: str, folder: Path) -> dict:
    """The zoo model, untrained, converted to every variant; calibrated on random images."""
    import keras

    from pipeline.config import BuildConfig
    from pipeline.convert import convert
    from pipeline.models import MODELS, build_model

    info = MODELS[name]
    keras.utils.set_random_seed(0)
    model = build_model(name, info.input_shape, 10)
    calibration = np.random.default_rng(0).random((32, *info.input_shape), dtype=np.float32)
    cfg = BuildConfig(dataset="digits" if info.channels == 1 else "cifar10", model=name)
    folder.mkdir(parents=True)
    h, w, c = info.input_shape
    meta = {"preprocess": {"height": h, "width": w, "channels": c, "scale": 1 / 255, "offset": 0.0,
                           "layout": "NHWC", "labels": [str(i) for i in range(10)]}, "built": [], "not_built": {}}
    for v in ALL:
        path = folder / f"model_{v}.tflite"
        path.write_bytes(convert(model, v, cfg, calibration))
        try:  # random weights calibrated on random images can overflow int16x8's requantization
            Model(path, threads=1, metadata=meta)
            meta["built"].append(v)
        except DeviceError as e:
            meta["not_built"][v] = str(e)
    return meta


def ours(folder: Path, variants: list[str], meta: dict, runs: int, warmup: int) -> dict:
    bench = benchmark_variants(folder, variants, meta, threads_list=[1], xnnpack=True, runs=runs, warmup=warmup,
                               memory=False, log=lambda *a: None)
    return {v: bench["threads"]["1"][v]["latency"]["p50_ms"] for v in PAIR}


def measure(name: str, folder: Path, meta: dict, runs: int, warmup: int, rounds: int) -> dict:
    a, b, c = {v: [] for v in PAIR}, {v: [] for v in PAIR}, {v: [] for v in PAIR}
    for r in range(rounds):
        progress(f"{name}: round {r + 1}/{rounds}")
        for v, p50 in ours(folder, PAIR, meta, runs, warmup).items():
            a[v].append(p50)
        for v in PAIR:
            theirs = litert_benchmark(folder / f"model_{v}.tflite", 1, runs, warmup)
            if "error" in theirs:
                raise SystemExit(f"litert-benchmark failed on {name} {v}: {theirs['error']}")
            c[v].append(theirs["median_ms"])
        for v, p50 in ours(folder, meta["built"], meta, runs, warmup).items():
            b[v].append(p50)
    out = {"all_variants": meta["built"], "not_built": meta["not_built"], "spread_warnings": []}
    for v in PAIR:
        ref = median(c[v], f"{name} {v} litert-benchmark rounds", out["spread_warnings"])
        row = {"litert_benchmark_median_ms": ref, "rounds": {"pair": a[v], "all": b[v], "litert_benchmark": c[v]}}
        for label, samples in (("pair", a[v]), ("all", b[v])):
            p50 = median(samples, f"{name} {v} our p50 rounds ({label})", out["spread_warnings"])
            allowed = CROSS_CHECK_RESOLUTION_MS + CROSS_CHECK_TOLERANCE * ref
            row[label] = {"p50_ms": p50, "residual_ms": p50 - ref, "allowed_ms": allowed,
                          "within": abs(p50 - ref) <= allowed}
        out[v] = row
    return out


def main() -> None:
    from device.core import environment
    from pipeline.models import MODELS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "issue20" / "latency-parity.json")
    args = ap.parse_args()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if platform.system() == "Linux" else ""
    result = {"environment": environment(), "lscpu_model": next(
        (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), None),
        "load_average_before": os.getloadavg(), "runs": args.runs, "warmup": args.warmup, "rounds": args.rounds,
        "goal": f"|ours - litert-benchmark| <= {CROSS_CHECK_RESOLUTION_MS} ms + {CROSS_CHECK_TOLERANCE:.0%}",
        "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            progress(f"{name}: converting")
            meta = build_variants(name, Path(tmp) / name)
            result["models"][name] = measure(name, Path(tmp) / name, meta, args.runs, args.warmup, args.rounds)
            # written after each model, in case a later one fails
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(portable_tree(result), indent=2) + "\n")
    result["load_average_after"] = os.getloadavg()
    result["met"] = all(m[v][k]["within"] for m in result["models"].values() for v in PAIR for k in ("pair", "all"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(portable_tree(result), indent=2) + "\n")
    print(f"{'model':<14} {'variant':<6} {'litert':>8} {'ours, pair':>11} {'ours, all':>10}  within")
    for name, m in result["models"].items():
        for v, row in ((v, m[v]) for v in PAIR):
            print(f"{name:<14} {v:<6} {row['litert_benchmark_median_ms']:8.4f} {row['pair']['p50_ms']:11.4f} "
                  f"{row['all']['p50_ms']:10.4f}  {row['pair']['within'] and row['all']['within']}")
    print(f"goal met: {result['met']}; written {args.json}")


if __name__ == "__main__":
    main()
