"""The accuracy goals of issue 9, each measured as one real `pipeline build` in a subprocess.

    python benchmarks/accuracy.py TARGET [TARGET...] [--json FILE]      (TARGET: mnist, cifar-cnn, cifar-resnet8)

Goals (2-core machine): mnist-cnn's default recipe int8 >= 99.2% on the full MNIST with the whole build
<= 90 s; cifar-cnn, 10 epochs, fp32 >= 72% and int8 within 0.5 pp; cifar-resnet8's default recipe int8
>= 85% with training <= 30 min. Each result records the exact command, wall time, the per-stage times,
training images/s, the build's peak memory and the load average sampled while it ran: the machine may
be shared, and a loaded machine trains slower.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from portable import portable, portable_command

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "datasets"
TARGETS = {
    "mnist": ["--dataset", "mnist", "--data-dir", str(SHARED / "mnist"), "--model", "mnist-cnn"],
    "cifar-cnn": ["--dataset", "cifar10", "--data-dir", str(SHARED / "cifar10-jpg"), "--model", "cifar-cnn",
                  "--epochs", "10"],
    "cifar-resnet8": ["--dataset", "cifar10", "--data-dir", str(SHARED / "cifar10-jpg"), "--model", "cifar-resnet8"],
}


class LoadSampler(threading.Thread):
    """os.getloadavg() every few seconds while a build runs."""

    def __init__(self, every: float = 10.0):
        super().__init__(daemon=True)
        self.every, self.samples, self.stop = every, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self.stop.wait(self.every)

    def summary(self) -> dict:
        s = sorted(self.samples)
        return {"samples": len(s), "min": s[0], "median": statistics.median(s), "max": s[-1]} if s else {}


def run(target: str, out: Path, extra: list[str]) -> dict:
    cmd = ["pipeline", "build", *TARGETS[target], "--quantize", "int8", *extra, "--out", str(out)]
    log = Path(tempfile.gettempdir()) / f"edgepipe-accuracy-{target}.log"
    sampler = LoadSampler()
    sampler.start()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        # The checkout's pipeline, not an installed one: `-m` finds this one only when started from its root.
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *cmd[1:]], stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        # wait4: this build's own resource usage (peak memory, CPU time), not all children's so far.
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{target}: build failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    manifest = json.loads((out / "manifest.json").read_text())
    evaluation = json.loads((out / "evaluation.json").read_text())
    ips = manifest["training"].get("images_per_second", [])
    return {
        "command": portable_command(cmd), "log": portable(log), "wall_s": round(wall, 1),
        "stage_seconds": {k: round(v, 1) for k, v in manifest["stage_seconds"].items()},
        "accuracy": {v: e["accuracy"] for v, e in evaluation["variants"].items()},
        "test_images": evaluation.get("n") or manifest["data"]["counts"]["test"],
        "recipe": manifest["training"].get("recipe"),
        "images_per_second_median": statistics.median(ips) if ips else None,
        "peak_rss_mb": round(usage.ru_maxrss / 1024),  # Linux reports KiB
        # CPU time does not grow with other users' load; / 2 estimates the wall time on an idle 2-core machine.
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "load_average": sampler.summary(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="+", choices=list(TARGETS))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--extra", default="", help="More build options, e.g. '--epochs 40'.")
    args = ap.parse_args()
    from device.core import environment

    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "platform": platform.platform(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), **environment()}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets:
            results[target] = run(target, Path(tmp) / target, args.extra.split())
            print(json.dumps({target: results[target]}, indent=2), flush=True)
            if args.json:  # after each target, so a long series leaves its finished figures behind
                args.json.write_text(json.dumps({"environment": env, "results": results}, indent=2))


if __name__ == "__main__":
    main()
