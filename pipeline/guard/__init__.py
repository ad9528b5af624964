"""The guard stage: when int8 loses too much accuracy, repair it, deciding on the validation split only.

`--fallback auto` with `--max-accuracy-drop PP` repairs an int8 model that loses more than PP
points, cheapest remedy first (the test split is for the report):
  1. cross-layer equalization (`int8-cle`, equalize.py): every layer stays int8, the float function is unchanged;
  2. a search for the fewest ops to leave in float (`int8-mixed`, search.py);
  3. quantization-aware fine-tuning (`int8-qat`, qat.py) on --qat, or when 2 falls short.
`--analyze` and `pipeline analyze RUN_DIR` add the per-layer error (analyze.py) to the report.
What was tried, what each remedy cost and which layers stayed float go into analysis.json.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import pipeline
from device.core import normalize
from pipeline.artifacts import atomic_write, updating, write_json
from pipeline.convert import calibration_images, convert
from pipeline.data.dataset import sample_indices
from pipeline.guard.analyze import IDEAL, SUSPECT, Judge, Quantizer, quiet
from pipeline.guard.equalize import equalize
from pipeline.guard.search import search_float_ops
from pipeline.report import plots

ANALYSIS, PLOT = "analysis.json", "analysis_layers.png"
DEBUG_IMAGES = 200        # validation images the debugger runs (per-layer statistics)
DECISION_IMAGES = 2000    # validation images every accuracy decision is measured on
REMEDIES = ("cle", "mixed", "qat")
ALL_INT8 = ("cle", "qat")  # the remedies that leave no op in float


def guard(run_dir: Path, cfg, data, model, log=print, remedies=REMEDIES) -> list[str]:
    """Analyse the int8 model and, if it loses more than cfg.max_accuracy_drop, repair it.

    Every decision is measured on the validation split; the test split is for the report only.
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
    # Across classes, not the split's first images: a split read from class folders is in class order, and
    # CIFAR-10's first 2,000 validation images held four of its ten classes.
    rows = sample_indices(data.y_val, DECISION_IMAGES)
    x_val, y_val = data.x_val[rows], data.y_val[rows]
    with tempfile.TemporaryDirectory() as tmp:
        judge = Judge(x_val, y_val, pre, Path(tmp))
        fp32 = judge((run_dir / "model_fp32.tflite").read_bytes())
        # A run built without int8 (--quantize float16) is analysed as the int8 preset would quantize it.
        in_run = (run_dir / "model_int8.tflite").is_file()
        with quiet():
            int8_fb = (run_dir / "model_int8.tflite").read_bytes() if in_run else convert(model, "int8", cfg,
                                                                                            calibration)
        int8 = judge(int8_fb)
        budget = cfg.max_accuracy_drop
        target = -np.inf if budget is None else fp32 - budget / 100 - 1e-9
        needed = cfg.fallback == "auto" and int8 < target
        analysis = {"schema": 1, "created_by": f"edgepipe {pipeline.__version__}",
                    "validation": {"images": len(y_val), "fp32_accuracy": fp32, "int8_accuracy": int8,
                                   "int8_drop_pp": 100 * (fp32 - int8), "int8_bytes": len(int8_fb),
                                   "int8_in_run": in_run},
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
        with quiet():
            return record, convert(eq, "int8", self.cfg, self.calibration), eq

    def mixed(self, best):
        q = best["quantizer"] or Quantizer(best["model"], self.cfg, self.calibration, self.debug)
        found = search_float_ops(q, self.judge, self.target)
        return {k: v for k, v in found.items() if k not in ("flatbuffer", "accuracy")}, found["flatbuffer"], None

    def qat(self, best):
        from pipeline.guard import qat

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
        atomic_write(run_dir / PLOT, plots.layer_errors(analysis["layers"], IDEAL, SUSPECT))


def _check_same_data(run_dir: Path, cfg, recorded: dict, loaded: dict) -> None:
    """Refuse data other than the run was built on (images added to a folder, another download): its
    validation and calibration images would be analysed as the run's, for classes the model may not have."""
    if recorded.get("sha256") and loaded.get("sha256") != recorded["sha256"]:
        from pipeline.data import DataError

        def described(source: dict) -> str:
            counts = source.get("counts") or {}
            return (" / ".join(f"{counts[s]:,} {s}" for s in ("train", "val", "test") if s in counts)
                    + f" images from {source.get('kind')}, sha256 {str(source.get('sha256'))[:12]}")

        raise DataError(f"{cfg.data_dir or f'the {cfg.dataset} dataset'}: not the data {run_dir} was built on "
                        f"({described(loaded)}, where its manifest.json records {described(recorded)}); restore "
                        "that data, or build a new run on this data with `pipeline build --analyze`")


def analyze_run(run_dir: Path, log=print) -> dict:
    """`pipeline analyze RUN_DIR`: the per-layer table of a finished run's int8 model, into its report."""
    import keras

    from pipeline.config import BuildConfig
    from pipeline.data import load_dataset

    with updating(run_dir, "analyze", log=log) as (work, _):
        manifest = json.loads((work / "manifest.json").read_text())
        cfg = BuildConfig.from_dict({**manifest["config"], "out": str(run_dir), "analyze": True, "fallback": "none",
                                     "qat": False})
        data = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, validation_fraction=cfg.validation_fraction,
                            input_shape=cfg.input_shape, log=log)
        _check_same_data(run_dir, cfg, manifest.get("data") or {}, data.source)
        pre = manifest.get("preprocess")
        if pre:  # the input convention the run was built with
            data = dataclasses.replace(data, spec=dataclasses.replace(data.spec, scale=pre["scale"],
                                                                      offset=pre["offset"]))
        model = keras.models.load_model(work / "model.keras", compile=False)
        analysis, _ = _examine(work, cfg, data, model, log, REMEDIES)
        if (work / ANALYSIS).is_file():  # keep what the build's guard decided
            analysis["guard"] = json.loads((work / ANALYSIS).read_text())["guard"]
        _mark_float(analysis)
        _write(work, analysis)
        layers = analysis["layers"]
        worst = max(layers, key=lambda r: r["rmse_over_scale"])
        if not analysis["validation"]["int8_in_run"]:
            log("analyze: the run has no int8 model; analysing the int8 preset applied to its model")
        log(f"analyze: {len(layers)} quantized ops, {sum(r['suspect'] for r in layers)} suspect (RMSE/scale > "
            f"{SUSPECT}); worst {worst['layer']} ({worst['op']}) at {worst['rmse_over_scale']:.2f}")
        if (work / "report.md").is_file():
            from pipeline.report import render as report

            report.render(work, log=log)
    return analysis
