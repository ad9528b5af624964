"""Own-image folders at the default settings: a small digit folder and real cats-vs-dogs photos (issue 20.4).

1. digits: 1,000 real MNIST digits (100 per class, from mnist-9k) written as PNGs into ten class folders,
   built with `pipeline build --data-dir FOLDER` at its defaults, then again with `--epochs 5`.
   Goals: defaults >= 90% int8 in <= 180 s; --epochs 5 >= 85% int8.
2. cats-dogs (--cats-dogs DIR, e.g. ../shared/datasets/cats-dogs, 2,000 training photos): defaults.
   Goals: >= 80% int8 on its test split, each class's recall >= 70%, in <= 900 s.
Each build is timed as a whole command (train, convert, evaluate, benchmark, report).

    python benchmarks/small_folder.py [--mnist ../shared/datasets/mnist-9k/mnist.npz] [--cats-dogs DIR]
                                      [--json FILE] [-- EXTRA BUILD OPTIONS]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from portable import portable_tree

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GOALS = {"digits": {"int8": 0.90, "seconds": 180}, "digits_epochs5": {"int8": 0.85},
         "cats_dogs": {"int8": 0.80, "recall": 0.70, "seconds": 900}}


def write_digit_folder(npz: Path, folder: Path, per_class: int = 100, seed: int = 0) -> Path:
    from PIL import Image

    with np.load(npz) as d:
        x, y = d["x_train"], d["y_train"]
    rng = np.random.default_rng(seed)
    for c in range(10):
        (folder / str(c)).mkdir(parents=True)
        for i in rng.choice(np.flatnonzero(y == c), per_class, replace=False):
            Image.fromarray(x[i]).save(folder / str(c) / f"{i}.png")
    return folder


def build(data_dir: Path, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pipeline.cli", "build", "--data-dir", str(data_dir), "--out", str(out), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    evaluation = json.loads((out / "evaluation.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    int8 = evaluation["variants"]["int8"]
    return {"command": " ".join(cmd[2:]), "seconds": seconds, "model": manifest["config"]["model"],
            "recipe": manifest["training"]["recipe"], "image_size": manifest["data"]["image_size"],
            "train_images": manifest["data"]["counts"]["train"], "test_images": evaluation["n"],
            "int8_accuracy": int8["accuracy"], "fp32_accuracy": evaluation["variants"]["fp32"]["accuracy"],
            "int8_recall": int8["per_class"], "stage_seconds": manifest["stage_seconds"],
            "warnings": [line for line in proc.stdout.splitlines() + proc.stderr.splitlines()
                         if line.startswith("warning")]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "datasets" / "mnist-9k" / "mnist.npz")
    ap.add_argument("--cats-dogs", type=Path)
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "issue20" / "small-folder.json")
    ap.add_argument("extra", nargs="*", help="more `pipeline build` options for every build")
    args = ap.parse_args()
    from device.core import environment

    result = {"environment": environment(), "load_average_before": os.getloadavg(), "goals": GOALS, "builds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_digits:
            digits = write_digit_folder(args.mnist, tmp / "digits")
            result["builds"]["digits"] = build(digits, tmp / "run-defaults", args.extra)
            result["builds"]["digits_epochs5"] = build(digits, tmp / "run-epochs5", ["--epochs", "5", *args.extra])
        if args.cats_dogs:
            result["builds"]["cats_dogs"] = build(args.cats_dogs, tmp / "run-cats-dogs", args.extra)
    result["load_average_after"] = os.getloadavg()
    for name, b in result["builds"].items():
        goal = GOALS[name]
        b["met"] = (b["int8_accuracy"] >= goal["int8"] and b["seconds"] <= goal.get("seconds", float("inf"))
                    and min(r for r in b["int8_recall"].values() if r is not None) >= goal.get("recall", 0))
        print(f"{name}: {b['model']} at {b['image_size']}, {b['train_images']} training images: int8 "
              f"{100 * b['int8_accuracy']:.1f}% (fp32 {100 * b['fp32_accuracy']:.1f}%), min recall "
              f"{100 * min(r for r in b['int8_recall'].values() if r is not None):.0f}%, {b['seconds']:.0f} s; "
              f"goal met: {b['met']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(portable_tree(result), indent=2) + "\n")


if __name__ == "__main__":
    main()
