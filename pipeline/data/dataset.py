"""The types every data module shares: the one-line DataError, the preprocessing a model expects, the
Dataset every stage reads, a registry entry, and the hash of a dataset's pixels and labels."""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from pipeline.failures import InputError


class DataError(InputError):
    """A user's data problem. str(e) is ONE line: what happened, what was expected, how to fix it."""

    def __init__(self, message: str):
        # Reasons quoted from gzip, pickle or Keras can span lines; the CLI prints exactly one.
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class PreprocessSpec:
    height: int
    width: int
    channels: int
    labels: tuple[str, ...]
    scale: float = 1 / 255  # model_input = uint8_pixel * scale + offset
    offset: float = 0.0
    layout: str = "NHWC"
    color: str | None = None  # "grayscale" or "rgb"; None derives it from channels
    resize: str = "bilinear"  # Pillow filter that brings any photo to height x width, as in training

    def __post_init__(self):
        # Frozen, so normalise through object.__setattr__: labels may arrive as a JSON list.
        object.__setattr__(self, "labels", tuple(self.labels))
        implied = {1: "grayscale", 3: "rgb"}.get(self.channels)
        if self.color is None:
            object.__setattr__(self, "color", implied)
        if self.layout != "NHWC" or implied is None or self.color != implied:
            raise ValueError(f"inconsistent preprocessing: {self.layout} with {self.channels} channel(s) "
                             f"and color {self.color!r}; expected NHWC, 1 channel grayscale or 3 channels rgb")

    def to_dict(self) -> dict:
        return {**asdict(self), "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, d) -> PreprocessSpec:
        # Unknown keys are skipped so that metadata written by a newer edgepipe still loads.
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays with == is ambiguous
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    spec: PreprocessSpec
    source: dict


# What every loader returns: source kind, checked (images, labels) for train and for test, files read.
Loaded = tuple[str, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], list]


@dataclass(frozen=True)
class DatasetInfo:
    description: str
    input_shape: tuple[int, int, int]
    labels: tuple[str, ...]
    default_model: str
    loader: Callable[[DatasetInfo, Path | None, Callable], Loaded]  # (info, data_dir, log)
    offline: str = ""  # the files --data-dir may hold, as error messages quote it

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec(*self.input_shape, labels=self.labels)


def sample_indices(y: np.ndarray, count: int) -> list[int]:
    """Test images across classes: the first of each class, then the second, and so on, classes in the
    order they first appear (a test split sorted by class, as image folders are, would otherwise give
    eight of the first class; the first test image stays the first sample)."""
    y = np.asarray(y).reshape(-1)
    classes, first = np.unique(y, return_index=True)
    members = [np.flatnonzero(y == c) for c in classes[np.argsort(first)]]
    order = [int(m[k]) for k in range(max(map(len, members), default=0)) for m in members if k < len(m)]
    return order[:count]


def _arrays_sha256(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        # dtype and shape go in too, so that differently shaped arrays with equal bytes differ.
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(np.ascontiguousarray(a))
    return h.hexdigest()
