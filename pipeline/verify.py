"""`pipeline verify RUN_DIR|BUNDLE`: is this exactly what the pipeline wrote, and does every model work?

A run directory is checked against its manifest.json: every file it lists is present with its size
and sha256, and no file is present that it does not list (hidden files excepted: those are never
part of a run). Then `device.verify.verify_folder`, the same check the runner makes on the device:
every model metadata.json lists has its size and sha256, loads and allocates in the interpreter,
and has the input and output tensors (shape, dtype, quantization) the metadata describes.

A bundle (.tar.gz) carries no manifest: it is unpacked into a temporary folder by the runner's own
`device.integrity.extract_bundle` (files and folders only, inside the folder, within size and count
limits, and through tarfile's `data` filter where this Python has it), checked for the files the
runner needs, and its models against its metadata.json.

Unlisted files count as problems because a verified run should be the one the build wrote: a stray
`model_x.tflite` or a swapped report beside a matching manifest is exactly what this command is
for. To keep notes beside a run, put them outside it (or in a hidden file).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from device.integrity import METADATA_NAME, DeviceError, extract_bundle
from device.verify import verify_folder
from pipeline.artifacts import check_files, is_staging, read_manifest
from pipeline.ship.bundle import RUNNER_FILES

# What `pipeline bundle` always writes besides the models, and the runner cannot do without.
BUNDLE_REQUIRED = (METADATA_NAME, "labels.txt", *(f"device/{name}" for name in RUNNER_FILES))


def verify_path(path) -> list[str]:
    """Problems with a run directory or bundle, one line each; an empty list means it verified."""
    path = Path(path)
    if path.is_dir():
        return verify_run_dir(path)
    if path.is_file():
        return verify_bundle(path)
    return [f"{path}: no such run directory or bundle"]


def verify_run_dir(run_dir: Path) -> list[str]:
    run_dir = Path(run_dir)
    if is_staging(run_dir):
        return [f"{run_dir}: the staging folder of an interrupted build, not a run; finish it with "
                "`pipeline build --resume`"]
    manifest, problem = read_manifest(run_dir)
    if problem:
        return [problem]
    # The same check every command that changes a run makes first (artifacts.check_unchanged).
    problems, _ = check_files(run_dir)
    # The models: size, sha256 (again, against metadata.json), load, tensors against the metadata.
    # A `pipeline train` run has none and no metadata.json: nothing more to check.
    if manifest.get("models") or METADATA_NAME in manifest["files"]:
        problems += [_relative(p, run_dir) for p in verify_folder(run_dir)]
    return problems


def verify_bundle(archive: Path) -> list[str]:
    archive = Path(archive)
    with tempfile.TemporaryDirectory(prefix="edgepipe-verify-") as tmp:
        try:
            folder = extract_bundle(archive, Path(tmp) / "bundle")
        except DeviceError as e:
            return [str(e)]
        problems = [f"{name}: missing from the bundle" for name in BUNDLE_REQUIRED
                    if name != METADATA_NAME and not (folder / name).is_file()]
        problems += [_relative(p, folder) for p in verify_folder(folder)]
    return problems


def _relative(problem: str, root: Path) -> str:
    """verify_folder names files by their full path; the temporary or run folder is noise here."""
    return problem.replace(f"{root}/", "").replace(str(root), ".")
