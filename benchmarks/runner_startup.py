"""Cold start and steady state of the device runner core.

0. The runner's whole `classify` of one PNG (import + load + one classification, a fresh process)
   against the bare imports it cannot avoid, `python -c "import numpy, ai_edge_litert.interpreter,
   PIL.Image"`, alternating the two, median wall time and peak RSS (from wait4, per process).
   Targets (issue 20.3): <= 1.3x the bare imports and <= 60 MB. --other-runner adds an older
   checkout's runner to the alternation, for a before/after measured in the same run.
1. A fresh process that imports the runner, loads the int8 model and runs one inference: wall time
   and peak RSS, for the ai_edge_litert route and the tensorflow.lite route, interleaved.
   Targets: <= 0.3 s and <= 60 MB for ai_edge_litert.
2. Steady-state time per inference of `Model.invoke` on a preloaded array against a bare
   `interpreter.invoke()` loop on the same interpreter, interleaved in blocks. Target: <= 1.15x.

    python benchmarks/runner_startup.py RUN_DIR [--rounds 10] [--json FILE] [--only-classify]
                                        [--other-runner ../main/device/runner.py]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from portable import portable_tree
from spread import median

REPO = Path(__file__).resolve().parent.parent
CHILD = """
import sys, time
t0 = time.perf_counter()
sys.path.insert(0, {repo!r})
from device import core, timing
import numpy as np
m = core.Model({model!r})
p = m.preprocess
m.predict(np.zeros((1, p["height"], p["width"], p["channels"]), np.uint8))
print(time.perf_counter() - t0, timing.peak_rss_mb(), m.runtime.name)
"""


BARE = "import numpy, ai_edge_litert.interpreter, PIL.Image"
CLASSIFY_RATIO, CLASSIFY_MB = 1.3, 60.0


def wall_and_peak(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS in MB of one child process (wait4 gives that child's own rusage)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{cmd} failed: {proc.stderr.read().decode()}")
    proc.stderr.close()
    return wall, usage.ru_maxrss / 1024


def classify_against_bare(run_dir: Path, rounds: int, other_runner: Path | None = None) -> dict:
    image = sorted((run_dir / "samples").glob("*.png"))[0]
    runners = {"classify": REPO / "device" / "runner.py", **({"other_runner": other_runner} if other_runner else {})}
    cmds = {"bare_imports": [sys.executable, "-c", BARE],
            **{k: [sys.executable, str(r), "classify", str(image), "--model", str(run_dir / "model_int8.tflite")]
               for k, r in runners.items()}}
    samples = {k: [] for k in cmds}
    for _ in range(rounds):
        for k, cmd in cmds.items():  # alternating, so machine drift hits both alike
            samples[k].append(wall_and_peak(cmd))
    spread: list[str] = []
    out = {k: {"wall_s": [w for w, _ in v], "peak_rss_mb": [m for _, m in v],
               "wall_s_median": median((w for w, _ in v), f"{k} wall s", spread), "wall_s_min": min(w for w, _ in v),
               "peak_rss_mb_median": median((m for _, m in v), f"{k} peak RSS MB", spread)}
           for k, v in samples.items()}
    for k in runners:
        out[k]["ratio_median"] = median((c[0] / b[0] for c, b in zip(samples[k], samples["bare_imports"])),
                                        f"{k} / bare imports", spread)
    out["spread_warnings"] = spread
    out["ratio_median"] = out["classify"]["ratio_median"]
    out["other_runner"] = {**out.get("other_runner", {}), "path": str(other_runner)} if other_runner else None
    out["image"] = image.name
    out["met"] = out["ratio_median"] <= CLASSIFY_RATIO and out["classify"]["peak_rss_mb_median"] <= CLASSIFY_MB
    return out


def cold_start(model: Path, route: str) -> tuple[float, float, float, str]:
    env = {**os.environ, "EDGEPIPE_RUNTIME": route}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), model=str(model))],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(proc.stderr)
    inside, rss, name = proc.stdout.split()
    return wall, float(inside), float(rss), name


def steady_state(model_path: Path, blocks: int = 30, per_block: int = 2000) -> dict:
    sys.path.insert(0, str(REPO))
    import numpy as np

    from device import core

    model = core.Model(model_path, threads=1)
    p = model.preprocess
    x = model.prepare(np.zeros((1, p["height"], p["width"], p["channels"]), np.uint8))
    interp = model.interpreter
    model.invoke(x)
    core_t, bare_t = [], []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(per_block):
            model.invoke(x)
        core_t.append((time.perf_counter() - t0) / per_block)
        t0 = time.perf_counter()
        for _ in range(per_block):
            interp.invoke()
        bare_t.append((time.perf_counter() - t0) / per_block)
    ratio = [c / b for c, b in zip(core_t, bare_t)]
    spread: list[str] = []
    return {"core_us": median(core_t, "core invoke", spread) * 1e6,
            "bare_invoke_us": median(bare_t, "bare invoke", spread) * 1e6,
            "ratio_median": median(ratio, "core / bare invoke", spread), "blocks": blocks, "per_block": per_block,
            "spread_warnings": spread}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only-classify", action="store_true", help="measure part 0 only (the issue 20.3 goal)")
    ap.add_argument("--other-runner", type=Path, help="another device/runner.py (an older checkout's) alternated "
                                                      "with ours in part 0, for a before/after in one run")
    args = ap.parse_args()
    model = args.run_dir / "model_int8.tflite"
    c = classify_against_bare(args.run_dir, args.rounds, args.other_runner)
    print(f"runner classify of one PNG {c['classify']['wall_s_median']:.3f} s, "
          f"{c['classify']['peak_rss_mb_median']:.1f} MB against the bare imports "
          f"{c['bare_imports']['wall_s_median']:.3f} s, "
          f"{c['bare_imports']['peak_rss_mb_median']:.1f} MB: {c['ratio_median']:.2f}x (medians of {args.rounds}, "
          f"target <= {CLASSIFY_RATIO}x and <= {CLASSIFY_MB:.0f} MB; met: {c['met']})")
    if c["other_runner"]:
        o = c["other_runner"]
        print(f"{o['path']}: {o['wall_s_median']:.3f} s, {o['peak_rss_mb_median']:.1f} MB, {o['ratio_median']:.2f}x")
    sys.path.insert(0, str(REPO))
    from device.core import environment

    out = {"environment": environment(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
           "load_average": os.getloadavg(),
           "classify_against_bare_imports": c, "cold_start": {}}
    if args.only_classify:
        if args.json:
            args.json.write_text(json.dumps(portable_tree(out), indent=2))
        return
    routes = ("ai_edge_litert", "tensorflow.lite")
    samples = {r: [] for r in routes}
    for _ in range(args.rounds):
        for r in routes:  # interleaved, so machine drift hits both routes alike
            samples[r].append(cold_start(model, r))
    for r in routes:
        walls, inside, rss = zip(*[(w, i, m) for w, i, m, _ in samples[r]])
        spread: list[str] = []
        out["cold_start"][r] = {"n": len(walls), "wall_s_median": median(walls, f"{r} cold start wall s", spread),
                                "in_process_s_median": median(inside, f"{r} in-process s", spread),
                                "peak_rss_mb_median": median(rss, f"{r} peak RSS MB", spread),
                                "wall_s_max": max(walls), "spread_warnings": spread}
        c = out["cold_start"][r]
        print(f"{r:>16}: fresh process wall {c['wall_s_median']:.3f} s median (max {c['wall_s_max']:.3f}), "
              f"import+load+infer {c['in_process_s_median']:.3f} s, peak RSS {c['peak_rss_mb_median']:.1f} MB")
    out["steady_state"] = steady_state(model)
    s = out["steady_state"]
    print(f"steady state: core invoke {s['core_us']:.2f} us vs bare invoke {s['bare_invoke_us']:.2f} us "
          f"= {s['ratio_median']:.3f}x (target <= 1.15)")
    if args.json:
        args.json.write_text(json.dumps(portable_tree(out), indent=2))


if __name__ == "__main__":
    main()
