"""BuildConfig: every choice a build makes, validated once, saved as JSON beside the artifacts."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# Order matters: reports list variants in this order, smallest change from the baseline first.
VARIANTS = ("fp32", "dynamic", "float16", "int8", "int16x8")
INT8_IO = ("int8", "float")
FALLBACKS = ("none", "auto")


class ConfigError(ValueError):
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


@dataclass(frozen=True)
class BuildConfig:
    dataset: str = "mnist"
    model: str | None = None  # None: the dataset's default model
    data_dir: str | None = None
    quantize: tuple[str, ...] = ("int8",)
    epochs: int = 5
    batch_size: int = 64
    calibration_samples: int = 300
    validation_fraction: float = 0.1
    seed: int = 0
    int8_io: str = "int8"
    keras_model: str | None = None
    tensorboard: str | None = None
    out: str = ""  # the run directory; empty: artifacts/<model or --keras-model file stem>-<dataset>
    # Evaluation and benchmark.
    evaluate: bool = True
    benchmark: bool = True
    bench_runs: int = 200
    bench_warmup: int = 20
    threads: tuple[int, ...] = ()  # empty: 1 and all cores
    xnnpack: bool = True
    cross_check: bool = False
    max_accuracy_drop: float | None = None
    # Accuracy guard.
    analyze: bool = False
    fallback: str = "none"
    qat: bool = False

    def __post_init__(self):
        from pipeline.data import DATASETS
        from pipeline.models import MODELS

        if self.dataset not in DATASETS:
            raise ConfigError(f"--dataset: unknown '{self.dataset}'; choose from {', '.join(DATASETS)}")
        model = self.model or DATASETS[self.dataset].default_model
        if model not in MODELS:
            raise ConfigError(f"--model: unknown '{model}'; choose from {', '.join(MODELS)}")
        if MODELS[model].input_shape != DATASETS[self.dataset].input_shape:
            fitting = [m for m, info in MODELS.items() if info.input_shape == DATASETS[self.dataset].input_shape]
            raise ConfigError(f"--model: '{model}' takes {MODELS[model].input_shape} images but '{self.dataset}' "
                              f"has {DATASETS[self.dataset].input_shape}; choose from {', '.join(fitting)}")
        _set(self, "model", model)
        _set(self, "quantize", resolve_variants(self.quantize))
        _set(self, "threads", tuple(self.threads) or tuple(sorted({1, os.cpu_count() or 1})))
        for name, low in (("epochs", 1), ("batch_size", 1), ("calibration_samples", 1), ("bench_runs", 1),
                          ("bench_warmup", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"--{name.replace('_', '-')}: got {value!r}, expected an integer >= {low}")
        if any(t < 1 for t in self.threads):
            raise ConfigError(f"--threads: got {list(self.threads)}, expected integers >= 1")
        if not 0.0 < self.validation_fraction < 0.5:
            raise ConfigError(f"validation_fraction: got {self.validation_fraction}, expected between 0 and 0.5")
        if self.int8_io not in INT8_IO:
            raise ConfigError(f"--int8-io: got '{self.int8_io}', expected one of {', '.join(INT8_IO)}")
        if self.fallback not in FALLBACKS:
            raise ConfigError(f"--fallback: got '{self.fallback}', expected one of {', '.join(FALLBACKS)}")
        if self.max_accuracy_drop is not None and not self.max_accuracy_drop >= 0:
            raise ConfigError(f"--max-accuracy-drop: got {self.max_accuracy_drop}, expected percentage points >= 0")
        if self.fallback == "auto" and self.max_accuracy_drop is None:
            raise ConfigError("--fallback auto needs --max-accuracy-drop PP: the accuracy the guard may lose")
        if not self.out:  # a user's own model is named after its file, not after a zoo model it may not be
            base = Path(self.keras_model).stem if self.keras_model else model
            _set(self, "out", str(Path("artifacts") / f"{base}-{self.dataset}"))

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["quantize"], d["threads"] = list(self.quantize), list(self.threads)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BuildConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        for k in ("quantize", "threads"):
            if k in kwargs:
                kwargs[k] = tuple(kwargs[k])
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _set(cfg, name, value):
    # Resolving defaults inside a frozen dataclass: the one place mutation is allowed.
    object.__setattr__(cfg, name, value)

