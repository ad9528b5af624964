"""edgepipe device runner: classify images, evaluate, benchmark and inspect a `.tflite` model.

Usage (in a bundle, or from the repository):
    python device/runner.py classify IMAGE|FOLDER|-... [--model PATH] [--top-k K] [--invert] [--json]
    python device/runner.py eval DATA.npz     [--model PATH] [--json]
    python device/runner.py bench             [--model PATH] [--runs N] [--warmup N] [--threads N] [--no-xnnpack]
                                              [--loads N] [--images IMAGE...] [--preprocess-runs N] [--json]
    python device/runner.py info              [--model PATH] [--json]
    python device/runner.py verify [FOLDER]   [--json]
    python device/runner.py unpack BUNDLE.tar.gz FOLDER [--json]

The default model is the one the bundle's metadata.json names as `default_model` (the variant the
run delivers). Exit codes: 0 ok, 1 failure (including any image that could not be classified),
2 usage, 130 interrupted. Every --json output carries `kind` and `schema`.

Needs only numpy, pillow and one TFLite interpreter (ai-edge-litert, tflite-runtime or tensorflow).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (`python device/runner.py`): make the `device` package importable from the
    # folder that holds it, in a bundle and in the repository alike.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# device.board (platform, subprocess) is imported by bench alone: 40 ms of every other command's cold start.
from device import core, foreign, images, integrity, timing, verify  # noqa: E402

BUNDLE = Path(__file__).resolve().parent.parent
SCHEMA = 1
SAMPLES = BUNDLE / "samples"


def default_model() -> Path:
    """The model the bundle's metadata names as its default: the variant the run delivers. Without
    that name there is no guessing (a guess could be the model the accuracy guard rejected)."""
    path = BUNDLE / core.METADATA_NAME
    try:
        name = json.loads(path.read_text()).get("default_model")
    except (OSError, ValueError, AttributeError):
        name = None
    if not (isinstance(name, str) and name and Path(name).name == name):
        raise core.DeviceError(f"{path}: names no default_model (missing, unreadable or a bundle from before "
                               "edgepipe recorded it); pass the model to run with --model, or make the bundle "
                               "again with `pipeline bundle`")
    return BUNDLE / name


def _shown(path: Path) -> str:
    """A path as the user gave it; the default model by its name inside the bundle."""
    path = Path(path)
    return path.name if path.is_absolute() and path.parent == BUNDLE else str(path)


def _header(kind: str, args=None, model=None) -> dict:
    out = {"kind": kind, "schema": SCHEMA}
    if model is not None:
        out.update({"model": _shown(args.model), "model_sha256": model.sha256})
    return out


def _preprocessing(args, model) -> dict:
    """The preprocessing a result was measured with and the options that chose it: `pipeline report` merges
    a result only when this is the run's own, since an --input-range or --labels override changes what the
    figures mean (raw 0-255 pixels fed to a model trained on 0..1 score near chance)."""
    p = model.preprocess
    overrides = {name: str(value) for name, value in (("input_range", args.input_range), ("labels", args.labels))
                 if value is not None}
    return {"scale": p["scale"], "offset": p["offset"], "labels": list(p["labels"]), "overrides": overrides}


def _load(args) -> core.Model:
    model = core.Model(args.model, threads=getattr(args, "threads", None),
                       xnnpack=not getattr(args, "no_xnnpack", False), **_foreign_options(args))
    entry = ((model.metadata or {}).get("models") or {}).get(model.path.name) or {}
    if isinstance(entry, dict) and entry.get("superseded_by"):
        warnings.warn(f"{model.path.name}: superseded by {entry['superseded_by']}, which the accuracy guard delivers "
                      "instead because this one lost too much accuracy; drop --model to run the default",
                      stacklevel=2)
    return model


def _foreign_options(args) -> dict:
    """--input-range and --labels: what a model without metadata.json means, when the user knows better."""
    labels = None
    if getattr(args, "labels", None) is not None:
        try:
            labels = foreign.read_labels(args.labels)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise core.DeviceError(f"--labels {args.labels}: {e}; pass a text file with one label a line")
    return {"input_range": getattr(args, "input_range", None), "labels": labels}


def _images(paths):
    """The images to classify, in order: files as given, a folder's image files sorted, `-` as stdin."""
    for path in paths:
        if str(path) == "-":
            yield "-", sys.stdin.buffer.read()
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                           and p.suffix.lower() in images.IMAGE_EXTENSIONS)
            yield from ((str(p), p) for p in found) if found else [(str(path), path)]  # an error for it
        else:
            yield str(path), path


def cmd_classify(args) -> dict:
    model = _load(args)
    results = model.classify(list(_images(args.images)), args.top_k, invert=args.invert)
    failed = sum("error" in r for r in results)
    return {**_header("classify", args, model), "invert": args.invert, "results": results,
            "failed": failed, "ok": failed == 0}


def cmd_eval(args) -> dict:
    x, y = core.load_npz(args.data)
    model = _load(args)
    t0 = time.perf_counter()
    result = core.evaluate(model, x, y, source=str(args.data))
    seconds = time.perf_counter() - t0
    return {**_header("eval", args, model), "preprocessing": _preprocessing(args, model), "data": str(args.data),
            "n": result["n"], "accuracy": result["accuracy"], "per_class": result["per_class"],
            "confusion": result["confusion"], "seconds": seconds,
            "interpreter": {"name": model.runtime.name, "version": model.runtime.version},
            "environment": core.environment()}


def cmd_bench(args) -> dict:
    """Load (cold, then warm), preprocessing per stage, first inference, timed inferences, memory and the
    board's state before and after, in the way hosted device farms report a profile run."""
    import numpy as np

    from device import board

    clock = time.perf_counter
    before = board.state()
    t0 = clock()
    rt = core.runtime()  # importing the interpreter module: part of a cold start, kept apart
    import_ms = (clock() - t0) * 1e3
    t0 = clock()
    model = _load(args)  # the first interpreter of this fresh process
    cold_ms = (clock() - t0) * 1e3
    peak_after_load = timing.peak_rss_mb()
    warm_loads = []
    for _ in range(args.loads):  # code loaded and the file in the page cache: what a reload costs
        t0 = clock()
        _load(args)
        warm_loads.append(clock() - t0)

    images = args.images if args.images is not None else sorted(SAMPLES.glob("*.png"))
    p, stages, quantize = model.preprocess, {}, []
    if images:
        core.load_image(images[0], p)  # untimed: the first decode imports Pillow's codec
        for i in range(max(args.preprocess_runs, len(images))):
            pixels = core.load_image(images[i % len(images)], p, stages)[None]
            t0 = clock()
            prepared = model.prepare(pixels)
            quantize.append(clock() - t0)
    else:  # no images to decode: random pixels of the input's size, preprocessing not measured
        pixels = np.random.default_rng(0).integers(0, 256, size=(1, p["height"], p["width"], p["channels"]),
                                                   dtype=np.uint8)
        prepared = model.prepare(pixels)
    t0 = clock()
    model.invoke(prepared)
    first_ms = (clock() - t0) * 1e3
    warm, timed = timing.time_calls(lambda: model.invoke(prepared), args.runs, args.warmup)
    peak_after_inference = timing.peak_rss_mb()
    return {**_header("bench", args, model), "preprocessing": _preprocessing(args, model),
            "threads": args.threads, "cores": os.cpu_count(),
            "xnnpack": not args.no_xnnpack,
            "load": {"import_ms": import_ms, "cold_ms": cold_ms, "warm": timing.summarize(warm_loads)},
            "init_ms": cold_ms, "first_inference_ms": first_ms,
            "preprocess": {"images": len(images), "runs": len(quantize),
                           "decode": timing.summarize(stages.get("decode", [])),
                           "resize": timing.summarize(stages.get("resize", [])),
                           "quantize": timing.summarize(quantize)} if images else None,
            "warmup": timing.summarize(warm), "latency": timing.summarize(timed),
            "samples_ms": [s * 1e3 for s in timed], "peak_rss_mb": peak_after_inference,
            "memory": {"peak_rss_mb_after_load": peak_after_load, "peak_rss_mb_after_inference": peak_after_inference},
            "board_state": {"before": before, "after": board.state()},
            "interpreter": {"name": rt.name, "version": rt.version},
            "environment": core.environment()}


def cmd_info(args) -> dict:
    model = _load(args)
    return {**_header("info", args, model), **{k: v for k, v in model.info().items() if k != "model"},
            "environment": core.environment()}


def cmd_unpack(args) -> dict:
    problems = []

    def verified(folder: Path) -> bool:
        problems.extend(verify.verify_folder(folder))
        return not problems

    integrity.extract_bundle(args.archive, args.dest, keep=verified)
    return {**_header("unpack"), "path": str(args.dest), "ok": not problems, "problems": problems}


def cmd_verify(args) -> dict:
    folder = args.folder if args.folder is not None else BUNDLE
    problems = verify.verify_folder(folder)
    return {**_header("verify"), "path": str(args.folder or "."), "ok": not problems, "problems": problems}


def _print_human(command: str, out: dict) -> None:
    if command == "classify":
        for r in out["results"]:
            if "error" in r:
                print(f"error: {r['error']}", file=sys.stderr)
                continue
            tops = ", ".join(f"{t['label']} {t['score']:.3f}" for t in r["top"])
            print(f"{r['image']}: {tops}")
        if out["failed"] and len(out["results"]) > 1:
            print(f"error: {out['failed']} of {len(out['results'])} image(s) could not be classified",
                  file=sys.stderr)
    elif command == "eval":
        print(f"accuracy {out['accuracy']:.4f} on {out['n']} images "
              f"({out['interpreter']['name']} {out['interpreter']['version']})")
        for label, acc in out["per_class"].items():
            print(f"  {label:>12}: " + ("no images" if acc is None else f"{acc:.4f}"))
    elif command == "bench":
        lat, load = out["latency"], out["load"]
        print(f"load: import {load['import_ms']:.1f} ms, cold {load['cold_ms']:.1f} ms, warm p50 "
              f"{load['warm'].get('p50_ms', float('nan')):.2f} ms (n={load['warm']['n']}); first inference "
              f"{out['first_inference_ms']:.3f} ms; threads {out['threads']} of {out['cores']} cores, "
              f"xnnpack {'on' if out['xnnpack'] else 'off'}")
        if out["preprocess"]:
            pre = out["preprocess"]
            print(f"preprocess per image (n={pre['runs']}, {pre['images']} images): " + ", ".join(
                f"{stage} p50 {pre[stage]['p50_ms']:.4f} ms" for stage in ("decode", "resize", "quantize")))
        print(f"invoke n={lat['n']} p50 {lat['p50_ms']:.4f} ms  p90 {lat['p90_ms']:.4f}  p99 {lat['p99_ms']:.4f}  "
              f"mean {lat['mean_ms']:.4f} ± {lat['std_ms']:.4f}  min {lat['min_ms']:.4f}  max {lat['max_ms']:.4f}")
        if lat.get("warning"):
            print(f"warning: {lat['warning']}")
        mem = out["memory"]
        if mem["peak_rss_mb_after_inference"] is not None:
            print(f"peak memory {mem['peak_rss_mb_after_load']:.1f} MB after load, "
                  f"{mem['peak_rss_mb_after_inference']:.1f} MB after inference")
        for when, st in out["board_state"].items():
            known = {k: v for k, v in st.items() if v is not None and k != "throttled_flags"}
            if known:
                print(f"board {when}: " + ", ".join(f"{k} {v}" for k, v in known.items())
                      + (f" ({'; '.join(st['throttled_flags']) or 'never throttled'})" if st["throttled"] else ""))
    elif command in ("verify", "unpack"):
        kept = "" if command == "verify" else " (nothing unpacked was kept)"
        print(f"{out['path']}: " + ("all models verified" if out["ok"] else f"PROBLEMS{kept}"))
        for problem in out["problems"]:
            print(f"  - {problem}")
    elif command == "info":
        _print_info(out)


def _print_info(out: dict) -> None:
    print(f"{out['model']}: {out['bytes']:,} bytes, sha256 {out['model_sha256'][:12]}..., "
          f"{out['interpreter']['name']} {out['interpreter']['version']}")
    for side in ("input", "output"):
        t = out[side]
        quant = f", scale {t['scale']:.6g}, zero point {t['zero_point']}" if t["scale"] else ""
        print(f"  {side:<6} {t['name']}: {t['shape']} {t['dtype']}{quant}")
    print(f"  ops    {', '.join(out['ops'])}")
    p = out["preprocess"]
    print(f"  images {p['height']}x{p['width']}x{p['channels']}, pixel * {_number(p['scale'])} + "
          f"{_number(p['offset'])}; {len(p['labels'])} labels: {', '.join(p['labels'][:12])}"
          f"{' ...' if len(p['labels']) > 12 else ''}"
          + ("" if out["metadata"] else f" (no {core.METADATA_NAME} beside the model: {p.get('source')})"))


def _number(value) -> str:
    """A scale or offset: one number, or one per channel."""
    return f"{value:.6g}" if isinstance(value, (int, float)) else "[" + ", ".join(f"{v:.6g}" for v in value) + "]"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runner.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help_text):
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("--model", type=Path, default=None,
                        help="the .tflite model (default: the bundle's default_model in metadata.json, "
                             "the variant the run delivers)")
        sp.add_argument("--json", action="store_true", help="print machine-readable JSON")
        sp.add_argument("--input-range", choices=tuple(foreign.INPUT_RANGES), default=None,
                        help="pixels scaled to this range before the model (default: metadata.json, the model's "
                             "TFLite metadata, else TFLite's convention for its input type)")
        sp.add_argument("--labels", type=Path, default=None,
                        help="a text file with one label a line (default: metadata.json or the model's TFLite "
                             "metadata)")
        sp.set_defaults(fn=fn)
        return sp

    sp = add("classify", cmd_classify, "top-k labels for each image")
    sp.add_argument("images", nargs="+", type=Path,
                    help="image files (any format Pillow reads), folders of them, or - for one image on stdin")
    sp.add_argument("--top-k", type=int, default=3, help="labels to show per image (default 3)")
    sp.add_argument("--invert", action="store_true",
                    help="flip pixel values first (dark strokes on light paper for a model trained on light on dark)")
    sp = add("eval", cmd_eval, "accuracy on a labelled .npz set (arrays x and y)")
    sp.add_argument("data", type=Path, help=".npz with 'x' (uint8 images) and 'y' (labels)")
    sp = add("bench", cmd_bench, "load (cold, warm), preprocessing, first inference, timed runs, memory, board state")
    sp.add_argument("--runs", type=int, default=200, help="timed runs (default 200)")
    sp.add_argument("--warmup", type=int, default=20, help="warm-up runs, not in the statistics (default 20)")
    sp.add_argument("--loads", type=int, default=5, help="warm loads timed after the cold one (default 5)")
    sp.add_argument("--images", type=Path, nargs="*", default=None,
                    help="images to time decode, resize and quantize on (default: the bundle's samples/*.png)")
    sp.add_argument("--preprocess-runs", type=int, default=50,
                    help="preprocessing runs, cycling through the images (default 50)")
    sp.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    sp.add_argument("--no-xnnpack", action="store_true", help="use the built-in kernels instead of XNNPACK")
    add("info", cmd_info, "tensors, dtypes, quantization parameters and ops")
    sp = sub.add_parser("verify", help="check every model in a bundle against its metadata (size, sha256, tensors)")
    sp.add_argument("folder", nargs="?", type=Path, default=None,
                    help="the unpacked bundle or run directory (default: this bundle)")
    sp.add_argument("--json", action="store_true", help="print machine-readable JSON")
    sp.set_defaults(fn=cmd_verify)
    sp = sub.add_parser("unpack", help="unpack a bundle .tar.gz safely into a folder, then verify it")
    sp.add_argument("archive", type=Path, help="the bundle written by `pipeline bundle`")
    sp.add_argument("dest", type=Path, help="folder to unpack into")
    sp.add_argument("--json", action="store_true", help="print machine-readable JSON")
    sp.set_defaults(fn=cmd_unpack)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    problem = _path_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if getattr(args, "fn", None) not in (cmd_verify, cmd_unpack) and args.model is None:
        args.model, code = _step(lambda _: default_model(), args)
        if code:
            return code
    for name in ("runs", "threads", "top_k", "loads", "preprocess_runs"):
        if getattr(args, name, 1) < 1:
            print(f"error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if getattr(args, "warmup", 0) < 0:
        print("error: --warmup must be 0 or more", file=sys.stderr)
        return 2
    # Warnings (such as a model without metadata) go to stderr as one line, never into the JSON.
    warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"
    isolate, code = _step(_unverifiable, args)
    if code:
        return code
    return _in_child(args) if isolate else _execute(args)


# Each path the command line names: the argument, whether it is a file or a folder, what it is called,
# what to pass instead, and whether it must exist (unpack makes its folder).
PATHS = (("model", "file", "model file", "a .tflite file with --model", True),
         ("data", "file", ".npz file", "an .npz file with arrays 'x' and 'y'", True),
         ("labels", "file", "labels file", "a text file with one label a line to --labels", True),
         ("archive", "file", "bundle file", "the .tar.gz written by `pipeline bundle`", True),
         ("folder", "folder", "folder", "an unpacked bundle or a run directory (`unpack` takes the .tar.gz)", True),
         ("dest", "folder", "folder to unpack into", "a new folder", False))


def _path_problem(args) -> str | None:
    """A path that does not exist, or is a file where a folder is expected (or the reverse): a usage error
    (2), as in `pipeline`. Images are data, each reported on its own by classify."""
    for name, kind, called, instead, must_exist in PATHS:
        path = getattr(args, name, None)
        if path is None or not path.exists():
            if path is not None and must_exist:
                return f"{path}: no such {called}"
            continue
        if not (path.is_dir() if kind == "folder" else path.is_file()):
            found = "a folder" if path.is_dir() else "a file" if path.is_file() else "a device, pipe or socket"
            return f"{path}: is {found}, not a {called}; pass {instead}"
    return None


def _step(fn, args):
    """(fn(args), 0), or (None, exit code) after one `error:` line for a user's mistake or Ctrl-C."""
    try:
        return fn(args), 0
    except core.DeviceError as e:
        print(f"error: {e}", file=sys.stderr)
        return None, 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return None, 130


def _execute(args) -> int:
    out, code = _step(args.fn, args)
    if code:
        return code
    for r in out.get("results", []):  # per-image doubts reach a person in --json mode too
        for w in r.get("warnings", []):
            print(f"warning: {r['image']}: {w}", file=sys.stderr)
    try:
        if args.json:
            print(json.dumps(_finite(out), indent=2, allow_nan=False))
        else:
            _print_human(args.command, out)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`runner.py ... | head`); Python would print a traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0 if out.get("ok", True) else 1


def _finite(value):
    """value with null for NaN and infinity: Python writes them as NaN and Infinity, which is not JSON, and
    strict parsers (JavaScript's, jq) refuse the whole output. A crafted model can carry them (a NaN scale)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _unverifiable(args) -> bool:
    """True when the command's model has no sha256 in a metadata.json beside it.

    A model whose sha256 is recorded is checked byte for byte before the interpreter sees it
    (core.Model), so it is the file the pipeline wrote. Any other model may be damaged or malicious,
    and a structurally valid but malicious .tflite can crash the interpreter's C++ kernels.
    """
    model = getattr(args, "model", None)
    if model is None or not Path(model).is_file() or not hasattr(os, "fork"):
        return False  # no model, or core.Model's own clean error; no fork on Windows: run in-process
    meta_path = integrity.find_metadata(model)
    return integrity.expected_sha256(model, integrity.load_metadata(meta_path) if meta_path else None) is None


def _in_child(args) -> int:
    """Run the command in a forked child; a crash there (signal) becomes a one-line error here."""
    sys.stdout.flush()
    sys.stderr.flush()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+ dislikes fork() beside BLAS threads
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _set_sigint(_interrupt_once)
            code = _execute(args)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    # Ctrl-C reaches the child as well (same process group) and a SIGINT sent to the parent alone is
    # passed on; the child stops once, with its own message, and the parent reports its exit code.
    previous = _set_sigint(lambda signum, frame: _signal_child(pid))
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        _set_sigint(previous)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        print(f"error: {args.model}: the interpreter crashed ({name}) on this model; the file is damaged or "
              f"malicious (no {core.METADATA_NAME} beside it records a sha256 to check it against)",
              file=sys.stderr)
        return 1
    return os.waitstatus_to_exitcode(status)


def _signal_child(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGINT)
    except OSError:  # already gone
        pass


def _interrupt_once(signum, frame):
    # Ctrl-C may arrive twice (from the terminal and passed on by the parent): stop once, cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _set_sigint(handler):
    try:
        return signal.signal(signal.SIGINT, handler) if handler is not None else None
    except ValueError:  # main() called from a thread other than the main one: leave signals alone
        return None


if __name__ == "__main__":
    sys.exit(main())
