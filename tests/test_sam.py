"""--sam: each training step applies, at the weights, the gradient taken at the worst point within the radius."""
import numpy as np
import pytest

from pipeline.config import BuildConfig, ConfigError


def _tiny(seed: int):
    """Dense -> BatchNorm -> Dense softmax with an L2 penalty (as ResNet-8 has): every part the step must get right."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    x = keras.layers.Dense(4, kernel_regularizer=keras.regularizers.L2(1e-2))(inputs)
    x = keras.layers.BatchNormalization()(x)
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.ReLU()(x))
    return keras.Model(inputs, outputs)


def _compiled(model, lr):
    import keras

    model.compile(optimizer=keras.optimizers.SGD(lr), loss=keras.losses.CategoricalCrossentropy(),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    return model


def _expected_step(model, x, y, rho, lr):
    """The SAM update written out on a copy: gradient g at w, e = rho g / |g|, gradient g' at w + e, w - lr g';
    BatchNorm's statistics as one forward pass at w leaves them."""
    import keras
    import tensorflow as tf

    ref = keras.models.clone_model(model)
    ref.set_weights(model.get_weights())
    loss_fn = keras.losses.CategoricalCrossentropy()

    def gradients():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, ref(x, training=True)) + tf.add_n(ref.losses)
        return tape.gradient(loss, ref.trainable_weights)

    g = gradients()
    statistics = [v.numpy() for v in ref.non_trainable_weights]
    norm = np.sqrt(sum(float(np.sum(t.numpy() ** 2)) for t in g))
    w = [v.numpy() for v in ref.trainable_weights]
    for v, w0, t in zip(ref.trainable_weights, w, g):
        v.assign(w0 + rho * t.numpy() / norm)
    g2 = gradients()
    return [w0 - lr * t.numpy() for w0, t in zip(w, g2)], statistics


def test_a_sam_step_is_the_gradient_at_the_climbed_point_applied_at_the_weights():
    from pipeline.sam import sharpness_aware

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 16)]
    rho, lr = 0.5, 0.1
    model = _compiled(_tiny(0), lr)
    weights, statistics = _expected_step(model, x, y, rho, lr)
    sharpness_aware(model, rho)
    history = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0).history
    for got, want in zip([v.numpy() for v in model.trainable_weights], weights):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    for got, want in zip([v.numpy() for v in model.non_trainable_weights], statistics):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert set(history) == {"loss", "accuracy"} and np.isfinite(history["loss"][0])
    # A plain step from the same weights lands elsewhere: the test can tell the two apart.
    plain = _compiled(_tiny(0), lr)
    plain.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    moved = max(np.abs(a.numpy() - b).max() for a, b in zip(plain.trainable_weights, weights))
    assert moved > 1e-3


def test_training_with_sam_records_it_and_trains_differently(tmp_path):
    import keras

    from pipeline.data import load_dataset
    from pipeline.train import train
    from tests.test_reparam import _colour_folder

    folder = _colour_folder(tmp_path / "images")
    trained = {}
    for sam in (0.0, 0.05):
        cfg = BuildConfig(dataset="folder", data_dir=str(folder), model="cifar-cnn", image_size="16x16", epochs=2,
                          batch_size=8, sam=sam, out=str(tmp_path / "run"))
        data = load_dataset("folder", folder, input_shape=cfg.input_shape, log=lambda *a: None)
        model, history = train(cfg, data, log=lambda *a: None)
        assert history["recipe"]["sam"] == sam
        trained[sam] = (model.get_weights(), history["val_accuracy"][-1])
        keras.backend.clear_session()
    assert trained[0.05][1] > 0.6  # three colours: SAM still learns them
    assert max(np.abs(a - b).max() for a, b in zip(trained[0.0][0], trained[0.05][0])) > 1e-3


@pytest.mark.parametrize("rho", [-0.1, 1.0])
def test_a_radius_outside_0_1_is_refused(rho):
    with pytest.raises(ConfigError, match=rf"--sam: got {rho}, expected a radius in \[0, 1\)"):
        BuildConfig(dataset="digits", sam=rho)
    assert BuildConfig(dataset="digits").sam == 0.0
