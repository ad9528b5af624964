"""BuildConfig: every choice a build makes, validated once, saved as JSON beside the artifacts."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# INPUT_RANGES: what a model's input expects, as uint8 pixel * scale + offset. A user's model that starts
# with a Rescaling or Normalization layer takes raw pixels ("0,255"); the zoo trains on "0,1". One table
# for the build and the device runner's --input-range.
from device.foreign import INPUT_RANGES
from pipeline.failures import InputError

# Order matters: reports list variants in this order, smallest change from the baseline first.
VARIANTS = ("fp32", "dynamic", "float16", "int8", "int16x8")
# uint8 is what TFLite Model Maker exported and what MediaPipe Tasks accepts as a quantized input.
INT8_IO = ("int8", "uint8", "float")
FALLBACKS = ("none", "auto")
MAX_SEED = 2**32 - 1  # numpy's legacy generator, which keras.utils.set_random_seed seeds, takes no more


def default_threads() -> tuple[int, ...]:
    """1 and min(4, cores): a Raspberry Pi has 4 cores, and 64 threads on a big host says nothing about it."""
    return tuple(sorted({1, min(4, os.cpu_count() or 1)}))


class ConfigError(InputError, ValueError):
    """An invalid option value; the message names the option and what would be valid."""


def resolve_variants(requested) -> tuple[str, ...]:
    """`all` or any subset, always with the fp32 baseline, in canonical order."""
    wanted = set(requested)
    if "all" in wanted:
        wanted = set(VARIANTS)
    unknown = wanted - set(VARIANTS)
    if unknown:
        raise ConfigError(f"--quantize: unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)} or all")
    wanted.add("fp32")
    return tuple(v for v in VARIANTS if v in wanted)


class _Derived(type):
    """`BuildConfig(...)` works out what was left to the defaults (the dataset's model, the model's recipe,
    the folder's fit, the run directory) before the frozen instance exists, so no field is ever changed
    after it: construction takes what it is given, derives the rest, then validates the whole."""

    def __call__(cls, **given):
        return super().__call__(**derive(given))


@dataclass(frozen=True)
class BuildConfig(metaclass=_Derived):
    dataset: str = "mnist"
    model: str | None = None  # None: the dataset's default model
    data_dir: str | None = None
    image_size: str | None = None  # "HxW"; None: the dataset's standard size (32x32 for a folder)
    quantize: tuple[str, ...] = ("int8",)
    # The training recipe: None takes the model's default (models.MODELS[...].recipe).
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    learning_rate: float | None = None
    lr_schedule: str | None = None
    warmup_epochs: int | None = None
    weight_decay: float | None = None
    label_smoothing: float | None = None
    ema: float | None = None
    reparam: bool | None = None
    sam: float | None = None
    plain_epochs: int | None = None
    augment: bool | None = None  # None: on for CIFAR and image folders, off for digits
    calibration_samples: int = 300
    validation_fraction: float = 0.1
    seed: int = 0
    int8_io: str = "int8"
    input_range: str | None = None  # None: read from the --keras-model, else "0,1"
    keras_model: str | None = None
    # Set, not given: why the folder's model, image size and batch were chosen (models.folder_defaults).
    folder_defaults: str | None = None
    tensorboard: str | None = None
    out: str = ""  # the run directory; empty: artifacts/<model or --keras-model file stem>-<dataset>
    # Evaluation and benchmark.
    evaluate: bool = True
    benchmark: bool = True
    bench_runs: int = 200
    bench_warmup: int = 20
    threads: tuple[int, ...] = ()  # empty: default_threads()
    xnnpack: bool = True
    cross_check: bool = False
    max_accuracy_drop: float | None = None
    # Accuracy guard.
    analyze: bool = False
    fallback: str = "none"
    qat: bool = False

    def __post_init__(self):
        """Checks only: every default was derived before the instance was made (see derive)."""
        from pipeline.data import DATASETS
        from pipeline.models import MODELS, OPTIMIZERS, SCHEDULES

        height, width = self.input_shape[:2]
        self._check_model_fits(MODELS, DATASETS[self.dataset].input_shape[-1], height, width)
        for name, low in (("epochs", 1), ("batch_size", 1), ("calibration_samples", 1), ("bench_runs", 1),
                          ("bench_warmup", 0), ("warmup_epochs", 0), ("plain_epochs", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"--{name.replace('_', '-')}: got {value!r}, expected an integer >= {low}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed: got {self.seed!r}, expected an integer from 0 to {MAX_SEED}")
        if any(t < 1 for t in self.threads):
            raise ConfigError(f"--threads: got {list(self.threads)}, expected integers >= 1")
        if not 0.0 < self.validation_fraction < 0.5:
            raise ConfigError(f"validation_fraction: got {self.validation_fraction}, expected between 0 and 0.5")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer: got '{self.optimizer}', expected one of {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"--lr-schedule: got '{self.lr_schedule}', expected one of {', '.join(SCHEDULES)}")
        if not 0 < self.learning_rate <= 10:
            raise ConfigError(f"--learning-rate: got {self.learning_rate}, expected a number in (0, 10]")
        if not 0 <= self.weight_decay < 1 or not 0 <= self.label_smoothing < 1 or not 0 <= self.ema < 1:
            raise ConfigError(f"--weight-decay / --label-smoothing / --ema: got {self.weight_decay} / "
                              f"{self.label_smoothing} / {self.ema}, expected numbers in [0, 1)")
        if self.plain_epochs > self.epochs:
            raise ConfigError(f"--plain-epochs: got {self.plain_epochs}, expected at most --epochs ({self.epochs})")
        if not 0 <= self.sam < 1:
            raise ConfigError(f"--sam: got {self.sam}, expected a radius in [0, 1), e.g. 0.05; 0 for plain steps")
        if self.reparam and (self.keras_model or not MODELS[self.model].reparam):
            able = [name for name, info in MODELS.items() if info.reparam]
            raise ConfigError(f"--reparam: {self.model_name} is not built with folding branches; "
                              f"use it with --model {' or '.join(able)}, or drop --reparam")
        if self.int8_io not in INT8_IO:
            raise ConfigError(f"--int8-io: got '{self.int8_io}', expected one of {', '.join(INT8_IO)}")
        if self.input_range is not None and self.input_range not in INPUT_RANGES:
            raise ConfigError(f"--input-range: got '{self.input_range}', expected one of {', '.join(INPUT_RANGES)}")
        if self.fallback not in FALLBACKS:
            raise ConfigError(f"--fallback: got '{self.fallback}', expected one of {', '.join(FALLBACKS)}")
        if self.max_accuracy_drop is not None and not self.max_accuracy_drop >= 0:
            raise ConfigError(f"--max-accuracy-drop: got {self.max_accuracy_drop}, expected percentage points >= 0")
        if self.fallback == "auto" and self.max_accuracy_drop is None:
            raise ConfigError("--fallback auto needs --max-accuracy-drop PP: the accuracy the guard may lose")

    def _check_model_fits(self, models, channels: int, height: int, width: int) -> None:
        """Said before any data is read or training starts: which zoo models take these images."""
        info = models[self.model]
        if self.dataset != "folder" and info.channels != channels:
            fitting = [m for m, i in models.items() if i.channels == channels]
            raise ConfigError(f"--model: '{self.model}' takes {info.channels}-channel images but '{self.dataset}' "
                              f"has {channels}; choose from {', '.join(fitting)}")
        if min(height, width) < info.min_size:
            raise ConfigError(f"--model: '{self.model}' needs images of at least {info.min_size}x{info.min_size}, "
                              f"but they are {height}x{width}; raise --image-size or pick another --model")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of the images this build trains on; a folder takes the model's channels."""
        from pipeline.data import DATASETS
        from pipeline.models import MODELS

        standard = DATASETS[self.dataset].input_shape
        height, width = parse_image_size(self.image_size) if self.image_size else standard[:2]
        return height, width, MODELS[self.model].channels if self.dataset == "folder" else standard[2]

    @property
    def model_name(self) -> str:
        """What reports call the model: the user's file for --keras-model, else the zoo model."""
        return Path(self.keras_model).name if self.keras_model else self.model

    @property
    def guarded(self) -> bool:
        """Whether the guard stage runs: it analyses, repairs or fine-tunes the int8 model."""
        return self.analyze or self.fallback == "auto" or self.qat

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["quantize"], d["threads"] = list(self.quantize), list(self.threads)
        # Saved for --resume and `pipeline analyze`, which may run in another folder, where a relative path names
        # another file or none; the messages of this build keep the path as the user typed it.
        for key in ("data_dir", "keras_model", "tensorboard"):
            if d[key]:
                d[key] = os.path.abspath(os.path.expanduser(d[key]))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BuildConfig:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        for k in ("quantize", "threads"):
            if k in kwargs:
                kwargs[k] = tuple(kwargs[k])
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def derive(given: dict) -> dict:
    """The constructor's arguments with every default worked out: the dataset's model, the image size as
    HxW, the folder's fit, the model's recipe, augmentation, the variants with fp32, threads, the run
    directory. Deriving an already derived configuration (a saved one) changes nothing."""
    from pipeline.data import DATASETS
    from pipeline.models import MODELS

    cfg = {f.name: f.default for f in fields(BuildConfig)} | given
    if cfg["dataset"] not in DATASETS:
        raise ConfigError(f"--dataset: unknown '{cfg['dataset']}'; choose from {', '.join(DATASETS)}")
    cfg |= _fit_folder(cfg)
    model = cfg["model"] or DATASETS[cfg["dataset"]].default_model
    if model not in MODELS:
        raise ConfigError(f"--model: unknown '{model}'; choose from {', '.join(MODELS)}")
    cfg["model"] = model
    cfg["image_size"] = _image_size(cfg["image_size"], cfg["dataset"], DATASETS[cfg["dataset"]].input_shape)
    recipe = MODELS[model].recipe
    for name in ("epochs", "batch_size", "optimizer", "learning_rate", "lr_schedule", "warmup_epochs",
                 "weight_decay", "label_smoothing", "ema", "reparam", "sam"):
        if cfg[name] is None:
            cfg[name] = getattr(recipe, name if name != "lr_schedule" else "schedule")
    if cfg["plain_epochs"] is None:  # --epochs 4 must not inherit a tail of 6
        cfg["plain_epochs"] = recipe.plain_for(cfg["epochs"])
    if cfg["augment"] is None:
        from pipeline.data.augment import default_augment

        cfg["augment"] = default_augment(cfg["dataset"])
    cfg["quantize"] = resolve_variants(cfg["quantize"])
    # A count given twice would be measured twice, the first measurement dropped unseen.
    cfg["threads"] = tuple(dict.fromkeys(cfg["threads"])) or default_threads()
    if not cfg["out"]:  # a user's own model is named after its file, not after a zoo model it may not be
        base = Path(cfg["keras_model"]).stem if cfg["keras_model"] else model
        cfg["out"] = str(Path("artifacts") / f"{base}-{cfg['dataset']}")
    return cfg


def _fit_folder(cfg: dict) -> dict:
    """An own-image folder's model, image size, batch size and augmentation, where not given, chosen to fit it."""
    if cfg["dataset"] != "folder" or not cfg["data_dir"] or cfg["keras_model"] or cfg["folder_defaults"] or \
            (cfg["model"] and cfg["image_size"] and cfg["batch_size"] and cfg["augment"] is not None):
        return {}
    from pipeline.data.folders import survey
    from pipeline.models import folder_defaults

    found = survey(Path(cfg["data_dir"]).expanduser())
    if found is None:
        return {}
    chosen = folder_defaults(found, cfg["model"])
    applied = {name: chosen[name][0] for name in chosen if cfg[name] is None}
    if applied:
        applied["folder_defaults"] = ", ".join(chosen[name][1] for name in applied)
    return applied


def _image_size(text: str | None, dataset: str, standard: tuple[int, int, int]) -> str | None:
    if text is None:
        return None
    height, width = parse_image_size(text)
    if dataset in FIXED_SIZE and (height, width) != standard[:2]:
        raise ConfigError(f"--image-size: {dataset} images are {standard[0]}x{standard[1]} and are not "
                          f"resized; --image-size applies to image folders (--dataset folder or cifar10 "
                          f"JPEGs), drop it")
    return f"{height}x{width}"


FIXED_SIZE = ("mnist", "digits")  # array formats with one image size; only image files are resized
IMAGE_SIZE_RANGE = (8, 512)


def parse_image_size(text: str) -> tuple[int, int]:
    """'32x32' (or '32') to (height, width), within IMAGE_SIZE_RANGE."""
    import re

    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(text))
    low, high = IMAGE_SIZE_RANGE
    if not match:
        raise ConfigError(f"--image-size: got '{text}', expected HEIGHTxWIDTH in pixels such as 32x32")
    height, width = int(match[1]), int(match[2] or match[1])
    if not (low <= height <= high and low <= width <= high):
        raise ConfigError(f"--image-size: got {height}x{width}, expected each side between {low} and {high} pixels "
                          f"(small models for edge devices train on 28x28 to 96x96)")
    return height, width

