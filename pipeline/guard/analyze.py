"""Per-layer int8 error: TensorFlow's QuantizationDebugger on the int8 model, and the judge of a flatbuffer.

For every quantized op, the RMSE between its int8 output and the float op fed the same input, in
units of the output's quantization step. Rounding alone gives 1/sqrt(12) = 0.29.
"""
from __future__ import annotations

import contextlib
import csv
import io
import warnings
from pathlib import Path

import numpy as np

from device.core import Model
from pipeline.artifacts import atomic_write
from pipeline.convert import PRESETS

IDEAL, SUSPECT = 1 / np.sqrt(12), 0.7  # RMSE/scale of pure rounding; above SUSPECT a layer is suspect
# Ops whose int8 output must share the input's scale: keeping a tensor float means keeping them float too.
_SAME_SCALE = {"MAX_POOL_2D", "AVERAGE_POOL_2D", "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "PAD"}
_KERAS_KIND = {"CONV_2D": "Conv2D", "DEPTHWISE_CONV_2D": "DepthwiseConv2D", "FULLY_CONNECTED": "Dense",
               "MAX_POOL_2D": "MaxPooling2D", "AVERAGE_POOL_2D": "AveragePooling2D",
               "MEAN": "GlobalAveragePooling2D", "RESHAPE": "Flatten"}


@contextlib.contextmanager
def quiet():
    # Keras prints the exported signature on every conversion; the converter warns about int8 inputs.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class Judge:
    """Validation accuracy of a flatbuffer, through device.core.Model: the code that ships."""

    def __init__(self, x, y, preprocess: dict, folder: Path):
        self.x, self.y, self.meta, self.path = x, np.asarray(y), {"preprocess": preprocess}, Path(folder) / "c.tflite"

    def __call__(self, flatbuffer: bytes) -> float:
        atomic_write(self.path, flatbuffer)
        return float((Model(self.path, metadata=self.meta, verify=False).predict(self.x).argmax(1) == self.y).mean())


class Quantizer:
    """A Keras model calibrated once, as the int8 preset does; int8 models with any ops left float.

    `ops` is the int8 graph in execution order; `layers` the debugger's statistics of the quantized ones.
    """

    def __init__(self, model, cfg, calibration: np.ndarray, debug_images: np.ndarray):
        import tensorflow as tf
        from tensorflow.lite.python import convert as tflite_convert

        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        PRESETS["int8"](converter, tf, lambda: ([calibration[i:i + 1]] for i in range(len(calibration))), cfg)
        with quiet():
            self.debugger = tf.lite.experimental.QuantizationDebugger(
                converter=converter, debug_dataset=lambda: ([debug_images[i:i + 1]] for i in range(len(debug_images))))
        # The debugger's get_nondebug_quantized_model() always gives float input/output; calling the
        # same quantizer with the preset's I/O types keeps a mixed model a drop-in for plain int8.
        self._quantize, self._io = tflite_convert.mlir_quantize, converter.inference_input_type
        self.ops = _graph(self.flatbuffer(), model)
        self.layers = self._stats()
        self.quantized = {r["index"] for r in self.layers}

    def flatbuffer(self, float_ops=()) -> bytes:
        with quiet():
            return self._quantize(self.debugger.calibrated_model, input_data_type=self._io, output_data_type=self._io,
                                  denylisted_nodes=[self.ops[i]["tensor"] for i in sorted(float_ops)] or None)

    def _stats(self) -> list[dict]:
        self.debugger.run()
        buf = io.StringIO()
        self.debugger.layer_statistics_dump(buf)
        by_name = {r["tensor_name"]: r for r in csv.DictReader(io.StringIO(buf.getvalue()))}
        rows = []
        for i, op in enumerate(self.ops):
            r = by_name.get(op["tensor"])
            if r is None:  # int32 shape arithmetic, or the float input/output edges
                continue
            scale, mse = float(r["scale"]), float(r["mean_squared_error"])
            rows.append({"index": i, "layer": op["layer"], "op": op["op"], "tensor": op["tensor"], "scale": scale,
                         "zero_point": int(r["zero_point"]), "rmse_over_scale": float(np.sqrt(mse) / scale),
                         "range": 255.0 * scale, "mse": mse, "max_abs_error": float(r["max_abs_error"]),
                         "suspect": bool(np.sqrt(mse) / scale > SUSPECT)})
        return rows

    def region(self, i: int) -> frozenset:
        """Op i, the consumers of its output, and same-scale ops either side: what keeps that tensor float."""
        def producers(j):
            return [k for k in self.quantized if self.ops[k]["output"] in self.ops[j]["inputs"]]

        def consumers(j):
            return [k for k in self.quantized if self.ops[j]["output"] in self.ops[k]["inputs"]]

        group, todo = set(), [i]
        while todo:
            j = todo.pop()
            if j not in group:
                group.add(j)
                same_scale = self.ops[j]["op"] in _SAME_SCALE
                todo += (consumers(j) if j == i or same_scale else []) + (producers(j) if same_scale else [])
        return frozenset(group)


def _graph(flatbuffer: bytes, model) -> list[dict]:
    """Ops in execution order, each named by its output tensor (what denylisted_nodes matches)."""
    from device.core import runtime

    interp = runtime().interpreter(flatbuffer, 1, False)
    names = {t["index"]: t["name"] for t in interp.get_tensor_details()}
    ops = [{"op": o["op_name"], "tensor": names[o["outputs"][0]], "inputs": [int(t) for t in o["inputs"]],
            "output": int(o["outputs"][0]), "layer": o["op_name"].lower()} for o in interp._get_ops_details()]
    # TensorFlow's tensor names carry unreliable suffixes (dense_1 may export as dense_1_2), so ops
    # are matched to Keras layers by order instead: the n-th CONV_2D is the n-th Conv2D, and so on.
    for kind, cls in _KERAS_KIND.items():
        of_kind = [o for o in ops if o["op"] == kind]
        keras_layers = [layer for layer in model.layers if type(layer).__name__ == cls]
        if len(of_kind) == len(keras_layers):
            for o, layer in zip(of_kind, keras_layers):
                o["layer"] = layer.name
    return ops


