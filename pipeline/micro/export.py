"""Export for TensorFlow Lite Micro: `pipeline export RUN_DIR --target tflm`.

From a finished run: the int8 model made lean for a microcontroller (batch fixed at 1, int8 in and out),
its arena measured and its accuracy checked under TFLM's kernels (micro/runtime.py), which boards it fits,
and a folder plus .tar.gz of C/C++ sources and a README (micro/sources.py). The run's manifest and
report gain the flash and RAM figures (tflm.json). Nothing is half-written: the folder is built in a
staging folder beside its target and renamed into place when every figure is in. It reads only the run
(model.keras, calibration.npz, samples/eval.npz), never the dataset: it does not build anything again.
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np

import pipeline
from device.core import Model, normalize
from device.integrity import METADATA_NAME, UMASK, DeviceError, read_model_bytes, sha256_file
from pipeline.artifacts import MANIFEST, check_unchanged, updating, write_json
from pipeline.build import SAMPLES
from pipeline.convert import CALIBRATION
from pipeline.micro import runtime
from pipeline.micro import sources as c_sources
from pipeline.micro.accuracy import check_accuracy
from pipeline.micro.fit import BOARDS, FLASH_ALLOWANCE, RAM_ALLOWANCE, Budget, choose_budget, fits
from pipeline.micro.fit import board_budget as board_budget  # re-exported: `pipeline search` reads it here
from pipeline.micro.runtime import ExportError

TARGETS = ("tflm",)
MARKER = "tflm_export.json"  # an export's own manifest; --overwrite replaces only folders that hold one
KIND = "edgepipe TensorFlow Lite Micro export"
RUN_SUMMARY = "tflm.json"


# ---------------------------------------------------------------- the run and its model

def _read_run(run_dir: Path) -> tuple[dict, dict]:
    try:
        meta = json.loads((run_dir / METADATA_NAME).read_text())
        manifest = json.loads((run_dir / MANIFEST).read_text())
        manifest["config"]
    except (OSError, ValueError, KeyError):
        raise ExportError(f"{run_dir}: no readable {METADATA_NAME} and {MANIFEST}; pass a run directory written "
                          "by `pipeline build`")
    return meta, manifest


def _test_samples(run_dir: Path, count: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The run's labelled test images (samples/eval.npz, taken across classes), the first `count` of them, and
    their indices in the run's test split (older runs kept its first images, without indices)."""
    try:
        with np.load(run_dir / SAMPLES / "eval.npz") as f:
            x, y = f["x"], f["y"]
            index = f["index"] if "index" in f.files else np.arange(len(y))
    except (OSError, KeyError, ValueError):
        raise ExportError(f"{run_dir}: no readable {SAMPLES}/eval.npz, the test images the export is checked on "
                          "(a run built without test images); rebuild it with `pipeline build`")
    return (x, y, index) if count is None else (x[:count], y[:count], index[:count])


def _calibration(run_dir: Path, manifest: dict) -> np.ndarray:
    """The training images the run's int8 model was calibrated on, normalized as the run fed them (its
    --input-range, a Rescaling layer, a detected range): calibrating on other values makes another model."""
    try:
        with np.load(run_dir / CALIBRATION) as f:
            pixels = f["x"]
    except (OSError, KeyError, ValueError):
        raise ExportError(f"{run_dir}: no {CALIBRATION}, the training images its int8 model was calibrated on "
                          "(runs built before edgepipe kept them have none), so it cannot be converted again with "
                          "batch 1 and int8 input/output; rebuild the run with `pipeline build`")
    return normalize(pixels, meta_preprocess(manifest))


def meta_preprocess(manifest: dict) -> dict:
    pre = manifest.get("preprocess") or {}
    if "scale" not in pre or "offset" not in pre:
        raise ExportError("the run's manifest records no preprocessing (scale, offset); rebuild it with "
                          "`pipeline build`")
    return pre


def lean_model(run_dir: Path, variant: str, file: str, meta: dict, manifest: dict, layers: set[str],
               log) -> tuple[bytes, str]:
    """The model for the microcontroller and how it was made. A model with int8 input and output and no
    run-time shape ops goes as it is; the int8 variant otherwise is converted again from model.keras
    with the batch fixed at 1 (Keras 3's Flatten then makes one RESHAPE instead of SHAPE, STRIDED_SLICE
    and PACK) and int8 input and output, calibrated on the same training images as the run's."""
    entry = meta["models"][file]
    original = read_model_bytes(run_dir / file, entry.get("sha256"))
    dynamic = sorted(set(runtime.check_ops(runtime.read_graph(original), layers, f"{run_dir.name}/{file}"))
                     & runtime.DYNAMIC_BATCH_OPS)
    float_io = [f"{side} {entry[side]['dtype']}" for side in ("input", "output") if entry[side]["dtype"] != "int8"]
    if not dynamic and not float_io:
        return original, f"{file} of the run, unchanged"
    if variant != "int8":
        if float_io:
            raise ExportError(f"{run_dir / file}: {' and '.join(float_io)}; a microcontroller needs int8 input and "
                              "output; export --variant int8, which is converted again with them")
        return original, (f"{file} of the run, unchanged; it keeps {', '.join(dynamic)} (only the int8 variant "
                          "is converted again with batch 1)")
    if not (run_dir / "model.keras").is_file():
        raise ExportError(f"{run_dir}: no model.keras to convert again with batch 1 and int8 input/output; "
                          "rebuild the run with `pipeline build`")
    calibration = _calibration(run_dir, manifest)
    import keras

    from pipeline.config import BuildConfig
    from pipeline.convert import convert

    cfg = BuildConfig.from_dict(manifest["config"])
    why = [f"its batch is dynamic ({', '.join(dynamic)})"] if dynamic else []
    why += [f"it has {' and '.join(float_io)} (--int8-io float)"] if float_io else []
    log(f"tflm: converting model.keras again for a microcontroller because {'; '.join(why)}: batch 1, int8 "
        f"input/output, calibrated on the run's {len(calibration)} training images ({CALIBRATION})")
    fixed = runtime.batch_one(keras.models.load_model(run_dir / "model.keras"))
    flatbuffer = convert(fixed, "int8", replace(cfg, int8_io="int8"), calibration)
    return flatbuffer, (f"model.keras converted again with batch 1 and int8 input/output, calibrated as {file} "
                        f"was ({len(calibration)} training images, seed {cfg.seed})")


def _layer_names(run_dir: Path) -> set[str]:
    """Layer names for error messages, read from the .keras archive's config without loading TensorFlow."""
    import zipfile

    names: set[str] = set()

    def walk(config: dict) -> None:  # a model's layers, and the layers of models nested in it
        for layer in config.get("layers", []):
            names.add(layer["config"]["name"])
            walk(layer["config"])
    try:
        with zipfile.ZipFile(run_dir / "model.keras") as z:
            walk(json.loads(z.read("config.json"))["config"])
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile):
        pass
    return names


def _variant_rows(run_dir: Path, meta: dict, exported: str, flash: int, arena: dict) -> list[dict]:
    """Flash, arena and fit of every variant of the run under TFLM, the exported one as exported."""
    rows = []
    for file, entry in meta["models"].items():
        v = entry["variant"]
        if v == exported:
            rows.append({"variant": v, "flash": flash, "arena": arena["recommended"], "exported": True})
            continue
        data = (run_dir / file).read_bytes()
        try:
            runtime.check_ops(runtime.read_graph(data), set(), file)
            measured = runtime.measure_arena(data, np.zeros(entry["input"]["shape"], entry["input"]["dtype"]))
        except ExportError as e:
            rows.append({"variant": v, "flash": len(data), "arena": None, "runs": False, "reason": str(e)})
            continue
        rows.append({"variant": v, "flash": len(data), "arena": measured["recommended"], "exported": False})
    for r in rows:
        r["fits"] = fits(r["flash"], r["arena"]) if r["arena"] is not None else {}
    return rows


# ---------------------------------------------------------------- the export folder

def _check_target(out: Path, archive: Path, run_dir: Path, overwrite: bool) -> None:
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise ExportError(f"--out {out}: inside the run directory {run_dir}; choose a folder outside it")
    if out.resolve() in run_dir.resolve().parents:  # --overwrite would delete the old export and the run in it
        raise ExportError(f"--out {out}: holds the run directory {run_dir}, which replacing it would delete; "
                          "choose a folder that does not contain the run")
    for path in (out, archive):
        if path.exists() and not overwrite:
            raise ExportError(f"{path} already exists; pass --overwrite to replace it or --out to export elsewhere")
    if out.exists() and not _is_export(out):
        raise ExportError(f"{out} exists and is not an edgepipe TFLite Micro export (no {MARKER}); refusing to "
                          "delete it, choose another --out")
    if archive.exists() and not _is_export_archive(archive, out.name):
        raise ExportError(f"{archive} exists and is not the archive of an edgepipe TFLite Micro export (no "
                          f"{out.name}/{MARKER} in it); refusing to replace it, choose another --out")


def _is_export(folder: Path) -> bool:
    try:
        return folder.is_dir() and json.loads((folder / MARKER).read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def _is_export_archive(archive: Path, name: str) -> bool:
    """True only for what _publish packs: the folder `name` first, holding its MARKER. Any other file at
    <out>.tar.gz (a device bundle, the user's own archive) is not ours to replace."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            first = tar.next()
            if first is None or not first.isdir() or first.name != name:
                return False
            for member in tar:
                if member.name == f"{name}/{MARKER}" and member.isfile():
                    return json.loads(tar.extractfile(member).read()).get("kind") == KIND
    except (OSError, tarfile.TarError, EOFError, zlib.error, ValueError, AttributeError):
        return False
    return False


def _publish(staging: Path, out: Path, archive: Path) -> None:
    """Pack the archive from the staging folder, then move both into place; an old export goes last."""
    tmp_archive = archive.with_name(f".{archive.name}.tmp{os.getpid()}")
    try:
        with tarfile.open(tmp_archive, "w:gz") as tar:
            tar.add(staging, arcname=out.name)
        trash = out.parent / f".{out.name}.old-{os.getpid()}" if out.exists() else None
        if trash:
            os.replace(out, trash)
        os.replace(staging, out)
        os.replace(tmp_archive, archive)
        if trash:
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        tmp_archive.unlink(missing_ok=True)


def _versions() -> dict:
    from importlib import metadata

    out = {"edgepipe": pipeline.__version__}
    for dist in ("tflite-micro", "ai-edge-litert", "tensorflow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def export_tflm(run_dir: Path, *, out: Path | None = None, variant: str | None = None, board: str | None = None,
                flash: int | None = None, ram: int | None = None, overwrite: bool = False,
                test_images: int | None = None, log=print) -> Path:
    """Write the export folder and its .tar.gz; record the figures in the run. Returns the folder."""
    run_dir = Path(run_dir)
    meta, manifest = _read_run(run_dir)
    check_unchanged(run_dir, "export")  # before writing anything: the run is updated at the end
    budget = choose_budget(board, flash, ram)
    out = Path(out) if out else run_dir.parent / f"{run_dir.name}-tflm"
    archive = out.parent / f"{out.name}.tar.gz"
    _check_target(out, archive, run_dir, overwrite)
    files = {m["variant"]: name for name, m in meta["models"].items()}
    variant = _export_variant(run_dir, files, variant, log)
    x, y, index = _test_samples(run_dir, test_images)
    layers = _layer_names(run_dir)
    model_bytes, conversion = lean_model(run_dir, variant, files[variant], meta, manifest, layers, log)
    source = f"{run_dir.name}/{files[variant]}"
    ops = runtime.check_ops(runtime.read_graph(model_bytes), layers, source)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    staging.chmod(0o777 & ~UMASK)  # mkdtemp's private mode would carry over to the published folder
    try:
        (staging / "model.tflite").write_bytes(model_bytes)
        litert, arena = _arena(staging / "model.tflite", model_bytes, meta, x[:1], budget, source, ops, log)
        accuracy = check_accuracy(run_dir, staging / "model.tflite", model_bytes, arena, meta, x, y, index,
                                  variant, files[variant], log)
        summary = {
            "kind": KIND, "schema": 1, "run": run_dir.name, "variant": variant, "source": source,
            "conversion": conversion, "flash_bytes": len(model_bytes), "sha256": sha256_file(staging / "model.tflite"),
            "arena": arena, "ops": ops, "input": litert.input.to_dict(), "output": litert.output.to_dict(),
            "accuracy": accuracy, "variants": _variant_rows(run_dir, meta, variant, len(model_bytes), arena),
            "boards": {name: {"title": b.title, "flash": b.flash, "ram": b.ram, "core": b.core}
                       for name, b in BOARDS.items()},
            "allowance": {"flash": FLASH_ALLOWANCE, "ram": RAM_ALLOWANCE},
            "budget": {"name": budget.name, "flash": budget.flash, "ram": budget.ram} if budget else None,
            "export": {"folder": str(out), "archive": str(archive)}, "versions": _versions(),
        }
        _write_sources(staging, summary, model_bytes, meta, litert, x, y, out.name)
        _publish(staging, out, archive)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _record(run_dir, summary, log)
    log(f"tflm: wrote {out} and {archive}")
    return out


def _export_variant(run_dir: Path, files: dict[str, str], variant: str | None, log) -> str:
    """The integer variant to export: the one asked for, else what the run delivers (the guard's repair
    when it made one); a guard that rejected int8 with no integer remedy refuses instead."""
    integer = [v for v in files if v.startswith("int8")]
    if not integer:
        raise ExportError(f"{run_dir}: no int8 model (it has {', '.join(files)}); build one with `pipeline build "
                          "--quantize int8`, or `pipeline convert RUN/model.keras --quantize int8` for a trained model")
    from pipeline.delivery import guard_decision

    delivered, superseded = guard_decision(run_dir)  # read even for --variant: an unreadable guard record refuses
    if variant is None and "int8" in superseded and delivered not in integer:
        raise ExportError(f"{run_dir}: the accuracy guard rejected int8 and no integer remedy met the "
                          f"--max-accuracy-drop budget (it delivers {delivered}, which a microcontroller cannot "
                          "run); rebuild with a larger --max-accuracy-drop or --qat, or pass --variant to "
                          "export a rejected model knowingly")
    if variant is None:
        variant = delivered if delivered in integer else "int8"
        log(f"export: {variant}" + (" (the accuracy guard's repair)" if variant == delivered != "int8" else ""))
    if variant not in integer:
        raise ExportError(f"--variant {variant}: not an int8 model of {run_dir}; a microcontroller export takes "
                          f"one of {', '.join(integer)}")
    return variant


def _arena(path: Path, model_bytes: bytes, meta: dict, image, budget: Budget | None, source: str, ops, log):
    """(the model under LiteRT, its measured arena), refusing a model that does not fit the budget."""
    try:
        litert = Model(path, metadata=meta, verify=False)
    except DeviceError as e:
        raise ExportError(str(e))
    sample = litert.prepare(image)
    arena = runtime.measure_arena(model_bytes, sample)
    log(f"tflm: {len(model_bytes):,} bytes of flash, arena {arena['measured']:,} bytes measured, "
        f"{arena['recommended']:,} with the margin; ops {', '.join(ops)}")
    if budget and budget.problems(len(model_bytes), arena["recommended"]):
        fitting = [n for n, ok in fits(len(model_bytes), arena["recommended"]).items() if ok]
        raise ExportError(f"{source} does not fit {budget.name}: "
                          f"{'; '.join(budget.problems(len(model_bytes), arena['recommended']))}"
                          f"; it fits {', '.join(fitting) or 'none of the listed boards'}; choose a smaller "
                          "model or another board")
    return litert, arena


def _write_sources(staging: Path, summary: dict, model_bytes: bytes, meta: dict, litert, x, y, name: str) -> None:
    """The C/C++ sources, README and the export's own manifest (MARKER, with every file's hash)."""
    k = summary["accuracy"]["example_index"]
    sources = c_sources.render(
        model_bytes=model_bytes, source=summary["source"], sha256=summary["sha256"],
        generator=f"edgepipe {pipeline.__version__}",
        preprocess=meta["preprocess"], input_spec=summary["input"], output_spec=summary["output"],
        labels=list(meta["preprocess"]["labels"]), arena=summary["arena"], ops=summary["ops"],
        resolver_methods=runtime.MICRO_OPS, pixel_table=runtime.pixel_table(meta["preprocess"], litert.input),
        test_image=x[k], test_label=int(y[k]), test_index=k)
    sources["README.md"] = c_sources.readme(summary, name)
    for file, text in sources.items():
        (staging / file).write_text(text, encoding="utf-8")
    summary["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                        for p in sorted(staging.iterdir())}
    (staging / MARKER).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def _record(run_dir: Path, summary: dict, log) -> None:
    """tflm.json beside the run's other results, the report rendered again, the manifest's figures:
    changed as one step (artifacts.updating), so an interruption leaves the run as it was."""
    with updating(run_dir, "export", log=log) as (work, changed):
        write_json(work / RUN_SUMMARY, {k: v for k, v in summary.items() if k != "files"})
        if (work / "evaluation.json").is_file():
            from pipeline.report.render import render

            render(work, log=log)
        changed["tflm"] = _manifest_figures(summary)


def _manifest_figures(summary: dict) -> dict:
    a = summary["accuracy"]
    return {
        "variant": summary["variant"], "flash_bytes": summary["flash_bytes"], "sha256": summary["sha256"],
        "arena_bytes": summary["arena"]["recommended"], "arena_measured_bytes": summary["arena"]["measured"],
        "accuracy_tflm": a["accuracy_tflm"], "agreement_with_litert": a["agreement"], "images": a["images"],
        "fits": next(r["fits"] for r in summary["variants"] if r.get("exported")),
        "export": summary["export"], "tflite_micro": summary["versions"]["tflite-micro"]}
