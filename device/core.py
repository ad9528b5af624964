"""The one inference core: find metadata, verify, load, preprocess, quantize, invoke, dequantize.

Everything in the project that runs a `.tflite` model goes through this module: the runner on the
device, and the host's evaluation and benchmark. It imports only the standard library, numpy, pillow
(lazily, for images) and a TFLite interpreter, so it installs on a Raspberry Pi in seconds.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device import foreign, timing
from device.images import MAX_IMAGE_PIXELS, image_warnings, load_image, read_image  # noqa: F401 (the core's API)
from device.integrity import METADATA_NAME, DeviceError, expected_sha256, find_metadata, load_metadata, read_model_bytes

# What the interpreter's C++ layer raises for a model it cannot take: pybind11 turns std::out_of_range into
# IndexError (a damaged model's tensor index missing from an internal map reads "_Map_base::at"), the other
# std exceptions into RuntimeError or ValueError. All of them are the model's fault, not the runner's.
INTERPRETER_ERRORS = (ValueError, RuntimeError, IndexError)

# Resolution order: LiteRT is the maintained runtime; tflite-runtime still has 32-bit ARM wheels;
# full TensorFlow works anywhere but costs seconds and hundreds of MB to import.
_INTERPRETERS = (
    ("ai_edge_litert", "ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite_runtime", "tflite_runtime.interpreter", "tflite-runtime"),
    ("tensorflow.lite", "tensorflow", "tensorflow"),
)


@dataclass(frozen=True)
class Runtime:
    name: str
    version: str
    module: object

    def interpreter(self, model_content: bytes, threads: int | None, xnnpack: bool):
        kwargs = {"model_content": model_content, "num_threads": threads}
        if self.name == "tensorflow.lite":
            interp_cls = self.module.lite.Interpreter
            resolver = self.module.lite.experimental.OpResolverType
        else:
            interp_cls = self.module.Interpreter
            resolver = getattr(self.module, "OpResolverType", None)
        if not xnnpack:
            if resolver is None:
                raise DeviceError(f"{self.name} {self.version} cannot turn XNNPACK off; drop --no-xnnpack")
            kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        return interp_cls(**kwargs)


_runtime: Runtime | None = None


def runtime(prefer: str | None = None) -> Runtime:
    """The first interpreter that imports, in the documented order, or the one named by `prefer`
    or by EDGEPIPE_RUNTIME (ai_edge_litert, tflite_runtime, tensorflow.lite) to test a fallback."""
    global _runtime
    prefer = prefer or os.environ.get("EDGEPIPE_RUNTIME") or None
    if prefer is not None and prefer not in {name for name, _, _ in _INTERPRETERS}:
        raise DeviceError(f"unknown interpreter '{prefer}'; choose one of "
                          + ", ".join(name for name, _, _ in _INTERPRETERS))
    if _runtime is not None and prefer in (None, _runtime.name):
        return _runtime
    tried = []
    for name, module_name, dist in _INTERPRETERS:
        if prefer not in (None, name):
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            tried.append(f"{name} ({e})")
            continue
        # The package's own __version__ first: importlib.metadata parses every installed distribution's
        # METADATA with the email package, ~100 ms of the runner's cold start.
        version = getattr(sys.modules.get(module_name.split(".")[0]), "__version__", None)
        if version is None:
            from importlib import metadata
            try:
                version = metadata.version(dist)
            except metadata.PackageNotFoundError:
                version = getattr(module, "__version__", "unknown")
        found = Runtime(name, version, module)
        if prefer is None:
            _runtime = found
        return found
    raise DeviceError(
        "no TFLite interpreter could be imported (tried " + "; ".join(tried) + "); "
        "install one: pip install ai-edge-litert (or tflite-runtime on 32-bit ARM)"
    )


# ---------------------------------------------------------------- quantization helpers

@dataclass(frozen=True)
class TensorSpec:
    name: str
    index: int
    shape: tuple
    dtype: np.dtype
    scale: float
    zero_point: int

    @property
    def quantized(self) -> bool:
        return np.issubdtype(self.dtype, np.integer) and self.scale > 0

    @classmethod
    def from_detail(cls, d: dict) -> TensorSpec:
        scale, zero_point = d.get("quantization", (0.0, 0))
        qp = d.get("quantization_parameters") or {}
        if len(qp.get("scales", [])) == 1:
            scale, zero_point = float(qp["scales"][0]), int(qp["zero_points"][0])
        return cls(d["name"], d["index"], tuple(int(s) for s in d["shape"]), np.dtype(d["dtype"]),
                   float(scale), int(zero_point))

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype.name,
                "scale": self.scale, "zero_point": self.zero_point}


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Real values to the tensor's storage type: q = clip(round(x / scale) + zero_point)."""
    if not spec.quantized:
        if np.issubdtype(spec.dtype, np.integer):
            return _whole(x, spec.dtype)
        return x.astype(spec.dtype, copy=False)
    info = np.iinfo(spec.dtype)
    q = np.round(x / spec.scale) + spec.zero_point
    return np.clip(q, info.min, info.max).astype(spec.dtype)


def _whole(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    # An integer input without quantization parameters takes values as they are (the model casts them
    # itself): a cast that would truncate a fraction or wrap a value around is refused, never made.
    info = np.iinfo(dtype)
    if x.size and not (np.array_equal(x, np.round(x)) and info.min <= x.min() and x.max() <= info.max):
        raise DeviceError(f"values from {x.min():g} to {x.max():g}, not all whole numbers from {info.min} to "
                          f"{info.max}, for a {dtype.name} input without quantization parameters (it takes whole "
                          "numbers as they are)")
    return x.astype(dtype)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def dequantize(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Stored values back to real ones: x = scale * (q - zero_point)."""
    if not spec.quantized:
        return q.astype(np.float32, copy=False)
    return (spec.scale * (q.astype(np.float32) - spec.zero_point)).astype(np.float32)


def normalize(pixels: np.ndarray, preprocess: dict) -> np.ndarray:
    """uint8 pixels to model input, exactly as in training: pixel * scale + offset."""
    # scale and offset are numbers, or one per channel (a foreign model's TFLite metadata may say so).
    return (pixels.astype(np.float32) * np.asarray(preprocess["scale"], np.float32)
            + np.asarray(preprocess["offset"], np.float32))


# ---------------------------------------------------------------- the model

class Model:
    """A loaded `.tflite` model with its preprocessing; `predict` takes uint8 images, returns probabilities."""

    def __init__(self, path, *, threads: int | None = None, xnnpack: bool = True,
                 metadata: dict | None = None, verify: bool = True, runtime_name: str | None = None,
                 input_range: str | None = None, labels: list[str] | None = None):
        self.path = Path(path)
        meta_path = find_metadata(self.path) if metadata is None else None
        self.metadata = metadata if metadata is not None else (load_metadata(meta_path) if meta_path else None)
        expected = expected_sha256(self.path, self.metadata) if verify else None
        self.model_bytes = read_model_bytes(self.path, expected)
        self.runtime = runtime(runtime_name)
        self.threads, self.xnnpack = threads, xnnpack
        try:
            self.interpreter = self.runtime.interpreter(self.model_bytes, threads, xnnpack)
            self.interpreter.allocate_tensors()
            inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        except INTERPRETER_ERRORS as e:
            raise DeviceError(f"{self.path}: the interpreter rejected the model ({str(e).splitlines()[0]})")
        if len(inputs) != 1 or len(outputs) != 1:
            raise DeviceError(f"{self.path}: expected one input and one output tensor, "
                              f"found {len(inputs)} and {len(outputs)}; this runner serves classifiers")
        self.input, self.output = TensorSpec.from_detail(inputs[0]), TensorSpec.from_detail(outputs[0])
        if len(self.input.shape) != 4:
            raise DeviceError(f"{self.path}: input shape {list(self.input.shape)} is not an image batch (N,H,W,C)")
        if len(self.output.shape) != 2:
            raise DeviceError(f"{self.path}: output shape {list(self.output.shape)} is not (N, classes); "
                              "this runner serves classifiers")
        signature = inputs[0].get("shape_signature")
        if signature is not None and len(signature) == 4 and min(signature[1:]) < 0:
            # The interpreter reports such a dimension as 1: images would be shrunk to 1x1 and still classified.
            raise DeviceError(f"{self.path}: input shape {[int(d) for d in signature]} has no fixed size (-1 is any); "
                              "the runner resizes images to the model's input size: export the model with a fixed "
                              "input size, such as keras.Input((224, 224, 3))")
        self.preprocess, inferred = self._preprocess_spec(input_range, labels)
        if self.preprocess.get("channels") not in (1, 3):
            raise DeviceError(f"{self.path}: input has {self.preprocess.get('channels')} channels; "
                              "the runner feeds grayscale (1) or RGB (3) images")
        if np.issubdtype(self.input.dtype, np.integer) and not self.input.quantized:
            self._check_whole(input_range)
        if inferred:  # said once the model is known to be usable: a refusal is the one line then
            warnings.warn(f"{self.path}: no {METADATA_NAME} beside the model; {inferred}", stacklevel=2)
        self._batch = self.input.shape[0]
        # A batch fixed in the model (shape_signature without -1, as in Coral's models) cannot be resized:
        # such a model gets its own batch size, one image at a time for batch 1.
        self.fixed_batch = signature is not None and len(signature) > 0 and int(signature[0]) > 0
        self._input_index, self._output_index = self.input.index, self.output.index
        self._set_tensor, self._invoke = self.interpreter.set_tensor, self.interpreter.invoke
        self._get_tensor = self.interpreter.get_tensor

    def _preprocess_spec(self, input_range: str | None, labels: list[str] | None) -> tuple[dict, str | None]:
        """(metadata.json's preprocessing with what the user overrides, None), else (what device/foreign.py
        infers, the sentence saying how)."""
        classes = self.output.shape[-1]
        if labels is not None and len(labels) != classes:
            raise DeviceError(f"--labels: {len(labels)} labels, but {self.path.name} has {classes} classes; "
                              "pass a file with one label a line for each class, in the model's order")
        if input_range is not None and input_range not in foreign.INPUT_RANGES:
            raise DeviceError(f"--input-range: got '{input_range}', expected one of {', '.join(foreign.INPUT_RANGES)}")
        if self.metadata is not None:
            pre = dict(self.metadata["preprocess"])
            if input_range is not None:
                pre["scale"], pre["offset"] = foreign.INPUT_RANGES[input_range]
            if labels is not None:
                pre["labels"] = list(labels)
            return pre, None
        return foreign.preprocess(self.model_bytes, self.input, classes, input_range, labels)

    def _check_whole(self, input_range: str | None) -> None:
        """Refuse, before any image is read, a preprocessing that gives an integer input without
        quantization anything but whole numbers it can hold: every pixel value 0..255 goes through it."""
        ramp = np.repeat(np.arange(256, dtype=np.uint8)[:, None], self.preprocess["channels"], axis=1)
        try:
            quantize(normalize(ramp, self.preprocess), self.input)
        except DeviceError as e:
            _, fed = foreign.raw_pixel(self.input.dtype)
            if input_range is not None:
                origin, fix = f"--input-range {input_range}", f"drop --input-range to feed the {fed}"
            else:
                origin = f"{METADATA_NAME}'s preprocess" if self.metadata is not None else "the model's TFLite metadata"
                fix = ("pass --input-range 0,255 to feed the raw pixel" if np.iinfo(self.input.dtype).max >= 255
                       else f"correct the {origin}")
            raise DeviceError(f"{self.path}: {origin} gives {e}; {fix}") from None

    @property
    def labels(self) -> list[str]:
        return list(self.preprocess["labels"])

    def _resize(self, batch: int) -> None:
        try:
            self.interpreter.resize_tensor_input(self.input.index, [batch, *self.input.shape[1:]])
            self.interpreter.allocate_tensors()
        except INTERPRETER_ERRORS as e:
            raise self._failed(e)
        self._batch = batch

    def _failed(self, e: Exception) -> DeviceError:
        # The interpreter checks a model's operators lazily (XNNPACK prepares at the first invoke), so a
        # damaged model can load and still fail here; its message names the node, keep that line.
        msg = " ".join(str(e).split())[:300]
        return DeviceError(f"{self.path}: the interpreter cannot run the model ({msg})")

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 images (N,H,W[,C]) to the input tensor's dtype, quantized with the model's own params."""
        expected = (self.preprocess["height"], self.preprocess["width"], self.preprocess["channels"])
        if pixels.ndim == 3 and expected[2] == 1:
            pixels = pixels[..., None]
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise DeviceError(f"images of shape {list(pixels.shape)} do not fit the model input "
                              f"(N, {expected[0]}, {expected[1]}, {expected[2]})")
        return quantize(normalize(pixels, self.preprocess), self.input)

    def invoke(self, prepared: np.ndarray) -> np.ndarray:
        """Run one prepared batch; returns the raw output tensor (a copy)."""
        # The hot path of every benchmark: bound methods are looked up once, in __init__, so the
        # core adds as little as possible to a bare interpreter.invoke().
        if prepared.shape[0] != self._batch:
            self._resize(prepared.shape[0])
        try:
            self._set_tensor(self._input_index, prepared)
            self._invoke()
            return self._get_tensor(self._output_index)
        except INTERPRETER_ERRORS as e:
            raise self._failed(e) from None

    def predict(self, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Probabilities (float32, N x classes) for uint8 images, in batches."""
        prepared = self.prepare(np.asarray(pixels))
        if self.fixed_batch:
            out = self._fixed_batches(prepared)
        else:
            out = [dequantize(self.invoke(prepared[i:i + batch_size]), self.output)
                   for i in range(0, len(prepared), batch_size)]
        if any(o.ndim != 2 for o in out):
            raise DeviceError(f"{self.path}: the model returned output of shape {list(out[0].shape)}, "
                              "not (N, classes)")
        probs = np.concatenate(out) if out else np.zeros((0, self.output.shape[-1]), np.float32)
        # A model whose last layer is not a softmax outputs logits (the metadata says so); scores are probabilities.
        return softmax(probs) if (self.metadata or {}).get("output") == "logits" else probs

    def _fixed_batches(self, prepared: np.ndarray) -> list[np.ndarray]:
        """Outputs in the model's own batch size; the last batch padded with its first image, then trimmed."""
        size, out = self.input.shape[0], []
        for i in range(0, len(prepared), size):
            chunk = prepared[i:i + size]
            padded = np.concatenate([chunk, np.repeat(chunk[:1], size - len(chunk), axis=0)]) if len(chunk) < size \
                else chunk
            out.append(dequantize(self.invoke(padded), self.output)[:len(chunk)])
        return out

    def classify(self, images, top_k: int = 3, invert: bool = False) -> list[dict]:
        """One result per image, in order: its top-k, or the error that kept it from being classified.

        `images` are paths or (name, bytes) pairs. A bad image does not stop the others.
        """
        results, loaded = [], []
        dataset = (self.metadata or {}).get("dataset")
        for image in images:
            name, source = image if isinstance(image, tuple) else (str(image), Path(image))
            try:
                pixels, facts = read_image(source, self.preprocess, name)
            except DeviceError as e:
                results.append({"image": name, "error": str(e)})
                continue
            if invert:
                pixels = 255 - pixels
            results.append({"image": name, "top": None, "warnings": image_warnings(pixels, facts, self.preprocess,
                                                                                     dataset)})
            loaded.append((len(results) - 1, pixels))
        if loaded:
            probs = self.predict(np.stack([p for _, p in loaded]))
            for (i, _), p in zip(loaded, probs):
                if not np.isfinite(p).all():  # no ranking means anything then, and JSON has no NaN
                    results[i] = {"image": results[i]["image"], "error": (
                        f"{results[i]['image']}: the model's scores for it are not all finite (NaN or infinity); "
                        "the model is damaged or overflows on this input: check --input-range")}
                    continue
                order = np.argsort(-p, kind="stable")[:top_k]  # ties: the lowest index, as argmax (evaluation)
                results[i]["top"] = [{"label": self.labels[c] if c < len(self.labels) else str(c), "index": int(c),
                                      "score": float(p[c])} for c in order]
        return results

    @property
    def sha256(self) -> str:
        import hashlib

        return hashlib.sha256(self.model_bytes).hexdigest()

    def info(self) -> dict:
        # DELEGATE nodes are the interpreter's own (XNNPACK took over part of the graph), not the model's.
        ops = sorted({op["op_name"] for op in self._ops()} - {"DELEGATE"})
        return {"model": str(self.path), "bytes": len(self.model_bytes),
                "interpreter": {"name": self.runtime.name, "version": self.runtime.version},
                "input": self.input.to_dict(), "output": self.output.to_dict(), "ops": ops,
                "preprocess": self.preprocess, "metadata": self.metadata is not None}

    def _ops(self) -> list[dict]:
        get = getattr(self.interpreter, "_get_ops_details", None)
        return get() if get else []


def _class_names(labels, classes: int) -> list[str]:
    """One distinct name per class, to key per-class figures by: a label that repeats (ImageNet has two
    "crane"s, a bird and a machine) takes its class index, "crane (134)"; every label does if one of
    them reads like another's indexed name, so no class's figures overwrite another's."""
    names = [labels[c] if c < len(labels) else str(c) for c in range(classes)]
    counts = Counter(names)
    indexed = [f"{name} ({c})" if counts[name] > 1 else name for c, name in enumerate(names)]
    return indexed if len(set(indexed)) == classes else [f"{name} ({c})" for c, name in enumerate(names)]


def score(probs: np.ndarray, y, labels, source: str = "labels") -> dict:
    """Top-1 accuracy, per-class accuracy and confusion matrix (rows: true class) of probabilities.

    The one place these figures are computed: the runner's `eval` on a device and the host's
    evaluation report the same numbers for the same predictions.
    """
    y = np.asarray(y).reshape(-1).astype(np.int64)
    classes = probs.shape[1]
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise DeviceError(f"{source}: labels range from {y.min()} to {y.max()}, but the model has {classes} classes "
                          f"(0 to {classes - 1}); check the 'y' array")
    pred = probs.argmax(axis=1)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    per_class = {name: float(confusion[c, c] / confusion[c].sum()) if confusion[c].sum() else None
                 for c, name in enumerate(_class_names(labels, classes))}
    return {"n": int(len(y)), "accuracy": float((pred == y).mean()) if len(y) else 0.0,
            "per_class": per_class, "confusion": confusion.tolist(), "predictions": pred}


def evaluate(model: Model, x: np.ndarray, y: np.ndarray, batch_size: int = 256, source: str = "labels") -> dict:
    """score() of `model` on uint8 images `x` with labels `y` (from `source`), plus the probabilities."""
    probs = model.predict(x, batch_size)
    check_finite(model.path, probs)
    return {**score(probs, y, model.labels, source), "probabilities": probs}


def check_finite(what, probs: np.ndarray) -> None:
    """Refuse scores that are not all finite: argmax would still pick a class for them, and the accuracy
    would pass for a measurement."""
    broken = ~np.isfinite(probs).all(axis=1)
    if broken.any():
        raise DeviceError(f"{what}: the model's scores are not all finite (NaN or infinity) for "
                          f"{int(broken.sum())} of {len(probs)} images, the first image {int(np.argmax(broken))}; "
                          "the model is damaged or overflows on these inputs: check its input range")


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A labelled evaluation set: arrays `x` (uint8 images, 0-255) and `y` (integer class indices)."""
    try:
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):  # np.load reads a .npy too, whatever its name
            raise DeviceError(f"{path}: one array (a .npy file), not an .npz archive; expected arrays 'x' (uint8 "
                              "images) and 'y' (labels): save them with np.savez(path, x=x, y=y)")
        with data:
            missing = {"x", "y"} - set(data.files)
            if missing:
                raise DeviceError(f"{path}: missing array(s) {sorted(missing)}; expected an npz with "
                                  f"'x' (uint8 images) and 'y' (labels), found {sorted(data.files)}")
            x, y = data["x"], data["y"]
    except DeviceError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DeviceError(f"{path}: not a readable .npz file ({e}); expected arrays 'x' and 'y'")
    if x.ndim == 0 or len(x) == 0:
        raise DeviceError(f"{path}: 'x' holds no images; expected N >= 1 uint8 images (N, H, W[, C])")
    if y.ndim == 0:
        raise DeviceError(f"{path}: 'y' is a single value; expected one class index per image, shape (N,)")
    if len(x) != len(y):
        raise DeviceError(f"{path}: {len(x)} images but {len(y)} labels; they must match")
    return _pixels(path, x), _labels(path, y)


def _pixels(path, x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating) and x.size and np.nanmax(x) <= 1.0:
        raise DeviceError(f"{path}: 'x' is {x.dtype} in [0, 1], but the runner takes uint8 pixels 0-255 and "
                          "scales them itself; save x as (x * 255).round().astype(np.uint8)")
    if np.issubdtype(x.dtype, np.integer) and x.min() >= 0 and x.max() <= 255:
        return x.astype(np.uint8)
    raise DeviceError(f"{path}: 'x' is {x.dtype} with values from {x.min()} to {x.max()}; expected uint8 pixels "
                      "0-255 (save x.astype(np.uint8) if that is what they are)")


def _labels(path, y: np.ndarray) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] > 1:
        raise DeviceError(f"{path}: 'y' has shape {list(y.shape)}, one-hot or scores; expected one class index "
                          "per image: save y.argmax(axis=1)")
    if y.size != len(y):
        raise DeviceError(f"{path}: 'y' has shape {list(y.shape)}; expected one class index per image, shape (N,)")
    y = y.reshape(len(y))
    if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.complexfloating):
        raise DeviceError(f"{path}: 'y' holds {y.dtype} values such as {str(y[0])!r}; expected integer class "
                          "indices (0 is the first line of labels.txt)")
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise DeviceError(f"{path}: 'y' holds non-integer values; expected integer class indices")
    # Checked before the cast, which would wrap a uint64 or a float beyond int64 into a small or negative index.
    if len(y) and (y.min() < 0 or y.max() > np.iinfo(np.int64).max):
        raise DeviceError(f"{path}: 'y' holds values from {y.min():g} to {y.max():g}; expected class indices "
                          "from 0 (the first line of labels.txt)")
    return y.astype(np.int64)


def environment() -> dict:
    import platform

    rt = runtime()
    cpu = platform.processor() or platform.machine()
    try:
        info = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip().lower(), value.strip())
        # x86 names the CPU in "model name" ("model" is a number there); a Raspberry Pi in "Model".
        for key in ("model name", "model", "hardware"):
            if info.get(key) and not info[key].isdigit():
                cpu = info[key]
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "os": platform.platform(),
            "numpy": np.__version__, "interpreter": {"name": rt.name, "version": rt.version},
            "cpu_features": timing.cpu_features()}
