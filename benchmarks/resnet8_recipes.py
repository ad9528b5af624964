"""ResNet-8 recipes within a budget of images seen (issue 20.6): int8 >= 85% on CIFAR-10's 8,000 test JPEGs
within 60 epochs of its 45,000 training images (2.7 M images), whatever the CPU.

Each recipe is one real `pipeline build` of cifar-resnet8 at `--epochs` (60), differing from the model's
default recipe by the options in RECIPES. The result file keeps, per recipe, the command, the int8 and fp32
test accuracy with their 95% intervals, the curve (training and validation accuracy after every epoch) and
the training throughput; the environment records the CPU and its features, since throughput (not accuracy)
depends on them. `--plot` draws the curves for the README.

    python benchmarks/resnet8_recipes.py [RECIPE...] [--epochs 60] [--runs DIR] [--json FILE] [--plot PNG]

Run folders are kept under --runs: a recipe whose finished run is there is read, not trained again, so an
interrupted series continues where it stopped. The recipes of an existing --json file that are not named again are
kept in it as they were (marked so): a series adds to the runs of earlier sessions, whose folders may be gone.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from portable import portable, portable_command
from series import chosen, kept

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from device.core import environment  # noqa: E402
from device.timing import features_words  # noqa: E402

DATA = REPO.parent / "shared" / "datasets" / "cifar10-jpg"
GOAL = 0.85
ISSUE9 = REPO / "benchmarks" / "results" / "issue9"
ISSUE22 = REPO / "benchmarks" / "results" / "issue22"
# Options on top of the default recipe (SGD with Nesterov momentum 0.9, peak rate 0.1 after 3 warm-up epochs,
# cosine decay, batch 128, label smoothing 0.1, the reference's L2 1e-4 on kernels, crop and flip).
RECIPES = {
    "default": [],
    # The same recipe from another seed (weights, order, augmentation, validation split): how far two runs of one
    # recipe land apart, the yardstick for the differences between recipes.
    "default-seed1": ["--seed", "1"],
    "batch64": ["--batch-size", "64"],
    # Batch 64 from seed 1, against default-seed1: whether batch 64's lead holds on a second seed, the batch alone.
    "batch64-seed1": ["--batch-size", "64", "--seed", "1"],
    # A model this small underfits (training accuracy 89% under augmentation): smoothing's pull on the logits off.
    "batch64-ls0": ["--batch-size", "64", "--label-smoothing", "0"],
    # Keras's SGD decays decoupled (w -= rate * decay * w, outside the momentum): 2e-3 doubles the kernels'
    # effective decay, since the architecture's L2 1e-4 acts through momentum 0.9 as 2e-3 would.
    "batch64-wd": ["--batch-size", "64", "--weight-decay", "2e-3"],
    # Twice batch 64's steps per epoch, the rate scaled down with the batch.
    "batch32": ["--batch-size", "32", "--learning-rate", "0.05"],
    # One-cycle as Smith's: a warm-up over 30% of the run to twice the usual peak, then down to zero.
    "onecycle": ["--warmup-epochs", "18", "--learning-rate", "0.2"],
    # The weights' moving average over about the last 14 epochs (5,000 steps at 352 a epoch), BatchNorm
    # statistics recomputed for it.
    "ema": ["--ema", "0.9998"],
    # Each 3x3 conv trained as three branches (3x3, 1x1, identity; RepVGG) folded back into it: the same
    # ResNet-8 is delivered, the same images are seen.
    "reparam": ["--reparam"],
    "reparam-batch64": ["--batch-size", "64", "--reparam"],
    # The three that landed above the default together: batch 64, the kernels' decay doubled, one-cycle's peak.
    "batch64-wd-onecycle": ["--batch-size", "64", "--weight-decay", "2e-3", "--warmup-epochs", "18",
                            "--learning-rate", "0.2"],
    # Sharpness-aware minimization at Foret et al.'s CIFAR radius: each step's gradient taken at the worst point
    # within 0.05 of the weights (twice the compute per image, the same images).
    "sam": ["--sam", "0.05"],
    # The best recipe ending on the images as they are: its last 6, 8 or 10 epochs without the shift and flip
    # (8 reached 85.19% int8, the issue's goal).
    "best-plain8": ["--batch-size", "64", "--weight-decay", "2e-3", "--warmup-epochs", "18", "--learning-rate", "0.2",
                    "--plain-epochs", "8"],
    "best-plain6": ["--batch-size", "64", "--weight-decay", "2e-3", "--warmup-epochs", "18", "--learning-rate", "0.2",
                    "--plain-epochs", "6"],
    "best-plain10": ["--batch-size", "64", "--weight-decay", "2e-3", "--warmup-epochs", "18", "--learning-rate", "0.2",
                     "--plain-epochs", "10"],
    # The default recipe ending on the images as they are: whether the tail lifts more than the one recipe it was
    # found on.
    "default-plain8": ["--plain-epochs", "8"],
}


def run(name: str, epochs: int, runs: Path) -> dict:
    out = runs / name
    cmd = ["pipeline", "build", "--dataset", "cifar10", "--data-dir", str(DATA), "--model", "cifar-resnet8",
           "--quantize", "int8", "--epochs", str(epochs), *RECIPES[name], "--out", str(out)]
    log = runs / f"{name}.log"
    t0, reused = time.perf_counter(), (out / "evaluation.json").exists()
    if not reused:
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *cmd[1:], "--overwrite"], stdout=f,
                                  stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
        if proc.returncode != 0:
            sys.exit(f"{name}: build failed (exit {proc.returncode}); see {log}")
    manifest = json.loads((out / "manifest.json").read_text())
    evaluation = json.loads((out / "evaluation.json").read_text())
    training = manifest["training"]
    # A kept run is read only if it trained this recipe: the table's options against the config it recorded.
    wanted = {"epochs": epochs, **options_of(RECIPES[name])}
    if any(manifest["config"][k] != v for k, v in wanted.items()):
        sys.exit(f"{name}: the run in {out} did not train {wanted}; remove it or pass another --runs folder")
    # The options alone do not name the recipe: the model's defaults under them change between sessions
    # (cifar-resnet8's default now ends plain), and a run finished before would pass for today's recipe.
    from pipeline.config import BuildConfig
    from pipeline.train import recipe_of

    today = recipe_of(BuildConfig(dataset="cifar10", data_dir=str(DATA), model="cifar-resnet8", out="unused", **wanted))
    if training.get("recipe") != today:
        sys.exit(f"{name}: the run in {out} trained {training.get('recipe')}, not today's recipe {today}; remove it "
                 "or pass another --runs folder")
    return {
        "command": portable_command(cmd), "reused_finished_run": reused,
        # A series may read runs finished in earlier sessions, on another machine of the kind `environment` names.
        "finished": time.strftime("%Y-%m-%d %H:%M", time.localtime((out / "evaluation.json").stat().st_mtime)),
        "wall_s": None if reused else round(time.perf_counter() - t0, 1),
        "recipe": training["recipe"], "train_seconds": round(manifest["stage_seconds"]["train"], 1),
        "images_per_second_median": statistics.median(training["images_per_second"]),
        "accuracy": {v: e["accuracy"] for v, e in evaluation["variants"].items()},
        "interval_95": {v: e["interval_95"] for v, e in evaluation["variants"].items()},
        "test_images": evaluation["n"], "meets_goal": evaluation["variants"]["int8"]["accuracy"] >= GOAL,
        "curve": {"accuracy": training["accuracy"], "val_accuracy": training["val_accuracy"]},
    }


def options_of(options: list[str]) -> dict:
    """The config fields a recipe's options set: `--name VALUE` a number (whole numbers as int), a bare `--flag`
    True."""
    out, i = {}, 0
    while i < len(options):
        valued = i + 1 < len(options) and not options[i + 1].startswith("--")
        value = options[i + 1] if valued else None
        out[options[i][2:].replace("-", "_")] = (True if value is None else int(value) if value.isdigit()
                                                 else float(value))
        i += 2 if valued else 1
    return out


def in_table_order(results: dict) -> dict:
    """The results in RECIPES's order, then those of recipes no longer in it: a kept result is never dropped."""
    return {**{k: results[k] for k in RECIPES if k in results}, **results}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(9, 4.6))
    for i, (name, r) in enumerate(results.items()):
        # Ten colours, then dashed validation lines in them again: each recipe's legend entry stays its own.
        colour, style = f"C{i % 10}", "-" if i < 10 else "--"
        epochs = range(1, len(r["curve"]["val_accuracy"]) + 1)
        ax.plot(epochs, r["curve"]["val_accuracy"], color=colour, linewidth=1, linestyle=style,
                label=f"{name}: int8 test {r['accuracy']['int8']:.1%}")
        ax.plot(epochs, r["curve"]["accuracy"], color=colour, linewidth=1, linestyle=":")
        ax.plot([len(epochs)], [r["accuracy"]["int8"]], "o", color=colour)
    # The default recipe's other full runs, one point per run, each a whole schedule: issue 9's at 20, 45 and 90
    # epochs and the zoo arms of issue 22's searches, which trained it for as many epochs as fit an hour.
    points = sorted([(r["recipe"]["epochs"], r["accuracy"]["int8"]) for f in ISSUE9.glob("accuracy-cifar-resnet8*.json")
                     for r in json.loads(f.read_text())["results"].values()]
                    + [(z["epochs"], z["int8_accuracy"]) for f in ISSUE22.glob("search-60min*.json")
                       for model, z in json.loads(f.read_text())["zoo"].items() if model == "cifar-resnet8"])
    if points:
        ax.plot(*zip(*points), "s--", color="black",
                label="default (batch 128), int8 test of separate runs, 20-158 epochs")
    ax.axhline(GOAL, color="grey", linewidth=0.8, linestyle="--")
    ax.set(xlim=(0, 162), xlabel="epoch (45,000 images each)", ylabel="accuracy", ylim=(0.5, 0.95),
           title="ResNet-8 on CIFAR-10: accuracy against epochs, by recipe")
    # One entry a recipe (its colour; the dot at the end is its int8 test accuracy), and what the line styles are.
    styles = [Line2D([], [], color="black", linewidth=1, label="validation"),
              Line2D([], [], color="black", linewidth=1, linestyle=":", label="training (augmented)")]
    ax.legend(handles=[*ax.get_legend_handles_labels()[0], *styles], fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*", metavar="RECIPE", help=f"{', '.join(RECIPES)} (default: every recipe)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--runs", type=Path, default=REPO / "artifacts" / "resnet8-recipes")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    wanted = chosen(ap, args.recipes, RECIPES, "recipe")
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: this benchmark reads the CIFAR-10 JPEG folders there")
    args.runs.mkdir(parents=True, exist_ok=True)
    env = environment()  # the runner's: CPU name, cores, Python, CPU features
    env.update(cpu_words=features_words(env["cpu_features"]), started=time.strftime("%Y-%m-%d %H:%M:%S"),
               runs=portable(args.runs))
    results = kept(args.json)
    for name in wanted:
        results[name] = run(name, args.epochs, args.runs)
        r = results[name]
        print(f"{name}: int8 {r['accuracy']['int8']:.2%} fp32 {r['accuracy']['fp32']:.2%} after {args.epochs} "
              f"epochs ({r['images_per_second_median']:,.0f} images/s); goal {GOAL:.0%}: "
              f"{'met' if r['meets_goal'] else 'not met'}", flush=True)
        if args.json:  # after each recipe, so a long series leaves its finished figures behind
            ordered = in_table_order(results)
            args.json.write_text(json.dumps({"environment": env, "goal_int8": GOAL, "results": ordered}, indent=2))
    if args.plot:
        plot(in_table_order(results), args.plot)


if __name__ == "__main__":
    main()
