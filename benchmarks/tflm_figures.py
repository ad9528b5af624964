"""Flash and arena of every zoo model's int8 variant under TensorFlow Lite Micro, for the README.

    python benchmarks/tflm_figures.py [--work DIR] [--cifar-per-class 500] [--epochs 2]

Builds each zoo model (MNIST models on ../shared/datasets/mnist, CIFAR models on a fixed slice of the
real CIFAR-10 JPEGs in ../shared/datasets/cifar10-jpg, packed in the CIFAR-10 batch format), exports it
with `pipeline export --target tflm`, and prints a Markdown table with the environment. Flash and arena
depend on the architecture, not on how well it was trained, so short training is enough for them; the
accuracies are those of these short runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODELS = {"mnist-mlp": "mnist", "mnist-cnn": "mnist", "cifar-cnn": "cifar10", "cifar-dscnn": "cifar10"}


def cifar_slice(work: Path, per_class: int, test_per_class: int) -> Path:
    """The first images of each class of cifar10-jpg as a cifar-10-python.tar.gz (the tests' helper)."""
    from tests import test_tflm

    if not test_tflm.CIFAR_JPG.is_dir():  # the helper would fall back to synthetic images, the table's accuracies too
        sys.exit(f"{test_tflm.CIFAR_JPG} not found: the CIFAR models' figures are measured on the real CIFAR-10 JPEGs")
    # Both counts name the slice: a slice cut with other test images is another one.
    folder = work / f"cifar-{per_class}-{test_per_class}"
    if (folder / "cifar" / "cifar-10-python.tar.gz").is_file():
        return folder / "cifar"
    folder.mkdir(parents=True, exist_ok=True)
    return test_tflm.cifar_data(folder, per_class, test_per_class)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgepipe-tflm-figures"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cifar-per-class", type=int, default=500)
    parser.add_argument("--cifar-test-per-class", type=int, default=100)
    args = parser.parse_args()

    from pipeline.build import build
    from pipeline.config import BuildConfig
    from pipeline.micro.export import export_tflm

    mnist = REPO.parent / "shared" / "datasets" / "mnist"
    data_dirs = {"mnist": str(mnist), "cifar10": str(cifar_slice(args.work, args.cifar_per_class,
                                                                   args.cifar_test_per_class))}
    rows = []
    for model, dataset in MODELS.items():
        t0 = time.perf_counter()
        cfg = BuildConfig(dataset=dataset, data_dir=data_dirs[dataset], model=model, epochs=args.epochs,
                          benchmark=False, out=str(args.work / model))
        run = build(cfg, overwrite=True, log=lambda *a: None)
        out = export_tflm(run, overwrite=True, log=print)
        s = json.loads((out / "tflm_export.json").read_text())
        fitting = [b for b, ok in next(r for r in s["variants"] if r.get("exported"))["fits"].items() if ok]
        rows.append((model, dataset, s, fitting, time.perf_counter() - t0))

    print("\n| model | data | int8 flash (bytes) | arena measured | kTensorArenaSize | ops | accuracy TFLM | "
          "TFLM = LiteRT built-in | top-1 agreement with LiteRT (XNNPACK) | fits |")
    print("|---|---|---:|---:|---:|---|---:|---|---:|---|")
    for model, dataset, s, fitting, _ in rows:
        a = s["accuracy"]
        print(f"| {model} | {dataset} | {s['flash_bytes']:,} | {s['arena']['measured']:,} | "
              f"{s['arena']['recommended']:,} | {', '.join(s['ops'])} | {a['accuracy_tflm']:.2%} "
              f"({a['images']:,} images) | {'identical outputs' if a['builtin_identical'] else 'differ'} | "
              f"{a['agreement']:.2%} | {', '.join(fitting)} |")
    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "loadavg": os.getloadavg(), "epochs": args.epochs, "cifar_train_per_class": args.cifar_per_class,
           "cifar_test_per_class": args.cifar_test_per_class,
           **{d: metadata.version(d) for d in ("tflite-micro", "tensorflow", "ai-edge-litert")},
           "seconds": {m: round(t, 1) for m, _, _, _, t in rows}}
    print("\nenvironment:", json.dumps(env))


if __name__ == "__main__":
    main()
