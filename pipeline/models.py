"""The model zoo: a registry of small classifiers sized for edge CPUs.

Keras is imported inside the builders: the CLI lists the registry's names for `--help` and for
error messages, and importing TensorFlow for that would cost seconds.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def mnist_mlp(input_shape, classes):
    from keras import Input, Sequential, layers

    return Sequential([
        Input(input_shape),
        layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.Dense(classes, activation="softmax"),
    ], name="mnist_mlp")


def _conv_pool_net(input_shape, classes, dense: int, name: str, filters=(32, 64), dropout: float = 0.0):
    """Conv32-Pool-Conv64-Pool-Flatten-Dense-Dense: the classic small CNN of the Keras examples.

    `filters` (one Conv-Pool stage each) makes it the search's parametric family (pipeline/search).
    """
    from keras import Input, Sequential, layers

    stages = [layer for f in filters for layer in (layers.Conv2D(f, 3, activation="relu"), layers.MaxPooling2D())]
    return Sequential([
        Input(input_shape),
        *stages,
        layers.Flatten(),
        *([layers.Dropout(dropout)] if dropout else []),
        layers.Dense(dense, activation="relu"),
        layers.Dense(classes, activation="softmax"),
    ], name=name)


def mnist_cnn(input_shape, classes):
    return _conv_pool_net(input_shape, classes, 128, "mnist_cnn", dropout=0.25)


def cifar_cnn(input_shape, classes):
    return _conv_pool_net(input_shape, classes, 64, "cifar_cnn")


def cifar_dscnn(input_shape, classes, width: float = 1.0, name: str = "cifar_dscnn"):
    """MobileNet-style: one full conv, then depthwise 3x3 + pointwise 1x1 blocks, global pooling.

    Depthwise-separable blocks cost about 1/8 of the multiply-accumulates of full 3x3 convs at these
    widths, which is what makes them the usual choice on phone and Pi CPUs. BatchNorm is folded
    into the convolutions by the converter. `width` scales every layer's filters (MobileNet's alpha).
    """
    from keras import Input, Sequential, layers

    def scaled(filters):
        return max(8, int(round(filters * width)))

    def block(filters, stride):
        return [
            layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False),
            layers.BatchNormalization(),
            layers.ReLU(6.0),
            layers.Conv2D(scaled(filters), 1, use_bias=False),
            layers.BatchNormalization(),
            layers.ReLU(6.0),
        ]

    return Sequential([
        Input(input_shape),
        layers.Conv2D(scaled(32), 3, strides=2, padding="same", use_bias=False),
        layers.BatchNormalization(),
        layers.ReLU(6.0),
        *block(64, 1),
        *block(128, 2),
        *block(128, 1),
        *block(256, 2),
        layers.GlobalAveragePooling2D(),
        layers.Dense(classes, activation="softmax"),
    ], name=name)


def cifar_resnet8(input_shape, classes, width: int = 16, name: str = "cifar_resnet8", blocks: int = 1,
                  expand: bool = False, stacks: tuple[tuple[int, int], ...] | None = None):
    """MLPerf Tiny's image-classification reference (ResNet v1, 16 filters): 78,666 parameters at 32x32x3.

    A 3x3 stem, then three stacks of two 3x3 convs (16; 32 and 64 at stride 2, with a 1x1 stride-2
    shortcut), global average pooling, softmax. L2 1e-4 and he_normal as in the reference, so its
    training figures are comparable with ours. The search varies `width` (the first stack's filters) and
    `blocks` (residual blocks per stack: 2 and 3 make the CIFAR ResNet-14 and ResNet-20), and `stacks`,
    (filters, first stride) of each stack, replaces the three (the search's two-stack family). `expand` builds
    it for training with branches that fold back into each 3x3 conv (pipeline/reparam.py, --reparam).
    """
    from keras import Input, Model, layers, regularizers

    from pipeline.reparam import conv_bn

    conv = {"padding": "same", "kernel_initializer": "he_normal", "kernel_regularizer": regularizers.l2(1e-4)}
    inputs = Input(input_shape)
    x = layers.ReLU()(conv_bn(inputs, width, 1, "stem", expand, **conv))
    for stack, (filters, first_stride) in enumerate(stacks or ((width, 1), (2 * width, 2), (4 * width, 2)), 1):
        for block, stride in enumerate((first_stride, *[1] * (blocks - 1)), 1):
            unit = f"stack{stack}_block{block}"
            y = layers.ReLU()(conv_bn(x, filters, stride, f"{unit}_conv1", expand, **conv))
            y = conv_bn(y, filters, 1, f"{unit}_conv2", expand, **conv)
            if stride != 1:
                x = layers.Conv2D(filters, 1, strides=stride, name=f"{unit}_shortcut", **conv)(x)
            x = layers.ReLU()(layers.Add()([x, y]))
    # The reference pools the whole final map (8x8 at 32x32 input); sized from the map, it fits any input.
    x = layers.AveragePooling2D(pool_size=tuple(x.shape[1:3]))(x)
    outputs = layers.Dense(classes, activation="softmax", kernel_initializer="he_normal",
                           name="classifier")(layers.Flatten()(x))
    return Model(inputs, outputs, name=name)


def photo_cnn(input_shape, classes):
    """Four Conv-BatchNorm-ReLU-MaxPool stages (32, 64, 128, 256 filters), global pooling, dropout: the classic
    small-data photo convnet, with global pooling instead of a wide dense head (a tenth of the parameters,
    and any input size). For own photo folders of a few thousand images, trained at 64x64 or more."""
    from keras import Input, Sequential, layers

    stages = [layer for filters in (32, 64, 128, 256) for layer in (
        layers.Conv2D(filters, 3, padding="same", use_bias=False), layers.BatchNormalization(), layers.ReLU(),
        layers.MaxPooling2D())]
    return Sequential([
        Input(input_shape),
        *stages,
        layers.GlobalAveragePooling2D(),
        layers.Dropout(0.3),
        layers.Dense(classes, activation="softmax"),
    ], name="photo_cnn")


@dataclass(frozen=True)
class Recipe:
    """How a zoo model is trained by default; every field can be overridden from the command line."""
    epochs: int
    batch_size: int
    optimizer: str  # a key of OPTIMIZERS
    learning_rate: float  # peak rate, reached after the warm-up
    schedule: str = "cosine"  # "cosine" decays to 0 over the run after a linear warm-up; "constant"
    warmup_epochs: int = 0
    weight_decay: float = 0.0  # decoupled (AdamW-style), on top of any L2 in the architecture
    label_smoothing: float = 0.0
    ema: float = 0.0  # decay of a moving average of the weights that replaces them at the end; 0: none
    reparam: bool = False  # train each 3x3 conv with branches folded into it at the end (pipeline/reparam.py)
    sam: float = 0.0  # radius of sharpness-aware minimization's climb (pipeline/sam.py); 0: plain steps
    plain_epochs: int = 0  # the last epochs train without augmentation (on the images as the test split has them)

    def plain_for(self, epochs: int) -> int:
        """The plain tail for a run of `epochs`: the same share of them as of the recipe's own."""
        return round(self.plain_epochs * epochs / self.epochs)


OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class ModelInfo:
    build: Callable
    input_shape: tuple[int, int, int]  # the standard size; channels are what the model takes
    description: str
    recipe: Recipe
    min_size: int = 8  # smallest height/width the architecture can take
    reparam: bool = False  # the builder takes `expand` (branches for --reparam)

    @property
    def channels(self) -> int:
        return self.input_shape[-1]


MODELS: dict[str, ModelInfo] = {
    "mnist-mlp": ModelInfo(mnist_mlp, (28, 28, 1), "Flatten, Dense 128 relu, Dense 10 softmax",
                           Recipe(5, 64, "adam", 1e-3, "constant"), min_size=1),
    "mnist-cnn": ModelInfo(mnist_cnn, (28, 28, 1),
                           "Conv32-Pool-Conv64-Pool-Flatten-Dropout-Dense128-Dense10 (the Keras MNIST example)",
                           Recipe(4, 128, "adam", 2e-3, "cosine", warmup_epochs=1, label_smoothing=0.1),
                           min_size=10),
    "cifar-cnn": ModelInfo(cifar_cnn, (32, 32, 3), "Conv32-Pool-Conv64-Pool-Flatten-Dense64-Dense10",
                           Recipe(10, 64, "adamw", 2e-3, "cosine", warmup_epochs=1, weight_decay=1e-4,
                                  label_smoothing=0.1), min_size=10),
    "cifar-dscnn": ModelInfo(cifar_dscnn, (32, 32, 3), "MobileNet-style depthwise-separable net for edge CPUs",
                             Recipe(10, 64, "adam", 1e-3, "cosine", warmup_epochs=1), min_size=8),
    "cifar-resnet8": ModelInfo(cifar_resnet8, (32, 32, 3),
                               "ResNet-8, the MLPerf Tiny image-classification reference (78,666 parameters)",
                               # The last 6 epochs on the images as they are: +0.5 pp int8 and validation at 45
                               # and at 60 epochs (docs/results.md).
                               Recipe(45, 128, "sgd", 0.1, "cosine", warmup_epochs=3, label_smoothing=0.1,
                                      plain_epochs=6),
                               min_size=8, reparam=True),
    "photo-cnn": ModelInfo(photo_cnn, (64, 64, 3), "Conv-BN-ReLU-Pool 32-64-128-256, global pooling, dropout "
                           "(own photos)", Recipe(30, 32, "adamw", 2e-3, "cosine", warmup_epochs=2,
                                                  weight_decay=5e-4, label_smoothing=0.1), min_size=16),
}


# The recipe of an own-image folder fits the folder. Below SMALL_FOLDER training images ResNet-8's
# BatchNorm statistics do not settle in the steps available and it trained to chance (10.1% on 812
# digits): the plain cifar-cnn, no BatchNorm, learns them; grayscale folders take mnist-cnn, one channel, and
# photos photo-cnn, whose BatchNorm settles in its 30 epochs of at least 50 steps.
SMALL_FOLDER = 5_000
# Batches small enough for this many optimizer steps per epoch: a schedule in steps, not epochs, is
# what a small folder needs (812 images at batch 128 are 7 steps an epoch).
MIN_STEPS_PER_EPOCH = 50
MIN_BATCH = 16
# Photos (shorter side at least PHOTO_SIDE) train at PHOTO_SIZE: 32x32 throws most of a photo away.
PHOTO_SIDE, PHOTO_SIZE = 128, "64x64"


def folder_defaults(survey: dict, model: str | None = None) -> dict:
    """{model, image_size, batch_size, augment: (value, why)} for a folder the survey describes (folders.survey);
    a model the user chose keeps its own recipe but gets the batch and size rules."""
    n, out = survey["train_images"], {}
    photos = survey["median_side"] >= PHOTO_SIDE
    if model is None:
        if survey["grayscale"]:
            model, why = "mnist-cnn", "grayscale images"
        elif n < SMALL_FOLDER:
            model, why = ("photo-cnn", f"fewer than {SMALL_FOLDER:,} photos") if photos else (
                "cifar-cnn", f"fewer than {SMALL_FOLDER:,} training images")
        else:
            model, why = "cifar-resnet8", f"{n:,} training images"
        out["model"] = (model, f"{model} for {why}")
    batch = max(MIN_BATCH, min(MODELS[model].recipe.batch_size, n // MIN_STEPS_PER_EPOCH))
    out["batch_size"] = (batch, f"batch {batch} for at least {MIN_STEPS_PER_EPOCH} steps an epoch over {n:,} "
                                "training images")
    if survey["grayscale"]:
        # The folder augmentation flips horizontally: a mirrored digit, letter or symbol is another shape
        # (812 digits: 75% test accuracy with it, 98.9% validation without).
        out["augment"] = (False, "no augmentation for grayscale images (flips mirror digits and text)")
    if photos:
        out["image_size"] = (PHOTO_SIZE, f"{PHOTO_SIZE} for photos of {survey['median_side']} px")
    return out


def build_model(name: str, input_shape, classes: int, expand: bool = False):
    """The zoo model `name`; with `expand`, built for training with --reparam's branches."""
    return MODELS[name].build(tuple(input_shape), classes, **({"expand": True} if expand else {}))


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
