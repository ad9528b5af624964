"""Speed of the evaluate and benchmark stages, their run-to-run stability, and what int8 buys, on real MNIST.

Builds mnist-cnn (5 epochs, all five variants) from the real MNIST subset, then measures:
  1. evaluating all five variants on the 1,000 test images through pipeline.measure.evaluate  target <= 5 s
  2. the default benchmark stage (runs, warm-up, threads, memory) for five variants     target <= 30 s
     run twice; int8 and fp32 p50 at 1 thread compared between the two runs            target within 10%
  3. int8 p50 / fp32 p50 at 1 thread, for mnist-cnn and for cifar-cnn                   target <= 0.45
There is no real CIFAR-10 on these machines, so cifar-cnn trains 1 epoch on random images written in
the CIFAR-10 python-batch format: its accuracy means nothing, only its latency is measured.

    python benchmarks/eval_bench.py [--data-dir ../shared/datasets/mnist-9k] [--out DIR] [--json FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from portable import portable

REPO = Path(__file__).resolve().parent.parent
TARGETS = {"evaluate_s": 5.0, "benchmark_s": 30.0, "p50_drift": 0.10, "int8_ratio": 0.45}


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def quiet(*_args) -> None:
    """The pipeline's per-stage log would drown the figures this script is about."""


def environment() -> dict:
    from importlib import metadata

    from device.core import environment as device_environment

    env = device_environment()
    env["tensorflow"] = metadata.version("tensorflow")
    return env


def write_synthetic_cifar(folder: Path, per_batch: int, seed: int = 0) -> Path:
    """Random uint8 images and labels in the CIFAR-10 python-batch layout (rows of R, G, B planes)."""
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, size=(per_batch, 3 * 32 * 32), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, size=per_batch).tolist()}
        (batches / name).write_bytes(pickle.dumps(batch))
    return folder


def time_evaluation(run_dir: Path, data, meta: dict, repeats: int) -> dict:
    from pipeline.measure.evaluate import evaluate_variants

    variants = [m["variant"] for m in meta["models"].values()]
    walls, accuracy = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        evaluation, _ = evaluate_variants(run_dir, variants, data.x_test, data.y_test, meta, log=quiet)
        walls.append(time.perf_counter() - t0)
        accuracy = {v: e["accuracy"] for v, e in evaluation["variants"].items()}
    return {"images": len(data.y_test), "variants": variants, "wall_s": walls, "accuracy": accuracy,
            "per_variant_s": {v: e["seconds"] for v, e in evaluation["variants"].items()}}


def time_benchmark(run_dir: Path, meta: dict, macs: int) -> dict:
    """One default benchmark stage exactly as `pipeline build` runs it."""
    from pipeline.config import BuildConfig
    from pipeline.measure.benchmark import benchmark_variants

    cfg = BuildConfig(dataset="mnist", model="mnist-cnn")
    variants = [m["variant"] for m in meta["models"].values()]
    t0 = time.perf_counter()
    bench = benchmark_variants(run_dir, variants, meta, threads_list=cfg.threads, xnnpack=cfg.xnnpack,
                               runs=cfg.bench_runs, warmup=cfg.bench_warmup, macs=macs,
                               cross_check_litert=cfg.cross_check, log=quiet)
    wall = time.perf_counter() - t0
    p50 = {v: bench["threads"]["1"][v]["latency"]["p50_ms"] for v in variants}
    return {"wall_s": wall, "threads": list(cfg.threads), "runs": cfg.bench_runs, "warmup": cfg.bench_warmup,
            "p50_ms_1_thread": p50, "bench": bench}


def mnist_part(data_dir: Path, out: Path, repeats: int) -> dict:
    from pipeline.artifacts import updating, write_json
    from pipeline.build import build
    from pipeline.config import BuildConfig
    from pipeline.data import load_dataset
    from pipeline.report import render as report

    progress("building mnist-cnn, 5 epochs, all variants (benchmark measured separately below)")
    t0 = time.perf_counter()
    cfg = BuildConfig(dataset="mnist", model="mnist-cnn", data_dir=str(data_dir), quantize=("all",), epochs=5,
                      benchmark=False, out=str(out / "mnist-cnn"))
    with contextlib.redirect_stdout(sys.stderr):  # Keras prints training progress; keep stdout for figures
        run_dir = build(cfg, overwrite=True, log=quiet)
    build_s = time.perf_counter() - t0
    meta = json.loads((run_dir / "metadata.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    data = load_dataset("mnist", data_dir, seed=cfg.seed, validation_fraction=cfg.validation_fraction)

    progress(f"evaluating five variants on {len(data.y_test)} test images, {repeats} times")
    evaluation = time_evaluation(run_dir, data, meta, repeats)
    built = json.loads((run_dir / "evaluation.json").read_text())
    if evaluation["accuracy"] != {v: e["accuracy"] for v, e in built["variants"].items()}:
        sys.exit("evaluating again gave other accuracies than the build's: the evaluate stage is not deterministic")

    benches = []
    for i in (1, 2):
        progress(f"default benchmark stage, run {i} of 2")
        benches.append(time_benchmark(run_dir, meta, manifest["macs_per_inference"]))
    # Leave a complete run behind for --out: the second measurement and the report that goes with it.
    with updating(run_dir, "benchmark", log=quiet) as (work, _):
        write_json(work / "benchmark.json", benches[-1]["bench"])
        report.render(work, log=quiet)
    drift = {v: abs(benches[1]["p50_ms_1_thread"][v] / benches[0]["p50_ms_1_thread"][v] - 1) for v in ("fp32", "int8")}
    ratios = [b["p50_ms_1_thread"]["int8"] / b["p50_ms_1_thread"]["fp32"] for b in benches]
    return {"run_dir": portable(run_dir), "build_s": build_s, "macs_per_inference": manifest["macs_per_inference"],
            "evaluation": evaluation, "benchmark_runs": [{k: b[k] for k in b if k != "bench"} for b in benches],
            "p50_drift": drift, "int8_fp32_ratio": ratios}


def cifar_part(out: Path, per_batch: int) -> dict:
    from pipeline.build import build
    from pipeline.config import BuildConfig

    data_dir = write_synthetic_cifar(out / "cifar-synthetic-data", per_batch)
    progress(f"building cifar-cnn, 1 epoch on {5 * per_batch} RANDOM images (latency only), fp32 and int8")
    cfg = BuildConfig(dataset="cifar10", model="cifar-cnn", data_dir=str(data_dir), quantize=("int8",), epochs=1,
                      threads=(1,), out=str(out / "cifar-cnn-synthetic"))
    with contextlib.redirect_stdout(sys.stderr):
        run_dir = build(cfg, overwrite=True, log=quiet)
    bench = json.loads((run_dir / "benchmark.json").read_text())
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    p50 = {v: bench["threads"]["1"][v]["latency"]["p50_ms"] for v in ("fp32", "int8")}
    return {"run_dir": portable(run_dir), "data": "synthetic: random pixels and labels in CIFAR-10 batch format",
            "macs_per_inference": bench["macs_per_inference"], "runs": bench["runs"], "p50_ms_1_thread": p50,
            "int8_fp32_ratio": p50["int8"] / p50["fp32"],
            "meaningless_accuracy": {v: e["accuracy"] for v, e in evaluation["variants"].items()}}


def summary(mnist: dict, cifar: dict) -> list[tuple[str, str, str, bool]]:
    """(what, measured, target, met) rows."""
    ev, runs = mnist["evaluation"], mnist["benchmark_runs"]
    worst_eval = max(ev["wall_s"])
    return [
        (f"evaluate {len(ev['variants'])} variants x {ev['images']} images (worst of {len(ev['wall_s'])})",
         f"{worst_eval:.2f} s (runs: {', '.join(f'{w:.2f}' for w in ev['wall_s'])})",
         f"<= {TARGETS['evaluate_s']:.0f} s", worst_eval <= TARGETS["evaluate_s"]),
        *[(f"default benchmark stage, run {i + 1} ({runs[i]['runs']} runs + {runs[i]['warmup']} warm-up, "
           f"threads {runs[i]['threads']}, memory)", f"{r['wall_s']:.1f} s", f"<= {TARGETS['benchmark_s']:.0f} s",
           r["wall_s"] <= TARGETS["benchmark_s"]) for i, r in enumerate(runs)],
        *[(f"{v} p50 at 1 thread, run 1 -> run 2",
           f"{runs[0]['p50_ms_1_thread'][v]:.4f} -> {runs[1]['p50_ms_1_thread'][v]:.4f} ms ({100 * d:.1f}%)",
           f"within {100 * TARGETS['p50_drift']:.0f}%", d <= TARGETS["p50_drift"])
          for v, d in mnist["p50_drift"].items()],
        *[(f"mnist-cnn int8/fp32 p50 at 1 thread, run {i + 1} ({mnist['macs_per_inference'] / 1e6:.2f} MMAC)",
           f"{r:.2f} ({runs[i]['p50_ms_1_thread']['int8']:.4f} / {runs[i]['p50_ms_1_thread']['fp32']:.4f} ms)",
           f"<= {TARGETS['int8_ratio']}", r <= TARGETS["int8_ratio"]) for i, r in enumerate(mnist["int8_fp32_ratio"])],
        (f"cifar-cnn int8/fp32 p50 at 1 thread ({cifar['macs_per_inference'] / 1e6:.2f} MMAC, synthetic data)",
         f"{cifar['int8_fp32_ratio']:.2f} ({cifar['p50_ms_1_thread']['int8']:.4f} / "
         f"{cifar['p50_ms_1_thread']['fp32']:.4f} ms)", f"<= {TARGETS['int8_ratio']}",
         cifar["int8_fp32_ratio"] <= TARGETS["int8_ratio"]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "datasets" / "mnist-9k")
    ap.add_argument("--out", type=Path, help="keep the runs in DIR (default: a temporary folder, removed)")
    ap.add_argument("--repeat-eval", type=int, default=3, help="times to time the evaluation (default 3)")
    ap.add_argument("--cifar-per-batch", type=int, default=400, help="synthetic CIFAR images per batch file")
    ap.add_argument("--json", type=Path, help="also write every figure to FILE")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    env = environment()
    env["load_average_1min_at_start"] = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        mnist = mnist_part(args.data_dir, out, args.repeat_eval)
        cifar = cifar_part(out, args.cifar_per_batch)
    env["load_average_1min_at_end"] = os.getloadavg()[0]
    rows = summary(mnist, cifar)
    interp = env["interpreter"]
    print(f"environment: {env['cpu']}, {env['cores']} cores, {env['machine']}, {env['os']}; python {env['python']}, "
          f"{interp['name']} {interp['version']}, tensorflow {env['tensorflow']}, numpy {env['numpy']}")
    load = max(env["load_average_1min_at_start"], env["load_average_1min_at_end"])
    # Other processes competing for the cores show up as latency drift, not as a failure of the code.
    busy = "; BUSY MACHINE: timings are contaminated" if load > 0.5 * env["cores"] else ""
    print(f"1-minute load average {env['load_average_1min_at_start']:.2f} at start, "
          f"{env['load_average_1min_at_end']:.2f} at end{busy}")
    print(f"mnist-cnn on {args.data_dir}: accuracy " + ", ".join(
        f"{v} {a:.4f}" for v, a in mnist["evaluation"]["accuracy"].items()))
    print("evaluation seconds per variant (last run): " + ", ".join(
        f"{v} {sec:.2f}" for v, sec in mnist["evaluation"]["per_variant_s"].items()))
    width = max(len(r[0]) for r in rows)
    for what, measured, target, met in rows:
        print(f"{what:<{width}}  {measured:<40}  {target:<12}  {'met' if met else 'MISSED'}")
    print("cifar-cnn was trained on random images: its accuracy ("
          + ", ".join(f"{v} {a:.3f}" for v, a in cifar["meaningless_accuracy"].items())
          + ") means nothing; only its latency is a measurement.")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "targets": TARGETS, "mnist_cnn": mnist,
                                         "cifar_cnn_synthetic": cifar,
                                         "summary": [dict(zip(("what", "measured", "target", "met"), r))
                                                     for r in rows]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
