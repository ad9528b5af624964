"""Accuracy-guarded quantization: per-layer int8 error, and repairs when int8 loses too much.

`pipeline analyze RUN_DIR` and `pipeline build --analyze` run TensorFlow's QuantizationDebugger on
the int8 model: for every quantized op, the RMSE between its int8 output and the float op fed the
same input, in units of the output's quantization step. Rounding alone gives 1/sqrt(12) = 0.29.

`--fallback auto` with `--max-accuracy-drop PP` repairs an int8 model that loses more than PP
points, cheapest remedy first, deciding on the validation split only (test is for the report):
  1. cross-layer equalization (`int8-cle`): every layer stays int8, the float function is unchanged;
  2. a search for the fewest ops to leave in float (`int8-mixed`);
  3. quantization-aware fine-tuning (`int8-qat`, pipeline.qat) on --qat, or when 2 falls short.
What was tried, what each remedy cost and which layers stayed float go into analysis.json.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import pipeline
from device.core import Model, normalize
from pipeline.artifacts import atomic_write, update_manifest, write_json
from pipeline.convert import PRESETS, calibration_images, convert
from pipeline.equalize import equalize

ANALYSIS, PLOT = "analysis.json", "analysis_layers.png"
IDEAL, SUSPECT = 1 / np.sqrt(12), 0.7  # RMSE/scale of pure rounding; above SUSPECT a layer is suspect
DEBUG_IMAGES = 200        # validation images the debugger runs (per-layer statistics)
DECISION_IMAGES = 2000    # validation images every accuracy decision is measured on
MAX_CANDIDATES = 16       # float-layer groups measured per search round, by quantization error
REMEDIES = ("cle", "mixed", "qat")
# Ops whose int8 output must share the input's scale: keeping a tensor float means keeping them float too.
_SAME_SCALE = {"MAX_POOL_2D", "AVERAGE_POOL_2D", "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "PAD"}
_KERAS_KIND = {"CONV_2D": "Conv2D", "DEPTHWISE_CONV_2D": "DepthwiseConv2D", "FULLY_CONNECTED": "Dense",
               "MAX_POOL_2D": "MaxPooling2D", "AVERAGE_POOL_2D": "AveragePooling2D",
               "MEAN": "GlobalAveragePooling2D", "RESHAPE": "Flatten"}


@contextlib.contextmanager
def _quiet():
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
        with _quiet():
            self.debugger = tf.lite.experimental.QuantizationDebugger(
                converter=converter, debug_dataset=lambda: ([debug_images[i:i + 1]] for i in range(len(debug_images))))
        # The debugger's get_nondebug_quantized_model() always gives float input/output; calling the
        # same quantizer with the preset's I/O types keeps a mixed model a drop-in for plain int8.
        self._quantize, self._io = tflite_convert.mlir_quantize, converter.inference_input_type
        self.ops = _graph(self.flatbuffer(), model)
        self.layers = self._stats()
        self.quantized = {r["index"] for r in self.layers}

    def flatbuffer(self, float_ops=()) -> bytes:
        with _quiet():
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


# ---------------------------------------------------------------- float-layer search

def search_float_ops(q: Quantizer, judge: Judge, target: float) -> dict:
    """Greedily leave in float the group of ops that raises validation accuracy most, until `target`.

    Candidates are single ops and the region around each op's output tensor (producer, consumers and
    same-scale ops between): damage done by one badly scaled tensor is only undone when both its
    producer and its consumers stay float. The MAX_CANDIDATES groups with the worst quantization
    error are measured each round; the search stops at `target` or when no group helps any more.
    """
    error = {r["index"]: r["rmse_over_scale"] for r in q.layers}
    groups = {frozenset([i]): f"{q.ops[i]['layer']} alone" for i in q.quantized}
    for i in q.quantized:
        groups.setdefault(q.region(i), f"the output of {q.ops[i]['layer']} with its consumers")
    ranked = sorted(groups, key=lambda g: (-max(error[i] for i in g), len(g)))[:MAX_CANDIDATES]
    float_ops, why = frozenset(), {}
    flatbuffer = q.flatbuffer()
    acc = start = judge(flatbuffer)
    rounds = []
    while acc < target:
        tried = []  # (accuracy, -bytes, group, flatbuffer): most accurate first, then smallest
        for g in ranked:
            if not g <= float_ops:
                fb = q.flatbuffer(float_ops | g)
                tried.append((judge(fb), -len(fb), g, fb))
        if not tried or max(tried, key=lambda t: t[:2])[0] <= acc:
            break  # nothing measured helps: more float layers would only cost size
        best, _, g, flatbuffer = max(tried, key=lambda t: t[:2])
        measured = sorted(({"group": groups[c], "accuracy": a} for a, _, c, _ in tried), key=lambda m: -m["accuracy"])
        rounds.append({"round": len(rounds) + 1, "candidates": len(tried), "chosen": groups[g],
                       "accuracy_before": acc, "accuracy_after": best, "measured": measured})
        for i in g - float_ops:
            why[i] = (f"round {len(rounds)}: leaving {groups[g]} float raised validation accuracy "
                      f"{acc:.2%} -> {best:.2%}")
        float_ops, acc = float_ops | g, best
    # A group may carry ops the final set does not need; drop each one that costs no accuracy.
    floor = min(acc, target)
    for i in sorted(float_ops, key=lambda i: error[i]):
        fb = q.flatbuffer(float_ops - {i})
        a = judge(fb)
        if a >= floor:
            float_ops, acc, flatbuffer = float_ops - {i}, a, fb
            why.pop(i)
    layers = [{**{k: r[k] for k in ("index", "layer", "op", "tensor", "rmse_over_scale")}, "why": why[r["index"]]}
              for r in q.layers if r["index"] in float_ops]
    return {"flatbuffer": flatbuffer, "accuracy": acc, "start_accuracy": start, "float_layers": layers,
            "rounds": rounds}


# ---------------------------------------------------------------- the guard

def guard(run_dir: Path, cfg, data, model, meta: dict, evaluation: dict, log=print,
          remedies=REMEDIES) -> list[str]:
    """Analyse the int8 model and, if it loses more than cfg.max_accuracy_drop, repair it.

    Every decision is measured on the validation split; `evaluation` (test split) is not used.
    Writes analysis.json (and analysis_layers.png) into run_dir, plus model_<variant>.tflite for the
    delivered remedy (and int8-qat when --qat asks for it); returns the variants written.
    `remedies` lets tests skip one.
    """
    run_dir = Path(run_dir)
    analysis, written = _examine(run_dir, cfg, data, model, log, remedies)
    for variant, flatbuffer in written.items():
        atomic_write(run_dir / f"model_{variant}.tflite", flatbuffer)
    _mark_float(analysis)
    _write(run_dir, analysis)
    return list(written)


def _examine(run_dir: Path, cfg, data, model, log, remedies) -> tuple[dict, dict[str, bytes]]:
    """Measure, analyse, repair if needed: (analysis, {variant: flatbuffer to write})."""
    t_start, pre = time.perf_counter(), data.spec.to_dict()
    calibration = calibration_images(data, cfg.calibration_samples, cfg.seed)
    x_val, y_val = data.x_val[:DECISION_IMAGES], data.y_val[:DECISION_IMAGES]
    with tempfile.TemporaryDirectory() as tmp:
        judge = Judge(x_val, y_val, pre, Path(tmp))
        fp32 = judge((run_dir / "model_fp32.tflite").read_bytes())
        with _quiet():
            int8_fb = ((run_dir / "model_int8.tflite").read_bytes() if (run_dir / "model_int8.tflite").is_file()
                       else convert(model, "int8", cfg, calibration))
        int8 = judge(int8_fb)
        budget = cfg.max_accuracy_drop
        target = -np.inf if budget is None else fp32 - budget / 100 - 1e-9
        needed = cfg.fallback == "auto" and int8 < target
        analysis = {"schema": 1, "created_by": f"edgepipe {pipeline.__version__}",
                    "validation": {"images": len(y_val), "fp32_accuracy": fp32, "int8_accuracy": int8,
                                   "int8_drop_pp": 100 * (fp32 - int8), "int8_bytes": len(int8_fb)},
                    "layers": None, "guard": None}
        debug = normalize(x_val[:DEBUG_IMAGES], pre)
        quantizer = Quantizer(model, cfg, calibration, debug) if cfg.analyze or needed else None
        analysis["layers"] = quantizer and quantizer.layers
        written: dict[str, bytes] = {}
        if needed or cfg.qat:
            log(f"guard: int8 loses {100 * (fp32 - int8):.2f} pp on {len(y_val)} validation images"
                + (f", over the {budget} pp budget: repairing" if needed else ""))
            repair = _Repair(cfg, data, calibration, debug, judge, fp32, int8_fb, target, Path(tmp), log)
            tried = repair.run(model, quantizer, int8, remedies if needed else ("qat",))
            analysis["guard"] = _verdict(budget, needed, tried, int8 >= target, time.perf_counter() - t_start)
            written = {v: repair.flatbuffers[v] for v in analysis["guard"]["written"]}
            log(f"guard: {analysis['guard']['summary']}")
    return analysis, written


def _mark_float(analysis: dict) -> None:
    """Each layer row names the written variants that keep it float."""
    guard = analysis["guard"] or {"remedies": [], "written": []}
    floats = {r["variant"]: {f["index"] for f in r.get("float_layers", [])}
              for r in guard["remedies"] if r["variant"] in guard["written"]}
    for row in analysis["layers"] or []:
        row["float_in"] = [variant for variant, indices in floats.items() if row["index"] in indices]


class _Repair:
    """The remedies in order, each measured against the same validation target."""

    def __init__(self, cfg, data, calibration, debug, judge, fp32, int8_fb, target, workdir, log):
        self.cfg, self.data, self.calibration, self.debug, self.judge = cfg, data, calibration, debug, judge
        self.fp32, self.int8_fb, self.target, self.workdir, self.log = fp32, int8_fb, target, workdir, log
        self.flatbuffers: dict[str, bytes] = {}

    def run(self, model, quantizer, int8: float, remedies) -> list[dict]:
        # Each remedy starts from the best float model so far: equalization keeps the float function,
        # so the search and QAT build on it when it helped.
        best = {"model": model, "base": "int8", "accuracy": int8, "quantizer": quantizer}
        tried = []
        for name in remedies:
            if best["accuracy"] >= self.target and not (name == "qat" and self.cfg.qat):
                continue  # within budget: only an explicit --qat still runs
            t0 = time.perf_counter()
            record, flatbuffer, float_model = getattr(self, name)(best)
            record = {"name": name, "variant": f"int8-{name}", "base": best["base"], **record,
                      "seconds": time.perf_counter() - t0}
            if flatbuffer is None:
                self.log(f"guard: {name}: {record['status']} ({record['reason']})")
            else:
                self._measure(record, flatbuffer)
                if record["accuracy"] > best["accuracy"]:
                    best["accuracy"] = record["accuracy"]
                    if float_model is not None:  # equalized weights: later remedies start from them
                        best.update(model=float_model, base=record["variant"], quantizer=None)
            tried.append(record)
        return tried

    def _measure(self, record: dict, flatbuffer: bytes) -> None:
        acc = self.judge(flatbuffer)
        self.flatbuffers[record["variant"]] = flatbuffer
        record.update(accuracy=acc, drop_pp=100 * (self.fp32 - acc), bytes=len(flatbuffer),
                      bytes_vs_int8=len(flatbuffer) / len(self.int8_fb),
                      status="within_budget" if acc >= self.target else "over_budget")
        self.log(f"guard: {record['variant']}: {acc:.2%} on validation ({100 * (acc - self.fp32):+.2f} pp vs fp32), "
                 f"{len(flatbuffer):,} bytes, {record['seconds']:.1f} s")

    def cle(self, best):
        eq, record = equalize(best["model"], self.calibration)
        if eq is None:
            return record, None, None
        record["float_max_abs_diff"] = float(np.abs(eq.predict(self.debug, verbose=0)
                                                    - best["model"].predict(self.debug, verbose=0)).max())
        with _quiet():
            return record, convert(eq, "int8", self.cfg, self.calibration), eq

    def mixed(self, best):
        q = best["quantizer"] or Quantizer(best["model"], self.cfg, self.calibration, self.debug)
        found = search_float_ops(q, self.judge, self.target)
        return {k: v for k, v in found.items() if k not in ("flatbuffer", "accuracy")}, found["flatbuffer"], None

    def qat(self, best):
        from pipeline import qat

        record, flatbuffer = qat.fine_tune(best["model"], self.cfg, self.data, self.calibration, self.judge,
                                           self.workdir, log=self.log)
        if "ptq_same_budget" in record:
            record["ptq_same_budget"]["drop_pp"] = 100 * (self.fp32 - record["ptq_same_budget"]["accuracy"])
        return record, flatbuffer, None


def _verdict(budget, needed: bool, tried: list[dict], int8_ok: bool, seconds: float) -> dict:
    """What the guard delivers; `superseded` lists what it replaces (the accuracy check skips those)."""
    within = [r for r in tried if r.get("status") == "within_budget"]
    measured = [r for r in tried if "accuracy" in r]
    if int8_ok:
        delivered = "int8"
    elif within:  # smallest first: the point of quantizing
        delivered = min(within, key=lambda r: (r["bytes"], -r["accuracy"]))["variant"]
    else:
        delivered = None
    # The delivered remedy, QAT when asked for, or else the closest miss, so the report can show it.
    written = [r["variant"] for r in measured if r["variant"] == delivered or r["name"] == "qat"]
    if delivered is None and measured and not written:
        written = [max(measured, key=lambda r: r["accuracy"])["variant"]]
    over = {"int8"} if not int8_ok else set()
    over |= {r["variant"] for r in measured if r["status"] == "over_budget"}
    superseded = [v for v in ["int8", *written] if v in over] if delivered else []
    if delivered is None and needed:
        summary = f"no remedy met the {budget} pp budget on validation (tried {', '.join(r['name'] for r in tried)})"
    else:
        summary = f"delivers {delivered}" + (f", replacing {', '.join(superseded)}" if superseded else "")
    return {"max_accuracy_drop_pp": budget, "needed": needed, "split": "validation", "remedies": tried,
            "delivered": delivered, "written": written, "superseded": superseded, "summary": summary,
            "seconds": seconds}


def _write(run_dir: Path, analysis: dict) -> None:
    write_json(run_dir / ANALYSIS, analysis)
    if analysis["layers"]:
        atomic_write(run_dir / PLOT, _plot(analysis["layers"]))


def _plot(layers: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['layer']} ({r['op']})" + (" [float]" if r.get("float_in") else "") for r in layers]
    values = [r["rmse_over_scale"] for r in layers]
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(layers) + 1.6))
    bars = ax.barh(labels, values, color=["#c0392b" if r["suspect"] else "#2e86c1" for r in layers])
    ax.bar_label(bars, fmt="%.2f", padding=3, fontsize=8)
    ax.axvline(IDEAL, color="grey", ls="--", lw=1, label=f"rounding only ({IDEAL:.2f})")
    ax.axvline(SUSPECT, color="#c0392b", ls=":", lw=1, label=f"suspect (> {SUSPECT})")
    ax.set_xlim(0, max(values + [1.0]) * 1.15)
    ax.invert_yaxis()
    ax.set_xlabel("RMSE of the op's int8 output / its quantization step")
    ax.set_title("int8 error per layer (QuantizationDebugger, validation images)", fontsize=10)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def analyze_run(run_dir: Path, log=print) -> dict:
    """`pipeline analyze RUN_DIR`: the per-layer table of a finished run's int8 model, into its report."""
    import keras

    from pipeline.config import BuildConfig
    from pipeline.data import load_dataset

    run_dir = Path(run_dir)
    cfg = BuildConfig.from_dict({**json.loads((run_dir / "manifest.json").read_text())["config"],
                                 "out": str(run_dir), "analyze": True, "fallback": "none", "qat": False})
    data = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, validation_fraction=cfg.validation_fraction)
    model = keras.models.load_model(run_dir / "model.keras", compile=False)
    analysis, _ = _examine(run_dir, cfg, data, model, log, REMEDIES)
    if (run_dir / ANALYSIS).is_file():  # keep what the build's guard decided
        analysis["guard"] = json.loads((run_dir / ANALYSIS).read_text())["guard"]
    _mark_float(analysis)
    _write(run_dir, analysis)
    worst = max(analysis["layers"], key=lambda r: r["rmse_over_scale"])
    log(f"analyze: {len(analysis['layers'])} quantized ops, {sum(r['suspect'] for r in analysis['layers'])} suspect "
        f"(RMSE/scale > {SUSPECT}); worst {worst['layer']} ({worst['op']}) at {worst['rmse_over_scale']:.2f}")
    if (run_dir / "report.md").is_file():
        from pipeline import report

        report.render(run_dir, log=log)
    update_manifest(run_dir)
    return analysis
