"""The model zoo: a registry of small classifiers sized for edge CPUs.

Keras is imported inside the builders: the CLI lists the registry's names for `--help` and for
error messages, and importing TensorFlow for that would cost seconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def mnist_mlp(input_shape, classes):
    from keras import Input, Sequential, layers

    return Sequential([
        Input(input_shape),
        layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.Dense(classes, activation="softmax"),
    ], name="mnist_mlp")


def _conv_pool_net(input_shape, classes, dense: int, name: str):
    """Conv32-Pool-Conv64-Pool-Flatten-Dense-Dense: the classic small CNN of the Keras examples."""
    from keras import Input, Sequential, layers

    return Sequential([
        Input(input_shape),
        layers.Conv2D(32, 3, activation="relu"),
        layers.MaxPooling2D(),
        layers.Conv2D(64, 3, activation="relu"),
        layers.MaxPooling2D(),
        layers.Flatten(),
        layers.Dense(dense, activation="relu"),
        layers.Dense(classes, activation="softmax"),
    ], name=name)


def mnist_cnn(input_shape, classes):
    return _conv_pool_net(input_shape, classes, 128, "mnist_cnn")


def cifar_cnn(input_shape, classes):
    return _conv_pool_net(input_shape, classes, 64, "cifar_cnn")


def cifar_dscnn(input_shape, classes):
    """MobileNet-style: one full conv, then depthwise 3x3 + pointwise 1x1 blocks, global pooling.

    Depthwise-separable blocks cost about 1/8 of the multiply-accumulates of full 3x3 convs at these
    widths, which is what makes them the usual choice on phone and Pi CPUs. BatchNorm is folded
    into the convolutions by the converter.
    """
    from keras import Input, Sequential, layers

    def block(filters, stride):
        return [
            layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False),
            layers.BatchNormalization(),
            layers.ReLU(6.0),
            layers.Conv2D(filters, 1, use_bias=False),
            layers.BatchNormalization(),
            layers.ReLU(6.0),
        ]

    return Sequential([
        Input(input_shape),
        layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False),
        layers.BatchNormalization(),
        layers.ReLU(6.0),
        *block(64, 1),
        *block(128, 2),
        *block(128, 1),
        *block(256, 2),
        layers.GlobalAveragePooling2D(),
        layers.Dense(classes, activation="softmax"),
    ], name="cifar_dscnn")


@dataclass(frozen=True)
class ModelInfo:
    build: Callable
    input_shape: tuple[int, int, int]
    description: str


MODELS: dict[str, ModelInfo] = {
    "mnist-mlp": ModelInfo(mnist_mlp, (28, 28, 1), "Flatten, Dense 128 relu, Dense 10 softmax"),
    "mnist-cnn": ModelInfo(mnist_cnn, (28, 28, 1), "Conv32-Pool-Conv64-Pool-Flatten-Dense128-Dense10 (the Keras MNIST example)"),
    "cifar-cnn": ModelInfo(cifar_cnn, (32, 32, 3), "Conv32-Pool-Conv64-Pool-Flatten-Dense64-Dense10"),
    "cifar-dscnn": ModelInfo(cifar_dscnn, (32, 32, 3), "MobileNet-style depthwise-separable net for edge CPUs"),
}


def build_model(name: str, input_shape, classes: int):
    return MODELS[name].build(tuple(input_shape), classes)


def count_macs(model) -> int:
    """Multiply-accumulates of one inference, from the layer shapes (conv, depthwise conv, dense)."""
    from keras import layers

    total = 0
    for layer in model.layers:
        if isinstance(layer, layers.DepthwiseConv2D):
            _, h, w, c = layer.output.shape
            kh, kw = layer.kernel_size
            total += h * w * c * kh * kw
        elif isinstance(layer, layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            total += h * w * c_out * kh * kw * layer.input.shape[-1]
        elif isinstance(layer, layers.Dense):
            total += int(layer.input.shape[-1]) * layer.units
    return int(total)
