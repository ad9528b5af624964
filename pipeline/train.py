"""Training: each zoo model's recipe (optimizer, schedule, smoothing, augmentation), seeded, timed per epoch."""
from __future__ import annotations

import time

from pipeline import console
from pipeline.config import BuildConfig
from pipeline.data import Dataset
from pipeline.models import build_model


class ModelMismatchError(ValueError):
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
                                         "warmup_epochs", "weight_decay", "label_smoothing", "augment")}


def _optimizer(recipe: dict, steps_per_epoch: int):
    import keras

    lr = recipe["learning_rate"]
    if recipe["lr_schedule"] == "cosine":
        total = recipe["epochs"] * steps_per_epoch
        warmup = min(recipe["warmup_epochs"] * steps_per_epoch, total - 1)
        # Warm-up starts from lr/100: big steps on freshly initialised BatchNorm statistics diverge.
        lr = keras.optimizers.schedules.CosineDecay(lr / 100 if warmup else lr, total - warmup,
                                                    warmup_target=lr if warmup else None, warmup_steps=warmup)
    wd = recipe["weight_decay"] or None
    if recipe["optimizer"] == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if recipe["optimizer"] == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=recipe["weight_decay"])
    return keras.optimizers.Adam(lr, weight_decay=wd)


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


def train(cfg: BuildConfig, data: Dataset, log=print):
    """Build the configured model and fit it with its recipe; returns (model, history dict)."""
    import keras

    from pipeline.data.augment import batches

    seed_everything(cfg.seed)
    spec = data.spec
    model = build_model(cfg.model, (spec.height, spec.width, spec.channels), len(spec.labels))
    check_input_shape(model, data, cfg.model)
    recipe, classes = recipe_of(cfg), len(spec.labels)
    common = {"batch_size": cfg.batch_size, "classes": classes, "scale": spec.scale, "offset": spec.offset}
    train_ds, steps = batches(data.x_train, data.y_train, epochs=cfg.epochs, shuffle=True, augment=cfg.augment,
                              seed=cfg.seed, **common)
    val_ds, _ = batches(data.x_val, data.y_val, **common)
    model.compile(optimizer=_optimizer(recipe, steps),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    throughput = _Throughput(len(data.x_train), cfg.epochs, log)
    callbacks = [throughput, console.keras_callback(cfg.epochs, steps)]
    callbacks += [keras.callbacks.TensorBoard(log_dir=cfg.tensorboard)] if cfg.tensorboard else []
    log(f"training {cfg.model} on {len(data.x_train)} {data.name} images ({len(data.x_val)} for validation), "
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in recipe.items()))
    history = model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, steps_per_epoch=steps,
                        shuffle=False, verbose=0, callbacks=callbacks)  # the dataset shuffles itself
    out = {k: [float(v) for v in vs] for k, vs in history.history.items() if k != "learning_rate"}
    out["epoch_seconds"] = [round(s, 3) for s in throughput.seconds]
    out["images_per_second"] = [round(len(data.x_train) / s, 1) for s in throughput.seconds]
    out["recipe"] = recipe
    return model, out


def load_user_model(path: str, data: Dataset):
    """A user's own `.keras` model, checked against the dataset before anything else runs."""
    import keras

    try:
        model = keras.models.load_model(path, compile=False)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelMismatchError(f"--keras-model {path}: cannot load it as a Keras model ({first}); "
                                 "pass a .keras file saved with model.save()")
    check_input_shape(model, data, path)
    return model


def check_input_shape(model, data: Dataset, what: str) -> None:
    expected = (data.spec.height, data.spec.width, data.spec.channels)
    got = tuple(model.inputs[0].shape[1:])
    if got != expected:
        raise ModelMismatchError(
            f"{what}: input shape {got} does not fit dataset '{data.name}' {expected}; "
            f"pick a model made for {data.name} (--model) or a matching --keras-model")
    classes = model.outputs[0].shape[-1]
    if classes != len(data.spec.labels):
        raise ModelMismatchError(f"{what}: {classes} outputs but dataset '{data.name}' has "
                                 f"{len(data.spec.labels)} classes; the last layer must match")
