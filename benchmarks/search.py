"""`pipeline search` against the best zoo model under the same budgets and the same training time (issue 22).

On CIFAR-10 JPEGs, host target: the latency budget is ResNet-8 int8's p50 measured here first (the
zoo's ResNet-8, untrained, converted and timed exactly as the search times its candidates), rounded up to two
significant digits as a user writes a budget, the size budget 100 KB. Rounded to the nearest instead, ResNet-8's
own architecture in the search (resnet8-w1-r32, timed again seconds later in the search's process) read 0.0385 ms
against a budget of 0.0385 ms and was dropped, while the zoo arm counts ResNet-8 within the budget by definition.
The search gets --budget-minutes; every zoo model that meets the budgets is then trained
with `pipeline build` for as many epochs as fit the same minutes (one probe epoch measures its speed),
so each zoo model gets the whole budget, not a share: the comparison favours the zoo.

--zoo-from FILE takes a zoo model's result from an earlier result file instead of training it for the hour
again, when it is a fair stand-in: its probe epoch is measured here, and the epochs the budget holds here must be
within ZOO_REUSE_TOLERANCE of the epochs it was trained for, and it must record the recipe that `pipeline build`
gives those epochs today and the fingerprint of the images it trained on, the same as the probe's here (its accuracy
depends only on those; the result files before 2026-12-05 record no recipe, and cifar-resnet8's recipe has ended
plain since). The result file records the reuse, both probe epochs and where the
reused run came from.

    python benchmarks/search.py [--data-dir ../shared/datasets/cifar10-jpg] [--budget-minutes 60]
                                [--max-size-kb 100] [--max-latency-ms MS] [--trials 40] [--space default] [--json FILE]
                                [--keep DIR] [--zoo-from FILE]
    python benchmarks/search.py --zoo-only --json FILE   # the zoo arm alone, for a later --zoo-from FILE
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from portable import portable_tree

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ZOO = ("cifar-cnn", "cifar-dscnn", "cifar-resnet8")
ZOO_REUSE_TOLERANCE = 0.10


def cli(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        sys.exit(f"`pipeline {' '.join(map(str, args[:2]))}` failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


def round_up(ms: float, digits: int = 2) -> float:
    """`ms` rounded up to `digits` significant digits (0.03852 -> 0.039)."""
    step = 10 ** (math.floor(math.log10(ms)) - digits + 1)
    return round(math.ceil(ms / step - 1e-9) * step, 12)


def zoo_costs(data_dir: Path) -> dict:
    """Each zoo model's int8 latency and size, untrained, measured as the search measures candidates."""
    import keras

    from pipeline.config import BuildConfig
    from pipeline.data import DATASETS
    from pipeline.models import MODELS, build_model
    from pipeline.search.feasibility import Target, measure_model

    cfg = BuildConfig(dataset="cifar10", data_dir=str(data_dir), out="unused")
    spec = DATASETS["cifar10"].spec.to_dict()
    out = {}
    for name in ZOO:
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        model = build_model(name, MODELS[name].input_shape, len(spec["labels"]))
        out[name] = measure_model(model, cfg, ("int8",), Target("host"), spec, name)["int8"]  # as a build names it
    return out


def train_zoo(name: str, data_dir: Path, minutes: float, out: Path, earlier: dict | None) -> dict:
    probe = out / f"{name}-probe"
    cli("build", "--dataset", "cifar10", "--data-dir", data_dir, "--model", name, "--epochs", 1, "--no-benchmark",
        "--threads", 1, "--out", probe)
    probed = json.loads((probe / "manifest.json").read_text())
    epoch_s = probed["training"]["epoch_seconds"][0]
    epochs = max(1, int(minutes * 60 // epoch_s))
    if earlier and name in earlier["zoo"]:
        from pipeline.config import BuildConfig
        from pipeline.train import recipe_of

        kept = earlier["zoo"][name]
        # The zoo's recipe changes between sessions (cifar-resnet8 gained its plain tail): a run trained with
        # another one, or recorded before runs kept theirs, is no stand-in for today's.
        today = recipe_of(BuildConfig(dataset="cifar10", data_dir=str(data_dir), model=name, epochs=kept["epochs"],
                                      out="unused"))
        if kept.get("recipe") != today:
            print(f"{name}: {earlier['file']} does not record that its run trained today's recipe; training it again")
        # Another folder of the same classes (a resized copy, a different split) gives another accuracy.
        elif kept.get("data_sha256") != probed["data"]["sha256"]:
            print(f"{name}: {earlier['file']} does not record that its run trained on the images of {data_dir}; "
                  "training it again")
        # The tolerance is a share of the epochs the run was trained for: a share of the epochs here would let a
        # run stand in for more than 10% more epochs than it saw.
        elif abs(kept["epochs"] - epochs) <= ZOO_REUSE_TOLERANCE * kept["epochs"]:
            print(f"{name}: {epochs} epochs fit {minutes:g} minutes here (probe epoch {epoch_s:.1f} s); reusing its "
                  f"{kept['epochs']}-epoch run from {earlier['file']}")
            return {**kept, "reused_from": earlier["file"], "probe_epoch_s_here": epoch_s, "epochs_here": epochs}
        else:
            print(f"{name}: {epochs} epochs fit here, {kept['epochs']} in {earlier['file']}: training it again")
    run = out / name
    t0 = time.perf_counter()
    cli("build", "--dataset", "cifar10", "--data-dir", data_dir, "--model", name, "--epochs", epochs,
        "--threads", 1, "--out", run)
    evaluation = json.loads((run / "evaluation.json").read_text())["variants"]["int8"]
    manifest = json.loads((run / "manifest.json").read_text())
    return {"epochs": epochs, "recipe": manifest["training"]["recipe"], "data_sha256": manifest["data"]["sha256"],
            "probe_epoch_s": epoch_s, "wall_s": time.perf_counter() - t0,
            "int8_accuracy": evaluation["accuracy"], "interval_95": evaluation["interval_95"]}


def paired(pick: Path, zoo: Path) -> dict:
    """The pick's run against the zoo run on the same test images, int8 and fp32: exact McNemar on the images only
    one of them classifies right (two intervals from the same images overlap long after a paired test separates
    them)."""
    import numpy as np

    from pipeline.measure.stats import paired_change

    with np.load(pick / "predictions.npz") as a, np.load(zoo / "predictions.npz") as b:
        if not np.array_equal(a["y"], b["y"]):
            sys.exit(f"{pick} and {zoo} were evaluated on different test images: no paired test")
        return {v: {**paired_change(a["y"], b[f"probs_{v}"].argmax(1), a[f"probs_{v}"].argmax(1)),
                    "baseline": zoo.name} for v in ("int8", "fp32")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "datasets" / "cifar10-jpg")
    ap.add_argument("--budget-minutes", type=float, default=60)
    ap.add_argument("--max-size-kb", type=float, default=100)
    ap.add_argument("--max-latency-ms", type=float, help="a latency budget other than ResNet-8's p50 here: where "
                                                           "no zoo model fits, the search runs alone")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=30, help="epochs per search trial at most (ASHA stops most sooner)")
    ap.add_argument("--space", default="default")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="keep the search folder and the zoo runs here (default: removed)")
    ap.add_argument("--zoo-from", type=Path, help="an earlier result file whose zoo runs stand in when the "
                                                  "budget holds as many epochs here (see above)")
    ap.add_argument("--zoo-only", action="store_true", help="train the zoo arm only and write it to --json, for a "
                                                            "later run's --zoo-from")
    args = ap.parse_args()
    earlier = ({**json.loads(args.zoo_from.read_text()), "file": args.zoo_from.name} if args.zoo_from else None)
    costs = zoo_costs(args.data_dir)
    measured = costs["cifar-resnet8"]["latency_ms"]
    latency = args.max_latency_ms or round_up(measured)
    print(f"ResNet-8 int8 p50 here: {measured:.4f} ms; --max-latency-ms {latency:g}, --max-size-kb "
          f"{args.max_size_kb:g}; load average {os.getloadavg()[0]:.2f}")
    if args.zoo_only:
        zoo_arm(args, costs, latency, measured)
        return
    with contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(
            prefix="edgepipe-search-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        cli("search", "--dataset", "cifar10", "--data-dir", args.data_dir, "--max-latency-ms", f"{latency:g}",
            "--max-size-kb", args.max_size_kb, "--budget-minutes", args.budget_minutes, "--trials", args.trials,
            "--epochs", args.epochs, "--space", args.space, "--out", tmp / "search")
        search_s = time.perf_counter() - t0
        report = json.loads((tmp / "search" / "search.json").read_text())
        fitting = [n for n, c in costs.items() if c["latency_ms"] <= latency and c["size_kb"] <= args.max_size_kb]
        zoo = {n: train_zoo(n, args.data_dir, args.budget_minutes, tmp, earlier) for n in fitting}
        best = max(zoo.items(), key=lambda kv: kv[1]["int8_accuracy"]) if zoo else None
        # A reused zoo run's folder is an earlier run's, not here.
        against = (paired(tmp / "search" / "pick", tmp / best[0]) if report["pick"] and best
                   and "reused_from" not in best[1] else None)
    pick = report["pick"]
    acc = pick["run_test"] if pick else None  # the pick's run: after its final training
    print(f"search: {search_s / 60:.1f} min, {report['summary']['trials']} trials "
          f"({report['summary']['trials'] / (search_s / 3600):.1f} per hour), "
          f"{100 * report['summary']['dropped_share']:.0f}% of {report['summary']['candidates']} candidates "
          "dropped before training")
    print("| model | int8 test accuracy [95%] | latency p50 ms | size KB |\n|---|---|---|---|")
    if pick:
        print(f"| search pick {pick['candidate']} | {acc['accuracy']:.4f} [{acc['low']:.4f}-{acc['high']:.4f}] | "
              f"{pick.get('run_latency_p50_ms', float('nan')):.3f} | {pick.get('run_bytes', 0) / 1024:.1f} |")
    for name, r in zoo.items():
        ci = r["interval_95"]
        print(f"| zoo {name}, {r['epochs']} epochs | {r['int8_accuracy']:.4f} [{ci['low']:.4f}-{ci['high']:.4f}] | "
              f"{costs[name]['latency_ms']:.3f} | {costs[name]['size_kb']:.1f} |")
    if not zoo:
        print("no zoo model meets both budgets")
    if against:
        t = against["int8"]
        print(f"int8, paired on the same test images: {t['variant_only_correct']} only the pick classifies right, "
              f"{t['baseline_only_correct']} only {best[0]}: exact McNemar p = {t['p_value']:.3f}")
    if args.json:
        from pipeline.search.feasibility import environment

        result = {"environment": environment(), "zoo_costs": costs, "resnet8_p50_ms": measured,
                  "latency_budget_ms": latency, "search": report,
                  "search_seconds": search_s, "zoo": zoo, "best_zoo": best, "pick_against_best_zoo": against}
        args.json.write_text(json.dumps(portable_tree(result), indent=2) + "\n")


def zoo_arm(args, costs: dict, latency: float, measured: float) -> None:
    """The zoo arm alone (an hour of training per fitting zoo model), for a later search's --zoo-from: on a
    machine of two cores the two arms do not fit one session one after the other."""
    from pipeline.search.feasibility import environment

    fitting = [n for n, c in costs.items() if c["latency_ms"] <= latency and c["size_kb"] <= args.max_size_kb]
    with contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(
            prefix="edgepipe-zoo-bench-") as tmp:
        zoo = {n: train_zoo(n, args.data_dir, args.budget_minutes, Path(tmp), None) for n in fitting}
    for name, r in zoo.items():
        print(f"zoo {name}, {r['epochs']} epochs: int8 {r['int8_accuracy']:.4f}")
    if args.json:
        result = {"environment": environment(), "zoo_costs": costs, "resnet8_p50_ms": measured,
                  "latency_budget_ms": latency, "budget_minutes": args.budget_minutes, "zoo": zoo}
        args.json.write_text(json.dumps(portable_tree(result), indent=2) + "\n")


if __name__ == "__main__":
    main()
