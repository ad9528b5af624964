"""Models under TensorFlow Lite Micro: its operator table, the arena a model needs, its outputs.

Everything here runs the `tflite-micro` package, a host build of the same interpreter and reference
kernels a microcontroller runs (another interpreter than device/core.py's on purpose: comparing the two
is the point). The arena comes from TFLM's own allocation report, confirmed by a search for the
smallest size that allocates and runs. TFLM's host timings say nothing about a microcontroller's
speed, so none are taken.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile

import numpy as np

from device.core import Model, TensorSpec, normalize, quantize
from pipeline.failures import InputError


class ExportError(InputError):
    """The run cannot be exported as asked; the message says what to change."""


KIB, MIB = 1024, 1024 * 1024
# The arena measured on a 64-bit host is an upper bound for a 32-bit core's bookkeeping (pointers are
# half as big there), but optimized kernels such as CMSIS-NN ask for scratch buffers the reference
# kernels do not (im2col for convolutions): a margin covers that and the arena's alignment.
ARENA_MARGIN = 0.10
ARENA_MARGIN_MIN = 1 * KIB

# TFLite Micro's builtin operators and the MicroMutableOpResolver method that registers each
# (tensorflow/lite/micro/micro_mutable_op_resolver.h, tflite-micro at 90b983c2, August 2026).
MICRO_OPS = {
    "ABS": "AddAbs", "ADD": "AddAdd", "ADD_N": "AddAddN", "ARG_MAX": "AddArgMax", "ARG_MIN": "AddArgMin",
    "ASSIGN_VARIABLE": "AddAssignVariable", "AVERAGE_POOL_2D": "AddAveragePool2D",
    "BATCH_MATMUL": "AddBatchMatMul", "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd",
    "BROADCAST_ARGS": "AddBroadcastArgs", "BROADCAST_TO": "AddBroadcastTo", "CALL_ONCE": "AddCallOnce",
    "CAST": "AddCast", "CEIL": "AddCeil", "CONCATENATION": "AddConcatenation", "CONV_2D": "AddConv2D",
    "COS": "AddCos", "CUMSUM": "AddCumSum", "DEPTH_TO_SPACE": "AddDepthToSpace",
    "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D", "DEQUANTIZE": "AddDequantize", "DIV": "AddDiv",
    "DYNAMIC_UPDATE_SLICE": "AddDynamicUpdateSlice", "EMBEDDING_LOOKUP": "AddEmbeddingLookup", "ELU": "AddElu",
    "EQUAL": "AddEqual", "EXP": "AddExp", "EXPAND_DIMS": "AddExpandDims", "FILL": "AddFill", "FLOOR": "AddFloor",
    "FLOOR_DIV": "AddFloorDiv", "FLOOR_MOD": "AddFloorMod", "FULLY_CONNECTED": "AddFullyConnected",
    "GATHER": "AddGather", "GATHER_ND": "AddGatherNd", "GREATER": "AddGreater",
    "GREATER_EQUAL": "AddGreaterEqual", "HARD_SWISH": "AddHardSwish", "IF": "AddIf",
    "L2_NORMALIZATION": "AddL2Normalization", "L2_POOL_2D": "AddL2Pool2D", "LEAKY_RELU": "AddLeakyRelu",
    "LESS": "AddLess", "LESS_EQUAL": "AddLessEqual", "LOG": "AddLog", "LOGICAL_AND": "AddLogicalAnd",
    "LOGICAL_NOT": "AddLogicalNot", "LOGICAL_OR": "AddLogicalOr", "LOGISTIC": "AddLogistic",
    "LOG_SOFTMAX": "AddLogSoftmax", "MAXIMUM": "AddMaximum", "MAX_POOL_2D": "AddMaxPool2D",
    "MIRROR_PAD": "AddMirrorPad", "MEAN": "AddMean", "MINIMUM": "AddMinimum", "MUL": "AddMul", "NEG": "AddNeg",
    "NOT_EQUAL": "AddNotEqual", "PACK": "AddPack", "PAD": "AddPad", "PADV2": "AddPadV2", "PRELU": "AddPrelu",
    "QUANTIZE": "AddQuantize", "READ_VARIABLE": "AddReadVariable", "REDUCE_ALL": "AddReduceAll",
    "REDUCE_MAX": "AddReduceMax", "REDUCE_MIN": "AddReduceMin", "RELU": "AddRelu", "RELU6": "AddRelu6",
    "RESHAPE": "AddReshape", "RESIZE_BILINEAR": "AddResizeBilinear",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor", "REVERSE_V2": "AddReverseV2", "ROUND": "AddRound",
    "RSQRT": "AddRsqrt", "SELECT_V2": "AddSelectV2", "SHAPE": "AddShape", "SIN": "AddSin", "SLICE": "AddSlice",
    "SOFTMAX": "AddSoftmax", "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd", "SPACE_TO_DEPTH": "AddSpaceToDepth",
    "SPLIT": "AddSplit", "SPLIT_V": "AddSplitV", "SQUEEZE": "AddSqueeze", "SQRT": "AddSqrt",
    "SQUARE": "AddSquare", "SQUARED_DIFFERENCE": "AddSquaredDifference", "STRIDED_SLICE": "AddStridedSlice",
    "SUB": "AddSub", "SUM": "AddSum", "SVDF": "AddSvdf", "TANH": "AddTanh", "TRANSPOSE_CONV": "AddTransposeConv",
    "TRANSPOSE": "AddTranspose", "UNPACK": "AddUnpack",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM", "VAR_HANDLE": "AddVarHandle",
    "WHILE": "AddWhile", "ZEROS_LIKE": "AddZerosLike",
}
# What Keras 3's Flatten makes of a dynamic batch dimension: the shape computed at run time.
DYNAMIC_BATCH_OPS = {"SHAPE", "STRIDED_SLICE", "PACK"}
# Ops TFLM lacks that a zoo-style model can still produce, and the layer change that avoids each.
OP_FIXES = {
    "GELU": "use activation='relu' (or 'relu6')",
    "HARD_SWISH": "use activation='relu6'",
    "BATCH_MATMUL": "use a Dense layer on a flattened input",
    "RESIZE_BILINEAR": "resize images before the model instead of inside it",
}


def batch_one(model):
    """`model` taking a batch of exactly one, as TFLite Micro wants it (a dynamic batch converts to
    DYNAMIC_BATCH_OPS). Its input is named: an unnamed one takes Keras's session counter into the .tflite file
    (keras_tensor_9 or keras_tensor_121), so the same model measured before training in one session and
    exported in another came out a few bytes apart."""
    import keras

    inputs = keras.Input(model.input_shape[1:], batch_size=1, name="image")
    return keras.Model(inputs, model(inputs), name=model.name)


# ---------------------------------------------------------------- reading the flatbuffer

def _runtime():
    try:
        from tflite_micro import runtime
    except ImportError as e:
        raise ExportError(f"the TFLite Micro interpreter is not installed ({e}); pip install tflite-micro "
                          "(or edgepipe[micro])")
    return runtime


def read_graph(model_bytes: bytes) -> list[tuple[str, str]]:
    """(op name, name of the op's first output tensor) for every operator, in execution order."""
    runtime = _runtime()
    model = runtime.convert_bytearray_to_object(bytearray(model_bytes))
    names = {v: k for k, v in vars(runtime.schema_fb.BuiltinOperator).items() if not k.startswith("_")}
    out = []
    for graph in model.subgraphs:
        for op in graph.operators or []:
            code = model.operatorCodes[op.opcodeIndex]
            builtin = runtime.get_builtin_code_from_operator_code(code)
            name = names.get(builtin, f"BUILTIN_{builtin}")
            if name == "CUSTOM":
                name = f"CUSTOM:{(code.customCode or b'?').decode(errors='replace')}"
            tensor = graph.tensors[op.outputs[0]].name if len(op.outputs) else b""
            out.append((name, (tensor or b"").decode(errors="replace")))
    return out


def layer_of(tensor_name: str, layer_names: set[str]) -> str:
    """The Keras layer that made a tensor, from the converter's 'model/layer/op' naming. Keras 3's export
    appends '_N' to every name (conv2d -> conv2d_1, conv2d_1 -> conv2d_1_2), so the name without its last
    suffix is tried first."""
    for part in tensor_name.split(";")[0].split("/")[1:]:
        for candidate in (re.sub(r"_\d+$", "", part), part):
            if candidate in layer_names:
                return candidate
    parts = tensor_name.split(";")[0].split("/")
    return parts[1] if len(parts) > 2 else tensor_name


def check_ops(graph: list[tuple[str, str]], layer_names: set[str], source: str) -> list[str]:
    """The distinct ops in first-use order; an op TFLite Micro lacks is an ExportError naming it."""
    for op, tensor in graph:
        if op not in MICRO_OPS:
            layer = layer_of(tensor, layer_names)
            fix = OP_FIXES.get(op, "rebuild that layer from ops TFLite Micro has (CONV_2D, DEPTHWISE_CONV_2D, "
                                   "FULLY_CONNECTED, pooling, RESHAPE, SOFTMAX, ADD, MEAN, ...)")
            raise ExportError(f"{source}: op {op} (made by layer '{layer}') is not in TFLite Micro; {fix}, "
                              "then build the run again")
    return list(dict.fromkeys(op for op, _ in graph))


# ---------------------------------------------------------------- the interpreter

@contextlib.contextmanager
def c_stderr():
    """Capture what C++ writes to file descriptor 2 (TFLM's allocation report and errors bypass
    sys.stderr); yields a list that holds the captured text once the block ends."""
    import sys

    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read().decode(errors="replace"))


def micro_interpreter(model_bytes: bytes, arena_size: int):
    return _runtime().Interpreter.from_bytes(model_bytes, arena_size=arena_size)


def _allocates(model_bytes: bytes, arena_size: int, sample: np.ndarray) -> bool:
    try:
        interpreter = micro_interpreter(model_bytes, arena_size)
        interpreter.set_input(sample, 0)
        interpreter.invoke()
    except RuntimeError:
        return False
    return True


def measure_arena(model_bytes: bytes, sample: np.ndarray) -> dict:
    """The arena TFLM reports after one inference, the smallest size that allocates and runs (binary
    search), and the size to allocate with the margin."""
    generous = max(len(model_bytes) * 4, 16 * MIB)
    with c_stderr() as text:
        try:
            interpreter = micro_interpreter(model_bytes, generous)
            interpreter.set_input(sample, 0)
            interpreter.invoke()
        except RuntimeError as e:
            failure = e
        else:
            failure = None
            interpreter.print_allocations()
    if failure is not None:
        # TFLM prints the failing kernel's check, then the node: both say why.
        reason = "; ".join([ln.strip() for ln in text[0].splitlines() if ln.strip()][-2:]) or str(failure)
        raise ExportError(f"TFLite Micro cannot run the model with a {generous:,} byte arena: {reason}")
    match = re.search(r"Arena allocation total (\d+) bytes", text[0])
    if not match:
        raise ExportError("TFLite Micro printed no arena total; this tflite-micro version reports differently")
    reported = int(match.group(1))
    with c_stderr():  # every failed attempt prints 'Failed to resize buffer' to the C stderr
        low, high = 0, reported
        if not _allocates(model_bytes, high, sample):  # the report left something out: search up to what worked
            low, high = high, generous
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (low, mid) if _allocates(model_bytes, mid, sample) else (mid, high)
    margin = max(int(np.ceil(high * ARENA_MARGIN)), ARENA_MARGIN_MIN)
    return {"reported": reported, "measured": high, "recommended": -(-(high + margin) // 16) * 16,
            "margin": {"fraction": ARENA_MARGIN, "minimum": ARENA_MARGIN_MIN},
            "how": "tflite-micro reference kernels, 64-bit host build"}


def micro_outputs(model_bytes: bytes, arena_size: int, prepared: np.ndarray) -> np.ndarray:
    """Raw output tensors of TFLM for each prepared (quantized) image, one inference at a time."""
    interpreter = micro_interpreter(model_bytes, arena_size)
    out = []
    for i in range(len(prepared)):
        interpreter.set_input(prepared[i:i + 1], 0)
        interpreter.invoke()
        out.append(np.array(interpreter.get_output(0)).reshape(-1))
    return np.stack(out) if out else np.zeros((0, 0), np.int8)


def litert_outputs(model: Model, prepared: np.ndarray) -> np.ndarray:
    """LiteRT's raw outputs for the same prepared images, through the project's one inference core."""
    return np.stack([model.invoke(prepared[i:i + 1]).reshape(-1) for i in range(len(prepared))])


def pixel_table(preprocess: dict, spec: TensorSpec) -> np.ndarray:
    """The input tensor value of every uint8 pixel value, computed as device/core.py prepares images."""
    return quantize(normalize(np.arange(256, dtype=np.uint8), preprocess), spec)
