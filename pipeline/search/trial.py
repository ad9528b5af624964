"""Phase (b), one Ray Tune trial: a real edgepipe training of one candidate, then its variants converted
and evaluated on the test split by the ordinary build stages.

Runs in a Ray worker process, which may be on another machine: everything it needs comes in `settings`
(plain data), and what it leaves is its reported metrics and a checkpoint (model.keras and the
evaluation) that Ray copies to the search's storage.
"""
from __future__ import annotations

import json
import socket
import tempfile
import time
from pathlib import Path

from pipeline.config import FIXED_SIZE, BuildConfig
from pipeline.search.space import Candidate

# The search trains every candidate with one recipe, so that the architectures are what it compares.
RECIPE = {"optimizer": "adam", "lr_schedule": "cosine", "warmup_epochs": 0, "weight_decay": 0.0,
          "label_smoothing": 0.1, "ema": 0.0, "reparam": False, "sam": 0.0, "plain_epochs": 0}
# The input range every candidate trains with, given again when its saved model is converted and evaluated:
# guessing it from the model scored a ResNet that saturates to one class at its best under 0-255.
TRAINED_RANGE = "0,1"
# Every candidate trains first at the first (sampling.py): in two 60-minute CIFAR-10 searches that trained 20
# candidates at both, 3e-3 led for 16, every ResNet among them by 6-7 points of validation.
LEARNING_RATES = (3e-3, 1e-3)


def trial_config(settings: dict, cand: Candidate, learning_rate: float | None, **more) -> BuildConfig:
    """The BuildConfig a candidate trains, converts and is evaluated with (the pick's build uses it too): the
    search's RECIPE at `learning_rate`, or with None the default recipe of the zoo model the candidate opens up
    (the final training's: a trial's few epochs compare architectures, a full schedule wants the family's tuned
    recipe). config.model is the dataset's default zoo model only because a config needs one that takes the
    data's channels (cifar-dscnn's recipe may train a depthwise net on grayscale digits); the candidate replaces
    it in training."""
    from pipeline.data import DATASETS
    from pipeline.models import MODELS

    image_size = None if settings["dataset"] in FIXED_SIZE else f"{cand.resolution}x{cand.resolution}"
    if settings.get("max_accuracy_drop") is not None:  # int8 competes as the accuracy guard delivers it
        more = {"max_accuracy_drop": settings["max_accuracy_drop"], "fallback": "auto", **more}
    if learning_rate is None:
        zoo = MODELS[recipe_model(settings["dataset"], cand)].recipe
        recipe = {k: getattr(zoo, "schedule" if k == "lr_schedule" else k) for k in ("learning_rate", *RECIPE)}
        recipe["plain_epochs"] = zoo.plain_for(settings["epochs"])
    else:
        recipe = {"learning_rate": learning_rate, **RECIPE}
    return BuildConfig(dataset=settings["dataset"], data_dir=settings["data_dir"], image_size=image_size,
                       seed=settings["seed"], quantize=tuple(settings["quantize"]), epochs=settings["epochs"],
                       batch_size=settings["batch_size"], model=DATASETS[settings["dataset"]].default_model,
                       input_range=TRAINED_RANGE, **recipe, **more)


def recipe_model(dataset: str, cand: Candidate) -> str:
    """The zoo model whose default recipe trains `cand` in the final training."""
    from pipeline.data import DATASETS

    return cand.zoo_model(DATASETS[dataset].input_shape[-1])


def _use_cpus() -> int:
    """TensorFlow's threads set to the CPUs Ray gave this trial (Ray sets only OMP_NUM_THREADS)."""
    import ray
    import tensorflow as tf

    cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(cpus)
        tf.config.threading.set_inter_op_parallelism_threads(cpus)
    except RuntimeError:  # TensorFlow already started in this worker: it keeps the threads it has
        pass
    return cpus


class TrialCrashedBefore(RuntimeError):
    """A resumed search was about to train again a trial that had crashed."""


def run_trial(config: dict, settings: dict) -> None:
    """The function trainable: reports validation accuracy after each epoch (ASHA stops the weak), and
    after the last one the test accuracy of every variant with its checkpoint."""
    import keras
    import ray
    from ray import tune

    from pipeline import build as stages

    crashed = sorted(Path(settings["experiment"]).glob(f"run_trial_{tune.get_context().get_trial_id()}_*/error.txt"))
    if crashed:
        # Ray may save the experiment before it records a crash (seen under load); resumed, Tune would train
        # the trial again. The crash's own file says what happened: it costs this trial, once.
        lines = [line for line in crashed[0].read_text().splitlines() if line.strip()]
        raise TrialCrashedBefore(f"crashed before the search was interrupted ({lines[-1] if lines else crashed[0]}); "
                                 "not trained again")
    cpus = _use_cpus()
    keras.backend.clear_session()  # Keras keeps graph state across models in one process
    cand = Candidate.parse(config["candidate"])
    where = {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(), "cpus": cpus}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgepipe-trial-") as tmp:
        cfg = trial_config(settings, cand, config["learning_rate"], out=str(Path(tmp) / "run"), benchmark=False)
        data, _, _ = stages.load_inputs(cfg, stages.STAGES, print)
        epochs = cfg.epochs

        class ReportEpoch(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch + 1 < epochs:  # the last epoch is reported with the test results below
                    tune.report({"epoch": epoch + 1, "val_accuracy": float(logs["val_accuracy"]), **where})

        from pipeline.train import seed_everything, train

        seed_everything(cfg.seed)  # the initial weights too: same seed, same trial, on any node
        model = cand.build(data.spec.channels, len(data.spec.labels))

        model, history = train(cfg, data, log=print, model=model, callbacks=[ReportEpoch()])
        train_seconds = time.perf_counter() - t0
        checkpoint = Path(tmp) / "checkpoint"
        checkpoint.mkdir()
        model.save(checkpoint / "model.keras")
        keras.backend.clear_session()
        # The trained model through the ordinary stages: convert with real calibration, evaluate on test.
        import dataclasses

        run = stages.build(dataclasses.replace(cfg, keras_model=str(checkpoint / "model.keras")), until="evaluate",
                           log=print)
        evaluation = json.loads((run / "evaluation.json").read_text())
        test = {v: {"accuracy": e["accuracy"], "low": e["interval_95"]["low"], "high": e["interval_95"]["high"],
                    "n": e["interval_95"]["n"]} for v, e in evaluation["variants"].items()}
        guarded = guard_of(run) if cfg.max_accuracy_drop is not None else None
        (checkpoint / "evaluation.json").write_text(json.dumps(evaluation))
        (checkpoint / "history.json").write_text(json.dumps(history))
        tune.report({"epoch": epochs, "val_accuracy": float(history["val_accuracy"][-1]), **where,
                     "test_json": json.dumps(test), "guard_json": json.dumps(guarded), "train_seconds": train_seconds,
                     "trial_seconds": time.perf_counter() - t0},
                    checkpoint=tune.Checkpoint.from_directory(str(checkpoint)))
    keras.backend.clear_session()


def guard_of(run: Path) -> dict:
    """What the accuracy guard made of this trial's int8: the variant it delivers in int8's place, and whether
    that variant runs int8's graph (the same ops on the same tensor shapes and types), so that the cost measured
    for int8 before training is its cost too; a remedy that leaves ops in float is another graph."""
    from pipeline.delivery import ANALYSIS, guard_decision

    delivered, superseded = guard_decision(run)
    analysis = json.loads((run / ANALYSIS).read_text())
    replacement = delivered if "int8" in superseded else "int8"
    same = replacement.startswith("int8") and (
        replacement == "int8" or _graph(run / f"model_{replacement}.tflite") == _graph(run / "model_int8.tflite"))
    return {"int8_drop_pp": analysis["validation"]["int8_drop_pp"], "delivered": delivered, "superseded": superseded,
            "int8_is": replacement, "same_graph_as_int8": same,
            "summary": (analysis.get("guard") or {}).get("summary", "int8 is within the accuracy budget")}


def _graph(path: Path) -> list:
    """The model's operators in order with their tensors' shapes and types, read from the flatbuffer."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(path.read_bytes()))
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    graph = []
    for sub in model.subgraphs:
        shape = [([int(d) for d in t.shape] if t.shape is not None else [], t.type) for t in sub.tensors]
        graph += [(codes[op.opcodeIndex], [shape[i] for i in op.inputs if i >= 0], [shape[i] for i in op.outputs])
                  for op in sub.operators]
    return graph
