"""The report: one table a person reads, one JSON a machine reads, plots, and notes drawn from the data.

Nothing is measured here. Every figure is copied or derived from the files the earlier stages wrote
(manifest, metadata, evaluation, benchmark) and, optionally, from JSON that `device/runner.py bench
--json` or `eval --json` printed on a device, so the report can be rendered again at any time.
"""
from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from device.timing import features_words
from pipeline.artifacts import MANIFEST, atomic_write, run_name, write_json
from pipeline.config import VARIANTS
from pipeline.delivery import default_variant, guard_decision
from pipeline.report import ReportError, ms, pct, plots, sections
from pipeline.report import device_results as on_device
from pipeline.report import read_json as _read_json
from pipeline.report.notes import notes, threads_label

SCHEMA = 1
TEMPLATES = Path(__file__).resolve().parent / "templates"
ANALYSIS_PLOT = "analysis_layers.png"
PLOTS = {"accuracy_vs_latency.png": "Accuracy against p50 latency; marker area is the file size",
         "latency.png": "Latency distribution of every variant (raw timed samples)",
         "confusion_fp32_int8.png": "Confusion matrices of fp32 and int8 on the test split"}

CAPTIONS = {**PLOTS,
            ANALYSIS_PLOT: "Per-layer RMSE/scale of the int8 model (0.29 is ideal rounding, above 0.7 suspect)"}


# ---------------------------------------------------------------- collecting the figures

def _load(run_dir: Path) -> tuple[dict, dict, dict | None, list[str]]:
    """manifest, evaluation, benchmark (None when the build skipped it) and the class labels."""
    manifest = _read_json(run_dir / MANIFEST, "the manifest written by `pipeline build`")
    evaluation = _read_json(run_dir / "evaluation.json", "the evaluation written by `pipeline build`")
    bench_path = run_dir / "benchmark.json"
    bench = _read_json(bench_path, "the benchmark of `pipeline build`") if bench_path.exists() else None
    meta = _read_json(run_dir / "metadata.json", "the metadata written by `pipeline build`")
    manifest["tflite_metadata"] = {name: m.get("tflite_metadata") for name, m in meta.get("models", {}).items()}
    return manifest, evaluation, bench, meta["preprocess"]["labels"]


def collect(run_dir: Path, manifest: dict, evaluation: dict, bench: dict | None,
            devices: list[Path] | None = None) -> dict:
    """The report as a dict, from the run directory's files; writes nothing."""
    threads = min(map(int, bench["threads"])) if bench and bench.get("threads") else None
    missing = [f"model_{v}.tflite" for v in evaluation["variants"] if not (run_dir / f"model_{v}.tflite").is_file()]
    if missing:
        raise ReportError(f"{run_dir}: {', '.join(missing)} missing, though evaluation.json lists them; rebuild it")
    from pipeline.measure.stats import adjust_across_variants, fill_missing

    fill_missing(evaluation["variants"], run_dir / "predictions.npz")
    adjust_across_variants(evaluation["variants"])  # runs evaluated before the tests were adjusted, too
    names = [v for v in VARIANTS if v in evaluation["variants"]]
    names += [v for v in evaluation["variants"] if v not in VARIANTS]
    variants = [_variant(run_dir, v, evaluation, bench, threads) for v in names]
    delivered, superseded = guard_decision(run_dir)
    report = {
        "kind": "report", "schema": SCHEMA, "run": run_name(run_dir),
        "model": manifest.get("model_name") or manifest["config"]["model"], "dataset": manifest["config"]["dataset"],
        "input_range": input_range_of(manifest),
        "test_images": evaluation["n"], "table_threads": threads, "variants": variants,
        "delivered": {"variant": default_variant(names, delivered, superseded), "by_guard": delivered in names,
                      "superseded": [v for v in superseded if v in names]},
        "keras": evaluation.get("keras"), "versions": manifest.get("versions", {}),
        "environment": bench["environment"] if bench else None,
        "benchmark": {k: bench.get(k) for k in ("xnnpack", "runs", "warmup", "timing", "macs_per_inference")}
        if bench else None,
        "devices": on_device.merge(devices or [], variants, run_dir),
        "analysis": sections.analysis(run_dir),
        "learning": _learning(evaluation, manifest),
        "boards": sections.boards(run_dir),
        # {model file: {"present": bool, "reason": why not}}; None for runs built before it was recorded.
        "tflite_metadata": manifest.get("tflite_metadata", {}),
        "tflm": _read_json(run_dir / "tflm.json", "the figures of `pipeline export --target tflm`")
        if (run_dir / "tflm.json").is_file() else None,
    }
    report["notes"] = notes(report, bench)
    return report


def input_range_of(manifest: dict) -> dict | None:
    """{"range": "0,255", "source": ...} of a run; runs made before it was recorded: from the preprocessing."""
    from pipeline.foreign import range_name

    if manifest.get("input_range"):
        return {k: manifest["input_range"].get(k) for k in ("range", "source", "scores", "images")}
    pre = manifest.get("preprocess") or {}
    name = range_name(pre.get("scale", 0.0), pre.get("offset", 0.0)) if pre else None
    return {"range": name, "source": "recorded preprocessing"} if name else None


def _variant(run_dir: Path, v: str, evaluation: dict, bench: dict | None, threads: int | None) -> dict:
    e, size = evaluation["variants"][v], (run_dir / f"model_{v}.tflite").stat().st_size
    entry = {"variant": v, "file": f"model_{v}.tflite", "bytes": size,
             "size_ratio": size / (run_dir / "model_fp32.tflite").stat().st_size,
             "accuracy": e["accuracy"], "change_pp": e["change_pp_vs_fp32"],
             "agreement": e.get("agreement_with_fp32", 1.0),  # fp32, the baseline, agrees with itself
             "mean_abs_prob_diff": e.get("mean_abs_prob_diff_vs_fp32", 0.0),
             "interval_95": e.get("interval_95"), "mcnemar_vs_fp32": e.get("mcnemar_vs_fp32"),
             "p50_ms": None, "p90_ms": None, "p99_ms": None, "speedup": None, "gmac_per_s": None,
             "latency": {}, "memory": None, "device": {}}
    if bench:
        for t, per_variant in bench["threads"].items():
            m = per_variant[v]
            entry["latency"][t] = {**m["latency"], "speedup": m["speedup_vs_fp32"], "gmac_per_s": m["gmac_per_s"],
                                   "init_ms": m["init_ms"], "first_inference_ms": m["first_inference_ms"]}
        at = entry["latency"][str(threads)]
        entry.update({k: at[k] for k in ("p50_ms", "p90_ms", "p99_ms", "speedup", "gmac_per_s")})
        entry["memory"] = bench["variants"][v].get("fresh_process")
    return entry


def _learning(evaluation: dict, manifest: dict) -> dict:
    """What says whether the model learned: test images per class, recall per class, the training curves."""
    confusion = np.asarray(evaluation["variants"]["fp32"].get("confusion") or [])
    training = manifest.get("training") or {}
    return {"labels": list((manifest.get("preprocess") or {}).get("labels") or []),
            "test_counts": confusion.sum(axis=1).astype(int).tolist() if confusion.size else None,
            "recall": {v: e.get("per_class") or {} for v, e in evaluation["variants"].items()},
            "train_accuracy": training.get("accuracy"), "val_accuracy": training.get("val_accuracy"),
            # Who trained the model decides what to try: --model and --epochs mean nothing to a given one.
            "trained_by": "search" if manifest.get("search") else
                          "user" if (manifest.get("config") or {}).get("keras_model") else "build"}


# ---------------------------------------------------------------- the table, in three formats

def table(report: dict) -> tuple[list[str], list[list[str]]]:
    """(headers, rows of strings): one row per variant, host figures then each device's."""
    headers = ["variant", "size", "size ratio", "accuracy", "95% interval", "change", "McNemar p (Holm)", "agreement",
               "p50 ms", "p90 ms", "p99 ms", "speed-up vs fp32"]
    labels = [d["label"] for d in report["devices"]]
    for label in labels:
        headers += [f"{label} accuracy", f"{label} p50 ms"]
    rows = []
    for v in report["variants"]:
        ci, test = v.get("interval_95"), v.get("mcnemar_vs_fp32")
        row = [v["variant"], f"{v['bytes'] / 1024:.1f} KiB", f"{v['size_ratio']:.2f}x", pct(v["accuracy"]),
               f"{100 * ci['low']:.1f}-{100 * ci['high']:.1f}%" if ci else "-", f"{v['change_pp']:+.2f} pp",
               _p_value(test), pct(v["agreement"]), ms(v["p50_ms"]), ms(v["p90_ms"]),
               ms(v["p99_ms"]), "-" if v["speedup"] is None else f"{v['speedup']:.2f}x"]
        for label in labels:
            dev = v["device"].get(label, {})
            # A latency measured under emulation is the emulator's speed, never shown as the board's.
            row += [pct(dev.get("accuracy")), "emulated" if dev.get("emulated") else ms(dev.get("p50_ms"))]
        rows.append(row)
    return headers, rows


def _p_value(test: dict | None) -> str:
    if not test:
        return "-"
    return f"{test.get('p_holm', test['p_value']):.2g}" + ("" if test["significant"] else " (n.s.)")


def _text(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = [[c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
             for row in [headers, *rows]]
    lines.insert(1, ["-" * w for w in widths])
    return "\n".join("  ".join(cells) for cells in lines)


def headline(report: dict) -> str:
    """Which model the run delivers: what its bundle ships and its runner runs by default."""
    d = report.get("delivered")
    if not d:
        return ""
    v = next(x for x in report["variants"] if x["variant"] == d["variant"])
    why = "the accuracy guard's repair" if d["by_guard"] else "the best variant present"
    line = f"Delivers {d['variant']} ({why}): {pct(v['accuracy'])} on the test split, {v['bytes'] / 1024:.1f} KiB"
    if d["superseded"]:
        line += f"; it replaces {', '.join(d['superseded'])}, which ships only on request"
    return line + "."


def _range_said(chosen: dict | None) -> str:
    if not chosen or not chosen.get("range"):
        return ""
    return f", input pixels scaled to {chosen['range'].replace(',', '..')} ({chosen.get('source') or 'recorded'})"


def _context(report: dict) -> list[str]:
    """The sentences above the table: what was measured, where, how."""
    versions = report["versions"]
    lines = [*([headline(report)] if report.get("delivered") else []),
             f"{report['model']} on {report['dataset']}{_range_said(report.get('input_range'))}, accuracy on "
             f"{report['test_images']:,} test images; "
             f"edgepipe {versions.get('edgepipe')}, TensorFlow {versions.get('tensorflow')}, "
             f"ai-edge-litert {versions.get('ai-edge-litert')}."]
    if report["benchmark"]:
        b, env = report["benchmark"], report["environment"]
        how = b.get("timing") or {}
        # Every block opens with its share of the warm-up, at least one run: with --warmup 0 there were some.
        warmup = how["rounds"] * how["block_warmup"] if "block_warmup" in how else b["warmup"]
        lines.append(f"Latency per image at {threads_label(report['table_threads'])}, XNNPACK "
                     f"{'on' if b['xnnpack'] else 'off'}, {b['runs']} timed runs after {warmup} warm-up, "
                     f"{_timing_words(b.get('timing'))}, on {env['cpu']} ({env['cores']} cores, "
                     f"{features_words(env.get('cpu_features'))}, "
                     f"{env['interpreter']['name']} {env['interpreter']['version']}); speed-ups hold on this "
                     "machine, not on a CPU with other features.")
    if report["keras"]:
        k = report["keras"]
        lines.append(f"Keras model accuracy {pct(k['accuracy'])}; the fp32 .tflite agrees with it on "
                     f"{pct(k['fp32_tflite_agreement'])} of images "
                     f"(max |prob diff| {k['fp32_tflite_max_abs_diff']:.1e}).")
    return lines


def _timing_words(how: dict | None) -> str:
    if how and how.get("method") == "blocked":
        return (f"each variant timed in warm blocks of consecutive runs, the blocks alternating over "
                f"{how['rounds']} rounds")
    return "variants interleaved invoke by invoke"  # runs benchmarked before the blocked timing


def _markdown(report: dict) -> str:
    headers, rows = table(report)
    out = [f"# edgepipe report: {report['run']}", "", *[f"{s}  " for s in _context(report)], "",
           "| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|",
           *["| " + " | ".join(r) + " |" for r in rows], "", "## Notes", ""]
    out += [f"- {n['text']}" for n in report["notes"]] or ["- none"]
    out += sections.analysis_md(report.get("analysis"))
    out += sections.tflm_md(report.get("tflm"))
    out += sections.boards_md(report)
    out += ["", "## Plots", ""] + [f"![{CAPTIONS.get(p, p)}]({p})" for p in report["plots"]]
    return "\n".join(out) + "\n"


def _html(report: dict, pngs: dict[str, bytes]) -> str:
    """The page: every section as HTML from templates/report.html; plots inline, nothing fetched."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pct=pct, ms=ms)
    headers, rows = table(report)
    analysis = report.get("analysis") or {}
    figures = [{"caption": CAPTIONS.get(name, name), "src": "data:image/png;base64," + base64.b64encode(png).decode()}
               for name, png in pngs.items()]
    micro = sections.tflm_sentences(report["tflm"]) if report.get("tflm") else []
    return env.get_template("report.html").render(
        report=report, context=_context(report), headers=headers, rows=rows, figures=figures,
        guard=analysis.get("guard"),
        guard_sentence=sections.guard_sentence(analysis) if analysis.get("guard") else None,
        layers=analysis.get("layers"), layers_note=sections.layers_note(analysis), micro=micro,
        boards=sections.boards_items(report))


# ---------------------------------------------------------------- entry points

def render(run_dir: Path, device_results: list[Path] | None = None, log=print) -> dict:
    """Write report.json, report.md, report.html and the plots into run_dir; returns the report."""
    run_dir = Path(run_dir)
    manifest, evaluation, bench, labels = _load(run_dir)
    kept, new = on_device.gather(run_dir, device_results or [])
    report = collect(run_dir, manifest, evaluation, bench, kept + [p for _, p in new])
    drawn = {"accuracy_vs_latency.png": plots.accuracy_vs_latency(report["variants"], report["table_threads"] or 1),
             "latency.png": plots.latency_distributions(bench, [v["variant"] for v in report["variants"]]),
             "confusion_fp32_int8.png": plots.confusion_pair(evaluation, labels)}
    pngs = {name: png for name, png in drawn.items() if png is not None}
    plots.save(run_dir, pngs, PLOTS)
    if report["analysis"] and (run_dir / ANALYSIS_PLOT).is_file():  # drawn by pipeline analyze
        pngs[ANALYSIS_PLOT] = (run_dir / ANALYSIS_PLOT).read_bytes()
    report["plots"] = list(pngs)
    on_device.keep(run_dir, new, report["devices"])
    write_json(run_dir / "report.json", report)
    atomic_write(run_dir / "report.md", _markdown(report))
    atomic_write(run_dir / "report.html", _html(report, pngs))
    log(f"report: wrote report.json, report.md, report.html and {len(pngs)} plot(s), {len(report['notes'])} note(s)")
    return report


def summary_table(run_dir: Path) -> str:
    """The report's table as aligned plain text for the terminal."""
    return _text(*table(_read_json(Path(run_dir) / "report.json", "the report written by `pipeline report`")))


def delivery_line(run_dir: Path) -> str:
    """The headline for the terminal: which model the run delivers."""
    return headline(_read_json(Path(run_dir) / "report.json", "the report written by `pipeline report`"))


def learning_warnings(run_dir: Path) -> list[str]:
    """The report's notes that say the model did not learn (none for a run without a report)."""
    from pipeline.report.notes import LEARNING_KINDS

    path = Path(run_dir) / "report.json"
    report = _read_json(path, "the report written by `pipeline report`") if path.exists() else {"notes": []}
    return [note["text"] for note in report["notes"] if note["kind"] in LEARNING_KINDS]
