"""The search space: the zoo's families made parametric, as named presets.

A candidate is one architecture at one input resolution; the quantization variants that compete are
chosen on the command line. The builders are the zoo's own (pipeline/models.py) with their width and
depth opened up, so a searched model is a zoo model with other numbers, not a copy of one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.config import FIXED_SIZE


@dataclass(frozen=True)
class Candidate:
    family: str  # a key of FAMILIES
    width: float  # multiplier of the zoo model's filters (resnet: of its 16 first-stack filters)
    depth: int  # Conv-Pool stages (cnn), residual blocks per stack (resnet); dscnn has a fixed depth, recorded as 0
    resolution: int  # input height and width in pixels

    @property
    def id(self) -> str:
        depth = f"-d{self.depth}" if self.depth else ""
        return f"{self.family}-w{self.width:g}{depth}-r{self.resolution}"

    def to_dict(self) -> dict:
        return {"id": self.id, **asdict(self)}

    @classmethod
    def parse(cls, text: str) -> Candidate:
        family, *parts = text.split("-")
        values = {p[0]: p[1:] for p in parts}
        family, depth = RENAMED.get(family, (family, int(values.get("d", 0))))
        return cls(family, float(values["w"]), depth, int(values["r"]))

    def build(self, channels: int, classes: int):
        """The untrained Keras model of this candidate."""
        return FAMILIES[self.family][0](self, (self.resolution, self.resolution, channels), classes)

    @property
    def keras_file(self) -> str:
        """The file name the pick's trained model is saved under. A build names a model after its .keras file in
        the TFLite metadata it embeds, so feasibility embeds this name too: the bytes it checks against
        --max-size-kb are the bytes the pick's run delivers."""
        return f"{_keras_name(self)}.keras"

    def zoo_model(self, channels: int) -> str:
        """The zoo model this candidate opens up (of its family's, the one for `channels`), whose default recipe
        trains the pick for the rest of the budget."""
        from pipeline.models import MODELS

        names = FAMILIES[self.family][3]
        return next((n for n in names if MODELS[n].channels == channels), names[-1])


# Families an older search folder names, as they are called now: a search started before the ResNet family
# opened up its depth still resumes (its ids stay as written; each builds the same network).
RENAMED = {"resnet8": ("resnet", 1)}


def _keras_name(c: Candidate) -> str:
    return c.id.replace("-", "_").replace(".", "p")


def _cnn(c: Candidate, input_shape, classes):
    from pipeline.models import _conv_pool_net

    filters = [max(8, int(round(32 * c.width * 2 ** i))) for i in range(c.depth)]
    return _conv_pool_net(input_shape, classes, max(16, int(round(64 * c.width))), _keras_name(c), filters)


def _dscnn(c: Candidate, input_shape, classes):
    from pipeline.models import cifar_dscnn

    return cifar_dscnn(input_shape, classes, width=c.width, name=_keras_name(c))


def _resnet(c: Candidate, input_shape, classes):
    from pipeline.models import cifar_resnet8

    return cifar_resnet8(input_shape, classes, width=int(round(16 * c.width)), blocks=c.depth, name=_keras_name(c))


def _resnet2(c: Candidate, input_shape, classes):
    """ResNet-8 without its full-resolution stack: the 16-filter stem at the input's resolution, then two stacks at
    half and a quarter of it, of 32 and 48 filters times the width (ResNet's doubling would put most weights in
    the last stack; 1.5 leaves them for a wider first one). At width 1.25 (40 and 60 filters) it has ResNet-8's
    parameters at nine tenths of its int8 latency on an AVX-512 host, and learned faster in a search trial."""
    from pipeline.models import cifar_resnet8

    stacks = ((int(round(32 * c.width)), 2), (int(round(48 * c.width)), 2))
    return cifar_resnet8(input_shape, classes, width=16, blocks=c.depth, name=_keras_name(c), stacks=stacks)


def _mbconv(c: Candidate, input_shape, classes):
    """MobileNetV2's inverted residual blocks, MCUNet's and MicroNets' building block, which the zoo lacks: a 1x1
    expansion to 4x the channels, a depthwise 3x3, a linear 1x1 projection, a skip where the shape allows. A full
    3x3 stem at the input's resolution, then stages of 16, 24, 48 and 64 filters (times the width) at strides 1, 2,
    2, 1; `depth` blocks in the 24- and 48-filter stages, one in the others."""
    from keras import Input, Model, layers

    def bn(x, relu=True):
        x = layers.BatchNormalization()(x)
        return layers.ReLU(6.0)(x) if relu else x

    inputs = Input(input_shape)
    x = bn(layers.Conv2D(max(8, int(round(16 * c.width))), 3, padding="same", use_bias=False)(inputs))
    for filters, stride, blocks, expand in ((16, 1, 1, 1), (24, 2, c.depth, 4), (48, 2, c.depth, 4), (64, 1, 1, 4)):
        for i in range(blocks):
            channels, out = x.shape[-1], max(8, int(round(filters * c.width)))
            y = bn(layers.Conv2D(channels * expand, 1, use_bias=False)(x)) if expand > 1 else x
            y = bn(layers.DepthwiseConv2D(3, strides=stride if i == 0 else 1, padding="same", use_bias=False)(y))
            y = bn(layers.Conv2D(out, 1, use_bias=False)(y), relu=False)
            x = layers.Add()([x, y]) if y.shape[1:] == x.shape[1:] else y
    x = layers.GlobalAveragePooling2D()(x)
    return Model(inputs, layers.Dense(classes, activation="softmax")(x), name=_keras_name(c))


# family: (builder, the zoo model it opens up, the smallest resolution it takes, those zoo models' names)
FAMILIES = {
    "cnn": (_cnn, "mnist-cnn / cifar-cnn (Conv-Pool stages, then Dense)", 10, ("mnist-cnn", "cifar-cnn")),
    "dscnn": (_dscnn, "cifar-dscnn (MobileNet-style depthwise-separable blocks)", 8, ("cifar-dscnn",)),
    "resnet": (_resnet, "cifar-resnet8 (MLPerf Tiny's ResNet-8; 2 and 3 blocks per stack: ResNet-14 and -20)", 8,
               ("cifar-resnet8",)),
    # Not zoo models: trained in the final training with their nearest zoo model's recipe.
    "resnet2": (_resnet2, "none: ResNet-8 without its full-resolution stack, the two others wider", 8,
                ("cifar-resnet8",)),
    "mbconv": (_mbconv, "none: MobileNetV2 inverted residuals (expansion 4), MCUNet's and MicroNets' blocks", 8,
               ("cifar-dscnn",)),
}


@dataclass(frozen=True)
class Space:
    """Per family: the widths, depths and resolutions (as fractions of the dataset's size) to combine."""
    description: str
    families: dict  # family -> {"width": [...], "depth": [...]}
    resolutions: tuple[float, ...]  # fractions of the dataset's standard side; fixed-size datasets keep 1.0

    def candidates(self, dataset: str, side: int) -> list[Candidate]:
        """Every candidate, in a stable order (the search's seed then means the same sequence of trials)."""
        fractions = (1.0,) if dataset in FIXED_SIZE else self.resolutions
        sides = sorted({max(8, int(round(side * f))) for f in fractions}, reverse=True)
        out = []
        for family, axes in self.families.items():
            for width in axes["width"]:
                for depth in axes.get("depth", [0]):
                    for r in sides:
                        if r >= FAMILIES[family][2]:
                            out.append(Candidate(family, float(width), int(depth), r))
        return out

    def to_dict(self, dataset: str, side: int) -> dict:
        return {"description": self.description, "families": {f: {**axes, "opens_up": FAMILIES[f][1]}
                                                               for f, axes in self.families.items()},
                "resolution_fractions": list(self.resolutions),
                "resolutions_note": (f"{dataset} images have one size and are not resized" if dataset in FIXED_SIZE
                                     else "images are resized to each resolution before training"),
                "candidates": [c.id for c in self.candidates(dataset, side)]}


SPACES = {
    # ResNet-14 and -20 cost more per parameter than ResNet-8 on an AVX-512 host (ResNet-20 at 8 filters: 70 K
    # parameters, 0.050 ms int8, ResNet-8's 79 K 0.037 ms), so under ResNet-8's own budgets phase (a) drops them
    # untrained; a board with room for 150-270 K parameters gets them in its search.
    "default": Space("the zoo's three families (widths 0.25-1, CNN depth 1-3, ResNet-8/14/20), ResNet-8 without its "
                     "full-resolution stack (widths 1-1.25, 1-2 blocks a stack) and MobileNetV2's inverted residuals "
                     "(widths 0.5-1, 1-2 blocks a stage), two resolutions",
                     {"cnn": {"width": [0.25, 0.5, 1.0], "depth": [1, 2, 3]},
                      "dscnn": {"width": [0.25, 0.5, 1.0]},
                      "resnet": {"width": [0.5, 1.0], "depth": [1, 2, 3]},
                      "resnet2": {"width": [1.0, 1.25], "depth": [1, 2]},
                      "mbconv": {"width": [0.5, 1.0], "depth": [1, 2]}},
                     (1.0, 0.75)),
    "small": Space("a quick look: narrow CNNs and depthwise nets",
                   {"cnn": {"width": [0.25, 0.5], "depth": [1, 2]}, "dscnn": {"width": [0.25, 0.5]}},
                   (1.0, 0.75)),
    # Seconds per trial on the digits: for tests and for trying the command out.
    "tiny": Space("four candidates of very different cost, for trying the search out",
                  {"cnn": {"width": [0.25, 0.5], "depth": [1]}, "dscnn": {"width": [0.25]},
                   "resnet": {"width": [2.0], "depth": [1]}},
                  (1.0,)),
}
