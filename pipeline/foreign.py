"""Models edgepipe did not make: legacy Keras files, and the input convention of a model that does not say.

A user's model carries no record of how its training images were scaled. A model that starts with a
Rescaling or Normalization layer takes raw pixels; any other is tried on a slice of the validation split
under each convention (0..1, -1..1, 0..255) before anything is trained or converted, because a model
fed the wrong range scores at chance and every figure after it would be silently wrong.
"""
from __future__ import annotations

import ast
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from pipeline.config import INPUT_RANGES

DETECT_IMAGES = 500  # validation images each convention is scored on: a few seconds for a small model
CLEAR_MARGIN = 0.10  # the best convention must beat the next by this much (accuracy) to be chosen
CHANCE_MARGIN = 0.05  # "at chance": within this of 1/classes
FAR_BELOW = 0.30  # a given range this far below the best convention is warned about too


class LegacyModelError(ValueError):
    """A Keras file neither Keras 3 nor tf_keras can turn into a Keras 3 model; the message says how to re-save it."""


# ---------------------------------------------------------------- legacy .h5 files

def load_legacy_h5(path: Path, error: Exception, log=print):
    """A tf.keras 2 HDF5 model as a Keras 3 model, or LegacyModelError in one line.

    Keras 3 refuses arguments tf.keras 2 wrote that it no longer has (DepthwiseConv2D's `groups`).
    tf_keras (installed for QAT) reads the file as it was written; the Keras 3 model is rebuilt from
    the same file without those arguments and kept only if it computes what tf_keras's model does.
    """
    path = Path(path)
    what = _h5_description(path)
    resave = (f"re-save it with Keras 3: rebuild the architecture, model.load_weights('{path.name}'), "
              "model.save('model.keras'), and pass that file")
    try:
        import tf_keras
    except ImportError:
        raise LegacyModelError(f"--keras-model {path}: {what} that Keras 3 cannot read ({_first_line(error)}) "
                               f"and tf_keras is not installed to read it; {resave}")
    try:
        reference = tf_keras.models.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001 - any failure of the legacy loader means the same to the user
        raise LegacyModelError(f"--keras-model {path}: {what} that neither Keras 3 ({_first_line(error)}) nor "
                               f"tf_keras ({_first_line(e)}) can read; {resave}")
    model, dropped = _rebuild(path)
    if model is None:
        raise LegacyModelError(f"--keras-model {path}: {what}; tf_keras reads it but Keras 3 cannot rebuild it "
                               f"({_first_line(error)}); {resave}")
    x = np.random.default_rng(0).uniform(0, 1, (4, *reference.input_shape[1:])).astype(np.float32)
    diff = float(np.abs(np.asarray(reference(x, training=False)) - np.asarray(model(x, training=False))).max())
    if diff > 1e-4:
        raise LegacyModelError(f"--keras-model {path}: {what}; rebuilt in Keras 3 without {_said(dropped)} it "
                               f"computes something else (max difference {diff:.2g}); {resave}")
    log(f"model: {path.name} is {what}; read with tf_keras {tf_keras.__version__} and rebuilt in Keras 3 "
        f"without {_said(dropped)} (outputs agree to {diff:.1g})")
    return model


def _rebuild(path: Path):
    """(Keras 3 model, {layer class: dropped arguments}) from a copy of the file with those arguments
    removed from its stored config, or (None, ...) when Keras 3 fails for another reason."""
    import h5py
    import keras

    dropped: dict[str, set] = {}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        shutil.copyfile(path, copy)
        for _ in range(20):
            try:
                return keras.models.load_model(copy, compile=False), dropped
            except TypeError as e:
                found = re.search(r"Unrecognized keyword arguments passed to (\w+): (\{.*?\})", str(e))
                if not found:
                    return None, dropped
                cls, keys = found[1], set(ast.literal_eval(found[2]))
                with h5py.File(copy, "r+") as f:
                    config = json.loads(f.attrs["model_config"])
                    if not _strip(config, cls, keys):
                        return None, dropped
                    f.attrs["model_config"] = json.dumps(config)
                dropped.setdefault(cls, set()).update(keys)
            except (OSError, ValueError):
                return None, dropped
    return None, dropped


def _strip(node, cls: str, keys: set) -> bool:
    """Remove `keys` from the config of every `cls` layer in a stored model config; True if any was."""
    changed = False
    if isinstance(node, dict):
        if node.get("class_name") == cls and isinstance(node.get("config"), dict):
            for k in keys & set(node["config"]):
                del node["config"][k]
                changed = True
        for v in node.values():
            changed |= _strip(v, cls, keys)
    elif isinstance(node, list):
        for v in node:
            changed |= _strip(v, cls, keys)
    return changed


def _h5_description(path: Path) -> str:
    try:
        import h5py

        with h5py.File(path, "r") as f:
            version, backend = f.attrs.get("keras_version"), f.attrs.get("backend")
    except (ImportError, OSError):
        return "an HDF5 file"
    return f"a Keras {version or '(unknown version)'} HDF5 model" + (f" ({backend} backend)" if backend else "")


def _said(dropped: dict) -> str:
    return ", ".join(f"{cls}({', '.join(sorted(keys))})" for cls, keys in sorted(dropped.items())) or "changes"


def _first_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return (text[:160] + "...") if len(text) > 160 else text or type(e).__name__


# ---------------------------------------------------------------- the input convention

def detect_input_range(model, x: np.ndarray, y: np.ndarray, given: str | None) -> dict:
    """Score `model` on uint8 images `x` under each convention; the range to use and why.

    Returns {"range", "source": "given" | "detected" | "default", "scores": {range: accuracy},
    "images", "warning": a sentence or None}.
    """
    n = min(DETECT_IMAGES, len(x))
    # Spread over the whole split: a split read from class folders is in class order, and its first images, all of
    # one class, let a model that answers that class for everything score 98% under the wrong range.
    pick = np.linspace(0, len(x) - 1, n).round().astype(int)
    x, y = x[pick], np.asarray(y).reshape(-1)[pick]
    classes = int(model.outputs[0].shape[-1])
    scores = {}
    for name, (scale, offset) in INPUT_RANGES.items():
        probs = model.predict(x.astype(np.float32) * np.float32(scale) + np.float32(offset), batch_size=256,
                              verbose=0)
        scores[name] = float((np.asarray(probs).argmax(axis=1) == y).mean())
    ranked = sorted(scores, key=scores.get, reverse=True)
    best = ranked[0]
    chance = 1.0 / classes
    clear = scores[best] - scores[ranked[1]] >= CLEAR_MARGIN and scores[best] > chance + CHANCE_MARGIN
    out = {"scores": scores, "images": n, "warning": None}
    if given is not None:
        out.update(range=given, source="given")
        at_chance = scores[given] <= chance + CHANCE_MARGIN
        if clear and best != given and (at_chance or scores[best] - scores[given] >= FAR_BELOW):
            out["warning"] = (f"--input-range {given} scores {_pct(scores[given])} on {n} validation images, "
                              f"{f'at chance (1 in {classes})' if at_chance else 'far below the best'}, but {best} "
                              f"scores {_pct(scores[best])}; pass --input-range {best} if that is how the model "
                              "was trained")
        return out
    # A model that scores as well under the default 0..1 as under the best (a ReLU network without
    # normalization barely cares about scale) keeps the default: it is as right as any.
    default_fits = scores["0,1"] >= scores[best] - CLEAR_MARGIN and scores["0,1"] > chance + CHANCE_MARGIN
    chosen = best if clear else "0,1"
    out.update(range=chosen, source="detected" if clear or default_fits else "default")
    if out["source"] == "default":
        out["warning"] = (f"no input range is clearly best on {n} validation images ({describe_scores(scores)}); "
                          "assuming 0,1: pass --input-range to choose")
    return out


def describe_scores(scores: dict) -> str:
    return ", ".join(f"{_pct(acc)} with {name}" for name, acc in sorted(scores.items(), key=lambda kv: -kv[1]))


def range_name(scale: float, offset: float) -> str | None:
    """'0,255' and the like for a preprocessing (scale, offset), None for one outside the table."""
    for name, (s, o) in INPUT_RANGES.items():
        if abs(s - scale) < 1e-9 and abs(o - offset) < 1e-9:
            return name
    return None


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"
