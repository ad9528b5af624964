"""Phase (c): the pick trained again, for as many epochs as the rest of the budget holds, and built as a run.

A trial trains for a few epochs only, so that many candidates fit the budget; the architecture it finds is
then worth a full schedule. The pick's candidate is trained once more, from scratch, in this process with every
CPU, with the default recipe of the zoo model its family opens up (ResNet-8: SGD at 0.1 after 3 warm-up epochs)
rather than the search's shared Adam recipe at the trial's learning rate: that recipe compares architectures in a
few epochs; the zoo's is tuned for a full schedule. The epochs are fixed before training (the schedule needs
them) from one epoch trained first and timed (probe_epoch): its trial's speed, on fewer CPUs beside other trials,
left a fifth or more of the time unused. The longer model replaces the trial's only if it is at least as accurate
on the validation split, and, under the accuracy guard, only if what the guard delivers for it still runs the graph
whose cost was measured before training; either way the report says which model the pick's run holds and why.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from pipeline.search.report import competing
from pipeline.search.space import Candidate
from pipeline.search.trial import guard_of, recipe_model, trial_config

# Phase (b) leaves this share of --budget-minutes to the final training (more when the trials end early).
FINAL_SHARE = 1 / 3
# At most this many times a trial's epochs, so that a small model on a small dataset does not train for the whole
# budget. At 10x a 60-minute CIFAR-10 search stopped ResNet-8 at 80 epochs and ended 19 minutes early, where its
# curve still climbs (83.4% int8 at 45 epochs, 84.2% at 90).
MAX_FACTOR = 20


def plan_epochs(cfg, pick: dict, seconds_left: float, epoch_seconds: float | None = None) -> tuple[int, str]:
    """The final training's epochs (0: keep the trial's model) and why, from --final-epochs or the time left at
    `epoch_seconds` an epoch (measured by probe_epoch; else its trial's speed, on fewer CPUs)."""
    if cfg.final_epochs is not None:
        return cfg.final_epochs, "--final-epochs" if cfg.final_epochs else "--final-epochs 0 keeps the trial's model"
    measured = bool(epoch_seconds)
    per_epoch = epoch_seconds or (pick.get("train_seconds") or 0) / max(1, pick.get("epochs_trained") or 1)
    fit = int(seconds_left // per_epoch) if per_epoch > 0 else 0
    epochs = min(fit, MAX_FACTOR * cfg.epochs)
    why = (f"{seconds_left / 60:.1f} minutes of the budget left at {per_epoch:.1f} s an epoch ("
           + ("one epoch measured in this process with every CPU" if measured else "its trial's speed")
           + f"), at most {MAX_FACTOR}x --epochs")
    if epochs <= (pick.get("epochs_trained") or 0):
        return 0, f"{why}: no longer than its trial, so the trial's model is kept"
    return epochs, why


def probe_epoch(cfg, pick: dict, seconds_left: float, log) -> float | None:
    """Seconds of one epoch of the final training, measured by training one: its trial ran on fewer CPUs
    beside other trials, and planning from that speed left a fifth or more of the reserved time unused. None (and no
    probe) when even the trial's speed twice over holds no training longer than the trial's."""
    if cfg.final_epochs is not None or not plan_epochs(cfg, pick, 2 * seconds_left)[0]:
        return None
    _, history, _, _ = _train(cfg, pick, 1, log)
    seconds = history["epoch_seconds"][0]  # tracing included: the plan errs on the short side
    log(f"search: one epoch of the pick in this process took {seconds:.1f} s")
    return seconds


def _train(cfg, pick: dict, epochs: int, log):
    """(model, history, seconds, recipe): the pick's candidate trained from scratch for `epochs` in this process
    with its family's zoo recipe."""
    import keras

    from pipeline import build as stages
    from pipeline.train import recipe_of, seed_everything, train

    cand = Candidate.parse(pick["candidate"])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgepipe-final-") as tmp:
        run_cfg = trial_config({**cfg.settings(), "epochs": epochs}, cand, None, out=str(Path(tmp) / "run"),
                               benchmark=False)
        data, _, _ = stages.load_inputs(run_cfg, stages.STAGES, log)
        keras.backend.clear_session()
        seed_everything(cfg.seed)
        model, history = train(run_cfg, data, log=log, model=cand.build(data.spec.channels, len(data.spec.labels)))
    recipe = {"zoo_model": recipe_model(cfg.dataset, cand), **recipe_of(run_cfg)}
    return model, history, time.perf_counter() - t0, recipe


def train_final(cfg, out: Path, pick: dict, epochs: int, log) -> dict:
    """Train the pick's configuration for `epochs`; returns what the report says about it, with the model's
    path under `keras_model` when it is the one to build."""
    import keras

    cand = Candidate.parse(pick["candidate"])
    log(f"search: training the pick {cand.id} again for {epochs} epochs (its trial: {pick['epochs_trained']})")
    model, history, seconds, recipe = _train(cfg, pick, epochs, log)
    path = out / "models" / f"final-{epochs}-epochs" / cand.keras_file
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    keras.backend.clear_session()
    val = float(history["val_accuracy"][-1])
    better = val >= pick["val_accuracy"]
    log(f"search: the longer training reached validation accuracy {val:.4f} (its trial: "
        f"{pick['val_accuracy']:.4f}); the pick's run holds the " + ("longer one" if better else "trial's model"))
    return {"epochs": epochs, "seconds": seconds, "val_accuracy": val, "used": better, "recipe": recipe,
            **({"keras_model": str(path)} if better else {}),
            "why": "at least as accurate on validation as its trial" if better else
                   "less accurate on validation than its trial, whose model is kept"}


def materialise(cfg, out: Path, pick: dict, log) -> Path:
    """The pick as an ordinary run in pick/: the final training's model through every `pipeline build` stage
    when it is used, else (or when the guard cannot keep it at the measured cost) its trial's model."""
    final = pick.get("final") or {}
    if final.get("used"):
        run = _build(cfg, out, pick, Path(final["keras_model"]), final["epochs"], log, final=True)
        # The guard decides again on the longer model: what it delivers for the base variant is the run's.
        variant = competing({"guard": guard_of(run)}, pick["base"]) if cfg.max_accuracy_drop is not None else None
        if cfg.max_accuracy_drop is None or variant is not None:
            pick["run_variant"] = variant or pick["variant"]
            return _record(run, out, pick, log)
        final.update(used=False, why="the accuracy guard delivers it only in another graph than the one measured "
                                     "before training, so its trial's model is kept")
        log(f"search: {final['why']}")
    keras_file = out / "models" / f"trial-{pick['trial_id']}" / Candidate.parse(pick["candidate"]).keras_file
    keras_file.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(pick["checkpoint"]) / "model.keras", keras_file)
    pick["run_variant"] = pick["variant"]
    return _record(_build(cfg, out, pick, keras_file, cfg.epochs, log), out, pick, log)


def _build(cfg, out: Path, pick: dict, keras_file: Path, epochs: int, log, final: bool = False) -> Path:
    """The run of `keras_file`, its config saying how the model was trained (the final training's recipe or the
    trial's)."""
    from pipeline.build import build

    settings = {**cfg.settings(), "quantize": pick["variants"], "epochs": epochs}
    run_cfg = trial_config(settings, Candidate.parse(pick["candidate"]), None if final else pick["learning_rate"],
                           keras_model=str(keras_file), out=str(out / "pick"), threads=(1,))
    log(f"search: building the pick {pick['candidate']} (trial {pick['trial_id']}, {keras_file.name}) into "
        f"{out / 'pick'}")
    return build(run_cfg, overwrite=True, log=log)


def _record(run: Path, out: Path, pick: dict, log) -> Path:
    from pipeline.artifacts import updating

    final = pick.get("final") or {}
    with updating(run, "search", log=log) as (_, changed):
        changed["search"] = {"search_dir": str(out), "candidate": Candidate.parse(pick["candidate"]).to_dict(),
                             "trial_id": pick["trial_id"], "learning_rate": pick["learning_rate"],
                             "variant": pick["run_variant"],
                             "final_training": {k: v for k, v in final.items() if k != "keras_model"},
                             "note": "config.model names the dataset's zoo model only because a config needs one; "
                                     "the model is the searched candidate, trained by the search (config.keras_model) "
                                     "with the recipe config gives (final_training.recipe.zoo_model: whose it is)"}
    return run
