"""The device bundle: one `.tar.gz` with the models, their metadata, the runner and instructions.

Laid out so that, unpacked anywhere, `python device/runner.py classify samples/*.png` works with no
other file: the runner's default model is `model_int8.tflite` beside the `device/` folder.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import device
from device.core import METADATA_NAME

RUNNER_FILES = ("__init__.py", "core.py", "integrity.py", "timing.py", "runner.py")

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


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def make_bundle(run_dir: Path, out: Path | None = None, variants=None) -> Path:
    """Write `<run>.tar.gz` (or `out`); returns its path."""
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
    litert = importlib_metadata.version("ai-edge-litert")
    device_dir = Path(device.__file__).resolve().parent
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for f in files:
                tar.add(run_dir / f, arcname=f)
            _add_bytes(tar, METADATA_NAME, json.dumps(bundle_meta, indent=2).encode())
            tar.add(run_dir / "labels.txt", arcname="labels.txt")
            for name in RUNNER_FILES:
                tar.add(device_dir / name, arcname=f"device/{name}")
            samples = run_dir / "samples"
            if samples.is_dir():
                for p in sorted(samples.iterdir()):
                    tar.add(p, arcname=f"samples/{p.name}")
            _add_bytes(tar, "requirements.txt", REQUIREMENTS.format(litert=litert).encode())
            _add_bytes(tar, "README.md", readme.encode())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
