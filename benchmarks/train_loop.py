"""The pipeline's training loop against a bare `model.fit` on the same in-memory arrays, interleaved.

    python benchmarks/train_loop.py [--images 20000] [--trials 3] [--model cifar-cnn] [--json FILE]

Same model, batch size, optimizer, loss and epochs; augmentation off. The pipeline keeps uint8 images
and scales each batch in its tf.data graph; the bare loop gets float32 arrays scaled up front, as a
user would write it. Each trial trains a fresh model for 2 epochs and times the second (steady state,
no tracing), training only; A and B alternate, so load on this shared machine hits both alike.
Goal: bare seconds / pipeline seconds >= 0.95 (median over trials).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from spread import median

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "datasets" / "cifar10-jpg")
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--model", default="cifar-cnn")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import keras

    from device.core import environment, normalize
    from pipeline.config import BuildConfig
    from pipeline.data import Dataset, load_dataset
    from pipeline.models import build_model
    from pipeline.train import _optimizer, _Throughput, recipe_of, train

    full = load_dataset("cifar10", args.data_dir, log=lambda *a: None)
    n = args.images
    data = Dataset(full.name, full.x_train[:n], full.y_train[:n], full.x_val, full.y_val, full.x_test[:1],
                   full.y_test[:1], full.spec, full.source)
    cfg = BuildConfig(dataset="cifar10", model=args.model, epochs=2, augment=False, out="unused")
    pre = data.spec.to_dict()
    x, xv = normalize(data.x_train, pre), normalize(data.x_val, pre)
    y, yv = keras.utils.to_categorical(data.y_train, 10), keras.utils.to_categorical(data.y_val, 10)

    def pipeline_epoch() -> float:
        _, history = train(cfg, data, log=lambda *a: None)
        return history["epoch_seconds"][1]

    def bare_epoch() -> float:
        keras.utils.set_random_seed(cfg.seed)
        model = build_model(args.model, x.shape[1:], 10)
        steps = -(-len(x) // cfg.batch_size)
        model.compile(optimizer=_optimizer(recipe_of(cfg), steps),
                      loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
                      metrics=["accuracy"])
        timer = _Throughput(len(x), 2, lambda *a: None)
        model.fit(x, y, batch_size=cfg.batch_size, epochs=2, validation_data=(xv, yv), shuffle=True, verbose=0,
                  callbacks=[timer])
        return timer.seconds[1]

    times = {"pipeline": [], "bare": []}
    loads = []
    for trial in range(args.trials):
        order = ("pipeline", "bare") if trial % 2 == 0 else ("bare", "pipeline")
        for name in order:
            loads.append(os.getloadavg()[0])
            times[name].append(pipeline_epoch() if name == "pipeline" else bare_epoch())
    spread: list[str] = []
    ratio = median((b / p for b, p in zip(times["bare"], times["pipeline"])), "bare / pipeline epoch", spread)
    result = {"model": args.model, "images": n, "batch_size": cfg.batch_size, "augment": False,
              "epoch_seconds": times, "images_per_second": {k: [n / s for s in v] for k, v in times.items()},
              "ratio_bare_over_pipeline": ratio, "goal": 0.95, "spread_warnings": spread, "load_average_1min": loads,
              "python": platform.python_version(), "cores": os.cpu_count(), "environment": environment()}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
