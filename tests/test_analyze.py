"""The accuracy guard on models that post-training int8 demonstrably breaks, on the real MNIST subset.

The breakers keep the float function exactly and ruin int8:
  rescaled: the two strongest output channels of the first Dense scaled by 300, the matching input
            rows of the last Dense by 1/300 (the issue's case); equalization undoes it, and the
            float-layer search must keep both Dense layers float: the damage sits in the tensor
            between them;
  shifted:  +1000 on every logit before the softmax; equalization cannot undo a shift, the search
            must keep the last Dense and the softmax float.
"""
from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from device.core import normalize
from pipeline.artifacts import sha256_file
from pipeline.config import BuildConfig

PP = 2.0  # the accuracy budget of these tests, in percentage points


@pytest.fixture(scope="module")
def source():
    """(dataset, data_dir): the real MNIST subset, or scikit-learn's real digits where it is absent."""
    from tests.conftest import real_digits

    return real_digits()


@pytest.fixture(scope="module")
def data(source):
    from pipeline.data import load_dataset

    return load_dataset(*source, seed=0)


@pytest.fixture(scope="module")
def trained(data):
    """mnist-cnn's shape at a quarter of the width, one epoch: about 90% in a few seconds."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(8, 3, activation="relu"), layers.MaxPooling2D(),
        layers.Conv2D(16, 3, activation="relu"), layers.MaxPooling2D(),
        layers.Flatten(), layers.Dense(32, activation="relu"), layers.Dense(10, activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy")
    epochs = 1 if data.name == "mnist" else 4  # the 1,293 digits need more passes to reach ~90%
    model.fit(normalize(data.x_train, data.spec.to_dict()), data.y_train, epochs=epochs, batch_size=64, verbose=0)
    return model


@pytest.fixture(scope="module")
def residual(data):
    """A functional model with a skip connection and BatchNorm (ResNet-8's building block), trained as `trained`."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    x = inputs = keras.Input((28, 28, 1))
    x = layers.MaxPooling2D()(layers.ReLU()(layers.Conv2D(8, 3, padding="same")(x)))
    # Momentum 0.9: the moving statistics settle within one epoch's 57 steps.
    y = layers.ReLU()(layers.BatchNormalization(momentum=0.9)(layers.Conv2D(8, 3, padding="same")(x)))
    y = layers.BatchNormalization(momentum=0.9)(layers.Conv2D(8, 3, padding="same")(y))
    x = layers.MaxPooling2D()(layers.ReLU()(layers.Add()([x, y])))
    model = keras.Model(inputs, layers.Dense(10, activation="softmax")(layers.Flatten()(x)))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    epochs = 1 if data.name == "mnist" else 4
    model.fit(normalize(data.x_train, data.spec.to_dict()), data.y_train, epochs=epochs, batch_size=64, verbose=0)
    return model


def _copy(model):
    import keras

    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    return twin


def rescaled(model):
    twin = _copy(model)
    (w1, b1), (w2, b2) = twin.layers[-2].get_weights(), twin.layers[-1].get_weights()
    strong = np.argsort(np.linalg.norm(w1, axis=0))[-2:]  # scaling a dead channel would do no harm
    w1[:, strong] *= 300
    b1[strong] *= 300
    w2[strong] /= 300
    twin.layers[-2].set_weights([w1, b1])
    twin.layers[-1].set_weights([w2, b2])
    return twin


def shifted(model):
    twin = _copy(model)
    w, b = twin.layers[-1].get_weights()
    twin.layers[-1].set_weights([w, b + 1000])
    return twin


def _cfg(tmp_path, source, **kw) -> BuildConfig:
    kw = {"fallback": "auto", "max_accuracy_drop": PP, **kw}
    dataset, data_dir = source
    return BuildConfig(dataset=dataset, data_dir=data_dir, model="mnist-cnn", out=str(tmp_path / "run"),
                       benchmark=False, **kw)


def _converted(tmp_path, model, cfg, data):
    """A run directory as the guard finds it: the fp32 and int8 models of `model`."""
    from pipeline.convert import calibration_images, convert

    run = tmp_path / "staging"
    run.mkdir()
    calibration = calibration_images(data, cfg.calibration_samples, cfg.seed)
    for v in ("fp32", "int8"):
        (run / f"model_{v}.tflite").write_bytes(convert(model, v, cfg, calibration))
    return run


def _guard(tmp_path, source, data, model, remedies=("cle", "mixed"), **kw):
    from pipeline.guard import guard

    cfg = _cfg(tmp_path, source, **kw)
    run = _converted(tmp_path, model, cfg, data)
    added = guard(run, cfg, data, model, log=lambda *a: None, remedies=remedies)
    return run, added, json.loads((run / "analysis.json").read_text())


@pytest.fixture(scope="module")
def breaker_run(tmp_path_factory, source, trained):
    """`pipeline build --keras-model breaker.keras --analyze --fallback auto --max-accuracy-drop 2`."""
    from pipeline.build import build

    tmp = tmp_path_factory.mktemp("breaker")
    rescaled(trained).save(tmp / "breaker.keras")
    cfg = _cfg(tmp, source, keras_model=str(tmp / "breaker.keras"), analyze=True)
    return build(cfg, log=lambda *a: None)


def test_breakers_keep_the_float_function(trained, data):
    x = normalize(data.x_val[:300], data.spec.to_dict())
    want = trained.predict(x, verbose=0)
    for breaker in (rescaled, shifted):
        assert np.abs(breaker(trained).predict(x, verbose=0) - want).max() < 1e-4, breaker.__name__


def test_build_repairs_the_rescaled_model_with_equalization(breaker_run):
    evaluation = json.loads((breaker_run / "evaluation.json").read_text())["variants"]
    analysis = json.loads((breaker_run / "analysis.json").read_text())
    assert -evaluation["int8"]["change_pp_vs_fp32"] > 5 * PP  # plain int8 breaks, on test too
    assert -evaluation["int8-cle"]["change_pp_vs_fp32"] <= PP
    guard = analysis["guard"]
    assert guard["delivered"] == "int8-cle" and guard["superseded"] == ["int8"] and guard["needed"]
    cle = guard["remedies"][0]
    assert cle["name"] == "cle" and cle["status"] == "within_budget" and len(guard["remedies"]) == 1
    assert len(cle["pairs"]) == 3  # conv -> conv, conv -> (pool, flatten) -> dense, dense -> dense
    assert cle["float_max_abs_diff"] < 1e-4
    # Every layer stays int8: the same size as plain int8.
    sizes = {v: (breaker_run / f"model_{v}.tflite").stat().st_size for v in ("fp32", "int8", "int8-cle")}
    assert sizes["int8-cle"] < 1.05 * sizes["int8"] < 0.5 * sizes["fp32"]
    manifest = json.loads((breaker_run / "manifest.json").read_text())
    assert "model_int8-cle.tflite" in manifest["models"]
    assert {"analysis.json", "analysis_layers.png"} <= set(manifest["files"])


def test_debugger_flags_the_last_dense(breaker_run):
    layers = json.loads((breaker_run / "analysis.json").read_text())["layers"]
    assert [r["op"] for r in layers] == ["CONV_2D", "MAX_POOL_2D", "CONV_2D", "MAX_POOL_2D", "RESHAPE",
                                         "FULLY_CONNECTED", "FULLY_CONNECTED", "SOFTMAX"]
    # The last Dense is the clear culprit; the Dense whose outputs were scaled up sits near the threshold,
    # on one side or the other depending on the calibration sample.
    suspects = [r for r in layers if r["suspect"]]
    worst = max(layers, key=lambda r: r["rmse_over_scale"])
    assert worst is layers[6] and worst["rmse_over_scale"] > 2
    assert suspects[-1] is worst and all(r["op"] == "FULLY_CONNECTED" for r in suspects)
    for r in layers:
        assert r["range"] == pytest.approx(255 * r["scale"]) and r["mse"] >= 0 and r["tensor"]
        assert r["suspect"] or r["rmse_over_scale"] < 0.7
    assert (breaker_run / "analysis_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_keeps_producer_and_consumer_float(tmp_path, source, data, trained):
    """Without equalization the search must find what the issue found by hand: both Dense layers."""
    run, added, analysis = _guard(tmp_path, source, data, rescaled(trained), remedies=("mixed",))
    assert added == ["int8-mixed"] and analysis["guard"]["delivered"] == "int8-mixed"
    mixed = analysis["guard"]["remedies"][0]
    assert mixed["status"] == "within_budget" and mixed["drop_pp"] <= PP
    assert [f["op"] for f in mixed["float_layers"]] == ["FULLY_CONNECTED", "FULLY_CONNECTED"]
    assert all("float raised validation accuracy" in f["why"] for f in mixed["float_layers"])
    # Either Dense alone is not enough; that is why groups around a tensor are candidates.
    measured = {m["group"]: m["accuracy"] for m in mixed["rounds"][0]["measured"]}
    assert measured[mixed["rounds"][0]["chosen"]] - max(
        a for g, a in measured.items() if g.endswith("alone")) > 0.05
    assert sum(bool(r["float_in"]) for r in analysis["layers"]) == 2


def test_search_repairs_what_equalization_cannot(tmp_path, source, data, trained):
    run, added, analysis = _guard(tmp_path, source, data, shifted(trained))
    cle, mixed = analysis["guard"]["remedies"]
    assert cle["status"] == "over_budget"
    assert mixed["status"] == "within_budget" and added == ["int8-mixed"]
    assert [f["op"] for f in mixed["float_layers"]] == ["FULLY_CONNECTED", "SOFTMAX"]
    # Only the 10-wide last layer is float, so the model stays int8-sized.
    assert mixed["bytes"] < 1.2 * analysis["validation"]["int8_bytes"]


def test_guard_does_nothing_when_int8_is_within_budget(tmp_path, source, data, trained):
    run, added, analysis = _guard(tmp_path, source, data, trained, max_accuracy_drop=100.0)
    assert added == [] and analysis["guard"] is None and analysis["layers"] is None
    assert sorted(p.name for p in run.iterdir()) == ["analysis.json", "model_fp32.tflite", "model_int8.tflite"]


def test_mixed_models_are_the_converter_s_int8_when_nothing_is_float(tmp_path, source, data, trained):
    from pipeline.convert import calibration_images
    from pipeline.guard.analyze import Judge, Quantizer

    cfg = _cfg(tmp_path, source)
    run = _converted(tmp_path, trained, cfg, data)
    pre = data.spec.to_dict()
    q = Quantizer(trained, cfg, calibration_images(data, 300, 0), normalize(data.x_val[:50], pre))
    judge = Judge(data.x_val, data.y_val, pre, tmp_path)
    assert judge(q.flatbuffer()) == judge((run / "model_int8.tflite").read_bytes())
    from device.core import Model

    (tmp_path / "q.tflite").write_bytes(q.flatbuffer())
    ours, theirs = (Model(p, metadata={"preprocess": pre}) for p in (tmp_path / "q.tflite", run / "model_int8.tflite"))
    assert np.array_equal(ours.predict(data.x_val[:200]), theirs.predict(data.x_val[:200]))
    assert ours.input.dtype == np.int8 and ours.output.dtype == np.int8


def test_equalization_through_batchnorm_relu6_depthwise_and_pooling():
    """cifar-dscnn's building blocks: the function is unchanged, ReLU-joined ranges end up equal."""
    import keras
    from keras import layers

    from pipeline.guard.equalize import _in_range, _out_range, equalize

    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((12, 12, 3)),
        layers.Conv2D(8, 3, padding="same", use_bias=False), layers.BatchNormalization(), layers.ReLU(6.0),
        layers.DepthwiseConv2D(3, padding="same", use_bias=False), layers.BatchNormalization(), layers.ReLU(6.0),
        layers.Conv2D(16, 1, activation="relu"), layers.AveragePooling2D(2), layers.Flatten(),
        layers.Dense(8, activation="relu"), layers.Dense(4, activation="softmax"),
    ])
    rng = np.random.default_rng(0)
    for bn in (layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)):
        c = bn.gamma.shape[0]
        bn.set_weights([rng.uniform(0.2, 3, c), rng.normal(1, 3, c), rng.normal(0, 0.5, c), rng.uniform(0.05, 4, c)])
    x = rng.uniform(0, 1, (64, 12, 12, 3)).astype(np.float32)
    eq, record = equalize(model, x)
    assert len(record["pairs"]) == 4 and record["relu6_channels_held"] > 0  # some channels reach 6 here
    assert np.abs(eq.predict(x, verbose=0) - model.predict(x, verbose=0)).max() < 1e-5
    a, b = eq.layers[6], eq.layers[9]  # Conv2D 1x1 relu -> AveragePooling -> Flatten -> Dense: pure ReLU
    np.testing.assert_allclose(_out_range(a, None), _in_range(b, None, 16), rtol=1e-3)


def test_analyze_command_adds_the_table_to_a_finished_run(tmp_path, breaker_run):
    from click.testing import CliRunner

    from pipeline.cli import main

    run = tmp_path / "copy"
    shutil.copytree(breaker_run, run)
    before = json.loads((run / "analysis.json").read_text())
    result = CliRunner().invoke(main, ["analyze", str(run)])
    assert result.exit_code == 0, result.output
    assert "suspect" in result.output
    after = json.loads((run / "analysis.json").read_text())
    assert after["guard"] == before["guard"]  # what the build decided is kept
    assert after["validation"]["int8_in_run"] is True
    assert "This run has no int8 model" not in (run / "report.md").read_text()
    assert [r["rmse_over_scale"] for r in after["layers"]] == pytest.approx(
        [r["rmse_over_scale"] for r in before["layers"]], rel=1e-6)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["files"]["analysis.json"]["sha256"] == sha256_file(run / "analysis.json")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tensorflow_model_optimization") is None
                    or importlib.util.find_spec("tf_keras") is None,
                    reason="QAT needs tensorflow-model-optimization and tf_keras")
@pytest.mark.parametrize("model", ["trained", "residual"])
def test_qat_on_request_is_reported_against_ptq_with_the_same_budget(tmp_path, source, data, model, request):
    run, added, analysis = _guard(tmp_path, source, data, request.getfixturevalue(model), remedies=("qat",),
                                  qat=True, max_accuracy_drop=100.0)
    (qat,) = analysis["guard"]["remedies"]
    assert added == ["int8-qat"] and (run / "model_int8-qat.tflite").is_file()
    assert qat["budget"]["epochs"] >= 1 and qat["budget"]["images"] == len(data.x_train)
    assert qat["accuracy"] > 0.8 and qat["ptq_same_budget"]["accuracy"] > 0.8
    assert qat["bytes"] < 0.5 * (run / "model_fp32.tflite").stat().st_size  # integer-only model



def test_qat_reads_a_residual_graph_and_refuses_a_layer_called_twice():
    import keras
    from keras import layers

    from pipeline.guard.qat import graph_of
    from pipeline.models import build_model

    graph = graph_of(build_model("cifar-resnet8", (32, 32, 3), 10))
    adds = [e for e in graph["layers"] if e["class_name"] == "Add"]
    assert len(adds) == 3 and all(e["as_list"] and len(e["inbound"]) == 2 for e in adds)
    known = {graph["input"]}
    for entry in graph["layers"]:  # each layer after the layers it is called on
        assert set(entry["inbound"]) <= known
        known.add(entry["config"]["name"])
    assert graph["output"] == graph["layers"][-1]["config"]["name"]

    inputs = keras.Input((4,))
    shared = layers.Dense(4, name="shared")
    twice = graph_of(keras.Model(inputs, shared(shared(inputs))))
    assert isinstance(twice, str) and "shared is called 2 times" in twice


def _digit_folders(root, classes: int = 3, images: int = 40) -> None:
    """scikit-learn's digits as class folders of PNGs, `images` of each of the first `classes` digits."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c in range(classes):
        folder = root / f"d{c}"
        folder.mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(digits.target == c)[:images]):
            Image.fromarray((digits.images[index] * 16).astype(np.uint8)).save(folder / f"{i}.png")


def test_analyze_of_a_run_built_with_a_relative_data_dir_works_from_another_folder(tmp_path, monkeypatch):
    """A build given --data-dir relative to where it ran: `pipeline analyze` from another folder read the path
    against that one, and refused with "--data-dir images: does not exist", an option the user never gave it. The
    build now records the folder's absolute path."""
    from click.testing import CliRunner

    from pipeline.cli import main

    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(tmp_path / "cache"))
    _digit_folders(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    built = CliRunner().invoke(main, ["build", "--data-dir", "images", "--image-size", "16x16", "--epochs", "1",
                                      "--no-benchmark", "--out", "run"])
    assert built.exit_code == 0, built.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_dir"] == str(tmp_path / "images")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = CliRunner().invoke(main, ["analyze", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "analysis.json").read_text())["validation"]["images"] == 12


def test_analyze_refuses_data_other_than_the_run_was_built_on(tmp_path, monkeypatch):
    """`pipeline analyze` loads the run's data again: a class folder added since would have been analysed as the
    run's validation and calibration images, for a class the model does not have, and written into its report."""
    from click.testing import CliRunner

    from pipeline.cli import main

    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(tmp_path / "cache"))
    _digit_folders(tmp_path / "images")
    run = tmp_path / "run"
    built = CliRunner().invoke(main, ["build", "--data-dir", str(tmp_path / "images"), "--image-size", "16x16",
                                      "--epochs", "1", "--no-benchmark", "--out", str(run)])
    assert built.exit_code == 0, built.output
    shutil.copytree(tmp_path / "images" / "d2", tmp_path / "images" / "d3")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    result = CliRunner().invoke(main, ["analyze", str(run)])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0].startswith(f"Error: {tmp_path / 'images'}: not the data {run} was built on (128 train / 16 "
                                "val / 16 test images from image-folders"), errors[0]
    recorded = "where its manifest.json records 96 train / 12 val / 12 test images from image-folders"
    assert recorded in errors[0], errors[0]
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_analyze_of_a_run_without_int8_says_its_table_is_of_a_model_the_run_lacks(tmp_path, monkeypatch):
    """A run built with --quantize float16 has no int8 model: `pipeline analyze` quantizes one for the table, and
    the report presented that table as if it were the run's int8 model."""
    from click.testing import CliRunner

    from pipeline.cli import main

    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(tmp_path / "cache"))
    _digit_folders(tmp_path / "images")
    run = tmp_path / "run"
    built = CliRunner().invoke(main, ["build", "--data-dir", str(tmp_path / "images"), "--image-size", "16x16",
                                      "--epochs", "1", "--no-benchmark", "--quantize", "float16", "--out", str(run)])
    assert built.exit_code == 0, built.output
    assert not (run / "model_int8.tflite").exists()
    result = CliRunner().invoke(main, ["analyze", str(run)])
    assert result.exit_code == 0, result.output
    assert "the run has no int8 model" in result.output
    assert json.loads((run / "analysis.json").read_text())["validation"]["int8_in_run"] is False
    for page in ("report.md", "report.html"):
        assert "This run has no int8 model: the table is of the int8 preset" in (run / page).read_text()
    assert not (run / "model_int8.tflite").exists()
