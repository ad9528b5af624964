"""Training: Adam, sparse categorical cross-entropy, seeded, with optional TensorBoard logs."""
from __future__ import annotations

from device.core import normalize
from pipeline import console
from pipeline.config import BuildConfig
from pipeline.data import Dataset
from pipeline.models import MODELS, build_model


class ModelMismatchError(ValueError):
    """A user-supplied model does not fit the dataset."""


def seed_everything(seed: int) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)  # Python, numpy and TensorFlow generators
    # Same seed, same weights: deterministic kernels cost a little speed on these tiny models.
    tf.config.experimental.enable_op_determinism()


def train(cfg: BuildConfig, data: Dataset, log=print):
    """Build the configured model and fit it; returns (model, history dict)."""
    import keras

    seed_everything(cfg.seed)
    model = build_model(cfg.model, MODELS[cfg.model].input_shape, len(data.spec.labels))
    check_input_shape(model, data, cfg.model)
    model.compile(optimizer=keras.optimizers.Adam(), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    callbacks = [keras.callbacks.TensorBoard(log_dir=cfg.tensorboard)] if cfg.tensorboard else []
    callbacks.append(console.keras_callback(cfg.epochs, -(-len(data.x_train) // cfg.batch_size), log))
    log(f"training {cfg.model} on {len(data.x_train)} {data.name} images "
        f"({len(data.x_val)} for validation), {cfg.epochs} epoch(s), batch {cfg.batch_size}")
    pre = data.spec.to_dict()
    history = model.fit(
        normalize(data.x_train, pre), data.y_train,
        validation_data=(normalize(data.x_val, pre), data.y_val),
        epochs=cfg.epochs, batch_size=cfg.batch_size, shuffle=True, verbose=0, callbacks=callbacks,
    )
    return model, {k: [float(v) for v in vs] for k, vs in history.history.items()}


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
