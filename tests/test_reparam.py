"""--reparam: ResNet-8 trains with branches beside each 3x3 conv and is delivered as the plain ResNet-8 computing
the same function."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import BuildConfig, ConfigError


def _features(model):
    """The pooled features the classifier reads: the softmax saturates, these show any difference."""
    import keras

    return keras.Model(model.input, model.get_layer("classifier").input)


@pytest.mark.parametrize("shape", [(32, 32, 3), (15, 18, 3)])
def test_folding_keeps_the_function_and_gives_the_plain_architecture(shape):
    """With BatchNorm statistics and scales far from their initial values, the folded plain model computes what
    the branched one does; an odd side (15) moves the 1x1 tap inside a stride-2 window, an even one (18) does
    not."""
    import keras

    from pipeline.models import build_model
    from pipeline.reparam import fold

    branched = build_model("cifar-resnet8", shape, 10, expand=True)
    rng = np.random.default_rng(0)
    for layer in branched.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, n))
            layer.beta.assign(rng.normal(0, 0.3, n))
            layer.moving_mean.assign(rng.normal(0, 0.3, n))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n))
    assert sum(layer.name.endswith("_id_bn") for layer in branched.layers) == 4  # stem and stride-2 convs have none
    x = rng.normal(size=(4, *shape)).astype(np.float32)
    expected = _features(branched)(x, training=False).numpy()
    plain = fold(branched, build_model("cifar-resnet8", shape, 10))
    got = _features(plain)(x, training=False).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())
    reference = build_model("cifar-resnet8", shape, 10)
    assert [type(layer) for layer in plain.layers] == [type(layer) for layer in reference.layers]
    assert plain.count_params() == reference.count_params() < branched.count_params()
    if shape == (32, 32, 3):
        assert plain.count_params() == 78_666


def _colour_folder(root: Path, per_class: int = 24) -> Path:
    """Three classes of 16x16 noise around a class colour: learnable in one epoch, so BatchNorm moves."""
    rng = np.random.default_rng(0)
    for name, colour in (("red", (200, 40, 40)), ("green", (40, 200, 40)), ("blue", (40, 40, 200))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(colour, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_training_with_reparam_delivers_resnet8_computing_what_was_trained(tmp_path):
    import keras

    from pipeline.data import load_dataset
    from pipeline.models import build_model
    from pipeline.train import train

    folder = _colour_folder(tmp_path / "images")
    cfg = BuildConfig(dataset="folder", data_dir=str(folder), model="cifar-resnet8", image_size="16x16", epochs=2,
                      batch_size=8, reparam=True, out=str(tmp_path / "run"))
    data = load_dataset("folder", folder, input_shape=cfg.input_shape, log=lambda *a: None)
    trained = []

    class Keep(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            trained.append(self.model)

    lines = []
    model, history = train(cfg, data, log=lines.append, callbacks=[Keep()])
    assert history["recipe"]["reparam"] is True
    assert any(layer.name.endswith("_1x1") for layer in trained[0].layers)
    assert not any(layer.name.endswith("_1x1") for layer in model.layers)
    assert model.count_params() == build_model("cifar-resnet8", (16, 16, 3), 3).count_params()
    assert any("folded" in line for line in lines)
    x = (data.x_val.astype(np.float32) * data.spec.scale + data.spec.offset)
    expected = _features(trained[0])(x, training=False).numpy()
    np.testing.assert_allclose(_features(model)(x, training=False).numpy(), expected,
                               atol=1e-5 * np.abs(expected).max())
    keras.backend.clear_session()


def test_reparam_is_refused_for_models_without_branches():
    with pytest.raises(ConfigError, match="--reparam: mnist-cnn .* --model cifar-resnet8"):
        BuildConfig(dataset="digits", model="mnist-cnn", reparam=True)
    with pytest.raises(ConfigError, match="--reparam: mine.keras"):
        BuildConfig(dataset="cifar10", keras_model="mine.keras", reparam=True)
    assert BuildConfig(dataset="cifar10", model="cifar-resnet8").reparam is False
