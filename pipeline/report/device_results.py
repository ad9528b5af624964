"""Device results merged into a run: the JSON `device/runner.py bench --json` or `eval --json` printed on a
board, checked file by file and added to the variant it measured.

A result counts only for a model this run contains byte for byte, and merged files are kept in the run
(device_results/, named by content) so every later render shows them again.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np

from device.runner import SCHEMA
from pipeline.artifacts import atomic_write
from pipeline.report import ReportError, read_json

DEVICE_DIR = "device_results"
DEVICE_SOURCE = "the output of `runner.py bench --json` or `runner.py eval --json`"


def gather(run_dir: Path, given: list[Path]) -> tuple[list[Path], list[tuple[str, Path]]]:
    """Device results merged before (kept in the run) and new ones, each file once by content."""
    folder = run_dir / DEVICE_DIR
    kept = sorted(folder.glob("*.json")) if folder.is_dir() else []
    seen = {p.name.split("-", 1)[0] for p in kept}
    new = []
    for path in map(Path, given):
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        except OSError as e:
            raise ReportError(f"{path}: cannot read device results ({e.strerror})")
        if digest not in seen:
            seen.add(digest)
            new.append((f"{digest}-{path.name}", path))
    return kept, new


def keep(run_dir: Path, new: list[tuple[str, Path]], devices: list[dict]) -> None:
    """Copy the new files into the run, so later renders keep the device columns, and name them there."""
    kept_as = {str(path): f"{DEVICE_DIR}/{name}" for name, path in new}
    for device in devices:
        for f in device["files"]:
            f["file"] = kept_as.get(f["file"], f["file"])
    for name, path in new:
        (run_dir / DEVICE_DIR).mkdir(exist_ok=True)
        atomic_write(run_dir / DEVICE_DIR / name, path.read_bytes())


def _model_hashes(meta: dict) -> dict[str, str]:
    """sha256 -> model file, for every model this run's metadata lists."""
    return {entry["sha256"]: name for name, entry in meta.get("models", {}).items() if entry.get("sha256")}


def _as_given(path: Path, run_dir: Path) -> str:
    """A file inside the run relative to it, any other as the user gave it (never made absolute)."""
    try:
        return path.relative_to(run_dir).as_posix()
    except ValueError:
        return str(path)


def merge(paths, variants: list[dict], run_dir: Path) -> list[dict]:
    """Add each device file's figures to its variant's `device` dict; returns the devices seen.

    A result counts only for a model this run contains byte for byte: the runner names the sha256
    of the model it ran, and a file name alone (model_int8.tflite) fits every run.
    """
    meta = read_json(run_dir / "metadata.json", "the metadata written by `pipeline build`")
    hashes = _model_hashes(meta)
    by_name = {v["file"]: v for v in variants}
    devices, seen = {}, {}  # label -> device; (label, model, kind) -> the file that gave it
    for path in map(Path, paths):
        data = read_json(path, DEVICE_SOURCE)
        if not isinstance(data, dict):
            raise ReportError(f"{path}: a JSON {type(data).__name__}; expected {DEVICE_SOURCE}")
        if data.get("schema") != SCHEMA:
            raise ReportError(f"{path}: schema {data.get('schema')!r}; expected schema {SCHEMA}, {DEVICE_SOURCE}")
        kind = data.get("kind")
        if kind not in ("bench", "eval"):
            raise ReportError(f"{path}: kind {kind!r}; expected 'bench' or 'eval', {DEVICE_SOURCE}")
        name = re.split(r"[\\/]", str(data.get("model", "")))[-1]
        if name not in by_name:
            raise ReportError(f"{path}: model '{name}' is not in this run; expected one of {', '.join(by_name)}")
        env = data.get("environment")
        if (not isinstance(env, dict) or not env.get("cpu") and not env.get("machine")
                or not all(isinstance(env.get(k) or "", str) for k in ("cpu", "machine"))):
            raise ReportError(f"{path}: no 'environment' with 'cpu' or 'machine' as text; expected {DEVICE_SOURCE}")
        _check_finite(path, data)
        figures = _device_figures(path, kind, data)
        sha = data.get("model_sha256")
        if not isinstance(sha, str):
            raise ReportError(f"{path}: names no 'model_sha256', so nothing shows it ran this run's {name}; "
                              "measure again with the runner of this run's bundle")
        if hashes.get(sha) != name:
            found = f"this run's {hashes[sha]}" if sha in hashes else "a model this run does not contain"
            raise ReportError(f"{path}: measured {found} (sha256 {sha[:12]}...), not this run's {name}; "
                              "pass results measured on this run's own bundle")
        _check_preprocessing(path, data, meta.get("preprocess") or {})
        # `pipeline deploy` names the board; a file brought back by hand is labelled by its CPU.
        label = _board(path, data).get("name") or _device_label(env)
        if (label, name, kind) in seen:
            raise ReportError(f"{path}: a second {kind} result for {name} on {label} (the first is "
                              f"{seen[label, name, kind]}); pass one per model, kind and device")
        seen[label, name, kind] = path
        by_name[name]["device"].setdefault(label, {}).update(figures)
        device = devices.setdefault(label, {"label": label, "environment": env,
                                            "interpreter": data.get("interpreter"), "files": []})
        device["files"].append({"file": _as_given(path, run_dir), "kind": kind, "variant": by_name[name]["variant"],
                                **figures})
    return list(devices.values())


def _check_preprocessing(path: Path, data: dict, run: dict) -> None:
    """Refuse a result measured with other preprocessing than the run's: with `--input-range 0,255` a model
    trained on 0..1 pixels scores near chance, which is no figure of this run.

    Runners before `preprocessing` was recorded cannot say what they fed; their files are merged as before,
    since bundles of theirs are on boards (docs/runner.md says so).
    """
    if "preprocessing" not in data:
        return
    used = data["preprocessing"]
    overrides = used.get("overrides") if isinstance(used, dict) else None
    if not isinstance(overrides, dict):
        raise ReportError(f"{path}: 'preprocessing' without its 'overrides'; expected {DEVICE_SOURCE}")
    differs = []
    if not (_same(used.get("scale"), run.get("scale")) and _same(used.get("offset"), run.get("offset"))):
        differs.append(f"pixel * {_fmt(used.get('scale'))} + {_fmt(used.get('offset'))} where this run's "
                       f"metadata.json says pixel * {_fmt(run.get('scale'))} + {_fmt(run.get('offset'))}")
    if used.get("labels") != run.get("labels"):
        differs.append("labels other than those this run's metadata.json lists")
    if differs:
        given = "".join(f" --{name.replace('_', '-')} {value}" for name, value in overrides.items())
        fix = (f"run the runner again without {' or '.join('--' + n.replace('_', '-') for n in overrides)}"
               if overrides else "run the runner again in this run's bundle, with its metadata.json beside the model")
        raise ReportError(f"{path}: measured with{given + ':' if given else ''} {' and '.join(differs)}; {fix}")


def _same(used, run) -> bool:
    """Equal scales or offsets, one number or one per channel; a model without metadata.json beside it
    takes its scale from the model's float32 quantization, which rounds the run's own."""
    try:
        return bool(np.allclose(np.asarray(used, np.float64), np.asarray(run, np.float64), rtol=1e-6, atol=1e-9))
    except (TypeError, ValueError):  # not numbers, or per-channel lists of other lengths
        return False


def _fmt(value) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.6g}"
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        return "[" + ", ".join(f"{v:.6g}" for v in value) + "]"
    return repr(value)


def _check_finite(path: Path, value, where: str = "") -> None:
    """The runner writes null for NaN and infinity; one here would reach report.json as a bare NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ReportError(f"{path}: '{where}' is {value}; expected a finite number, as in {DEVICE_SOURCE} "
                          "(it writes null for NaN and infinity)")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        _check_finite(path, item, f"{where}.{key}" if where else str(key))


def _board(path: Path, data: dict) -> dict:
    """The board `pipeline deploy` names, {} for a file brought back by hand."""
    board = data.get("board", {})
    if not (isinstance(board, dict) and isinstance(board.get("name") or "", str)
            and isinstance(board.get("emulated"), (bool, type(None)))):
        raise ReportError(f"{path}: 'board' is {json.dumps(board)[:60]}; expected an object with a 'name' and "
                          f"'emulated' true or false, as `pipeline deploy` writes, or no 'board'")
    return board


def _device_label(env: dict) -> str:
    cpu, machine = env.get("cpu") or "", env.get("machine") or ""
    return cpu if not machine or machine in cpu else f"{cpu} ({machine})" if cpu else machine


# Figures the report formats beyond the required ones: each a number of milliseconds or MB, or null.
OPTIONAL_FIGURES = (("latency", "mean_ms"), ("latency", "std_ms"), ("latency", "min_ms"), ("first_inference_ms",),
                    ("peak_rss_mb",), ("load", "cold_ms"), ("load", "warm", "p50_ms"),
                    ("memory", "peak_rss_mb_after_load"), ("memory", "peak_rss_mb_after_inference"),
                    *(("preprocess", stage, "p50_ms") for stage in ("decode", "resize", "quantize")))


def _device_figures(path: Path, kind: str, data: dict) -> dict:
    def number(*keys, least=0, most=None, integer=False, optional=False):
        value = data
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        where = ".".join(keys)
        if value is None and optional:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ReportError(f"{path}: no number at '{where}'; expected {DEVICE_SOURCE}")
        if value < least or most is not None and value > most or integer and value != int(value):
            want = (f"{'an integer' if integer else 'a number'} of at least {least}" if most is None
                    else f"a fraction from {least} to {most}")
            raise ReportError(f"{path}: '{where}' is {value}; expected {want}, as in {DEVICE_SOURCE}")
        return value

    emulated = bool(_board(path, data).get("emulated"))
    if kind == "eval":
        return {"accuracy": number("accuracy", most=1), "n": number("n", least=1, integer=True),
                "data": data.get("data"), "emulated": emulated}
    latency = {f"{k}_ms": number("latency", f"{k}_ms") for k in ("p50", "p90", "p99")}
    for keys in OPTIONAL_FIGURES:
        number(*keys, optional=True)
    number("threads", least=1, integer=True, optional=True)
    return {**latency, "runs": number("latency", "n", least=1, integer=True), "warning": data["latency"].get("warning"),
            "emulated": emulated,
            **{k: data.get(k) for k in ("threads", "xnnpack", "peak_rss_mb", "first_inference_ms", "load",
                                        "preprocess", "memory", "board_state")},
            "mean_ms": data["latency"].get("mean_ms"), "std_ms": data["latency"].get("std_ms"),
            "min_ms": data["latency"].get("min_ms")}
