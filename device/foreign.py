"""A model edgepipe did not make (no metadata.json beside it): what its input means and its labels.

In order: what the user says (--input-range, --labels); the model's own standard TFLite metadata
(normalization mean/std of the input image, the output's label file), which model zoos and
edgepipe's own models (pipeline/metadata.py) carry; else TFLite's convention for image models: a
uint8 input (quantized, or cast by the model itself) takes the raw pixel, an int8 input the
pixel - 128, and a float input is ambiguous (0..1 is assumed and said). The device has neither
TensorFlow nor the flatbuffers package, so the few metadata fields needed are read with a minimal
flatbuffer reader.
"""
from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import numpy as np

# uint8 pixel * scale + offset for each name; pipeline.config's --input-range takes the same names.
INPUT_RANGES = {"0,1": (1 / 255, 0.0), "-1,1": (2 / 255, -1.0), "0,255": (1.0, 0.0)}

# Field numbers (vtable slots) from tensorflow/lite/schema/schema.fbs and metadata_schema.fbs.
MODEL_BUFFERS, MODEL_METADATA = 4, 6
METADATA_NAME, METADATA_BUFFER = 0, 1
BUFFER_DATA = 0
MM_SUBGRAPHS = 3
SG_INPUTS, SG_OUTPUTS = 2, 3
TM_PROCESS_UNITS, TM_ASSOCIATED_FILES = 4, 6
PU_OPTIONS_TYPE, PU_OPTIONS = 0, 1
NORMALIZATION_OPTIONS = 1  # ProcessUnitOptions union tag
NORM_MEAN, NORM_STD = 0, 1
AF_NAME, AF_TYPE = 0, 2
TENSOR_AXIS_LABELS = 2  # AssociatedFileType


class _Table:
    """One flatbuffer table: fields by vtable slot, absent fields as None."""

    def __init__(self, buf: bytes, pos: int):
        self.buf, self.pos = buf, pos
        self.vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vtable_size = struct.unpack_from("<H", buf, self.vtable)[0]

    def _offset(self, slot: int) -> int:
        at = 4 + 2 * slot
        return struct.unpack_from("<H", self.buf, self.vtable + at)[0] if at < self.vtable_size else 0

    def scalar(self, slot: int, fmt: str, default=0):
        off = self._offset(slot)
        return struct.unpack_from("<" + fmt, self.buf, self.pos + off)[0] if off else default

    def _indirect(self, slot: int) -> int | None:
        off = self._offset(slot)
        if not off:
            return None
        at = self.pos + off
        return at + struct.unpack_from("<I", self.buf, at)[0]

    def table(self, slot: int) -> _Table | None:
        at = self._indirect(slot)
        return None if at is None else _Table(self.buf, at)

    def vector(self, slot: int) -> tuple[int, int]:
        """(position of the first element, length); (0, 0) when absent."""
        at = self._indirect(slot)
        return (0, 0) if at is None else (at + 4, struct.unpack_from("<I", self.buf, at)[0])

    def tables(self, slot: int) -> list[_Table]:
        start, n = self.vector(slot)
        out = []
        for i in range(n):
            at = start + 4 * i
            out.append(_Table(self.buf, at + struct.unpack_from("<I", self.buf, at)[0]))
        return out

    def string(self, slot: int) -> str | None:
        start, n = self.vector(slot)
        return None if not start else self.buf[start:start + n].decode("utf-8", "replace")

    def floats(self, slot: int) -> list[float]:
        start, n = self.vector(slot)
        return list(struct.unpack_from(f"<{n}f", self.buf, start)) if n else []


def read(model: bytes) -> dict | None:
    """{"mean": [...], "std": [...], "labels": [...] or None} from the model's TFLite metadata, or None
    when it has none (or it cannot be read: a damaged buffer is as good as no metadata)."""
    try:
        return _read(model)
    except (struct.error, IndexError, UnicodeDecodeError, ValueError):
        return None


def _read(model: bytes) -> dict | None:
    root = _Table(model, struct.unpack_from("<I", model, 0)[0])
    buffers = root.tables(MODEL_BUFFERS)
    for entry in root.tables(MODEL_METADATA):
        if entry.string(METADATA_NAME) == "TFLITE_METADATA":
            start, n = buffers[entry.scalar(METADATA_BUFFER, "I")].vector(BUFFER_DATA)
            if n:
                return _describe(model[start:start + n], model)
    return None


def _describe(meta: bytes, model: bytes) -> dict | None:
    root = _Table(meta, struct.unpack_from("<I", meta, 0)[0])
    subgraphs = root.tables(MM_SUBGRAPHS)
    if not subgraphs:
        return None
    out = {"mean": None, "std": None, "labels": None}
    inputs, outputs = subgraphs[0].tables(SG_INPUTS), subgraphs[0].tables(SG_OUTPUTS)
    for unit in inputs[0].tables(TM_PROCESS_UNITS) if inputs else []:
        if unit.scalar(PU_OPTIONS_TYPE, "B") == NORMALIZATION_OPTIONS:
            options = unit.table(PU_OPTIONS)
            out["mean"], out["std"] = options.floats(NORM_MEAN), options.floats(NORM_STD)
    for f in outputs[0].tables(TM_ASSOCIATED_FILES) if outputs else []:
        if f.scalar(AF_TYPE, "b") == TENSOR_AXIS_LABELS:
            out["labels"] = _packed_lines(model, f.string(AF_NAME))
            break
    return out


def _packed_lines(model: bytes, name: str | None) -> list[str] | None:
    """The lines of a file zipped behind the flatbuffer (how the metadata populator packs them)."""
    try:
        with zipfile.ZipFile(io.BytesIO(model)) as packed:
            text = packed.read(name).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, OSError, UnicodeDecodeError):
        return None
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line] or None


# ---------------------------------------------------------------- inference of the preprocessing

def preprocess(model_bytes: bytes, input_spec, classes: int, input_range: str | None = None,
               labels: list[str] | None = None) -> tuple[dict, str]:
    """(the preprocess dict core.Model uses, one sentence saying where each part came from)."""
    _, h, w, c = input_spec.shape
    embedded = read(model_bytes) or {}
    whole = np.issubdtype(input_spec.dtype, np.integer) and not input_spec.quantized
    if input_range is not None:
        scale, offset = INPUT_RANGES[input_range]
        said = f"input range {input_range} as given"
    elif embedded.get("mean") and embedded.get("std"):
        mean, std = np.asarray(embedded["mean"], np.float64), np.asarray(embedded["std"], np.float64)
        scale, offset = _per_channel(1.0 / std), _per_channel(-mean / std)
        said = (f"input (pixel - {_fmt(embedded['mean'])}) / {_fmt(embedded['std'])} from the model's TFLite "
                "metadata")
    elif input_spec.quantized and input_spec.dtype in (np.uint8, np.int8):
        # Chosen so that quantize(pixel * scale + offset) is exactly the raw pixel (uint8) or pixel - 128 (int8).
        shift, fed = raw_pixel(input_spec.dtype)
        scale, offset = input_spec.scale, -(shift + input_spec.zero_point) * input_spec.scale
        said = f"{input_spec.dtype.name} input takes the {fed} (TFLite's convention for quantized image models)"
    elif whole:
        # The model casts its input itself, so it takes the integers as they are: the same pixels as a
        # quantized input of its type. No other --input-range fits it (fractions would be truncated).
        shift, fed = raw_pixel(input_spec.dtype)
        scale, offset = 1.0, float(-shift)
        said = (f"{input_spec.dtype.name} input without quantization takes the {fed} as it is "
                "(TFLite's convention for integer image input)")
    else:
        scale, offset = INPUT_RANGES["0,1"]
        said = f"{input_spec.dtype.name} input: assuming pixels scaled to 0..1"
    if input_range is None and not embedded.get("mean") and not whole:
        said += "; pass --input-range 0,1, -1,1 or 0,255 if the model was trained otherwise"
    if labels is not None:
        said += f"; {len(labels)} labels as given"
    elif embedded.get("labels"):
        labels = embedded["labels"]
        said += f"; {len(labels)} labels from the model's TFLite metadata"
    else:
        said += "; no labels in the model, classes are numbered: pass --labels FILE (one label a line)"
    return ({"height": h, "width": w, "channels": c, "scale": scale, "offset": offset, "layout": "NHWC",
             "labels": list(labels) if labels else [str(i) for i in range(classes)], "source": said}, said)


def raw_pixel(dtype) -> tuple[int, str]:
    """(what is subtracted from a pixel, how it is said) for an integer image input: TFLite's convention
    is the raw pixel, and the pixel - 128 for int8, which cannot hold 128..255."""
    return (128, "pixel - 128") if np.dtype(dtype) == np.int8 else (0, "raw pixel")


def read_labels(path: Path) -> list[str]:
    """One label a line, blank lines skipped; ValueError with the reason when there are none."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    labels = [line for line in lines if line]
    if not labels:
        raise ValueError("holds no labels; expected one label a line")
    return labels


def _per_channel(values: np.ndarray):
    return float(values[0]) if np.allclose(values, values[0]) else [float(v) for v in values]


def _fmt(values) -> str:
    return f"{values[0]:g}" if len(set(values)) == 1 else "[" + ", ".join(f"{v:g}" for v in values) + "]"
