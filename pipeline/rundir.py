"""Finding runs: what a run name means on disk, the next free name, what a command needs a run to hold.

artifacts.py keeps what happens inside a run directory (lock, manifest, hashes, atomic writes and
swaps); this module answers the questions a command asks before it starts: which folder does NAME
mean, is it a finished run with models, what configuration did it (or its interrupted build) use.
The answers that refuse raise RunDirError, one line naming the folder and what makes a usable one.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.artifacts import MANIFEST, RUNS, RunDirError, is_run, resume_target, staging_dir  # noqa: F401
from pipeline.config import BuildConfig


def locate(target: str) -> Path:
    """A run name (artifacts/NAME) or a path: anything with a slash, or anything that exists, is a path."""
    path = Path(target)
    return path if ("/" in target or path.exists()) else RUNS / target


def next_free(path: Path) -> Path:
    """path-2, path-3, ...: the first of them that does not exist yet."""
    n = 2
    while path.with_name(f"{path.name}-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}-{n}")


def resume_config(target: str) -> BuildConfig:
    """The configuration an interrupted build saved in its staging folder."""
    final = locate(target)
    staging = staging_dir(final)
    try:
        saved = json.loads((staging / "config.json").read_text())
    except (OSError, ValueError):
        if is_run(final):
            raise RunDirError(f"--resume {target}: the run {final} is already complete; nothing to resume")
        if final.exists():
            raise RunDirError(f"--resume {target}: {final} is not a run (no {MANIFEST}) and no interrupted build "
                              f"of it was found at {staging}; start one with `pipeline build --out {final}`")
        raise RunDirError(f"--resume {target}: no interrupted build found at {staging}; start it with "
                          "`pipeline build --name NAME` first")
    saved["out"] = str(final)
    return BuildConfig.from_dict(saved)


def require_converted(run_dir: Path, command: str) -> None:
    """A finished run with .tflite models, or one line saying what RUN_DIR is and what makes one."""
    from device.core import METADATA_NAME

    if not (run_dir / MANIFEST).is_file():
        raise RunDirError(f"{run_dir}: not a run directory (no {MANIFEST}); `pipeline {command}` needs a run "
                          "written by `pipeline build`")
    if not (run_dir / METADATA_NAME).is_file() or not (run_dir / "model_fp32.tflite").is_file():
        raise RunDirError(f"{run_dir}: a `pipeline train` run (model.keras, no .tflite models); `pipeline {command}` "
                          f"needs converted models: make them with `pipeline build --keras-model {run_dir}/model.keras "
                          "--name NAME` (with the run's --dataset)")


def saved_config(run_dir: Path, **overrides) -> BuildConfig:
    """The configuration a finished run was built with, `overrides` (BuildConfig fields) replacing some."""
    try:
        saved = json.loads((run_dir / MANIFEST).read_text())["config"]
    except (OSError, ValueError, KeyError):
        raise RunDirError(f"{run_dir}: no readable {MANIFEST}; pass a run directory written by `pipeline build`")
    saved.update(overrides)
    return BuildConfig.from_dict(saved)
