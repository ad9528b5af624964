"""The device bundle: one `.tar.gz` with the models, their metadata, the runner and instructions.

Laid out so that, unpacked anywhere, `python device/runner.py classify samples/*.png` works with no
other file: the runner's default model is the one metadata.json names as `default_model`, the
variant the run delivers (pipeline/delivery.py). A variant the accuracy guard replaced ships only
when asked for, labelled `superseded_by` in the metadata.

The archive is reproducible: members sorted, mtimes fixed (SOURCE_DATE_EPOCH, else 1980-01-01 as
in wheels), owner 0/0 without names, modes 0644 (0755 for folders), no timestamp in the gzip header,
so two bundles of one run are byte-identical, and a bundle's sha256 tells `pipeline deploy` whether a
board already has it. With `wheels`, the bundle also carries the runtime's wheels for the named
board platforms, for boards without internet.
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
from pipeline.artifacts import MANIFEST, check_unchanged, is_staging, resume_target, run_holding, run_name
from pipeline.config import ConfigError
from pipeline.delivery import PREFERENCE, default_variant, guard_decision
from pipeline.failures import InputError, os_problem

SUFFIXES = (".tar.gz", ".tgz")
ZIP_EPOCH = 315532800  # 1980-01-01, the earliest time a zip (and so a wheel) can record

RUNNER_FILES = ("__init__.py", "core.py", "images.py", "integrity.py", "timing.py", "verify.py", "runner.py",
                "board.py", "foreign.py")
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

Every command takes --model model_<variant>.tflite; the default is {default} ({why}).
"""


class BundleError(InputError):
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


def _mtime() -> int:
    try:
        return int(os.environ["SOURCE_DATE_EPOCH"])
    except (KeyError, ValueError):
        return ZIP_EPOCH


def _member(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = size, _mtime()
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type, info.mode = (tarfile.DIRTYPE, 0o755) if directory else (tarfile.REGTYPE, 0o644)
    return info


def write_archive(path: Path, members: dict[str, bytes]) -> None:
    """A .tar.gz of `members` (name -> bytes) that depends on nothing but their names and contents."""
    folders = sorted({str(Path(n).parent) for n in members} - {"."})
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for folder in folders:
            tar.addfile(_member(folder, directory=True))
        for name in sorted(members):
            tar.addfile(_member(name, len(members[name])), io.BytesIO(members[name]))


def _is_bundle(path: Path) -> bool:
    """True only for an archive `pipeline bundle` wrote: the one kind of file --overwrite may replace."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            names = set(tar.getnames())
    except (OSError, tarfile.TarError, EOFError):
        return False
    return {METADATA_NAME, "device/runner.py"} <= names


def _out_path(run_dir: Path, out, overwrite: bool) -> Path:
    out = Path(out) if out else run_dir.parent / f"{run_dir.name}.tar.gz"
    if not out.name.endswith(SUFFIXES):
        fix = out.name + (".gz" if out.name.endswith(".tar") else ".tar.gz")
        raise ConfigError(f"--out {out}: a bundle is a gzip-compressed tar; name it {fix} (or .tgz)")
    holder = run_holding(out.parent)
    if holder:
        raise BundleError(f"--out {out}: inside the run directory {holder}, which would then fail `pipeline "
                          "verify`; write the bundle outside it (the default is beside the run)")
    if out.is_dir():
        raise BundleError(f"--out {out}: is a folder; pass a file name such as {out / run_dir.name}.tar.gz")
    if out.exists():
        if not overwrite:
            raise BundleError(f"--out {out}: already exists; pass --overwrite to replace it, or another --out")
        if not _is_bundle(out):
            raise BundleError(f"--out {out}: exists and is not a bundle written by `pipeline bundle`; "
                              "refusing to replace it even with --overwrite, choose another --out")
    return out


def choose(run_dir: Path, available: dict[str, str], variants=None) -> tuple[list[str], str, str]:
    """(variants to pack, the runner's default among them, why that one)."""
    delivered, superseded = guard_decision(run_dir)
    if variants:
        chosen = list(dict.fromkeys(variants))  # `int8,int8` packs one copy
        missing = [v for v in chosen if v not in available]
        if missing:
            raise BundleError(f"{run_dir}: no model for variant(s) {', '.join(missing)}; "
                              f"this run has {', '.join(available)}")
    else:
        # What the run delivers, and fp32 beside it as the reference; superseded models stay home.
        best = default_variant(available, delivered, superseded)
        chosen = list(dict.fromkeys([best, *(["fp32"] if "fp32" in available else [])]))
    default = default_variant(chosen, delivered, superseded)
    if default == delivered:
        why = "the variant the accuracy guard delivers"
    elif default in superseded:
        why = f"superseded by {delivered}, which --variants left out"
    else:
        why = "the first present of " + ", ".join(PREFERENCE)
    return chosen, default, why


def make_bundle(run_dir: Path, out: Path | None = None, variants=None, overwrite: bool = False,
                log=lambda line: None, wheels=()) -> Path:
    """Write `<run>.tar.gz` (or `out`); returns its path. `wheels`: WHEEL_PLATFORMS names to carry wheels for."""
    # `bundle .` names the archive and its README after the folder's own name, not "".
    run_dir = Path(os.path.abspath(run_dir)) if Path(run_dir).name in ("", "..") else Path(run_dir)
    listed = _check_run(run_dir)
    meta = _run_metadata(run_dir)
    available = {m["variant"]: name for name, m in meta["models"].items()}
    chosen, default, why = choose(run_dir, available, variants)
    out = _out_path(run_dir, out, overwrite)
    models = _models(run_dir, meta, [available[v] for v in chosen])
    bundle_meta = {**meta, "default_model": available[default], "default_reason": why, "models": models}
    unknown = [w for w in wheels if w not in WHEEL_PLATFORMS]
    if unknown:
        raise BundleError(f"no wheel platform {', '.join(unknown)}; choose from {', '.join(WHEEL_PLATFORMS)}")
    members = _members(run_dir, listed, bundle_meta, _readme(run_dir, meta, models, out, available[default], why))
    _add_wheels(members, wheels, log)
    _write_atomically(out, members)
    log(f"bundle: {', '.join(models)}; the runner's default is {available[default]} ({why})")
    return out


def _check_run(run_dir: Path) -> list[str]:
    """The files the run's manifest lists, once every one matches it. A bundle ships only what the build
    wrote: never an edited label, a guard record added later, or a half-built staging folder."""
    if is_staging(run_dir):
        final = resume_target(run_dir.parent / run_name(run_dir))
        raise BundleError(f"{run_dir}: the staging folder of an interrupted build, not a run; finish it with "
                          f"`pipeline build --resume {final}`, then bundle the run")
    if not (run_dir / MANIFEST).is_file():
        raise BundleError(f"{run_dir}: no {MANIFEST}; pass a run directory written by `pipeline build` "
                          "or `pipeline convert`")
    return list(check_unchanged(run_dir, "bundle"))


def _run_metadata(run_dir: Path) -> dict:
    meta_path = run_dir / METADATA_NAME
    if not meta_path.is_file():
        raise BundleError(f"{run_dir}: no {METADATA_NAME}; pass a run directory written by `pipeline build` "
                          "or `pipeline convert`")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        meta = f"not readable JSON ({e})"
    models = meta.get("models") if isinstance(meta, dict) else None
    if not isinstance(models, dict) or not all(isinstance(m, dict) and "variant" in m for m in models.values()) \
            or not isinstance(meta.get("preprocess"), dict):
        why = meta if isinstance(meta, str) else "no models with their variants and preprocessing"
        raise BundleError(f"{meta_path}: {why}; it is not the metadata `pipeline build` writes; rebuild the run "
                          "with `pipeline build --overwrite`")
    return meta


def _models(run_dir: Path, meta: dict, files: list[str]) -> dict:
    """The metadata entries of the chosen model files; one the guard replaced names its replacement."""
    delivered, superseded = guard_decision(run_dir)
    models = {}
    for name in files:
        models[name] = dict(meta["models"][name])
        if models[name]["variant"] in superseded and delivered:
            models[name]["superseded_by"] = delivered
    return models


def _readme(run_dir: Path, meta: dict, models: dict, out: Path, default: str, why: str) -> str:
    import pipeline

    pre = meta["preprocess"]
    return README.format(name=run_dir.name, model=meta["model"], dataset=meta["dataset"],
                         version=pipeline.__version__, models=", ".join(models), h=pre["height"],
                         w=pre["width"], color=pre.get("color", f"{pre['channels']}-channel"),
                         scale=pre["scale"], archive=out.name, default=default, why=why)


def _members(run_dir: Path, listed: list[str], bundle_meta: dict, readme: str) -> dict[str, bytes]:
    """Archive path -> bytes: the models, metadata, labels, the runner, samples, requirements and README.

    Samples are the ones the manifest lists: whatever else lies in samples/ (a hidden .env, a leftover
    temporary) is not the run's, and a bundle is copied to boards."""
    from importlib import metadata as importlib_metadata

    litert = importlib_metadata.version("ai-edge-litert")
    device_dir = Path(device.__file__).resolve().parent
    members = {f: (run_dir / f).read_bytes() for f in bundle_meta["models"]}
    members[METADATA_NAME] = json.dumps(bundle_meta, indent=2).encode()
    members["labels.txt"] = (run_dir / "labels.txt").read_bytes()
    members.update({f"device/{name}": (device_dir / name).read_bytes() for name in RUNNER_FILES})
    members.update({rel: (run_dir / rel).read_bytes() for rel in listed if rel.startswith("samples/")})
    members["requirements.txt"] = REQUIREMENTS.format(litert=litert).encode()
    members["README.md"] = readme.encode()
    return members


def _add_wheels(members: dict[str, bytes], wheels, log) -> None:
    """The runtime's wheels for each board platform asked for, and the index `pipeline deploy` installs from."""
    index = {}
    with tempfile.TemporaryDirectory(prefix="edgepipe-wheels-") as wheel_dir:
        for name in wheels:
            folder = Path(wheel_dir) / name
            folder.mkdir()
            index[name] = download_wheels(members["requirements.txt"].decode(), name, folder, log)
            members.update({f"{WHEELS_DIR}/{name}/{whl.name}": whl.read_bytes() for whl in folder.glob("*.whl")})
    if index:
        members[WHEELS_INDEX] = json.dumps(index, indent=2).encode()


def _write_atomically(out: Path, members: dict[str, bytes]) -> None:
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_archive(tmp, members)
        os.replace(tmp, out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # A full or read-only disk and a denied folder have their own line (failures.os_problem).
        if isinstance(e, OSError) and not os_problem(e):
            raise BundleError(f"--out {out}: cannot write there ({e.strerror or e}); pass --out in a folder "
                              "you can write") from None
        raise

