"""What `pipeline deploy` puts on a board: the run's bundle as opened and checked, its folder's name on the
board, the runtime its requirements.txt chooses for each board, and the host's own answers on the
same images, which a board with the same interpreter must reproduce.
"""
from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from device import core
from device.integrity import METADATA_NAME, sha256_file
from pipeline.boards.ssh import BoardError
from pipeline.failures import InputError
from pipeline.ship.bundle import WHEELS_INDEX, make_bundle, select_requirements, wheel_key

EVAL_DATA = "samples/eval.npz"
# The interpreter each runtime distribution provides, and the platforms it publishes wheels for.
RUNTIMES = {"ai-edge-litert": ("ai_edge_litert.interpreter", ("aarch64", "x86_64")),
            "tflite-runtime": ("tflite_runtime.interpreter", ("armv7l", "aarch64", "x86_64"))}


class DeployError(InputError):
    """The run or bundle cannot be deployed as asked; the message says what to do."""


@dataclass(frozen=True)
class Bundle:
    path: Path
    run: str
    sha256: str
    size: int
    requirements: str
    models: dict           # variant -> file name
    wheels: dict           # wheels.json: platform -> what the bundle carries for it


@dataclass(frozen=True)
class Choice:
    machine: str           # the platform the board's Python loads wheels for
    requirements: list
    runtime: str
    module: str
    venv: str              # the environment's key: Python, platform and requirements
    wheels: str | None     # folder of the bundle's wheels for this platform, if it carries them


def open_bundle(run_dir: Path, path: Path | None, workdir: Path, log) -> Bundle:
    """The run's bundle (made into workdir when not given), checked to hold this run's models."""
    try:
        run_meta = json.loads((run_dir / METADATA_NAME).read_text())
    except (OSError, ValueError):
        raise DeployError(f"{run_dir}: no readable {METADATA_NAME}; pass a run directory written by `pipeline build`")
    if not (run_dir / EVAL_DATA).is_file():
        raise DeployError(f"{run_dir}: no {EVAL_DATA} to evaluate on the boards; rebuild the run with `pipeline build`")
    if path is None:
        path = make_bundle(run_dir, workdir / f"{run_dir.name}.tar.gz", log=log)
    try:
        with tarfile.open(path, "r:gz") as tar:
            names = set(tar.getnames())

            def read(name):
                return tar.extractfile(name).read().decode() if name in names else None

            meta, requirements, wheels = read(METADATA_NAME), read("requirements.txt"), read(WHEELS_INDEX)
    except (OSError, tarfile.TarError, EOFError) as e:
        raise DeployError(f"{path}: not a readable bundle ({e}); write one with `pipeline bundle {run_dir}`")
    if meta is None or requirements is None or EVAL_DATA not in names:
        raise DeployError(f"{path}: not a bundle written by `pipeline bundle` (no metadata.json, requirements.txt "
                          f"or {EVAL_DATA})")
    models = json.loads(meta)["models"]
    for name, entry in models.items():
        if run_meta["models"].get(name, {}).get("sha256") != entry.get("sha256"):
            raise DeployError(f"{path}: its {name} is not the one in {run_dir}; the bundle was built from another "
                              f"run, write it again with `pipeline bundle {run_dir}`")
    return Bundle(Path(path), board_folder(run_dir.name), sha256_file(path), Path(path).stat().st_size, requirements,
                  {entry["variant"]: name for name, entry in models.items()}, json.loads(wheels) if wheels else {})


def board_folder(run_name: str) -> str:
    """The run's folder name on the board: the run's own name when it is a plain one, else a plain
    version of it with a hash of the original, so no two runs share a folder by accident."""
    plain = re.sub(r"[^A-Za-z0-9._-]", "-", run_name).lstrip(".-_")[:100]
    if plain == run_name:
        return plain
    return f"{plain or 'run'}-{hashlib.sha256(run_name.encode()).hexdigest()[:8]}"


def runtime_for(probe: dict, bundle: Bundle) -> Choice:
    """The requirements the bundle's requirements.txt selects on this board, as pip would select them."""
    markers = dict(probe["markers"])
    machine = markers["platform_machine"]
    if probe.get("bits") == 32 and machine in ("aarch64", "arm64", "armv8l"):
        # A 32-bit Raspberry Pi OS on a 64-bit kernel (the default on a Pi 4 and 5 since 2023): uname
        # says aarch64, yet its Python loads only armv7l wheels.
        machine = markers["platform_machine"] = "armv7l"
    requirements = select_requirements(bundle.requirements, markers)
    runtime = next((r for r in requirements if re.split(r"[<>=!~;\[ ]", r)[0] in RUNTIMES), None)
    where = f"{machine} with Python {probe['python']} ({probe.get('model') or 'unknown board'}, {probe.get('os')})"
    module, platforms = RUNTIMES.get(re.split(r"[<>=!~;\[ ]", runtime or "")[0], (None, ()))
    if runtime is None or machine not in platforms:
        raise BoardError(f"no LiteRT runtime for {where}: ai-edge-litert has wheels for 64-bit aarch64 and x86_64 "
                         "with Python 3.10+, tflite-runtime 2.14.0 for armv7l, aarch64 and x86_64 with Python up to "
                         "3.11; this platform has neither")
    key = wheel_key(machine, markers["python_version"])
    carried = bundle.wheels.get(key, {}).get("files")
    venv = hashlib.sha256(json.dumps({"python": probe["python"], "machine": machine, "requirements": requirements,
                                      "system_site_packages": True}).encode()).hexdigest()[:16]
    return Choice(machine, requirements, runtime, module, venv, f"wheels/{key}" if carried else None)


def host_reference(run_dir: Path, bundle: Bundle) -> dict:
    """Every model's accuracy and confusion on samples/eval.npz through this host's core: what a board
    with the same interpreter must reproduce exactly."""
    x, y = core.load_npz(run_dir / EVAL_DATA)
    variants, rt = {}, None
    for variant, name in bundle.models.items():
        model = core.Model(run_dir / name)
        rt = model.runtime
        result = core.evaluate(model, x, y, source=EVAL_DATA)
        variants[variant] = {"accuracy": result["accuracy"], "confusion": result["confusion"]}
    return {"data": EVAL_DATA, "n": len(y), "interpreter": {"name": rt.name, "version": rt.version},
            "variants": variants}
