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
    """Multiply-accumulates of one inference, from the layer shapes.

    Convolutions of any rank (1-D, 2-D, 3-D, grouped, transposed), depthwise and separable ones, and
    dense layers (on any rank), descending into nested models. Other layers (pooling, normalization,
    activations) cost additions and comparisons, not MACs, and are left out, as is usual.
    """
    import keras
    from keras import layers
    from keras.src.layers.convolutional.base_conv import BaseConv
    from keras.src.layers.convolutional.base_conv_transpose import BaseConvTranspose
    from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv
    from keras.src.layers.convolutional.base_separable_conv import BaseSeparableConv

    def prod(values) -> int:
        out = 1
        for v in values:
            out *= int(v)
        return out

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += count_macs(layer)
            continue
        if not isinstance(layer, (BaseConv, BaseConvTranspose, BaseDepthwiseConv, BaseSeparableConv, layers.Dense)):
            continue
        c_in, out_shape = int(layer.input.shape[-1]), layer.output.shape  # channels_last, as the zoo builds
        kernel = prod(getattr(layer, "kernel_size", ()))
        if isinstance(layer, BaseSeparableConv):  # depthwise over the input, then 1x1 to the output channels
            positions = prod(out_shape[1:-1])
            total += positions * c_in * layer.depth_multiplier * (kernel + int(out_shape[-1]))
        elif isinstance(layer, BaseDepthwiseConv):
            total += prod(out_shape[1:]) * kernel
        elif isinstance(layer, BaseConvTranspose):  # every input position scatters a kernel of outputs
            total += prod(layer.input.shape[1:-1]) * c_in * kernel * int(out_shape[-1])
        elif isinstance(layer, BaseConv):
            total += prod(out_shape[1:]) * kernel * c_in // getattr(layer, "groups", 1)
        else:  # Dense: every leading position multiplies its input vector by the kernel
            total += prod(layer.input.shape[1:-1]) * c_in * layer.units
    return int(total)
