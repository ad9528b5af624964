"""`pipeline compare RUN_A RUN_B [...]`: finished runs side by side, one row per run and variant.

Each run contributes what its report and manifest say: model, data, training recipe, and for each
variant its accuracy with the 95% interval, size, p50 latency per thread count, and device
columns. A figure is only comparable across runs measured the same way: accuracies on the same
test set (data fingerprint and image count), latencies on the same machine (CPU, cores,
interpreter, XNNPACK), device figures on the same device. Where runs differ, that column is flagged
as not comparable and the reason is given, instead of silently lining the numbers up.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

from device.timing import features_words
from pipeline.artifacts import MANIFEST, is_run, run_holding
from pipeline.config import ConfigError
from pipeline.failures import InputError
from pipeline.measure.stats import wilson
from pipeline.report import ms, pct
from pipeline.report.render import SCHEMA, TEMPLATES, _text, input_range_of
from pipeline.rundir import locate

FORMATS = ("text", "markdown", "html", "json")


class CompareError(InputError):
    """A run that cannot be compared (missing, unfinished, another schema); the message says which and why."""


def _load_run(path: Path) -> dict:
    if not path.is_dir():
        what = "a file, not a run directory" if path.exists() else "no such run directory"
        raise ConfigError(f"{path}: {what}; pass run names (artifacts/NAME) or paths written by `pipeline build`")
    try:
        report = json.loads((path / "report.json").read_text())
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError as e:
        raise CompareError(f"{path}: no {Path(e.filename).name}; compare needs finished runs with a report "
                           f"(run `pipeline report {path}` if the build got that far)")
    except (OSError, ValueError) as e:
        raise CompareError(f"{path}: unreadable report or manifest ({e}); rebuild the run")
    # Other tools write a report.json and a manifest.json too: compare only what edgepipe wrote.
    if not is_run(path):
        raise CompareError(f"{path}: its {MANIFEST} is not one edgepipe wrote; pass runs written by `pipeline build`")
    if not isinstance(report, dict) or report.get("kind", "report") != "report":
        raise CompareError(f"{path}: its report.json is not one `pipeline report` wrote; render the run's report "
                           f"again with `pipeline report {path}`")
    if report.get("schema") != SCHEMA:
        raise CompareError(f"{path}: report schema {report.get('schema')!r}, this edgepipe reads schema {SCHEMA}; "
                           f"render it again with `pipeline report {path}`")
    return {"path": path, "report": report, "manifest": manifest}


def _row(run: dict, v: dict) -> dict:
    report = run["report"]
    n = report["test_images"]
    ci = v.get("interval_95") or dict(zip(("low", "high"), wilson(round(v["accuracy"] * n), n)))
    return {"variant": v["variant"], "accuracy": v["accuracy"], "interval_95": [ci["low"], ci["high"]],
            "change_pp": v["change_pp"], "mcnemar_p": (v.get("mcnemar_vs_fp32") or {}).get("p_value"),
            "bytes": v["bytes"], "p50_ms": {t: lat["p50_ms"] for t, lat in v.get("latency", {}).items()},
            "device": {label: {k: d.get(k) for k in ("accuracy", "p50_ms", "emulated")}
                       for label, d in v.get("device", {}).items()}}


def _summary(run: dict) -> dict:
    report, manifest = run["report"], run["manifest"]
    cfg, data, env, bench = manifest["config"], manifest.get("data") or {}, report.get("environment"), \
        report.get("benchmark") or {}
    return {
        "run": run["path"].name, "path": str(run["path"]), "model": report["model"], "dataset": report["dataset"],
        "input_range": (report.get("input_range") or input_range_of(manifest) or {}).get("range"),
        "recipe": {k: cfg.get(k) for k in ("epochs", "batch_size", "seed", "calibration_samples", "int8_io",
                                           "keras_model")},
        "test_set": {"images": report["test_images"], "data_sha256": data.get("sha256"), "source": data.get("kind")},
        # The CPU's features decide which kernels run (int8 with or without dot-product instructions):
        # the same CPU name under another hypervisor can expose others.
        "machine": None if env is None else {"cpu": env.get("cpu"), "cores": env.get("cores"),
                                             "cpu_features": env.get("cpu_features"),
                                             "interpreter": env.get("interpreter"), "xnnpack": bench.get("xnnpack")},
        "variants": [_row(run, v) for v in report["variants"]],
        "devices": [d["label"] for d in report.get("devices", [])],
    }


def _differs(runs: list[dict], key: str, describe, same=lambda value: value) -> str | None:
    """None if every run has the same `same(r[key])`, else why the column cannot be compared."""
    values = [json.dumps(same(r[key]), sort_keys=True) for r in runs]
    if len(set(values)) == 1:
        return None
    return "; ".join(f"{r['run']}: {describe(r[key])}" for r in runs)


def compare(targets: list[str]) -> dict:
    """The comparison as one dict (what the JSON output is); raises CompareError on bad input."""
    if len(targets) < 2:
        raise ConfigError(f"compare needs at least two runs, got {len(targets)}; "
                           "pass them as `pipeline compare RUN_A RUN_B [...]`")
    seen: dict[Path, str] = {}
    for t in targets:
        real = locate(t).resolve()
        if real in seen:  # labelled once by name and once by path, it would pass for two runs that agree
            raise ConfigError(f"{t}: the run {real} again (given as {seen[real]} too); compare different runs")
        seen[real] = t
    runs = [_summary(_load_run(locate(t))) for t in targets]
    names = [r["run"] for r in runs]
    if len(set(names)) < len(names):  # two folders of one name: label by path instead
        for r in runs:
            r["run"] = r["path"]
    test_set = _differs(runs, "test_set", lambda t: f"{t['images']:,} test images of data "
                                                    f"{(t['data_sha256'] or 'unknown')[:12]} ({t['source']})",
                        # The fingerprint is of the arrays: the same images read from mnist.npz, IDX files or
                        # keras.datasets are the same test set.
                        same=lambda t: [t["images"], t["data_sha256"]] if t["data_sha256"] else t)
    measured = [r for r in runs if r["machine"]]
    machine = _differs(measured, "machine", lambda m: f"{m['cpu']}, {m['cores']} cores, "
                                                      f"{features_words(m['cpu_features'])}, "
                                                      f"{m['interpreter']['name']} {m['interpreter']['version']}, "
                                                      f"XNNPACK {'on' if m['xnnpack'] else 'off'}")
    if len(measured) < len(runs):
        missing = ", ".join(r["run"] for r in runs if not r["machine"])
        machine = f"{missing}: not benchmarked" + (f"; {machine}" if machine else "")
    return {"schema": 1, "runs": runs,
            "not_comparable": {"accuracy": test_set, "latency": machine},
            "threads": sorted({t for r in runs for v in r["variants"] for t in v["p50_ms"]}, key=int),
            "devices": sorted({d for r in runs for d in r["devices"]})}


# ---------------------------------------------------------------- formats

def table(result: dict) -> tuple[list[str], list[list[str]], list[str]]:
    """(headers, rows, footnotes): a column that is not comparable carries a mark and a footnote."""
    flags = result["not_comparable"]
    acc_mark, lat_mark = ("*" if flags["accuracy"] else ""), ("†" if flags["latency"] else "")
    headers = ["run", "model", "dataset", "input", "recipe", "variant", f"accuracy{acc_mark}", "95% interval",
               "change", "size"] + [f"p50 ms @{t}{lat_mark}" for t in result["threads"]]
    for label in result["devices"]:
        headers += [f"{label} accuracy", f"{label} p50 ms"]
    rows = []
    for r in result["runs"]:
        recipe = (f"{r['recipe']['epochs']} ep, batch {r['recipe']['batch_size']}, seed {r['recipe']['seed']}"
                  if not r["recipe"].get("keras_model") else f"given {Path(r['recipe']['keras_model']).name}")
        for v in r["variants"]:
            low, high = v["interval_95"]
            row = [r["run"], r["model"], r["dataset"], (r["input_range"] or "?").replace(",", ".."), recipe,
                   v["variant"], pct(v["accuracy"]),
                   f"{100 * low:.1f}-{100 * high:.1f}%", f"{v['change_pp']:+.2f} pp", f"{v['bytes'] / 1024:.1f} KiB"]
            row += [ms(v["p50_ms"].get(t)) for t in result["threads"]]
            for label in result["devices"]:
                d = v["device"].get(label, {})
                # An emulated board's latency is the emulator's speed, never the board's (as in the report).
                row += [pct(d.get("accuracy")), "emulated" if d.get("emulated") else ms(d.get("p50_ms"))]
            rows.append(row)
    notes = []
    if flags["accuracy"]:
        notes.append(f"* accuracy not comparable across these runs, different test sets: {flags['accuracy']}")
    if flags["latency"]:
        notes.append(f"† latency not comparable across these runs, measured differently: {flags['latency']}")
    if result["devices"]:
        notes.append("device columns compare one device across runs; each run's device files say what was measured")
    return headers, rows, notes


def text(result: dict) -> str:
    headers, rows, notes = table(result)
    return "\n".join([_text(headers, rows), *([""] + notes if notes else [])])


def markdown(result: dict) -> str:
    headers, rows, notes = table(result)
    out = ["# edgepipe comparison", "", "| " + " | ".join(headers) + " |",
           "|" + "|".join(["---"] * 5 + ["---:"] * (len(headers) - 5)) + "|",
           *["| " + " | ".join(row) + " |" for row in rows]]
    return "\n".join(out + ([""] + [f"{n}  " for n in notes] if notes else [])) + "\n"


def html(result: dict, png: bytes | None) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    headers, rows, notes = table(result)
    plot = "data:image/png;base64," + base64.b64encode(png).decode() if png else None
    return env.get_template("compare.html").render(headers=headers, rows=rows, notes=notes, plot=plot,
                                                   runs=result["runs"])


def plot(result: dict) -> bytes | None:
    """Accuracy (with its interval) against p50 at the fewest threads, every variant of every run."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    threads = result["threads"][0] if result["threads"] else None
    if threads is None:
        return None
    fig = Figure(figsize=(8, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, r in enumerate(result["runs"]):
        color = f"C{i % 10}"
        points = [v for v in r["variants"] if v["p50_ms"].get(threads) is not None]
        for v in points:
            y, (low, high) = 100 * v["accuracy"], v["interval_95"]
            ax.errorbar(v["p50_ms"][threads], y, yerr=[[y - 100 * low], [100 * high - y]], fmt="o", color=color,
                        capsize=3, label=r["run"] if v is points[0] else None)
            ax.annotate(v["variant"], (v["p50_ms"][threads], y), textcoords="offset points", xytext=(5, 4),
                        fontsize=8, color=color)
    ax.set_xscale("log")
    ax.set_xlabel(f"p50 latency per image, ms ({threads} thread{'s' if int(threads) > 1 else ''}, log scale)")
    ax.set_ylabel("top-1 accuracy, % (bars: 95% interval)")
    flags = result["not_comparable"]
    warn = " [not comparable: " + ", ".join(k for k, v in flags.items() if v) + "]" if any(flags.values()) else ""
    ax.set_title("Accuracy vs latency, all runs" + warn, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def check_out(out: Path) -> None:
    """Refuse, before anything is compared or printed, an --out whose files would land in a finished run."""
    holder = run_holding(out)
    if holder:
        raise CompareError(f"--out {out}: inside the run directory {holder}, which would then fail `pipeline "
                           "verify`; choose a folder outside it")


def write(result: dict, out: Path) -> list[Path]:
    """compare.json, compare.md, compare.html and compare.png into folder `out`."""
    from pipeline.artifacts import atomic_write, write_json

    out.mkdir(parents=True, exist_ok=True)
    png = plot(result)
    written = [out / "compare.json", out / "compare.md", out / "compare.html"]
    write_json(written[0], result)
    atomic_write(written[1], markdown(result))
    atomic_write(written[2], html(result, png))
    if png:
        written.append(out / "compare.png")
        atomic_write(written[3], png)
    else:  # an earlier comparison's plot would pass for this one's
        (out / "compare.png").unlink(missing_ok=True)
    return written
