"""The stages of a build, in order, into one atomic run directory.

data -> train -> convert -> metadata -> evaluate -> benchmark -> report. Each stage records the
files it wrote; `--resume` skips a finished stage whose files still verify. The run directory
(manifest.json, metadata.json, evaluation.json, benchmark.json) is the interface between stages, so
`pipeline benchmark` and `pipeline report` can run later on a finished run.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

import pipeline
from device.core import METADATA_NAME, Model
from pipeline.artifacts import MANIFEST, RunDir, file_entry, update_manifest, write_json
from pipeline.config import BuildConfig
from pipeline.data import Dataset, load_dataset

STAGES = ("train", "convert", "metadata", "evaluate", "benchmark", "report")


class AccuracyDropError(Exception):
    """Variants lost more accuracy than --max-accuracy-drop allows (the report is still written)."""


def versions() -> dict:
    from importlib import metadata

    out = {"edgepipe": pipeline.__version__, "python": platform.python_version()}
    for dist in ("tensorflow", "keras", "ai-edge-litert", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _save_keras(model, path: Path) -> None:
    # Keras insists on the .keras suffix, so the temporary name keeps it; rename makes it atomic.
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.keras")
    model.save(tmp)
    os.replace(tmp, path)


def metadata_for(cfg: BuildConfig, data: Dataset, run_dir: Path, variants) -> dict:
    """What the device needs beside a model: preprocessing, labels, and each model's hash and tensors."""
    pre = data.spec.to_dict()
    meta = {"schema": 1, "created_by": f"edgepipe {pipeline.__version__}", "dataset": data.name,
            "model": cfg.model, "preprocess": pre, "models": {}}
    for v in variants:
        path = run_dir / f"model_{v}.tflite"
        info = Model(path, metadata={"preprocess": pre}, verify=False).info()
        meta["models"][path.name] = {"variant": v, **file_entry(path), "input": info["input"],
                                     "output": info["output"], "ops": info["ops"]}
    return meta


def build(cfg: BuildConfig, *, overwrite: bool = False, resume: bool = False, until: str = "report",
          log=print) -> Path:
    """Run the stages up to and including `until`; returns the finished run directory."""
    from pipeline import convert as convert_stage
    from pipeline import train as train_stage

    run = RunDir(cfg.run_dir, overwrite=overwrite, resume=resume, log=log)
    wanted = STAGES[:STAGES.index(until) + 1]
    times: dict[str, float] = {}
    reused: list[str] = []
    try:
        run.write_json("config.json", cfg.to_dict())  # first, so --resume can restart from any point
        t0 = time.perf_counter()
        data = _data(cfg, wanted, log)
        times["data"] = time.perf_counter() - t0
        log(f"data: {data.name} from {data.source['kind']}, {len(data.x_train)} train / {len(data.x_val)} "
            f"validation / {len(data.x_test)} test")

        t0 = time.perf_counter()
        import keras

        if run.reusable("train"):
            model, history = keras.models.load_model(run.path("model.keras")), run.progress()["train"]["info"]
            reused.append("train")
        else:
            if cfg.keras_model:
                model, history = train_stage.load_user_model(cfg.keras_model, data), {"source": cfg.keras_model}
                log(f"using your model {cfg.keras_model}; training skipped")
            else:
                model, history = train_stage.train(cfg, data, log=log)
            _save_keras(model, run.path("model.keras"))
            run.stage_done("train", ["model.keras"], history)
        times["train"] = time.perf_counter() - t0
        from pipeline.models import count_macs

        macs = count_macs(model)

        if "convert" in wanted:
            t0 = time.perf_counter()
            converted = ["model.keras", *(f"model_{v}.tflite" for v in cfg.quantize)]
            if _reuse(run, "convert", converted):  # the models of this very model.keras
                reused.append("convert")
            else:
                for v, (flatbuffer, _) in convert_stage.convert_all(model, cfg, data, log=log).items():
                    run.write(f"model_{v}.tflite", flatbuffer)
                run.stage_done("convert", converted)
            times["convert"] = time.perf_counter() - t0

            variants = list(cfg.quantize)
            meta = metadata_for(cfg, data, run.staging, variants)
            run.write_json(METADATA_NAME, meta)
            run.write("labels.txt", "\n".join(data.spec.labels) + "\n")
            _write_samples(run.path("samples"), data)

        if "evaluate" in wanted and cfg.evaluate:
            from pipeline.measure.evaluate import evaluate_variants

            t0 = time.perf_counter()
            guarded = cfg.analyze or cfg.fallback == "auto" or cfg.qat
            evaluated = ["model.keras", METADATA_NAME, *(f"model_{v}.tflite" for v in variants)]
            if not guarded and _reuse(run, "evaluate", evaluated):
                reused.append("evaluate")
            else:
                evaluation, probs = evaluate_variants(run.staging, variants, data.x_test, data.y_test, meta,
                                                      keras_model=model, log=log)
            times["evaluate"] = time.perf_counter() - t0

            if guarded:
                from pipeline.guard import guard

                t0 = time.perf_counter()
                # The guard decides on the validation split and writes any new variant it makes
                # (model_<name>.tflite); those join the evaluation, benchmark and report.
                added = guard(run.staging, cfg, data, model, meta, evaluation, log=log)
                if added:
                    variants += added
                    meta = metadata_for(cfg, data, run.staging, variants)
                    run.write_json(METADATA_NAME, meta)
                    evaluation, probs = evaluate_variants(run.staging, variants, data.x_test, data.y_test, meta,
                                                          keras_model=model, log=log)
                times["guard"] = time.perf_counter() - t0
            if "evaluate" not in reused:
                run.write_json("evaluation.json", evaluation)
                _save_predictions(run.path("predictions.npz"), probs, data.y_test)
                run.stage_done("evaluate", ["evaluation.json", "predictions.npz", *evaluated])

        if "benchmark" in wanted and cfg.benchmark:
            from pipeline.measure.benchmark import benchmark_variants

            t0 = time.perf_counter()
            measured = [f"model_{v}.tflite" for v in variants]
            if _reuse(run, "benchmark", measured):
                reused.append("benchmark")
            else:
                bench = benchmark_variants(run.staging, variants, meta, threads_list=cfg.threads,
                                           xnnpack=cfg.xnnpack, runs=cfg.bench_runs, warmup=cfg.bench_warmup,
                                           macs=macs, cross_check_litert=cfg.cross_check, log=log)
                run.write_json("benchmark.json", bench)
                run.stage_done("benchmark", ["benchmark.json", *measured])
            times["benchmark"] = time.perf_counter() - t0

        manifest = {
            "schema": 1, "config": cfg.to_dict(), "versions": versions(),
            "platform": {"system": platform.platform(), "machine": platform.machine(),
                         "cpu_count": os.cpu_count()},
            "data": data.source, "calibration_samples": min(cfg.calibration_samples, len(data.x_train)),
            "preprocess": data.spec.to_dict(), "training": history, "macs_per_inference": macs,
            "models": meta["models"] if "convert" in wanted else {},
            "stage_seconds": times, "reused_stages": reused,
        }
        if "report" in wanted and cfg.evaluate:
            from pipeline.report import render as report

            t0 = time.perf_counter()
            run.write_json(MANIFEST, manifest)
            report.render(run.staging, log=log)
            times["report"] = time.perf_counter() - t0
        final = run.commit(manifest)
    except BaseException:
        run.abandon()
        raise
    if reused:
        log(f"reused from the interrupted build: {', '.join(reused)}")
    elif run.resumed:
        log("nothing from the interrupted build could be reused; every stage ran again")
    log(f"wrote {final}")
    return final


def _data(cfg: BuildConfig, wanted, log) -> Dataset:
    """The dataset, or only its description when nothing needs its images and getting them means a download:
    converting your own model (`pipeline convert`) to variants that need no calibration."""
    from pipeline.convert import CALIBRATED
    from pipeline.data import DATASETS

    info = DATASETS[cfg.dataset]
    needs_images = "evaluate" in wanted or not cfg.keras_model or any(v in CALIBRATED for v in cfg.quantize)
    if needs_images or cfg.data_dir is not None or not info.offline:
        return load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, validation_fraction=cfg.validation_fraction)
    log(f"data: {', '.join(cfg.quantize)} need no images, so {cfg.dataset} is not downloaded "
        "(no samples/ for the device; pass --data-dir to include them)")
    empty = np.zeros((0, *info.input_shape), np.uint8), np.zeros(0, np.int64)
    return Dataset(cfg.dataset, *empty, *empty, *empty, info.spec, {"kind": "none", "files": [], "sha256": None,
                                                                      "counts": {"train": 0, "val": 0, "test": 0}})


def _reuse(run: RunDir, stage: str, inputs: list[str]) -> bool:
    """A finished stage is reused only if its outputs and these inputs are still the files it saw."""
    entry = run.reusable(stage)
    return entry is not None and set(inputs) <= set(entry["files"])


def _write_samples(folder: Path, data: Dataset, images: int = 8, labelled: int = 200) -> None:
    """A few test images as PNG for `classify`, and a labelled npz for `eval`, to ship in the bundle."""
    import io

    from PIL import Image

    from pipeline.artifacts import atomic_write

    if not len(data.x_test):
        return
    folder.mkdir(exist_ok=True)
    for i in range(min(images, len(data.x_test))):
        img = data.x_test[i]
        img = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        atomic_write(folder / f"{i:02d}_{data.spec.labels[int(data.y_test[i])]}.png", buf.getvalue())
    buf = io.BytesIO()
    np.savez_compressed(buf, x=data.x_test[:labelled], y=data.y_test[:labelled])
    atomic_write(folder / "eval.npz", buf.getvalue())


def _save_predictions(path: Path, probs: dict[str, np.ndarray], y: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, y=np.asarray(y), **{f"probs_{k}": v for k, v in probs.items()})
    os.replace(tmp, path)


def check_accuracy_drop(run_dir: Path, max_drop_pp: float) -> None:
    run_dir = Path(run_dir)
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    # With --fallback auto the guard delivers a repaired variant; the ones it replaced are not judged.
    analysis = run_dir / "analysis.json"
    guard = json.loads(analysis.read_text()).get("guard") if analysis.is_file() else None
    replaced = set((guard or {}).get("superseded", []))
    over = [f"{v} ({-e['change_pp_vs_fp32']:.2f} pp)" for v, e in evaluation["variants"].items()
            if v not in replaced and -e["change_pp_vs_fp32"] > max_drop_pp]
    if over:
        raise AccuracyDropError(f"accuracy drop above --max-accuracy-drop {max_drop_pp} pp: {', '.join(over)}; "
                                f"the full report is in {run_dir}")


def rebenchmark(run_dir: Path, cfg: BuildConfig, log=print) -> dict:
    """`pipeline benchmark RUN_DIR`: measure again, rewrite benchmark.json and the report."""
    from pipeline.report import render as report
    from pipeline.measure.benchmark import benchmark_variants

    run_dir = Path(run_dir)
    meta = json.loads((run_dir / METADATA_NAME).read_text())
    manifest = json.loads((run_dir / MANIFEST).read_text())
    variants = [m["variant"] for m in meta["models"].values()]
    bench = benchmark_variants(run_dir, variants, meta, threads_list=cfg.threads, xnnpack=cfg.xnnpack,
                               runs=cfg.bench_runs, warmup=cfg.bench_warmup, macs=manifest.get("macs_per_inference"),
                               cross_check_litert=cfg.cross_check, log=log)
    write_json(run_dir / "benchmark.json", bench)
    update_manifest(run_dir, {"stage_seconds": {**manifest.get("stage_seconds", {}), "benchmark": bench["seconds"]}})
    if (run_dir / "evaluation.json").exists():
        report.render(run_dir, log=log)
        update_manifest(run_dir)
    return bench

