"""What changing a finished run as one swap costs: `updating()` (copy, re-hash, renameat2 exchange)
against re-hashing the manifest in place (the old, non-atomic way), interleaved, medians.

    python benchmarks/update_swap.py RUN_DIR [--repeats 21]

Works on a copy of RUN_DIR in a temporary folder; prints JSON with the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from spread import median

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the checkout's pipeline, not an installed one
from device.core import environment  # noqa: E402
from pipeline.artifacts import update_manifest, updating  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / args.run_dir.name
        shutil.copytree(args.run_dir, run)
        swap, in_place = [], []
        for _ in range(args.repeats):  # interleaved, so machine drift lands on both alike
            t0 = time.perf_counter()
            with updating(run, "benchmark", log=lambda *a: None):
                pass
            swap.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            update_manifest(run)
            in_place.append(time.perf_counter() - t0)
        size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    files = len(json.loads((args.run_dir / "manifest.json").read_text())["files"])
    spread: list[str] = []
    print(json.dumps({"run_bytes": size, "files": files,
                      "repeats": args.repeats, "swap_median_ms": 1e3 * median(swap, "swap", spread),
                      "in_place_median_ms": 1e3 * median(in_place, "in place", spread),
                      "ratio": statistics.median(swap) / statistics.median(in_place), "spread_warnings": spread,
                      "load_average_1m": os.getloadavg()[0], "environment": environment()}, indent=2))


if __name__ == "__main__":
    main()
