"""The stages of a build, in order, into one atomic run directory.

data -> train -> convert -> guard -> metadata -> evaluate -> benchmark -> report. Each stage is one
function with explicit inputs and outputs; each records the files it wrote and the inputs it was
made from (data hash, source model hash, the options that shape it), so `--resume` reuses a finished
stage only when its files still verify and its inputs are the same. The run directory (manifest.json,
metadata.json, evaluation.json, benchmark.json) is the interface between stages, so `pipeline
benchmark` and `pipeline report` can run later on a finished run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

import pipeline
from device.core import METADATA_NAME, Model
from device.integrity import sha256_file
from pipeline import console, failures, train
from pipeline.artifacts import (
    CHECKPOINT,
    CREATED_BY,
    MANIFEST,
    RunDir,
    atomic_write,
    file_entry,
    resume_target,
    updating,
    write_json,
)
from pipeline.config import INPUT_RANGES, BuildConfig
from pipeline.data import Dataset, load_dataset
from pipeline.data.dataset import sample_indices
from pipeline.failures import InputError
from pipeline.metadata import status as tflite_metadata_status

STAGES = ("train", "convert", "guard", "metadata", "evaluate", "benchmark", "report")
SAMPLES = "samples"


class AccuracyDropError(InputError):
    """Variants lost more accuracy than --max-accuracy-drop allows (the report is still written)."""


class Stopwatch:
    """Seconds per stage: `with clock("train"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = time.perf_counter() - t0


def versions() -> dict:
    from importlib import metadata

    out = {"edgepipe": pipeline.__version__, "python": platform.python_version()}
    for dist in ("tensorflow", "keras", "ai-edge-litert", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def build(cfg: BuildConfig, *, overwrite: bool = False, resume: bool = False, until: str | None = None,
          log=print) -> Path:
    """Run the stages up to and including `until` (a resumed build: what it was first asked for)."""
    run = RunDir(cfg.run_dir, overwrite=overwrite, resume=resume, log=log)
    try:
        console.keep_log(run.staging, run.final)  # build.log goes with the run (and stays with a failed one)
        final = _stages(run, cfg, run.request(None if resume else until or "report"), log)
    except BaseException as e:
        _stop(run, e)
        raise
    log(f"wrote {final}")
    return final


def _stop(run: RunDir, error: BaseException) -> None:
    """Keep the staging folder for `--resume`, or throw it away: decided here, before anything is deleted.

    Only the user's input makes a new build's worthless (the same input fails the same way). An interruption, a
    full disk or a bug keeps what the finished stages and the training checkpoint paid for, and the
    error's line says how to continue; a failure before anything finished leaves nothing to continue.
    """
    what = failures.kind(error)
    worth_keeping = bool(run.resumable())
    # A resumed build keeps it even then: what failed may be a file that can be put back (a data folder
    # moved), and what it was asked to continue is not lost to a mistake.
    if (what == failures.INPUT and not run.resumed) or (what != failures.INTERRUPTED and not worth_keeping):
        console.log_moved(run.discard())  # the log stays beside the run as NAME.failed.log
        return
    run.abandon()
    error.add_note(f"`pipeline build --resume {resume_target(run.final)}` continues from the last finished stage")


def _stages(run: RunDir, cfg: BuildConfig, until: str, log) -> Path:
    wanted = STAGES[:STAGES.index(until) + 1]
    clock, reused = Stopwatch(), []
    run.write_json("config.json", cfg.to_dict())  # first, so --resume can restart from any point
    with clock("data"):
        data, user_model, chosen_range = load_inputs(cfg, wanted, log)
    with clock("train"):
        model, history = train_stage(run, cfg, data, user_model, reused, log)
    variants, meta = ["fp32"], None
    if "convert" in wanted:
        with clock("convert"):
            variants = convert_stage(run, cfg, data, model, reused, log)
    if "guard" in wanted and cfg.guarded:
        with clock("guard"):
            variants += guard_stage(run, cfg, data, model, reused, log)
    if "metadata" in wanted:
        meta = metadata_stage(run, cfg, data, model, variants)
    if "evaluate" in wanted and cfg.evaluate:
        with clock("evaluate"):
            evaluate_stage(run, data, model, meta, variants, reused, log)
    from pipeline.models import count_macs

    macs = count_macs(model)
    if "benchmark" in wanted and cfg.benchmark:
        with clock("benchmark"):
            benchmark_stage(run, cfg, meta, variants, macs, reused, log)
    manifest = {
        "schema": 1, "created_by": CREATED_BY, "config": cfg.to_dict(), "versions": versions(),
        "platform": {"system": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count()},
        "data": data.source, "calibration_samples": min(cfg.calibration_samples, len(data.x_train)),
        "model_name": cfg.model_name, "input_range": chosen_range,
        "preprocess": data.spec.to_dict(), "training": history, "macs_per_inference": macs,
        "models": meta["models"] if meta else {}, "stage_seconds": clock.seconds, "reused_stages": reused,
    }
    if "report" in wanted and cfg.evaluate:
        with clock("report"):
            run.write_json(MANIFEST, manifest)  # the report reads it
            from pipeline.report import render

            render.render(run.staging, log=log)
    final = run.commit(manifest)
    if reused:
        log(f"reused from the interrupted build: {', '.join(reused)}")
    elif run.resumed and not history.get("resumed_after_epoch"):
        log("nothing from the interrupted build could be reused; every stage ran again")
    return final


# ---------------------------------------------------------------- the stages

def load_inputs(cfg: BuildConfig, wanted, log) -> tuple[Dataset, object, dict]:
    """The dataset, with the model's input convention, the user's own model if one was given, and how
    the input range was chosen (for the manifest)."""
    from pipeline.train import check_input_shape, load_user_model

    # The user's model before the data: a file that cannot be used is said before minutes of decoding.
    user_model = load_user_model(cfg.keras_model, None, log=log) if cfg.keras_model else None
    data = _data(cfg, wanted, log, _images_for(cfg, user_model))
    if user_model is not None:
        check_input_shape(user_model, data, cfg.keras_model)
    log(f"data: {data.name} from {data.source['kind']}, {len(data.x_train)} train / {len(data.x_val)} "
        f"validation / {len(data.x_test)} test")
    chosen = input_range(cfg, user_model, data, log)
    scale, offset = INPUT_RANGES[chosen["range"]]
    data = dataclasses.replace(data, spec=dataclasses.replace(data.spec, scale=scale, offset=offset))
    return data, user_model, chosen


def input_range(cfg: BuildConfig, user_model, data: Dataset, log) -> dict:
    """The input range the build feeds the model, and why: given, the model's own Rescaling layer, or
    detected by scoring a user's model under each convention (pipeline/foreign.py)."""
    from pipeline.foreign import describe_scores, detect_input_range
    from pipeline.train import input_convention, scales_its_own_input

    if user_model is None:
        return {"range": cfg.input_range or "0,1", "source": "given" if cfg.input_range else "default"}
    input_convention(cfg, user_model)  # refuses an --input-range that contradicts a Rescaling layer
    if scales_its_own_input(user_model):
        log("input range: 0,255, the model's first layer scales raw pixels itself")
        return {"range": "0,255", "source": "model's first layer"}
    if not len(data.x_val):
        if cfg.input_range is None:  # assumed, a model trained on -1..1 would ship with the wrong preprocessing
            from pipeline.train import ModelMismatchError

            raise ModelMismatchError(
                f"{cfg.keras_model}: its input range cannot be detected without {cfg.dataset} images, which "
                f"{', '.join(cfg.quantize)} do not need; pass --input-range {' or '.join(INPUT_RANGES)} as the "
                "model was trained, or --data-dir DIR to detect it")
        log(f"input range: {cfg.input_range} (given; not checked: no validation images were loaded)")
        return {"range": cfg.input_range, "source": "given"}
    chosen = detect_input_range(user_model, data.x_val, data.y_val, cfg.input_range)
    how = {"given": "given with --input-range", "detected": "detected", "default": "assumed"}[chosen["source"]]
    log(f"input range: {chosen['range']}, {how}: {describe_scores(chosen['scores'])} on {chosen['images']} "
        "validation images" + ("" if chosen["source"] == "given" else "; --input-range overrides it"))
    if chosen["warning"]:
        log(f"warning: {chosen['warning']}")
    return chosen


def train_stage(run: RunDir, cfg: BuildConfig, data: Dataset, user_model, reused: list, log):
    """-> model.keras: trained, or the user's model as it is."""
    import keras

    inputs = {"data": data.source["sha256"], "preprocess": [data.spec.scale, data.spec.offset],
              "source_model": sha256_file(Path(cfg.keras_model)) if cfg.keras_model else None,
              "options": {k: getattr(cfg, k) for k in ("model", "epochs", "batch_size", "seed")}}
    entry = run.reusable("train", inputs)
    if entry:
        reused.append("train")
        return keras.models.load_model(run.path("model.keras")), entry["info"]
    if user_model is not None:
        model, history = user_model, {"source": cfg.keras_model}
        log(f"using your model {cfg.keras_model}; training skipped")
    else:
        model, history = train.train(cfg, data, log=log, checkpoint=run.path(CHECKPOINT), key=inputs)
    _save_keras(model, run.path("model.keras"))
    run.stage_done("train", ["model.keras"], history, inputs)
    run.path(CHECKPOINT).unlink(missing_ok=True)  # model.keras holds what it kept
    return model, history


def convert_stage(run: RunDir, cfg: BuildConfig, data: Dataset, model, reused: list, log) -> list[str]:
    """-> model_<variant>.tflite for every --quantize variant."""
    from pipeline import convert

    files = [f"model_{v}.tflite" for v in cfg.quantize]
    inputs = {**_hashes(run, ["model.keras"]), "data": data.source["sha256"],
              "options": {k: getattr(cfg, k) for k in ("quantize", "calibration_samples", "int8_io", "seed")}}
    inputs["options"]["quantize"] = list(cfg.quantize)
    if any(v in convert.CALIBRATED for v in cfg.quantize) and len(data.x_train):
        files.append(convert.CALIBRATION)
    if run.reusable("convert", inputs, files):
        reused.append("convert")
    else:
        for v, (flatbuffer, _) in convert.convert_all(model, cfg, data, log=log).items():
            run.write(f"model_{v}.tflite", flatbuffer)
        if convert.CALIBRATION in files:  # the export converts int8 again from model.keras on these
            _save_npz(run.path(convert.CALIBRATION),
                      x=convert.calibration_pixels(data, cfg.calibration_samples, cfg.seed))
        _tflite_metadata(cfg, data, run.staging, cfg.quantize, log)
        run.stage_done("convert", files, None, inputs)
    return list(cfg.quantize)


def guard_stage(run: RunDir, cfg: BuildConfig, data: Dataset, model, reused: list, log) -> list[str]:
    """-> analysis.json and any variant the guard made (model_int8-cle.tflite, ...); returns those."""
    from pipeline.guard import guard

    inputs = {**_hashes(run, ["model.keras", *(f"model_{v}.tflite" for v in cfg.quantize)]),
              "data": data.source["sha256"],
              "options": {k: getattr(cfg, k) for k in ("analyze", "fallback", "qat", "max_accuracy_drop",
                                                       "calibration_samples", "int8_io", "seed")}}
    entry = run.reusable("guard", inputs)
    if entry:
        reused.append("guard")
        return entry["info"]["added"]
    added = guard(run.staging, cfg, data, model, log=log)
    _tflite_metadata(cfg, data, run.staging, added, log)
    written = ["analysis.json", *(f"model_{v}.tflite" for v in added)]
    written += [p.name for p in run.staging.glob("analysis_*.png")]
    run.stage_done("guard", written, {"added": added}, inputs)
    return added


def metadata_stage(run: RunDir, cfg: BuildConfig, data: Dataset, model, variants: list[str]) -> dict:
    """-> metadata.json (what the device needs), labels.txt and samples/; cheap, so never reused."""
    meta = metadata_for(cfg, data, run.staging, variants, logits=_outputs_logits(model))
    run.write_json(METADATA_NAME, meta)
    run.write("labels.txt", "\n".join(data.spec.labels) + "\n")
    _write_samples(run.path(SAMPLES), data)
    return meta


def evaluate_stage(run: RunDir, data: Dataset, model, meta: dict, variants: list[str], reused: list, log) -> None:
    """-> evaluation.json and predictions.npz: every variant once, on the test split."""
    from pipeline.measure.evaluate import evaluate_variants

    inputs = {**_hashes(run, ["model.keras", METADATA_NAME, *(f"model_{v}.tflite" for v in variants)]),
              "data": data.source["sha256"]}
    if run.reusable("evaluate", inputs):
        reused.append("evaluate")
        return
    evaluation, probs = evaluate_variants(run.staging, variants, data.x_test, data.y_test, meta,
                                          keras_model=model, log=log)
    run.write_json("evaluation.json", evaluation)
    _save_predictions(run.path("predictions.npz"), probs, data.y_test)
    run.stage_done("evaluate", ["evaluation.json", "predictions.npz"], None, inputs)


def benchmark_stage(run: RunDir, cfg: BuildConfig, meta: dict, variants: list[str], macs: int, reused: list,
                    log) -> None:
    """-> benchmark.json: latency, memory and size of every variant."""
    from pipeline.measure.benchmark import benchmark_variants

    inputs = {**_hashes(run, [METADATA_NAME, *(f"model_{v}.tflite" for v in variants)]),
              "options": {k: getattr(cfg, k) for k in ("xnnpack", "bench_runs", "bench_warmup", "cross_check")}}
    inputs["options"]["threads"] = list(cfg.threads)
    if run.reusable("benchmark", inputs):
        reused.append("benchmark")
        return
    bench = benchmark_variants(run.staging, variants, meta, threads_list=cfg.threads, xnnpack=cfg.xnnpack,
                               runs=cfg.bench_runs, warmup=cfg.bench_warmup, macs=macs,
                               cross_check_litert=cfg.cross_check, log=log)
    run.write_json("benchmark.json", bench)
    run.stage_done("benchmark", ["benchmark.json"], None, inputs)


# ---------------------------------------------------------------- helpers of the stages

def _images_for(cfg: BuildConfig, user_model) -> tuple[int, int, int]:
    """The shape the images are decoded to. A folder is decoded for the model that reads it: for a user's
    model that is its own input (grayscale or RGB, and its size unless --image-size says), not that of the
    zoo model the folder would have trained."""
    shape = cfg.input_shape
    if user_model is None or cfg.dataset != "folder":
        return shape
    wanted = tuple(user_model.inputs[0].shape[1:])
    if len(wanted) != 3 or wanted[2] not in (1, 3) or None in wanted:
        return shape  # check_input_shape says what is wrong with it
    return (*(shape[:2] if cfg.image_size else wanted[:2]), wanted[2])


def _data(cfg: BuildConfig, wanted, log, shape: tuple[int, int, int]) -> Dataset:
    """The dataset, or only its description when nothing needs its images and getting them means a download:
    converting your own model (`pipeline convert`) to variants that need no calibration."""
    from pipeline.convert import CALIBRATED
    from pipeline.data import DATASETS

    info = DATASETS[cfg.dataset]
    needs_images = "evaluate" in wanted or not cfg.keras_model or any(v in CALIBRATED for v in cfg.quantize)
    if needs_images or cfg.data_dir is not None or not info.offline:
        return load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, validation_fraction=cfg.validation_fraction,
                            input_shape=shape, log=log)
    log(f"data: {', '.join(cfg.quantize)} need no images, so {cfg.dataset} is not downloaded "
        "(no samples/ for the device; pass --data-dir to include them)")
    empty = np.zeros((0, *info.input_shape), np.uint8), np.zeros(0, np.int64)
    return Dataset(cfg.dataset, *empty, *empty, *empty, info.spec, {"kind": "none", "files": [], "sha256": None,
                                                                      "counts": {"train": 0, "val": 0, "test": 0}})


def _hashes(run: RunDir, names: list[str]) -> dict:
    return {name: sha256_file(run.path(name)) for name in names}


def _save_keras(model, path: Path) -> None:
    # Keras insists on the .keras suffix, so the temporary name keeps it; rename makes it atomic.
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.keras")
    model.save(tmp)
    os.replace(tmp, path)


def _outputs_logits(model) -> bool:
    """True when the last layer does not end in softmax: the model's outputs are logits."""
    from pipeline.train import outputs_probabilities

    return not outputs_probabilities(model)


def metadata_for(cfg: BuildConfig, data: Dataset, run_dir: Path, variants, logits: bool = False) -> dict:
    """What the device needs beside a model: preprocessing, labels, and each model's hash and tensors."""
    pre = data.spec.to_dict()
    meta = {"schema": 1, "created_by": CREATED_BY, "dataset": data.name, "model": cfg.model_name,
            "preprocess": pre, "output": "logits" if logits else "probabilities", "models": {}}
    for v in variants:
        path = run_dir / f"model_{v}.tflite"
        info = Model(path, metadata={"preprocess": pre}, verify=False).info()
        meta["models"][path.name] = {"variant": v, **file_entry(path), "input": info["input"],
                                     "output": info["output"], "ops": info["ops"],
                                     "tflite_metadata": tflite_metadata_status(path, pre)}
    return meta


def _tflite_metadata(cfg: BuildConfig, data: Dataset, folder: Path, variants, log) -> None:
    """Standard TFLite model metadata (labels, normalization) inside each model, for apps like MediaPipe."""
    from pipeline.metadata import embed_files

    embed_files(folder, variants, cfg.model_name, data.name, data.spec.to_dict(), pipeline.__version__, log=log)


def sample_name(index: int, label: str) -> str:
    """A file name for a sample image; a label such as `T-shirt/top` must not make a folder."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label).strip("_") or "class"
    return f"{index:02d}_{safe}.png"


def _write_samples(folder: Path, data: Dataset, images: int = 8, labelled: int = 200) -> None:
    """A few test images as PNG for `classify`, and a labelled npz for `eval`, to ship in the bundle."""
    from PIL import Image

    if not len(data.x_test):
        return
    folder.mkdir(exist_ok=True)
    for n, i in enumerate(sample_indices(data.y_test, images)):
        img = data.x_test[i]
        img = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        atomic_write(folder / sample_name(n, data.spec.labels[int(data.y_test[i])]), buf.getvalue())
    # Across classes, as the PNGs: an image folder's test split is read class by class, and its first 200
    # images were one class. `index` says which test images they are (predictions.npz holds the whole split).
    index = np.asarray(sample_indices(data.y_test, labelled), dtype=np.int64)
    _save_npz(folder / "eval.npz", x=data.x_test[index], y=data.y_test[index], index=index)


def _save_predictions(path: Path, probs: dict[str, np.ndarray], y: np.ndarray) -> None:
    _save_npz(path, y=np.asarray(y), **{f"probs_{k}": v for k, v in probs.items()})


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write(path, buf.getvalue())


# ---------------------------------------------------------------- after the build

def check_accuracy_drop(run_dir: Path, max_drop_pp: float) -> None:
    run_dir = Path(run_dir)
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    # With --fallback auto the guard delivers a repaired variant; the ones it replaced are not judged.
    analysis = run_dir / "analysis.json"
    guard = json.loads(analysis.read_text()).get("guard") if analysis.is_file() else None
    replaced = set((guard or {}).get("superseded", []))
    # A drop of exactly the budget is within it: 100 * (978/1000 - 979/1000) is -0.10000000000000009, not -0.1.
    over = [f"{v} ({-e['change_pp_vs_fp32']:.2f} pp)" for v, e in evaluation["variants"].items()
            if v not in replaced and -e["change_pp_vs_fp32"] > max_drop_pp + 1e-7]
    if over:
        raise AccuracyDropError(f"accuracy drop above --max-accuracy-drop {max_drop_pp} pp: {', '.join(over)}; "
                                f"the full report is in {run_dir}")


def check_min_accuracy(run_dir: Path, floor_pct: float) -> None:
    path = Path(run_dir) / "report.json"
    if not path.exists():
        raise AccuracyDropError(f"--min-accuracy {floor_pct:g}: {run_dir} has no report (built with evaluation off?), "
                                "so there is no test accuracy to check; drop --min-accuracy or evaluate")
    report = json.loads(path.read_text())
    delivered = report["delivered"]["variant"]
    accuracy = next(v["accuracy"] for v in report["variants"] if v["variant"] == delivered)
    if 100 * accuracy < floor_pct - 1e-7:  # 979 of 1,000 images is 97.89999999999999%, and at 97.9 the floor
        raise AccuracyDropError(f"{delivered} test accuracy {100 * accuracy:.2f}% is below --min-accuracy "
                                f"{floor_pct:g}%; the full report is in {run_dir}")


def rebenchmark(run_dir: Path, cfg: BuildConfig, log=print) -> dict:
    """`pipeline benchmark RUN_DIR`: measure again; benchmark.json, the report and the manifest change as one."""
    from pipeline.measure.benchmark import benchmark_variants
    from pipeline.report import render

    with updating(run_dir, "benchmark", log=log) as (work, changed):
        manifest = json.loads((work / MANIFEST).read_text())
        meta = json.loads((work / METADATA_NAME).read_text())
        variants = [m["variant"] for m in meta["models"].values()]
        bench = benchmark_variants(work, variants, meta, threads_list=cfg.threads, xnnpack=cfg.xnnpack,
                                   runs=cfg.bench_runs, warmup=cfg.bench_warmup,
                                   macs=manifest.get("macs_per_inference"), cross_check_litert=cfg.cross_check,
                                   log=log)
        write_json(work / "benchmark.json", bench)
        changed["stage_seconds"] = {**manifest.get("stage_seconds", {}), "benchmark": bench["seconds"]}
        if (work / "evaluation.json").exists():
            render.render(work, log=log)
    return bench
