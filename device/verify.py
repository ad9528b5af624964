"""A folder (an unpacked bundle or a run directory) against its metadata.json: every model it lists
is present with its size and sha256, loads and allocates in the interpreter, and has the input and
output tensors the metadata describes. It needs the core (to load) and integrity (to read and hash),
so it sits above both: the core imports integrity, and nothing imports back.
"""
from __future__ import annotations

from pathlib import Path

from device.core import Model
from device.integrity import METADATA_NAME, DeviceError, expected_sha256, load_metadata


def verify_folder(folder: Path) -> list[str]:
    """Problems with the models a metadata file lists: missing, wrong size or hash, unloadable, or
    tensors that differ from what the metadata says. An empty list means the folder is sound."""
    folder = Path(folder)
    meta_path = folder / METADATA_NAME
    if not folder.is_dir():
        return [f"{folder}: no such folder; pass an unpacked bundle or a run directory"]
    if not meta_path.is_file():
        return [f"{meta_path}: missing; expected the metadata file written by `pipeline build`"]
    try:
        meta = load_metadata(meta_path)
    except DeviceError as e:
        return [str(e)]
    problems = []
    models = meta.get("models")
    if not isinstance(models, dict) or not models:
        return [f"{meta_path}: lists no models"]
    for name, entry in models.items():
        path = folder / name
        if not isinstance(entry, dict) or expected_sha256(path, meta) is None:
            # Nothing to check the bytes against, so they are not handed to the interpreter either.
            problems.append(f"{name}: the metadata records no sha256 for it; cannot verify")
            continue
        if Path(name).name != name:
            problems.append(f"{name}: not a plain file name beside {METADATA_NAME}")
            continue
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        if path.stat().st_size != entry.get("bytes"):
            problems.append(f"{name}: {path.stat().st_size} bytes, metadata says {entry.get('bytes')}")
            continue
        try:
            model = Model(path, metadata=meta)
        except DeviceError as e:
            problems.append(str(e))
            continue
        for side, spec in (("input", model.input), ("output", model.output)):
            want = entry.get(side)
            if not isinstance(want, dict):
                problems.append(f"{name}: the metadata does not describe its {side} tensor")
                continue
            got = spec.to_dict()
            differs = [k for k in ("shape", "dtype", "scale", "zero_point") if k in want and want[k] != got[k]]
            if differs:
                problems.append(f"{name}: {side} tensor {', '.join(differs)} differ from the metadata")
    for extra in sorted(folder.glob("*.tflite")):
        if extra.name not in models:
            problems.append(f"{extra.name}: not listed in {METADATA_NAME}, so nothing vouches for it")
    return problems
