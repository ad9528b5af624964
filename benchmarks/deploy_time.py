#!/usr/bin/env python3
"""The first and the second `pipeline deploy` of one run to the emulated Raspberry Pis, timed.

    python benchmarks/deploy_time.py [RUN_DIR] [--boards pi64=arm64,pi32=armhf] [--runs 20]

Serves the emulated boards of scripts/arm_emulate.py (Raspberry Pi OS 64-bit and 32-bit userlands,
each behind its own sshd on 127.0.0.1), removes what earlier deploys left on them, then deploys the
run to all of them at once, twice: the first deploy copies the bundle, installs the runtime and
unpacks; the second finds everything ready and only measures. Prints each board's total and per-step
seconds from the run's deploy.json, with the machine's load. Everything that runs on these boards
runs under qemu: the numbers compare a first deploy with a second one, never a Pi with anything.
Without RUN_DIR a small run (mnist-cnn, 1 epoch, int8) is built first. Needs root (binfmt_misc,
chroot, sshd). Deploys write device columns into RUN_DIR's report: pass a copy if that matters.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = ("connect", "lock_and_probe", "copy", "install", "unpack", "measure")


def pipeline(*args: str, env: dict) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"pipeline {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?", type=Path, help="run directory to deploy (default: build a small one)")
    p.add_argument("--boards", default="pi64=arm64,pi32=armhf",
                   help="NAME=USERLAND pairs (userlands: arm64, armhf, amd64-bullseye); default: %(default)s")
    p.add_argument("--runs", type=int, default=20, help="timed inferences per model on the boards (default 20)")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: binfmt_misc, chroot and sshd")
    spec = importlib.util.spec_from_file_location("arm_emulate", REPO / "scripts" / "arm_emulate.py")
    arm = importlib.util.module_from_spec(spec)
    sys.modules["arm_emulate"] = arm
    spec.loader.exec_module(arm)
    names = dict(pair.split("=", 1) for pair in args.boards.split(","))

    with tempfile.TemporaryDirectory(prefix="deploy-time-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CONFIG_HOME": str(tmp / "config")}
        run = args.run_dir
        if run is None:
            run = tmp / "mnist-int8"
            mnist = REPO.parent / "shared" / "datasets" / "mnist-9k"
            data = ["--dataset", "mnist", "--data-dir", str(mnist)] if (mnist / "mnist.npz").is_file() else [
                "--dataset", "digits"]
            pipeline("build", *data, "--model", "mnist-cnn", "--quantize", "int8", "--epochs", "1", "--no-benchmark",
                     "--out", str(run), env=env)
        boards, config = arm.start_boards(names, tmp / "lab", fresh=True)
        rows = []
        try:
            for attempt in ("first", "second"):
                load = os.getloadavg()[0]
                t0 = time.monotonic()
                pipeline("deploy", str(run), "--ssh-config", str(config), *[a for n in names for a in ("--device", n)],
                         "--runs", str(args.runs), env=env)
                wall = time.monotonic() - t0
                record = json.loads((run / "deploy.json").read_text())["boards"]
                for name in names:
                    b = record[name]
                    rows.append([name, attempt, f"{b['seconds']:.1f}", *(f"{b['steps'][s]:.1f}" if s in b["steps"]
                                                                          else "-" for s in STEPS),
                                 "yes" if b["copied"] else "no", "yes" if b["installed"] else "no",
                                 f"{wall:.1f}", f"{load:.1f}"])
        finally:
            for board in boards:
                board.stop()
    headers = ["board", "deploy", "seconds", *STEPS, "copied", "installed", "wall (all boards)", "load before"]
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
    print(f"\nhost: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; load average now {os.getloadavg()[0]:.1f}; boards under qemu user-mode "
          "emulation (their step times are the emulator's, not a Pi's)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
