"""Candidates of the search space trained exactly as a search trial trains them, one after another, with their cost
measured before training as phase (a) measures it: the question whether a family could beat ResNet-8 at its own
latency and size, asked without an hour's search (issue 22).

Each candidate gets the search's shared recipe (Adam, cosine, label smoothing 0.1, batch 64) at one learning
rate, the search's seed and the same data, validation split and augmentation as a trial (`trial_config` and
`pipeline.train.train`, the trial's own calls), so its validation curve is the one its trial would report to ASHA.
The cost is the untrained candidate's int8 file and p50 on this host (`measure_model`, one thread, XNNPACK),
ResNet-8 measured in the same process as the yardstick.

    python benchmarks/search_trials.py CANDIDATE... [--epochs 8] [--learning-rate 3e-3] [--json FILE]
    python benchmarks/search_trials.py resnet-w1-d1-r32 mbconv-w1-d1-r32 --json FILE
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from series import kept

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from device.core import environment  # noqa: E402
from device.timing import features_words  # noqa: E402

DATA = REPO.parent / "shared" / "datasets" / "cifar10-jpg"


def cost(cand) -> dict:
    import keras

    from pipeline.config import BuildConfig
    from pipeline.data import DATASETS
    from pipeline.search.feasibility import Target, measure_model

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = cand.build(3, 10)
    cfg = BuildConfig(dataset="cifar10", data_dir=str(DATA), out="unused")
    measured = measure_model(model, cfg, ("int8",), Target("host"), DATASETS["cifar10"].spec.to_dict(),
                             cand.keras_file)["int8"]
    return {"parameters": model.count_params(), "bytes": measured["bytes"], "size_kb": round(measured["size_kb"], 1),
            "latency_p50_ms": measured["latency_ms"]}


def trial(cand, epochs: int, learning_rate: float) -> dict:
    import keras

    from pipeline import build as stages
    from pipeline.search.trial import trial_config
    from pipeline.train import seed_everything, train

    settings = {"dataset": "cifar10", "data_dir": str(DATA), "seed": 0, "quantize": ["int8"], "epochs": epochs,
                "batch_size": 64}
    with tempfile.TemporaryDirectory(prefix="edgepipe-trial-") as tmp:
        cfg = trial_config(settings, cand, learning_rate, out=str(Path(tmp) / "run"), benchmark=False)
        data, _, _ = stages.load_inputs(cfg, {"train"}, lambda *a: None)
        keras.backend.clear_session()
        seed_everything(cfg.seed)  # as run_trial: the initial weights from the search's seed
        t0 = time.perf_counter()
        _, history = train(cfg, data, log=lambda *a: None, model=cand.build(data.spec.channels, len(data.spec.labels)))
    return {"epochs": epochs, "learning_rate": learning_rate, "train_s": round(time.perf_counter() - t0),
            "val_accuracy": [round(v, 4) for v in history["val_accuracy"]],
            "train_accuracy_end": round(history["accuracy"][-1], 4)}


def main() -> None:
    from pipeline.search.space import Candidate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("candidates", nargs="+", metavar="CANDIDATE", help="ids as the search names them")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--learning-rate", type=float, default=3e-3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: this benchmark reads the CIFAR-10 JPEG folders there")
    try:
        cands = [Candidate.parse(c) for c in args.candidates]
    except (KeyError, ValueError) as e:
        sys.exit(f"not a candidate id ({e}): write them as the search does, e.g. resnet-w1-d1-r32, mbconv-w1-d1-r32")
    env = environment()
    env.update(cpu_words=features_words(env["cpu_features"]), started=time.strftime("%Y-%m-%d %H:%M:%S"))
    results = kept(args.json)
    yardstick = Candidate.parse("resnet-w1-d1-r32")
    costs = {c.id: cost(c) for c in [yardstick, *cands]}  # one process, back to back: comparable timings
    for cand in cands:
        key = f"{cand.id}@{args.learning_rate:g}"
        results[key] = {"candidate": cand.id, "cost": costs[cand.id], "resnet8_cost_here": costs[yardstick.id],
                        **trial(cand, args.epochs, args.learning_rate)}
        print(f"{key}: validation {results[key]['val_accuracy'][-1]:.2%} after {args.epochs} epochs; "
              f"{costs[cand.id]['size_kb']} KB, {costs[cand.id]['latency_p50_ms']:.4f} ms "
              f"(ResNet-8 here: {costs[yardstick.id]['latency_p50_ms']:.4f} ms)", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"environment": env, "results": results}, indent=2))


if __name__ == "__main__":
    main()
