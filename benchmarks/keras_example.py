"""Our whole default MNIST build against the official Keras example "Simple MNIST convnet" (issue 20.5).

What a user would write by hand: the example's model (Conv32-Pool-Conv64-Pool-Flatten-Dropout-Dense10), 15
epochs, batch 128, `validation_split=0.1`, then `evaluate` on the test split. Against it: `pipeline build
--dataset mnist` at its defaults (train, convert, evaluate, benchmark, report, int8). Both read the same full
MNIST file, each in a fresh process, alternating A B B A ... so load on a shared machine hits both alike.

The ratio is our build's whole wall time over the example's `fit` alone (its data loading and evaluation are
not counted, which favours the example); goal <= 0.33 at no less accuracy (our int8 against its fp32).

    python benchmarks/keras_example.py [--data-dir ../shared/datasets/mnist] [--rounds 1] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from portable import portable, portable_tree
from spread import median

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The example as published on keras.io (examples/vision/mnist_convnet.py), reading the given file and timing
# its fit; printed as one JSON line.
EXAMPLE = r"""
import json, sys, time
import numpy as np
import keras
from keras import layers

with np.load(sys.argv[1]) as f:
    x_train, y_train, x_test, y_test = f["x_train"], f["y_train"], f["x_test"], f["y_test"]
num_classes, input_shape = 10, (28, 28, 1)
x_train = np.expand_dims(x_train.astype("float32") / 255, -1)
x_test = np.expand_dims(x_test.astype("float32") / 255, -1)
y_train = keras.utils.to_categorical(y_train, num_classes)
y_test = keras.utils.to_categorical(y_test, num_classes)
model = keras.Sequential([
    keras.Input(shape=input_shape),
    layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
    layers.MaxPooling2D(pool_size=(2, 2)),
    layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
    layers.MaxPooling2D(pool_size=(2, 2)),
    layers.Flatten(),
    layers.Dropout(0.5),
    layers.Dense(num_classes, activation="softmax"),
])
model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
t0 = time.perf_counter()
model.fit(x_train, y_train, batch_size=128, epochs=15, validation_split=0.1, verbose=0)
fit = time.perf_counter() - t0
score = model.evaluate(x_test, y_test, verbose=0)
print(json.dumps({"fit_seconds": fit, "test_accuracy": float(score[1]), "test_images": len(x_test)}))
"""


def ours(data_dir: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "pipeline.cli", "build", "--dataset", "mnist", "--data-dir", str(data_dir),
           "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"build failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    evaluation = json.loads((out / "evaluation.json").read_text())
    return {"wall_seconds": wall, "stage_seconds": manifest["stage_seconds"],
            "accuracy": {v: e["accuracy"] for v, e in evaluation["variants"].items()},
            "epochs": manifest["config"]["epochs"], "command": cmd}


def example(data_dir: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", EXAMPLE, str(data_dir / "mnist.npz")], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"the Keras example failed:\n{proc.stderr[-2000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "datasets" / "mnist")
    ap.add_argument("--rounds", type=int, default=1, help="each round runs both, in alternating order")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from device.timing import cpu_features

    runs = {"ours": [], "example": []}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in (("ours", "example") if r % 2 == 0 else ("example", "ours")):
                loads.append(os.getloadavg()[0])
                runs[name].append(ours(args.data_dir, Path(tmp) / f"run{r}") if name == "ours"
                                  else example(args.data_dir))
                print(f"round {r + 1} {name}: {json.dumps(runs[name][-1], default=str)[:300]}", flush=True)
    ratios = [o["wall_seconds"] / e["fit_seconds"] for o, e in zip(runs["ours"], runs["example"])]
    spread: list[str] = []
    ours_int8 = statistics.median(o["accuracy"]["int8"] for o in runs["ours"])
    theirs = statistics.median(e["test_accuracy"] for e in runs["example"])
    result = {
        "ratio_our_build_over_example_fit": ratios, "median_ratio": median(ratios, "our build / example fit", spread),
        "spread_warnings": spread, "goal": 0.33,
        "our_int8_accuracy": ours_int8, "example_fp32_accuracy": theirs, "accuracy_goal_met": ours_int8 >= theirs,
        "runs": runs, "load_average_1min": loads, "data": portable(args.data_dir),
        "environment": {"python": platform.python_version(), "machine": platform.machine(), "cores": os.cpu_count(),
                        "cpu": cpu_features()},
    }
    stages = statistics.median(sum(o["stage_seconds"].values()) for o in runs["ours"])
    print(f"our build / the example's fit: {result['median_ratio']:.2f}x (goal <= 0.33); our stages {stages:.0f} s: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in runs["ours"][0]["stage_seconds"].items()))
    print(f"accuracy: our int8 {ours_int8:.4f}, the example's fp32 {theirs:.4f}")
    if statistics.pstdev(loads) > 1 or max(loads) > (os.cpu_count() or 1):
        print(f"warning: the load average went from {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} cores; "
              "the ratio is taken inside each round, but a busy machine widens it")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(portable_tree(result), indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
