"""Wall time per stage of `pipeline build --quantize all` for mnist-cnn, 5 epochs, real MNIST subset.

Targets on a 2-core machine: the whole build in at most 60 s, conversion of all variants at most 5 s.

    python benchmarks/build_time.py [--data-dir ../shared/datasets/mnist-9k] [--repeat 1] [--json FILE]
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def one_build(data_dir: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "pipeline.cli", "build", "--dataset", "mnist", "--model", "mnist-cnn",
           "--data-dir", str(data_dir), "--quantize", "all", "--epochs", "5", "--out", str(out)]
    t0 = time.perf_counter()
    # The checkout's pipeline, not an installed one: `-m` finds this one only when started from its root.
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"build failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    evaluation = json.loads((out / "evaluation.json").read_text())
    return {"wall_s": wall, "stage_seconds": manifest["stage_seconds"],
            "accuracy": {v: e["accuracy"] for v, e in evaluation["variants"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "datasets" / "mnist-9k")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            results.append(one_build(args.data_dir, Path(tmp) / f"run{i}"))
    from device.core import environment

    env = {"python": platform.python_version(), "machine": platform.machine(), "platform": platform.platform(),
           **environment()}
    print(f"environment: {env}")
    for i, r in enumerate(results):
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in r["stage_seconds"].items())
        in_process = sum(r["stage_seconds"].values())
        print(f"build {i + 1}: wall {r['wall_s']:.1f} s (target <= 60), stages {in_process:.1f} s: {stages}")
        print(f"  conversion of all variants: {r['stage_seconds']['convert']:.2f} s (target <= 5)")
        print("  accuracy: " + ", ".join(f"{v} {a:.4f}" for v, a in r["accuracy"].items()))
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "builds": results}, indent=2))


if __name__ == "__main__":
    main()
