"""Training: each zoo model's recipe (optimizer, schedule, smoothing, augmentation), seeded, timed per epoch."""
from __future__ import annotations

import math
import time
import zipfile
from pathlib import Path

from pipeline import console
from pipeline.config import INPUT_RANGES, BuildConfig
from pipeline.data import Dataset
from pipeline.failures import InputError
from pipeline.models import build_model
from pipeline.reparam import fold
from pipeline.sam import sharpness_aware


class ModelMismatchError(InputError, ValueError):
    """A user-supplied model does not fit the dataset."""


def seed_everything(seed: int) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)  # Python, numpy and TensorFlow generators
    # Same seed, same weights: deterministic kernels cost a little speed on these tiny models.
    tf.config.experimental.enable_op_determinism()


def recipe_of(cfg: BuildConfig) -> dict:
    """The training recipe this build uses: the model's defaults with the command line's overrides."""
    return {k: getattr(cfg, k) for k in ("epochs", "batch_size", "optimizer", "learning_rate", "lr_schedule",
                                         "warmup_epochs", "weight_decay", "label_smoothing", "ema", "reparam",
                                         "sam", "augment", "plain_epochs")}


NO_DECAY = ["gamma", "beta", "bias"]  # Keras names of BatchNorm's scale and shift and of every bias


def _optimizer(recipe: dict, steps_per_epoch: int):
    import keras

    lr = recipe["learning_rate"]
    if recipe["lr_schedule"] == "cosine" or recipe["warmup_epochs"]:
        total = recipe["epochs"] * steps_per_epoch
        warmup = min(recipe["warmup_epochs"] * steps_per_epoch, total - 1)
        # Warm-up starts from lr/100: big steps on freshly initialised BatchNorm statistics diverge. A constant
        # schedule warms up too (a cosine whose floor, alpha, is its peak never falls).
        lr = keras.optimizers.schedules.CosineDecay(lr / 100 if warmup else lr, total - warmup,
                                                    alpha=0.0 if recipe["lr_schedule"] == "cosine" else 1.0,
                                                    warmup_target=lr if warmup else None, warmup_steps=warmup)
    wd = recipe["weight_decay"] or None
    ema = {"use_ema": bool(recipe["ema"]), "ema_momentum": recipe["ema"] or 0.99}
    if recipe["optimizer"] == "sgd":
        optimizer = keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, weight_decay=wd, **ema)
    elif recipe["optimizer"] == "adamw":
        optimizer = keras.optimizers.AdamW(lr, weight_decay=recipe["weight_decay"], **ema)
    else:
        optimizer = keras.optimizers.Adam(lr, weight_decay=wd, **ema)
    if wd:
        # Decay is for kernels: on BatchNorm's scale and shift, or on a bias, it only pulls a layer's output
        # towards zero, which a network of a few thousand channels cannot spare.
        optimizer.exclude_from_weight_decay(var_names=NO_DECAY)
    return optimizer


class _Throughput:
    """Keras callback timing the training part of each epoch (validation excluded) and logging it."""

    def __new__(cls, images: int, epochs: int, log):
        import keras

        class Callback(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.seconds: list[float] = []

            def on_epoch_begin(self, epoch, logs=None):
                self.t0, self.trained = time.perf_counter(), None

            def on_test_begin(self, logs=None):
                self.trained = time.perf_counter() - self.t0

            def on_epoch_end(self, epoch, logs=None):
                seconds = self.trained if self.trained is not None else time.perf_counter() - self.t0
                self.seconds.append(seconds)
                figures = ", ".join(f"{k} {v:.4f}" for k, v in (logs or {}).items() if k != "learning_rate")
                log(f"epoch {epoch + 1}/{epochs}: {figures}; {images / seconds:,.0f} images/s ({seconds:.1f} s)")

        return Callback()


def train(cfg: BuildConfig, data: Dataset, log=print, checkpoint: Path | None = None, key: dict | None = None,
          model=None, callbacks=()):
    """Build the configured model (or take `model`, as the search does) and fit it with its recipe;
    returns (model, history dict). `callbacks` are more Keras callbacks (the search reports each epoch).

    With `checkpoint`, the whole training state is saved there after every epoch, and a checkpoint made
    with the same `key` and recipe is continued from: the result is the model a straight run gives.
    """
    import keras

    from pipeline.data.augment import batches

    seed_everything(cfg.seed)
    spec = data.spec
    shape = (spec.height, spec.width, spec.channels)
    if model is None:
        model = build_model(cfg.model, shape, len(spec.labels), expand=cfg.reparam)
    elif cfg.reparam:
        raise ValueError("--reparam builds its own model: a model given to train() has no branches to fold")
    check_input_shape(model, data, model.name)
    recipe, classes = recipe_of(cfg), len(spec.labels)
    steps = math.ceil(len(data.x_train) / cfg.batch_size)
    model.compile(optimizer=_optimizer(recipe, steps),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    if cfg.sam:
        sharpness_aware(model, cfg.sam)
    if cfg.folder_defaults:
        log(f"chosen for this folder: {cfg.folder_defaults} (--model, --image-size and --batch-size choose)")
    log(f"training {cfg.model} on {len(data.x_train)} {data.name} images ({len(data.x_val)} for validation), "
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in recipe.items()))
    key = {"key": key, "model": cfg.model, "recipe": recipe}
    saved = _read_checkpoint(checkpoint, key) if checkpoint else None
    if saved and _restore(model, saved):
        log(f"training: continuing after epoch {saved['state']['epoch']}/{cfg.epochs} from the interrupted "
            "build's checkpoint")
    else:
        saved = None
    first = saved["state"]["epoch"] if saved else 0
    common = {"batch_size": cfg.batch_size, "classes": classes, "scale": spec.scale, "offset": spec.offset}
    train_ds, _ = batches(data.x_train, data.y_train, epochs=cfg.epochs, shuffle=True, augment=cfg.augment,
                          seed=cfg.seed, first_epoch=first, plain_from=cfg.epochs - cfg.plain_epochs, **common)
    val_ds, _ = batches(data.x_val, data.y_val, **common)
    throughput = _Throughput(len(data.x_train), cfg.epochs, log)
    record = _Checkpoint(checkpoint, key, saved["state"] if saved else None, throughput)
    callbacks = [throughput, record, console.keras_callback(cfg.epochs, steps, first), *callbacks]
    callbacks += [keras.callbacks.TensorBoard(log_dir=cfg.tensorboard)] if cfg.tensorboard else []
    if first < cfg.epochs:
        model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, initial_epoch=first, steps_per_epoch=steps,
                  shuffle=False, verbose=0, callbacks=callbacks)  # the dataset shuffles itself
    if cfg.ema:
        # After a plain tail the statistics are those of the images as they are, as the tail's training left them.
        _take_average(model, batches(data.x_train, data.y_train, shuffle=True, seed=cfg.seed,
                                     augment=cfg.augment and not cfg.plain_epochs, **common)[0], log)
    if cfg.reparam:
        model = fold(model, build_model(cfg.model, shape, len(spec.labels)))
        log(f"weights: the branches of each 3x3 conv folded into it ({model.count_params():,} parameters, the "
            f"model {cfg.model} as built without them)")
    seconds = record.state["epoch_seconds"]
    out = {k: vs for k, vs in record.state["history"].items() if k != "learning_rate"}
    out["epoch_seconds"] = [round(s, 3) for s in seconds]
    out["images_per_second"] = [round(len(data.x_train) / s, 1) for s in seconds]
    out["recipe"] = recipe
    if first:
        out["resumed_after_epoch"] = first
    return model, out


BN_BATCHES = 100  # batches that recompute BatchNorm's statistics for the averaged weights (12,800 images at 128)


def _take_average(model, train_ds, log) -> None:
    """Give the model the moving average of its weights and BatchNorm statistics that match them.

    `fit` swaps the average in at its end, but not when a resumed training had no epoch left, so it is done
    here (a second swap changes nothing). The running statistics were gathered for the trained weights, not
    for their average: they are recomputed as a plain mean over training batches, as torch's `update_bn` does.
    """
    import keras

    model.optimizer.finalize_variable_values(model.trainable_variables)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not norms:
        return
    momenta = [layer.momentum for layer in norms]
    for step, (x, _) in enumerate(train_ds.take(BN_BATCHES)):
        for layer in norms:
            layer.momentum = step / (step + 1)  # the first batch replaces the statistics, then a running mean
        model(x, training=True)
    for layer, momentum in zip(norms, momenta):
        layer.momentum = momentum
    log(f"weights: their moving average (decay {model.optimizer.ema_momentum}), BatchNorm statistics "
        f"recomputed over {min(BN_BATCHES, step + 1)} training batches")


class _Checkpoint:
    """Keras callback keeping every epoch's figures and, with a path, saving the whole training state after
    each epoch in one file written atomically: weights and every other model variable (random generator
    states included), the optimizer's variables (its step count drives the schedule), the epoch and the
    figures so far. The data pipeline's order and augmentation are functions of the seed and the step."""

    def __new__(cls, path: Path | None, key: dict, state: dict | None, throughput):
        import keras

        class Callback(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.state = state or {"epoch": 0, "history": {}, "epoch_seconds": []}

            def on_epoch_end(self, epoch, logs=None):
                for k, v in (logs or {}).items():
                    self.state["history"].setdefault(k, []).append(float(v))
                self.state["epoch"] = epoch + 1
                self.state["epoch_seconds"].append(throughput.seconds[-1])
                if path is not None:
                    _write_checkpoint(path, key, self.state, self.model)

        return Callback()


def _write_checkpoint(path: Path, key: dict, state: dict, model) -> None:
    import io
    import json

    import numpy as np

    from pipeline.artifacts import atomic_write

    arrays = {f"model_{i}": v.numpy() for i, v in enumerate(model.variables)}
    arrays.update({f"optimizer_{i}": v.numpy() for i, v in enumerate(model.optimizer.variables)})
    buf = io.BytesIO()
    np.savez(buf, state=np.array(json.dumps({"key": key, "state": state})), **arrays)
    atomic_write(path, buf.getvalue())


def _read_checkpoint(path: Path, key: dict) -> dict | None:
    """The checkpoint at `path` when it was made for the same key and recipe, else None."""
    import json

    import numpy as np

    try:
        with np.load(path) as f:
            saved = {"arrays": {k: f[k] for k in f.files if k != "state"}, **json.loads(str(f["state"]))}
    except (OSError, ValueError, KeyError):
        return None
    return saved if json.dumps(saved["key"], sort_keys=True) == json.dumps(key, sort_keys=True) else None


def _restore(model, saved: dict) -> bool:
    """Put a checkpoint's variables into the compiled model and its optimizer; False if they do not fit."""
    model.optimizer.build(model.trainable_variables)
    targets = [*(("model", i, v) for i, v in enumerate(model.variables)),
               *(("optimizer", i, v) for i, v in enumerate(model.optimizer.variables))]
    arrays = saved["arrays"]
    if len(arrays) != len(targets) or any(arrays.get(f"{kind}_{i}", None) is None
                                          or arrays[f"{kind}_{i}"].shape != tuple(v.shape)
                                          for kind, i, v in targets):
        return False
    for kind, i, v in targets:
        v.assign(arrays[f"{kind}_{i}"])
    return True


def load_user_model(path: str, data: Dataset | None, log=print):
    """A user's own `.keras` model, checked against the dataset (when given) before anything else runs."""
    import keras

    path = Path(path)
    what = _not_a_keras_file(path)
    if what:
        raise ModelMismatchError(f"--keras-model {path}: {what}; pass a .keras file saved with model.save()")
    try:
        model = keras.models.load_model(path, compile=False)
    except (TypeError, ValueError) as e:
        if path.read_bytes()[:4] != b"\x89HDF":
            _unloadable(path, e)
        model = _legacy(path, e, log)  # a tf.keras 2 file: its legacy loader may read it
    except OSError as e:
        _unloadable(path, e)
    if data is not None:
        check_input_shape(model, data, str(path))
    return model


def _unloadable(path: Path, e: Exception):
    custom = _custom_layers(path) if isinstance(e, TypeError) else []
    if isinstance(e, TypeError) and not custom:
        raise e  # not the user's file: a bug of ours or of Keras, reported as one
    if custom:
        raise ModelMismatchError(
            f"--keras-model {path}: custom layer(s) {', '.join(custom)} need their Python code to load; "
            "edgepipe reads built-in Keras layers only: rebuild the model from built-in layers and save it again")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ModelMismatchError(f"--keras-model {path}: cannot load it as a Keras model ({first}); "
                             "pass a .keras file saved with model.save()")


def _legacy(path: Path, error: Exception, log):
    from pipeline.foreign import LegacyModelError, load_legacy_h5

    try:
        return load_legacy_h5(path, error, log=log)
    except LegacyModelError as legacy:
        raise ModelMismatchError(str(legacy)) from None


def _not_a_keras_file(path: Path) -> str | None:
    """What the file is when it cannot be a Keras model (a zip with config.json, or HDF5 for .h5)."""
    head = path.read_bytes()[:8]
    if head.startswith(b"\x89HDF"):
        return None
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if "config.json" in z.namelist():
                return None
        return "a zip archive without config.json, so not a Keras archive (model.save() writes config.json in it)"
    if not head:
        return "an empty file"
    try:
        path.read_bytes()[:4096].decode("utf-8")
        return "a text file, not a Keras model"
    except UnicodeDecodeError:
        return f"{path.stat().st_size:,} bytes of binary data that is neither a .keras (zip) nor an .h5 (HDF5) model"


def _custom_layers(path: Path) -> list[str]:
    """Class names in a .keras archive's config that Keras itself does not provide."""
    import json

    try:
        with zipfile.ZipFile(path) as z:
            config = json.loads(z.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return []
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "class_name" in node and "config" in node and not str(node.get("module") or "").startswith("keras"):
                found.append(f"'{node['class_name']}'" + (f" ({node['registered_name']})"
                                                         if node.get("registered_name") else ""))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(config)
    return sorted(set(found))


def input_convention(cfg: BuildConfig, model) -> tuple[float, float]:
    """(scale, offset) from uint8 pixels to the model's input: read from the model where it says.

    A model whose first layer is Rescaling or Normalization does its own scaling, so it takes raw
    0-255 pixels; otherwise --input-range says, and the zoo's convention is 0,1.
    """
    scales_itself = model is not None and scales_its_own_input(model)
    if scales_itself and cfg.input_range not in (None, "0,255"):
        raise ModelMismatchError(f"--input-range {cfg.input_range}: {cfg.keras_model} starts with a "
                                 f"{_first_layer(model)} layer, so it takes raw 0-255 pixels; drop --input-range")
    return INPUT_RANGES["0,255" if scales_itself else cfg.input_range or "0,1"]


def scales_its_own_input(model) -> bool:
    """A model whose first layer is Rescaling or Normalization takes raw 0-255 pixels."""
    return _first_layer(model) in ("Rescaling", "Normalization")


def _first_layer(model) -> str | None:
    """The class of the first layer that computes something, looking inside nested models."""
    import keras

    layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    if layers and isinstance(layers[0], keras.Model):
        return _first_layer(layers[0])
    return type(layers[0]).__name__ if layers else None


def outputs_probabilities(model) -> bool:
    """Whether the model ends in softmax (probabilities) rather than logits, looking inside nested models."""
    import keras

    last = model.layers[-1]
    if isinstance(last, keras.Model):
        return outputs_probabilities(last)
    if type(last).__name__ == "Softmax":
        return True
    activation = getattr(last, "activation", None)
    return getattr(activation, "__name__", "") == "softmax"


def check_input_shape(model, data: Dataset, what: str) -> None:
    expected = (data.spec.height, data.spec.width, data.spec.channels)
    got = tuple(model.inputs[0].shape[1:])
    if None in got:
        raise ModelMismatchError(
            f"{what}: dynamic input shape {got}; a .tflite for a board needs a fixed one: build the model with "
            f"keras.Input(shape={expected}) and save it again")
    if got != expected and data.source.get("kind") == "image-folders":  # decoded to the model's size unless told
        raise ModelMismatchError(
            f"{what}: input shape {got} does not fit the folder's images as --image-size resizes them {expected}; "
            f"drop --image-size (a folder is decoded to the model's own size) or pass --image-size {got[0]}x{got[1]}")
    if got != expected:
        raise ModelMismatchError(
            f"{what}: input shape {got} does not fit dataset '{data.name}' {expected}; "
            f"pick a model made for {data.name} (--model) or a matching --keras-model")
    classes = model.outputs[0].shape[-1]
    if classes != len(data.spec.labels):
        raise ModelMismatchError(f"{what}: {classes} outputs but dataset '{data.name}' has "
                                 f"{len(data.spec.labels)} classes; the last layer must match")
