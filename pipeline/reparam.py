"""Structural re-parameterization: train a 3x3 convolution as three branches, deliver it as one.

A 3x3 conv + BatchNorm of a small network trains as the sum of three branches (RepVGG, Ding et al. 2021):
the 3x3 conv + BatchNorm itself, a 1x1 conv + BatchNorm, and a BatchNorm of the input alone where the
shapes allow (stride 1, as many channels out as in). Every branch is linear at inference, so after
training their sum is folded into the one 3x3 kernel and bias of the model as it is built without them:
the delivered model has the same layers, parameters, size and latency, while the optimizer worked on a
richer parameterization (RepVGG's gain on ImageNet-sized networks). Training costs about twice the time per
image for ResNet-8 on a CPU; the images seen are the same. Measured on CIFAR-10 at 60 epochs it did not help
ResNet-8 (docs/results.md), so no recipe uses it by default.

Layer names carry the pairing: the trained model's `{name}`, `{name}_bn`, `{name}_1x1`, `{name}_1x1_bn` and
`{name}_id_bn` fold into the plain model's `{name}` and `{name}_bn`; every other layer is copied by name.
"""
from __future__ import annotations

import numpy as np


def conv_bn(x, filters: int, stride: int, name: str, expand: bool, **conv):
    """A 3x3 conv + BatchNorm called `name`; with `expand`, the three branches that fold into it."""
    from keras import layers

    out = layers.BatchNormalization(name=f"{name}_bn")(layers.Conv2D(filters, 3, strides=stride, name=name,
                                                                     **conv)(x))
    if not expand:
        return out
    branches = [out, layers.BatchNormalization(name=f"{name}_1x1_bn")(
        layers.Conv2D(filters, 1, strides=stride, name=f"{name}_1x1", use_bias=False, **conv)(x))]
    if stride == 1 and x.shape[-1] == filters:
        branches.append(layers.BatchNormalization(name=f"{name}_id_bn")(x))
    return layers.Add(name=f"{name}_sum")(branches)


def fold(trained, plain):
    """`plain` (the model built without the branches) with the trained model's function: each branched
    conv's branches summed into its kernel, their shift into its BatchNorm, which otherwise passes its input
    through; every other layer copied."""
    for layer in plain.layers:
        if layer.weights:
            layer.set_weights(trained.get_layer(layer.name).get_weights())
    for layer in plain.layers:
        if not _has(trained, f"{layer.name}_1x1"):
            continue
        kernel, shift = _folded(trained, layer.name)
        layer.kernel.assign(kernel)
        if layer.use_bias:
            layer.bias.assign(np.zeros_like(shift))
        norm = plain.get_layer(f"{layer.name}_bn")
        norm.gamma.assign(np.ones_like(shift))
        norm.beta.assign(shift)
        norm.moving_mean.assign(np.zeros_like(shift))
        norm.moving_variance.assign(np.full_like(shift, 1.0 - norm.epsilon))
    return plain


def _has(model, name: str) -> bool:
    return any(layer.name == name for layer in model.layers)


def _folded(trained, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The kernel (3, 3, in, out) and bias (out,) equal to the sum of `name`'s branches at inference."""
    conv = trained.get_layer(name)
    kernel, bias = _scaled(trained.get_layer(f"{name}_bn"), conv.kernel.numpy(),
                           conv.bias.numpy() if conv.use_bias else 0.0)
    one = trained.get_layer(f"{name}_1x1")
    row, col = _offset(one)
    k1, b1 = _scaled(trained.get_layer(f"{name}_1x1_bn"), one.kernel.numpy(), 0.0)
    kernel[row, col] += k1[0, 0]
    bias = bias + b1
    if _has(trained, f"{name}_id_bn"):
        channels = kernel.shape[-1]
        ki, bi = _scaled(trained.get_layer(f"{name}_id_bn"), np.eye(channels, dtype=np.float32)[None, None], 0.0)
        kernel[1, 1] += ki[0, 0]
        bias = bias + bi
    return kernel, bias


def _scaled(norm, kernel: np.ndarray, bias) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm at inference after a conv, folded into the conv's kernel and bias (conv_bn's BatchNorms all
    have a scale and a shift)."""
    scale = norm.gamma.numpy() / np.sqrt(norm.moving_variance.numpy() + norm.epsilon)
    return kernel * scale, norm.beta.numpy() + (bias - norm.moving_mean.numpy()) * scale


def _offset(one) -> tuple[int, int]:
    """Where a 1x1 conv's tap sits inside the 3x3 window of the conv it parallels: both pad "same", and at
    stride 2 an even input pads the 3x3 window on the bottom/right only, so the tap is its top-left, not
    its centre."""
    stride = one.strides[0]
    sides = []
    for size in one.input.shape[1:3]:
        out = -(-size // stride)
        pad3 = max((out - 1) * stride + 3 - size, 0) // 2
        pad1 = max((out - 1) * stride + 1 - size, 0) // 2
        sides.append(pad3 - pad1)
    return sides[0], sides[1]
