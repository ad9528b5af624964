"""Stages run alone (train, convert), CIFAR-10 models end to end on a small file in the real format,
and the TensorBoard option."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from device import core, integrity
from pipeline.cli import main
from tests.test_data import BATCHES, pickled, write_cifar_tar


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def cifar_archive(tmp_path, per_batch=40, n_test=50):
    """A cifar-10-python.tar.gz in the real layout whose classes are learnable (one bright channel)."""
    rng = np.random.default_rng(0)
    members = {}
    for name in BATCHES:
        n = n_test if name == "test_batch" else per_batch
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 3, 32, 32), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, label % 3, : 8 + 2 * label] += 150
        members[name] = pickled({b"labels": [int(v) for v in labels], b"data": images.reshape(n, 3072),
                                 b"batch_label": name.encode()})
    (tmp_path / "cifar").mkdir()
    return write_cifar_tar(tmp_path / "cifar" / "cifar-10-python.tar.gz", members).parent


def test_cifar_dscnn_builds_converts_and_runs(tmp_path):
    data_dir = cifar_archive(tmp_path)
    result = invoke("build", "--dataset", "cifar10", "--model", "cifar-dscnn", "--data-dir", data_dir,
                    "--quantize", "int8,float16", "--epochs", "1", "--calibration-samples", "32",
                    "--no-benchmark", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["kind"] == "cifar-tar" and manifest["preprocess"]["channels"] == 3
    info = core.Model(run / "model_int8.tflite").info()
    assert info["input"]["shape"] == [1, 32, 32, 3] and info["input"]["dtype"] == "int8"
    assert "DEPTHWISE_CONV_2D" in info["ops"]
    labels = (run / "labels.txt").read_text().split()
    assert labels[0] == "airplane" and labels[-1] == "truck"
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["n"] == 50 and set(evaluation["variants"]) == {"fp32", "float16", "int8"}


def test_train_then_convert_as_separate_stages(tmp_path):
    result = invoke("train", "--dataset", "digits", "--model", "mnist-mlp", "--epochs", "1",
                    "--out", tmp_path / "trained", "--tensorboard", tmp_path / "tb")
    assert result.exit_code == 0, result.output
    trained = tmp_path / "trained"
    manifest = json.loads((trained / "manifest.json").read_text())
    assert (trained / "model.keras").is_file() and not list(trained.glob("*.tflite"))
    assert manifest["files"]["model.keras"]["bytes"] == (trained / "model.keras").stat().st_size
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*")), "TensorBoard wrote no event file"

    result = invoke("convert", trained / "model.keras", "--dataset", "digits", "--quantize", "dynamic,int8",
                    "--out", tmp_path / "converted")
    assert result.exit_code == 0, result.output
    converted = tmp_path / "converted"
    assert sorted(p.name for p in converted.glob("*.tflite")) == [
        "model_dynamic.tflite", "model_fp32.tflite", "model_int8.tflite"]
    meta = json.loads((converted / "metadata.json").read_text())
    for name, entry in meta["models"].items():
        assert entry["sha256"] == integrity.sha256_file(converted / name)
    # Converting the same Keras model again gives the same fp32 flatbuffer: conversion is deterministic.
    fp32 = (converted / "model_fp32.tflite").read_bytes()
    again = invoke("convert", trained / "model.keras", "--dataset", "digits", "--quantize", "fp32",
                   "--out", tmp_path / "again")
    assert again.exit_code == 0 and (tmp_path / "again" / "model_fp32.tflite").read_bytes() == fp32


def test_same_seed_same_weights(tmp_path):
    import keras

    from pipeline.config import BuildConfig
    from pipeline.data import load_dataset
    from pipeline.train import train

    cfg = BuildConfig(dataset="digits", model="mnist-mlp", epochs=1, seed=7, out=str(tmp_path))
    data = load_dataset("digits", seed=7)
    first, _ = train(cfg, data, log=lambda *a: None)
    second, _ = train(cfg, data, log=lambda *a: None)
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)
    keras.backend.clear_session()


def test_ema_ends_with_the_weights_average_and_batchnorm_statistics_for_it(tmp_path):
    """With --ema the model ends with the moving average of its weights over the training steps, and each
    BatchNorm's running mean is recomputed for the averaged weights: the mean of its input over training batches."""
    import keras

    from pipeline.config import BuildConfig
    from pipeline.data import load_dataset
    from pipeline.data.augment import batches
    from pipeline.train import BN_BATCHES, train

    data = load_dataset("digits", seed=0)
    spec = data.spec
    net = keras.Sequential([keras.Input((spec.height, spec.width, spec.channels)), keras.layers.Conv2D(4, 3),
                            keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.Flatten(),
                            keras.layers.Dense(10, "softmax")])
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(self.model.layers[-1].kernel.numpy().copy())

    decay = 0.9
    cfg = BuildConfig(dataset="digits", model="mnist-mlp", epochs=2, ema=decay, out=str(tmp_path))
    model, history = train(cfg, data, log=lambda *a: None, model=net, callbacks=[Record()])
    assert history["recipe"]["ema"] == decay
    average = seen[0]
    for w in seen[1:]:
        average = decay * average + (1 - decay) * w
    np.testing.assert_allclose(model.layers[-1].kernel.numpy(), average, atol=1e-5)
    assert not np.allclose(average, seen[-1], atol=1e-3)  # the average is not the last step's weights

    stream, _ = batches(data.x_train, data.y_train, batch_size=cfg.batch_size, classes=10, scale=spec.scale,
                        offset=spec.offset, shuffle=True, augment=cfg.augment, seed=cfg.seed)
    conv = keras.Model(model.inputs, model.layers[0].output)
    means = [conv(x).numpy().mean(axis=(0, 1, 2)) for x, _ in stream.take(BN_BATCHES)]
    np.testing.assert_allclose(model.layers[1].moving_mean.numpy(), np.mean(means, axis=0), atol=1e-4)
    keras.backend.clear_session()


def test_plain_epochs_end_the_training_on_the_images_as_they_are(tmp_path):
    import pytest

    from pipeline.config import BuildConfig, ConfigError
    from pipeline.data.augment import batches

    x = np.random.default_rng(0).integers(1, 255, (20, 8, 8, 3), dtype=np.uint8)
    y = np.arange(20) % 10
    stream, steps = batches(x, y, batch_size=10, classes=10, scale=1.0, offset=0.0, epochs=3, augment=True,
                            plain_from=2)
    seen = [images.numpy() for images, _ in stream]
    assert steps == 2 and len(seen) == 6
    plain = x.astype(np.float32)
    assert all(not np.array_equal(s, plain[i % 2 * 10:][:10]) for i, s in enumerate(seen[:4]))
    assert all(np.array_equal(s, plain[i % 2 * 10:][:10]) for i, s in enumerate(seen[4:]))
    # A resumed training (first_epoch) reaches the plain epochs at the same step.
    resumed, _ = batches(x, y, batch_size=10, classes=10, scale=1.0, offset=0.0, epochs=3, augment=True,
                         plain_from=2, first_epoch=1)
    assert all(np.array_equal(a, b.numpy()) for a, (b, _) in zip(seen[2:], resumed))

    cfg = BuildConfig(dataset="digits", model="mnist-mlp", epochs=4, plain_epochs=1, out=str(tmp_path))
    assert cfg.plain_epochs == 1
    with pytest.raises(ConfigError, match="--plain-epochs: got 5, expected at most --epochs"):
        BuildConfig(dataset="digits", model="mnist-mlp", epochs=4, plain_epochs=5, out=str(tmp_path))
    # cifar-resnet8's recipe ends with 6 of its 45 epochs plain: the same share of other --epochs, never more.
    tails = {epochs: BuildConfig(dataset="cifar10", model="cifar-resnet8", out=str(tmp_path),
                                 **({"epochs": epochs} if epochs else {})).plain_epochs for epochs in (None, 90, 4, 2)}
    assert tails == {None: 6, 90: 12, 4: 1, 2: 0}
    assert BuildConfig(dataset="cifar10", model="cifar-resnet8", plain_epochs=0, out=str(tmp_path)).plain_epochs == 0
    assert BuildConfig(dataset="digits", model="mnist-mlp", epochs=40, out=str(tmp_path)).plain_epochs == 0


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_warmup_epochs_warm_up_either_schedule(schedule, tmp_path):
    # A constant schedule ignored --warmup-epochs while the manifest recorded them as trained.
    from pipeline.config import BuildConfig
    from pipeline.train import _optimizer, recipe_of

    cfg = BuildConfig(dataset="digits", model="mnist-mlp", epochs=4, lr_schedule=schedule, warmup_epochs=2,
                      learning_rate=0.01, out=str(tmp_path))
    optimizer = _optimizer(recipe_of(cfg), steps_per_epoch=10)

    def rate(step):
        optimizer.iterations.assign(step)
        return float(optimizer.learning_rate)

    assert rate(0) == pytest.approx(1e-4) and rate(10) == pytest.approx(0.00505) and rate(20) == pytest.approx(0.01)
    assert rate(39) == (pytest.approx(0.01) if schedule == "constant" else pytest.approx(0.0, abs=1e-4))


def test_ema_after_a_plain_tail_recomputes_batchnorm_on_the_images_as_they_are(tmp_path):
    # The statistics were recomputed over augmented images, undoing the plain tail for BatchNorm: the model
    # ended with means ~0.1 off those of the images the tail trained on and the test split has.
    import dataclasses

    import keras

    from pipeline.config import BuildConfig
    from pipeline.data import load_dataset
    from pipeline.data.augment import batches
    from pipeline.train import BN_BATCHES, train

    data = load_dataset("digits", seed=0)
    data = dataclasses.replace(data, x_train=255 - data.x_train)  # on white, the shifts' black borders show
    spec = data.spec
    net = keras.Sequential([keras.Input((spec.height, spec.width, spec.channels)), keras.layers.Conv2D(4, 3),
                            keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.Flatten(),
                            keras.layers.Dense(10, "softmax")])
    cfg = BuildConfig(dataset="digits", model="mnist-mlp", epochs=2, plain_epochs=1, augment=True, ema=0.9,
                      out=str(tmp_path))
    model, _ = train(cfg, data, log=lambda *a: None, model=net)
    conv = keras.Model(model.inputs, model.layers[0].output)
    means = {}
    for augment in (True, False):
        stream, _ = batches(data.x_train, data.y_train, batch_size=cfg.batch_size, classes=10, scale=spec.scale,
                            offset=spec.offset, shuffle=True, augment=augment, seed=cfg.seed)
        means[augment] = np.mean([conv(x).numpy().mean(axis=(0, 1, 2)) for x, _ in stream.take(BN_BATCHES)], axis=0)
    assert np.abs(means[True] - means[False]).max() > 0.01
    np.testing.assert_allclose(model.layers[1].moving_mean.numpy(), means[False], atol=1e-4)
    keras.backend.clear_session()
