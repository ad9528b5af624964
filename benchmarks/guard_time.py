"""Seconds the accuracy guard adds to `pipeline build`, when int8 is within budget and when it must act.

Targets on a 2-core machine: at most 30 s when the guard acts, about 0 s when int8 is already within
the budget. For mnist-cnn (real MNIST subset) and cifar-dscnn (a synthetic CIFAR-format dataset
written here: there is no CIFAR on these machines), one model is trained, then built again with
`--keras-model` in three forms, all with `--fallback auto --max-accuracy-drop 1`:

  as trained  int8 is within budget: the guard must only check that, on the validation split;
  rescaled    the two strongest channels (weight norm) of the first Dense scaled by 300 and the
              matching rows of the last Dense by 1/300 (the issue's case, float function unchanged;
              needs a Dense-ReLU-Dense tail, so mnist-cnn only): equalization repairs it;
  shifted     +1000 on every logit of the softmax layer (float function unchanged, int8 logits lose
              their resolution): equalization cannot repair it, the float-layer search must.

    python benchmarks/guard_time.py [--data-dir ../shared/datasets/mnist-9k] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import pickle
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def write_synthetic_cifar(folder: Path, n_train: int = 10000, n_test: int = 1000, seed: int = 0) -> Path:
    """CIFAR-10 python batches of noisy coloured gratings: class = orientation, frequency and tint."""
    rng = np.random.default_rng(seed)
    batches = Path(folder) / "cifar-10-batches-py"
    batches.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)

    def images(n):
        labels = rng.integers(0, 10, n)
        angle = (labels * np.pi / 10 + rng.normal(0, 0.12, n))[:, None, None]
        freq = (0.35 + 0.15 * (labels % 3) + rng.normal(0, 0.03, n))[:, None, None]
        grating = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi, (n, 1, 1)))
        tint = np.stack([labels % 2, (labels // 2) % 2, (labels // 4) % 2], 1) * 0.5 + 0.5 + rng.normal(0, 0.2, (n, 3))
        pixels = 128 + 90 * grating[:, None] * tint[:, :, None, None] + rng.normal(0, 60, (n, 3, 32, 32))
        return np.clip(pixels, 0, 255).astype(np.uint8).reshape(n, 3072), labels.tolist()

    for i in range(5):
        x, y = images(n_train // 5)
        (batches / f"data_batch_{i + 1}").write_bytes(pickle.dumps({b"data": x, b"labels": y}))
    x, y = images(n_test)
    (batches / "test_batch").write_bytes(pickle.dumps({b"data": x, b"labels": y}))
    return Path(folder)


def rescaled(model, factor: float = 300.0):
    """The issue's breaker, or None without a Dense-ReLU-Dense tail."""
    import keras

    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    if len(dense) < 2 or model.layers[-2] is not dense[-2] or dense[-2].get_config()["activation"] != "relu":
        return None
    (w1, b1), (w2, b2) = dense[-2].get_weights(), dense[-1].get_weights()
    strong = np.argsort(np.linalg.norm(w1, axis=0))[-2:]  # a dead channel scaled up would do no harm
    w1[:, strong] *= factor
    b1[strong] *= factor
    w2[strong] /= factor
    dense[-2].set_weights([w1, b1])
    dense[-1].set_weights([w2, b2])
    return model


def shifted(model, offset: float = 1000.0):
    """softmax(z + c) = softmax(z): the same classifier, but int8 logits now span 0..1000."""
    w, b = model.layers[-1].get_weights()
    model.layers[-1].set_weights([w, b + offset])
    return model


def _silent(*args) -> None:
    pass


def one(name: str, dataset: str, data_dir: Path, epochs: int, root: Path) -> list[dict]:
    import keras

    from pipeline.build import build
    from pipeline.config import BuildConfig

    base = BuildConfig(dataset=dataset, model=name, data_dir=str(data_dir), epochs=epochs, benchmark=False,
                       out=str(root / name))
    t0 = time.perf_counter()
    trained = build(base, log=_silent)
    rows = [{"model": name, "case": "no guard flags", "build_s": time.perf_counter() - t0, "guard_s": 0.0}]
    forms = {"as trained": lambda m: m, "rescaled": rescaled, "shifted": shifted}
    for case, form in forms.items():
        model = form(keras.models.load_model(trained / "model.keras"))
        if model is None:
            continue
        path = root / f"{name}-{case.replace(' ', '-')}.keras"
        model.save(path)
        cfg = BuildConfig(dataset=dataset, model=name, data_dir=str(data_dir), keras_model=str(path), benchmark=False,
                          fallback="auto", max_accuracy_drop=1.0, out=str(root / path.stem))
        t0 = time.perf_counter()
        run = build(cfg, log=_silent)
        wall = time.perf_counter() - t0
        manifest = json.loads((run / "manifest.json").read_text())
        analysis = json.loads((run / "analysis.json").read_text())
        evaluation = json.loads((run / "evaluation.json").read_text())["variants"]
        guard = analysis["guard"] or {}
        rows.append({"model": name, "case": case, "build_s": wall, "guard_s": manifest["stage_seconds"]["guard"],
                     "delivered": guard.get("delivered", "int8"),
                     "remedies": [(r["name"], r.get("status")) for r in guard.get("remedies", [])],
                     "float_layers": [f["layer"] for r in guard.get("remedies", []) for f in r.get("float_layers", [])],
                     "test_accuracy": {v: round(e["accuracy"], 4) for v, e in evaluation.items()},
                     "bytes": {v: (run / f"model_{v}.tflite").stat().st_size for v in evaluation}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "datasets" / "mnist-9k")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows += one("mnist-cnn", "mnist", args.data_dir, 3, root)
        rows += one("cifar-dscnn", "cifar10", write_synthetic_cifar(root / "cifar"), 5, root)
    from device.core import environment

    env = {"python": platform.python_version(), "machine": platform.machine(), "platform": platform.platform(),
           **environment()}
    print(f"environment: {env}")
    for r in rows:
        acts = "acts" if r.get("remedies") else "idle"
        print(f"{r['model']:>12} {r['case']:<15} guard {r['guard_s']:5.2f} s ({acts}; target "
              f"{'<= 30' if acts == 'acts' else '~0'}), build {r['build_s']:5.1f} s"
              + (f", delivers {r['delivered']}" if r.get("delivered") else ""))
        if r.get("remedies"):
            print(f"{'':>12} remedies {r['remedies']}, float layers {r['float_layers'] or 'none'}")
            print(f"{'':>12} test accuracy {r['test_accuracy']}, bytes {r['bytes']}")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
