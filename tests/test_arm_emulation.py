"""Proof that the bundle runs on ARM: the device runner on an emulated Raspberry Pi OS 64-bit userland.

`scripts/arm_emulate.py` builds (once, cached) a Debian bookworm arm64 userland with Python 3.11 and
runs the bundle's runner under `qemu-aarch64-static -cpu cortex-a72` (the Raspberry Pi 4's core) on
the 1,000 real MNIST test digits, with the host's ai-edge-litert release and with the tflite-runtime
2.14.0 fallback. The int8 accuracy must equal the host's exactly. Only correctness is checked:
timings under emulation say nothing about a real Pi.

Needs root and apt (Debian's qemu-user-static and debootstrap; the script installs them), Debian's
package mirror and PyPI. The first run builds the userland (~30 s) into
${XDG_CACHE_HOME:-~/.cache}/edgepipe/arm64-bookworm, or EDGEPIPE_ARM_CACHE if set; later runs reuse it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "arm_emulate.py"
MNIST_DIR = Path(os.environ.get("EDGEPIPE_MNIST_DIR", REPO.parent / "shared" / "datasets" / "mnist-9k"))
HOST_LITERT = metadata.version("ai-edge-litert")

# (--runtime spec, interpreter name the runner must report, its version)
RUNTIMES = [
    (f"ai-edge-litert=={HOST_LITERT}", "ai_edge_litert", HOST_LITERT),
    ("tflite-runtime==2.14.0", "tflite_runtime", "2.14.0"),
]


@pytest.fixture(scope="module")
def emulation_tools():
    """qemu-aarch64-static and debootstrap, or root and apt-get so the script can install them."""
    if shutil.which("qemu-aarch64-static") and shutil.which("debootstrap"):
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("emulated Raspberry Pi run needs qemu-user-static and debootstrap, and they cannot be "
                    "installed here (not root or no apt-get): apt-get install -y qemu-user-static debootstrap")


def _cli(*args: str, timeout: int = 1800) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, f"pipeline {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    """(bundle .tar.gz, eval npz of the 1,000 real test digits, the host's int8 accuracy on them)."""
    if not (MNIST_DIR / "mnist.npz").is_file():
        pytest.skip(f"real MNIST subset not found at {MNIST_DIR} (set EDGEPIPE_MNIST_DIR)")
    tmp = tmp_path_factory.mktemp("arm")
    run, bundle = tmp / "run", tmp / "bundle.tar.gz"
    _cli("build", "--dataset", "mnist", "--data-dir", str(MNIST_DIR), "--quantize", "int8", "--epochs", "1",
         "--no-benchmark", "--out", str(run))
    _cli("bundle", str(run), "--out", str(bundle))
    report = json.loads((run / "report.json").read_text())
    host_accuracy = next(v["accuracy"] for v in report["variants"] if v["variant"] == "int8")

    data = tmp / "eval.npz"
    with np.load(MNIST_DIR / "mnist.npz") as d:
        x, y = d["x_test"], d["y_test"]
    np.savez(data, x=x, y=y)
    if "test_images" in report:  # the host's figure must be on the same digits
        assert report["test_images"] == len(y)
    return bundle, data, host_accuracy


@pytest.mark.slow
@pytest.mark.parametrize("spec, name, version", RUNTIMES, ids=[r[1] for r in RUNTIMES])
def test_int8_accuracy_on_emulated_pi_equals_host(emulation_tools, int8_bundle, spec, name, version):
    bundle, data, host_accuracy = int8_bundle
    cache = ["--cache", os.environ["EDGEPIPE_ARM_CACHE"]] if os.environ.get("EDGEPIPE_ARM_CACHE") else []
    proc = subprocess.run([sys.executable, str(SCRIPT), str(bundle), str(data), "--runtime", spec, *cache],
                          capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    out = json.loads(proc.stdout)

    assert out["interpreter"] == {"name": name, "version": version}
    # Emulated for real: the script's probe of the emulated Python, and the runner's own report.
    assert "machine=aarch64" in proc.stderr
    if "environment" in out:
        assert out["environment"]["machine"] == "aarch64"
    if "n" in out:
        assert out["n"] == 1000
    assert out["accuracy"] == pytest.approx(host_accuracy, abs=1e-9), (
        f"{spec} on emulated arm64: accuracy {out['accuracy']} != host int8 {host_accuracy}")


def test_usage_errors_exit_2(tmp_path):
    """Bad arguments fail at once with exit 2, before any setup (no tools or network needed)."""
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.zeros((1, 28, 28), np.uint8), y=np.zeros(1, np.int64))
    for args in ([str(tmp_path / "missing.tar.gz"), str(npz)],
                 [str(npz), str(npz), "--runtime", "tensorflow"],
                 [str(npz), str(npz), "--runtime", "ai-edge-litert>=2"]):
        proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--cache", str(tmp_path / "cache")],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stdout == ""
        assert "error:" in proc.stderr
    assert not (tmp_path / "cache").exists()
