"""The device bundle: one `.tar.gz` with the models, their metadata, the runner and instructions.

Laid out so that, unpacked anywhere, `python device/runner.py classify samples/*.png` works with no
other file: the runner's default model is `model_int8.tflite` beside the `device/` folder.

The same run gives the same bytes (fixed times, owners and order), so a bundle's sha256 tells
`pipeline deploy` whether a board already has it. With `wheels`, the bundle also carries the
runtime's wheels for the named platforms, for boards without internet.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import device
from device.core import METADATA_NAME

RUNNER_FILES = ("__init__.py", "core.py", "integrity.py", "timing.py", "runner.py", "board.py")
WHEELS_DIR = "wheels"
WHEELS_INDEX = f"{WHEELS_DIR}/wheels.json"

# ai-edge-litert publishes wheels for 64-bit Linux (aarch64, x86_64) and macOS arm64 on Python
# 3.10+; a 32-bit Raspberry Pi OS (armv7l) or an older Python needs tflite-runtime, whose last
# release (2.14.0) was built against numpy 1.x.
REQUIREMENTS = """\
# edgepipe device runner: pip install -r requirements.txt
pillow
numpy; python_version >= "3.10" and platform_machine != "armv7l"
numpy<2; python_version < "3.10" or platform_machine == "armv7l"
ai-edge-litert=={litert}; python_version >= "3.10" and platform_machine in "aarch64 x86_64 arm64 AMD64"
tflite-runtime==2.14.0; python_version < "3.10" or platform_machine == "armv7l"
"""

README = """\
# {name}: {model} on {dataset}, ready for a Raspberry Pi

Built by edgepipe {version}. Models: {models}.
Input: {h}x{w} {color}, pixels scaled by {scale:g}; labels in labels.txt.

1. Copy and unpack (any 64-bit Raspberry Pi OS, or any Linux ARM board):
       scp {archive} pi@raspberrypi.local:
       mkdir {name} && tar xzf {archive} -C {name} && cd {name}
2. Install (Python 3.10+ on 64-bit gets ai-edge-litert; 32-bit OS or Python 3.9 gets tflite-runtime):
       python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt
3. Check that nothing was damaged in transit:
       python3 device/runner.py verify .
4. Classify images (any size or format; they are converted like the training data):
       python3 device/runner.py classify samples/*.png
5. Benchmark (add --threads 4 for all cores of a Pi 4, --json for machine-readable output):
       python3 device/runner.py bench --runs 500
6. Evaluate on the labelled samples (or your own .npz with arrays x and y):
       python3 device/runner.py eval samples/eval.npz --json > eval.json
   Bring bench/eval JSON back to the host: `pipeline report RUN_DIR --device-results *.json`.

Every command takes --model model_<variant>.tflite; the default is model_int8.tflite.
"""


class BundleError(Exception):
    """The run directory cannot be bundled as asked."""


@dataclass(frozen=True)
class WheelPlatform:
    machine: str     # platform_machine as the board's Python reports it
    python: str      # major.minor
    glibc: int       # the newest manylinux_2_<glibc> its OS can load
    os: str

    @property
    def tags(self) -> list[str]:
        # pip does not widen a --platform tag to older manylinux versions: name each one (and
        # linux_<machine>, the tag of piwheels.org's builds, for users who add that index).
        return [f"manylinux_2_{m}_{self.machine}" for m in range(self.glibc, 16, -1)] + [
            f"manylinux2014_{self.machine}", f"linux_{self.machine}"]

    def markers(self) -> dict:
        return {"implementation_name": "cpython", "os_name": "posix", "platform_machine": self.machine,
                "platform_python_implementation": "CPython", "platform_system": "Linux", "sys_platform": "linux",
                "python_version": self.python, "python_full_version": f"{self.python}.0"}


# `pipeline bundle --wheels NAME`: the boards a bundle can carry wheels for, named <machine>-cp<python>
# as the deploy looks them up.
WHEEL_PLATFORMS = {
    "aarch64-cp311": WheelPlatform("aarch64", "3.11", 36, "Raspberry Pi OS 64-bit (bookworm)"),
    "armv7l-cp311": WheelPlatform("armv7l", "3.11", 36, "Raspberry Pi OS 32-bit (bookworm)"),
    "aarch64-cp313": WheelPlatform("aarch64", "3.13", 41, "Raspberry Pi OS 64-bit (trixie)"),
    "aarch64-cp39": WheelPlatform("aarch64", "3.9", 31, "Raspberry Pi OS 64-bit legacy (bullseye)"),
    "armv7l-cp39": WheelPlatform("armv7l", "3.9", 31, "Raspberry Pi OS 32-bit legacy (bullseye)"),
    "x86_64-cp311": WheelPlatform("x86_64", "3.11", 36, "64-bit PC Linux with Python 3.11"),
}


def wheel_key(machine: str, python_version: str) -> str:
    return f"{machine}-cp{python_version.replace('.', '')}"


def select_requirements(text: str, markers: dict) -> list[str]:
    """The lines of a requirements.txt that apply where `markers` hold, without their markers."""
    from packaging.requirements import InvalidRequirement, Requirement

    chosen = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as e:
            raise BundleError(f"requirements.txt: {line!r} is not a requirement ({e})")
        if req.marker is None or req.marker.evaluate(markers):
            chosen.append(f"{req.name}{req.specifier}")
    return chosen


def _pip_download(platform: WheelPlatform, reqs: list[str], dest: Path, deps: bool = True) -> tuple[bool, str]:
    tags = [arg for tag in platform.tags for arg in ("--platform", tag)]
    abi = f"cp{platform.python.replace('.', '')}"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input",
                           "--only-binary=:all:", "--python-version", platform.python, "--implementation", "cp",
                           "--abi", abi, *tags, *([] if deps else ["--no-deps"]), "-d", str(dest), *reqs],
                          capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR:")]
    return proc.returncode == 0, (errors[-1] if errors else proc.stderr.strip()[-300:])


def download_wheels(requirements: str, name: str, dest: Path, log=print) -> dict:
    """The wheels `requirements` choose on platform `name`, into dest; what PyPI lacks is listed, not fatal.

    PyPI has no armv7l wheel of numpy or Pillow (a Raspberry Pi gets them from piwheels.org or apt's
    python3-numpy and python3-pil, which the deploy's environment sees), so a requirement is tried
    with its dependencies, then without them, then recorded as missing."""
    platform = WHEEL_PLATFORMS[name]
    reqs = select_requirements(requirements, platform.markers())
    log(f"bundle: downloading wheels for {name} ({platform.os}): {' '.join(reqs)}")
    ok, _ = _pip_download(platform, reqs, dest)
    missing, without_deps = {}, []
    if not ok:
        for req in reqs:
            if _pip_download(platform, [req], dest)[0]:
                continue
            ok_alone, reason = _pip_download(platform, [req], dest, deps=False)
            if ok_alone:
                without_deps.append(req)
            else:
                missing[req] = reason.removeprefix("ERROR: ")
    files = sorted(p.name for p in dest.glob("*.whl"))
    if missing:
        log(f"bundle: {name}: no wheel on the index for {', '.join(missing)}; the board must provide "
            f"{'it' if len(missing) == 1 else 'them'} (Raspberry Pi OS: apt install python3-numpy python3-pil)")
    return {"platform": name, "os": platform.os, "python": platform.python, "machine": platform.machine,
            "requirements": reqs, "files": files, "missing": missing, "without_dependencies": without_deps}


def _normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    info.mode = 0o755 if info.isdir() or info.mode & 0o111 else 0o644
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(_normalized(info), io.BytesIO(data))


def make_bundle(run_dir: Path, out: Path | None = None, variants=None, wheels=(), log=print) -> Path:
    """Write `<run>.tar.gz` (or `out`); returns its path. `wheels`: WHEEL_PLATFORMS names to carry wheels for."""
    from importlib import metadata as importlib_metadata

    import pipeline

    run_dir = Path(run_dir)
    meta_path = run_dir / METADATA_NAME
    if not meta_path.is_file():
        raise BundleError(f"{run_dir}: no {METADATA_NAME}; pass a run directory written by `pipeline build`")
    meta = json.loads(meta_path.read_text())
    available = {m["variant"]: name for name, m in meta["models"].items()}
    chosen = list(variants) if variants else [v for v in ("int8", "fp32") if v in available] or list(available)
    missing = [v for v in chosen if v not in available]
    if missing:
        raise BundleError(f"{run_dir}: no model for variant(s) {', '.join(missing)}; "
                          f"this run has {', '.join(available)}")
    if "int8" not in chosen:
        raise BundleError("a bundle must contain the int8 model, the runner's default; add int8 to --variants")
    files = [available[v] for v in chosen]
    bundle_meta = {**meta, "models": {f: meta["models"][f] for f in files}}
    out = Path(out) if out else run_dir.parent / f"{run_dir.name}.tar.gz"
    out.parent.mkdir(parents=True, exist_ok=True)
    pre = meta["preprocess"]
    readme = README.format(name=run_dir.name, model=meta["model"], dataset=meta["dataset"],
                           version=pipeline.__version__, models=", ".join(files), h=pre["height"],
                           w=pre["width"], color=pre.get("color", f"{pre['channels']}-channel"),
                           scale=pre["scale"], archive=out.name)
    unknown = [w for w in wheels if w not in WHEEL_PLATFORMS]
    if unknown:
        raise BundleError(f"no wheel platform {', '.join(unknown)}; choose from {', '.join(WHEEL_PLATFORMS)}")
    requirements = REQUIREMENTS.format(litert=importlib_metadata.version("ai-edge-litert"))
    device_dir = Path(device.__file__).resolve().parent
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with tempfile.TemporaryDirectory(prefix="edgepipe-wheels-") as wheel_dir, open(tmp, "wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for f in files:
                tar.add(run_dir / f, arcname=f, filter=_normalized)
            _add_bytes(tar, METADATA_NAME, json.dumps(bundle_meta, indent=2).encode())
            tar.add(run_dir / "labels.txt", arcname="labels.txt", filter=_normalized)
            for name in RUNNER_FILES:
                tar.add(device_dir / name, arcname=f"device/{name}", filter=_normalized)
            samples = run_dir / "samples"
            if samples.is_dir():
                for p in sorted(samples.iterdir()):
                    tar.add(p, arcname=f"samples/{p.name}", filter=_normalized)
            _add_bytes(tar, "requirements.txt", requirements.encode())
            _add_bytes(tar, "README.md", readme.encode())
            index = {}
            for name in wheels:
                folder = Path(wheel_dir) / name
                folder.mkdir()
                index[name] = download_wheels(requirements, name, folder, log)
                for whl in sorted(folder.glob("*.whl")):
                    tar.add(whl, arcname=f"{WHEELS_DIR}/{name}/{whl.name}", filter=_normalized)
            if index:
                _add_bytes(tar, WHEELS_INDEX, json.dumps(index, indent=2).encode())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
