"""The device bundle: one `.tar.gz` with the models, their metadata, the runner and instructions.

Laid out so that, unpacked anywhere, `python device/runner.py classify samples/*.png` works with no
other file: the runner's default model is the one metadata.json names as `default_model`, the
variant the run delivers (pipeline/delivery.py). A variant the accuracy guard replaced ships only
when asked for, labelled `superseded_by` in the metadata.

The archive is reproducible: members sorted, mtimes fixed (SOURCE_DATE_EPOCH, else 1980-01-01 as
in wheels), owner 0/0 without names, modes 0644 (0755 for folders), no timestamp in the gzip header,
so two bundles of one run are byte-identical.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import device
from device.core import METADATA_NAME
from pipeline.delivery import PREFERENCE, default_variant, guard_decision

SUFFIXES = (".tar.gz", ".tgz")
ZIP_EPOCH = 315532800  # 1980-01-01, the earliest time a zip (and so a wheel) can record

RUNNER_FILES = ("__init__.py", "core.py", "images.py", "integrity.py", "timing.py", "runner.py")

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


class BundleError(Exception):
    """The run directory cannot be bundled as asked."""


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


def _write_archive(path: Path, members: dict[str, bytes]) -> None:
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
        raise BundleError(f"--out {out}: a bundle is a gzip-compressed tar; name it {fix} (or .tgz)")
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
                log=lambda line: None) -> Path:
    """Write `<run>.tar.gz` (or `out`); returns its path."""
    from importlib import metadata as importlib_metadata

    import pipeline

    run_dir = Path(run_dir)
    meta_path = run_dir / METADATA_NAME
    if not meta_path.is_file():
        raise BundleError(f"{run_dir}: no {METADATA_NAME}; pass a run directory written by `pipeline build` "
                          "or `pipeline convert`")
    meta = json.loads(meta_path.read_text())
    available = {m["variant"]: name for name, m in meta["models"].items()}
    chosen, default, why = choose(run_dir, available, variants)
    out = _out_path(run_dir, out, overwrite)
    delivered, superseded = guard_decision(run_dir)
    models = {}
    for v in chosen:
        models[available[v]] = dict(meta["models"][available[v]])
        if v in superseded and delivered:
            models[available[v]]["superseded_by"] = delivered
    bundle_meta = {**meta, "default_model": available[default], "default_reason": why, "models": models}
    pre = meta["preprocess"]
    readme = README.format(name=run_dir.name, model=meta["model"], dataset=meta["dataset"],
                           version=pipeline.__version__, models=", ".join(models), h=pre["height"],
                           w=pre["width"], color=pre.get("color", f"{pre['channels']}-channel"),
                           scale=pre["scale"], archive=out.name, default=available[default], why=why)
    litert = importlib_metadata.version("ai-edge-litert")
    device_dir = Path(device.__file__).resolve().parent
    members = {f: (run_dir / f).read_bytes() for f in models}
    members[METADATA_NAME] = json.dumps(bundle_meta, indent=2).encode()
    members["labels.txt"] = (run_dir / "labels.txt").read_bytes()
    members.update({f"device/{name}": (device_dir / name).read_bytes() for name in RUNNER_FILES})
    samples = run_dir / "samples"
    if samples.is_dir():
        members.update({f"samples/{p.name}": p.read_bytes() for p in samples.iterdir() if p.is_file()})
    members["requirements.txt"] = REQUIREMENTS.format(litert=litert).encode()
    members["README.md"] = readme.encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        _write_archive(tmp, members)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log(f"bundle: {', '.join(models)}; the runner's default is {available[default]} ({why})")
    return out

