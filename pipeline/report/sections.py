"""The report's optional sections, each from the file a later command wrote into the run: the accuracy
guard (analysis.json), the microcontroller export (tflm.json) and the boards (deploy.json).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.report import ms, pct, read_json
from pipeline.report.notes import threads_label

# ---------------------------------------------------------------- accuracy guard (analysis.json)

def analysis(run_dir: Path) -> dict | None:
    """The per-layer table and the guard's decisions, as `pipeline analyze` / the guard wrote them."""
    path = run_dir / "analysis.json"
    if not path.is_file():
        return None
    a = read_json(path, "the analysis written by `pipeline analyze`")
    return {"layers": a.get("layers"), "guard": a.get("guard"), "validation": a.get("validation")}


def guard_sentence(analysis: dict) -> str:
    """The guard's decision and what it rests on: how many validation images, so what one image is worth."""
    g, images = analysis["guard"], (analysis.get("validation") or {}).get("images")
    rests = (f"{images:,} {g['split']} images (one image is {100 / images:.2f} pp)" if images
             else f"the {g['split']} split")
    return (f"Budget {g['max_accuracy_drop_pp']} pp, decided on {rests} in {g['seconds']:.1f} s: "
            f"{g['summary']}")


def layers_note(analysis: dict) -> str:
    """What the per-layer table is of, when the run has no int8 model of its own."""
    if (analysis.get("validation") or {}).get("int8_in_run", True):
        return ""
    return ("This run has no int8 model: the table is of the int8 preset applied to its model for this analysis, "
            "calibrated as a build with --quantize int8 would calibrate it.")


def analysis_md(analysis: dict | None) -> list[str]:
    if not analysis:
        return []
    out = []
    if analysis.get("guard"):
        g = analysis["guard"]
        out += ["", "## Accuracy guard", "", f"{guard_sentence(analysis)}.", ""]
        for r in g.get("remedies", []):
            line = f"- {r['name']} -> {r.get('variant') or '-'}: {r['status']}"
            if r.get("accuracy") is not None:
                line += (f", validation accuracy {pct(r['accuracy'])} ({0.0 - r['drop_pp']:+.2f} pp), "
                         f"{r['bytes']:,} bytes")
            if r.get("reason"):
                line += f"; {r['reason']}"
            out.append(line)
            out += [f"  - kept float: {f['layer']} ({f['op']}): {f['why']}" for f in r.get("float_layers", [])]
    if analysis.get("layers"):
        note = layers_note(analysis)
        out += ["", "## Per-layer quantization error (int8)", "", *([note, ""] if note else []),
                "RMSE/scale about 0.29 is ideal rounding; above 0.7 a layer is suspect.", "",
                "| layer | op | scale | RMSE/scale | range | MSE | suspect |", "|---|---|---:|---:|---:|---:|---|"]
        out += [f"| {r['layer']} | {r['op']} | {r['scale']:.3g} | {r['rmse_over_scale']:.3f} | {r['range']:.3g} | "
                f"{r['mse']:.3g} | {'yes' if r['suspect'] else ''} |" for r in analysis["layers"]]
    return out


def tflm_sentences(t: dict, code=str) -> list[str]:
    """The microcontroller export's figures, as `pipeline export --target tflm` measured them; `code` marks
    the folder name up (Markdown's backticks)."""
    a, arena = t["accuracy"], t["arena"]
    fits = [b for b, ok in next(r for r in t["variants"] if r.get("exported"))["fits"].items() if ok]
    shown = ", ".join(f"#{d['index']} ({d['label']}: TFLM {d['tflm']}, LiteRT {d['litert']})"
                      for d in a["differing"][:10])
    return [(f"{t['variant']} for {code(t['export']['folder'])}: {t['flash_bytes']:,} bytes of flash, tensor arena "
             f"{arena['recommended']:,} bytes ({arena['measured']:,} measured under tflite-micro "
             f"{t['versions']['tflite-micro']}, plus margin); "
             f"fits {', '.join(fits) or 'none of the listed boards'}."),
            (f"Accuracy under TFLite Micro's kernels {pct(a['accuracy_tflm'])} on {a['images']:,} test images; "
             f"top-1 agreement with LiteRT {pct(a['agreement'])}"
             + (f", {a['differing_count']} image(s) differ: {shown}." if a["differing_count"] else "."))]


def tflm_md(t: dict | None) -> list[str]:
    if not t:
        return []
    first, second = tflm_sentences(t, code=lambda name: f"`{name}`")
    return ["", "## Microcontroller (TensorFlow Lite Micro)", "", f"{first}  ", second]


# ---------------------------------------------------------------- boards (deploy.json)

def boards(run_dir: Path) -> dict | None:
    """What `pipeline deploy` recorded: each board's description and last deploy, and the host's reference."""
    path = run_dir / "deploy.json"
    if not path.is_file():
        return None
    d = read_json(path, "the record written by `pipeline deploy`")
    return {"boards": d.get("boards", {}), "reference": d.get("reference")}


SOURCES = {"bundle": "installed from the bundle's wheels", "index": "installed from the package index",
           "existing": "in the environment an earlier deploy installed"}


def boards_items(report: dict) -> list[tuple[int, str]]:
    """(nesting level, text): a line per board, below it a line per model it measured."""
    boards = (report.get("boards") or {}).get("boards")
    out = []
    devices = {d["label"]: d for d in report["devices"]}
    for name, b in (boards or {}).items():
        if not b["ok"]:
            out.append((0, f"{name} ({b['target']}): deploy FAILED on {b['finished']}: {b['reason']}"))
            continue
        info, interp = b["board"], b["interpreter"]
        out.append((0, f"{name} ({b['target']}): {info.get('model') or 'unknown board'}, {info.get('os')}, Python "
                   f"{info.get('python')} {info.get('machine')} ({info.get('bits')}-bit), {info.get('cores')} cores"
                   + (f", {info['memory_mb']} MB" if info.get("memory_mb") else "")
                   + f"; {interp['name']} {interp['version']} {SOURCES.get(b['runtime']['source'], '')}; "
                   f"deployed in {b['seconds']:.1f} s on {b['finished']} ("
                   + (", ".join(x for x, f in (("bundle copied", b["copied"]), ("runtime installed", b["installed"]))
                                if f)
                      or "nothing copied or installed") + ")"))
        for f in devices.get(name, {}).get("files", []):
            if f["kind"] != "bench":
                continue
            if f["emulated"]:
                out.append((1, f"{f['variant']}: timings not shown: measured under emulation, they are the emulator's"))
                continue
            load, pre, mem = f.get("load") or {}, f.get("preprocess"), f.get("memory") or {}
            line = (f"{f['variant']}: load cold {load.get('cold_ms', 0):.1f} ms, warm p50 "
                    f"{(load.get('warm') or {}).get('p50_ms', 0):.2f} ms; "
                    f"first inference {f.get('first_inference_ms') or 0:.3f} ms; "
                    f"invoke p50 {ms(f['p50_ms'])}, p90 {ms(f['p90_ms'])}, p99 {ms(f['p99_ms'])}, mean "
                    f"{ms(f.get('mean_ms'))} ± {ms(f.get('std_ms'))}, min {ms(f.get('min_ms'))} ms (n={f['runs']}, "
                    f"{threads_label(f['threads'])})")
            if pre:
                line += ("; per image "
                         + ", ".join(f"{k} {ms(pre[k].get('p50_ms'))}" for k in ("decode", "resize", "quantize"))
                         + " ms")
            if mem.get("peak_rss_mb_after_inference") is not None:
                line += (f"; peak memory {mem['peak_rss_mb_after_load']:.1f} MB after load, "
                         f"{mem['peak_rss_mb_after_inference']:.1f} MB after inference")
            states = f.get("board_state") or {}
            shown = [f"{when}: " + ", ".join(f"{k} {v}" for k, v in st.items()
                                             if v is not None and k != "throttled_flags")
                     for when, st in states.items() if any(v is not None for v in st.values())]
            out.append((1, line + (f"; board {'; '.join(shown)}" if shown else "")))
    return out


def boards_md(report: dict) -> list[str]:
    items = boards_items(report)
    if not items:
        return []
    return ["", "## Boards", "", *[f"{'  ' * level}- {text}" for level, text in items]]
