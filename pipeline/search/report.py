"""The search's report: every candidate and trial with what happened to it, the Pareto front of test
accuracy (95% Wilson intervals) against measured latency (or arena) and size, a plot, and the pick.

The pick is chosen on validation accuracy, never on the test split the front reports.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.artifacts import CREATED_BY, atomic_write, write_json


def competing(trial: dict, variant: str) -> str | None:
    """The variant that competes for `variant` in a trained trial: itself, or for int8 under the accuracy guard
    (--max-accuracy-drop) the variant the guard delivers in its place when that runs int8's graph, so that the
    cost measured before training holds; None when the guard rejected int8 and nothing with a measured cost
    replaces it."""
    guard = trial.get("guard")
    if variant != "int8" or not guard:
        return variant
    return guard["int8_is"] if guard["same_graph_as_int8"] else None


def points(trials: list[dict], feasibility: dict) -> list[dict]:
    """One point per trained trial and variant within the budgets, with its measured cost."""
    rows = {r["candidate"]["id"]: r for r in feasibility["rows"]}
    out = []
    for t in trials:
        if t["status"] != "trained":
            continue
        row = rows[t["candidate"]]
        for base in row.get("fitting_variants", []):
            v = competing(t, base)
            if v is None:
                continue
            cost, test = row["variants"][base], t["test"][v]
            out.append({"trial_id": t["trial_id"], "candidate": t["candidate"], "variant": v, "base": base,
                        "learning_rate": t["learning_rate"], "val_accuracy": t["val_accuracy"],
                        "accuracy": test["accuracy"], "low": test["low"], "high": test["high"], "n": test["n"],
                        "latency_ms": cost.get("latency_ms"), "size_kb": cost["size_kb"],
                        "arena_kb": cost.get("arena_kb"), "node_id": t["node_id"]})
    return out


def _cost(p: dict) -> tuple:
    return (p["latency_ms"] if p["latency_ms"] is not None else p["arena_kb"] or 0.0, p["size_kb"])


def pareto(pts: list[dict]) -> list[dict]:
    """The points no other point beats: at least as accurate, as fast (or small an arena) and as small, and
    better in one."""
    def dominated(p):
        return any(q["accuracy"] >= p["accuracy"] and all(a <= b for a, b in zip(_cost(q), _cost(p)))
                   and (q["accuracy"] > p["accuracy"] or _cost(q) != _cost(p)) for q in pts)
    return sorted((p for p in pts if not dominated(p)), key=_cost)


def choose(trials: list[dict], feasibility: dict) -> dict | None:
    """The trained trial with the best validation accuracy that has a variant within the budgets (the guard may
    have rejected its int8); its smallest such variant. `variants` are the ones its run is built with."""
    pts = points([t for t in trials if t.get("checkpoint")], feasibility)
    if not pts:
        return None
    best = min(pts, key=lambda p: (-p["val_accuracy"], next(t["number"] for t in trials
                                                            if t["trial_id"] == p["trial_id"])))
    mine = [p for p in pts if p["trial_id"] == best["trial_id"]]
    trial = next(t for t in trials if t["trial_id"] == best["trial_id"])
    smallest = min(mine, key=lambda p: p["size_kb"])
    return {**trial, "variants": [p["base"] for p in mine], "variant": smallest["variant"], "base": smallest["base"]}


def write_report(out: Path, cfg, feasibility: dict, trials: list[dict], pick: dict | None, log,
                 pick_dir: Path | None = None, interrupted: bool = False) -> dict:
    from pipeline.build import versions

    pts = points(trials, feasibility)
    front = pareto(pts)
    rows = feasibility["rows"]
    hours = sum(t.get("trial_seconds") or 0 for t in trials) / 3600
    report = {
        "kind": "search", "schema": 1, "created_by": CREATED_BY, "config": cfg.to_dict(), "versions": versions(),
        "target": feasibility["target"], "latency_measured_on": feasibility["latency_measured_on"],
        "budgets": feasibility["budgets"], "space": feasibility["space"], "data": feasibility["data"],
        "environment": feasibility["environment"], "interrupted": interrupted,
        "summary": {"candidates": len(rows), "dropped_before_training": sum(not r["feasible"] for r in rows),
                    "dropped_share": sum(not r["feasible"] for r in rows) / max(1, len(rows)),
                    "trials": len(trials), **{s: sum(t["status"] == s for t in trials)
                                              for s in ("trained", "stopped", "failed", "unfinished")},
                    "trials_per_hour_of_trial_time": len(trials) / hours if hours else None,
                    # Each Ray start names its nodes anew, so a resumed search on one machine counts two nodes: the
                    # machines say where the trials ran.
                    "nodes": sorted({t["node_id"] for t in trials if t.get("node_id")}),
                    "machines": sorted({t["hostname"] for t in trials if t.get("hostname")})},
        "candidates": rows, "trials": trials, "points": pts, "front": front, "pick": None,
    }
    if pick:
        report["pick"] = {k: pick.get(k) for k in ("trial_id", "candidate", "variant", "variants", "learning_rate",
                                                   "val_accuracy", "test", "final", "run_variant", "base")}
        report["pick"]["run_dir"] = str(pick_dir) if pick_dir else None
        variant = pick.get("run_variant") or pick["variant"]  # the guard may deliver the longer model otherwise
        if pick_dir and (Path(pick_dir) / "evaluation.json").is_file():
            run_eval = json.loads((Path(pick_dir) / "evaluation.json").read_text())["variants"][variant]
            report["pick"]["run_test"] = {"accuracy": run_eval["accuracy"], **run_eval["interval_95"]}
        if pick_dir and (Path(pick_dir) / "benchmark.json").is_file():
            bench = json.loads((Path(pick_dir) / "benchmark.json").read_text())
            lat = next(iter(bench["threads"].values()))[variant]["latency"]
            report["pick"]["run_latency_p50_ms"] = lat["p50_ms"]
            report["pick"]["run_bytes"] = bench["variants"][variant]["bytes"]
            row = next(r for r in rows if r["candidate"]["id"] == pick["candidate"])
            report["pick"].update(run_over_budget(report["pick"], variant, row["variants"][pick["base"]],
                                                  feasibility["budgets"], feasibility["target"]))
            for key in ("over_budget", "latency_over_budget"):
                if key in report["pick"]:
                    log(f"search: warning: the pick's {report['pick'][key]}")
    report["generated_unix"] = time.time()
    write_json(out / "search.json", report)
    plot(out / "front.png", pts, front, report["pick"], feasibility["target"], feasibility["budgets"])
    atomic_write(out / "search.md", markdown(report))
    atomic_write(out / "search.html", html(report, (out / "front.png").read_bytes()))
    log(f"search: report in {out / 'search.md'}" + (f"; the pick is the run {pick_dir}" if pick_dir else ""))
    return report


def run_over_budget(pick: dict, variant: str, measured: dict, budgets: dict, target: str) -> dict:
    """What the pick's run measured over a budget. Its file over the size budget is a defect (sizes are measured
    before training on the model as a build delivers it). Its host latency over the latency budget, on the host
    target, may be this host's noise between processes, or a candidate kept by noise in the first place: either way
    the user reads both figures."""
    out = {}
    if budgets.get("size_kb") is not None and pick["run_bytes"] > budgets["size_kb"] * 1024:
        out["over_budget"] = (f"its run's {variant} file is {pick['run_bytes']:,} bytes, over the "
                              f"{budgets['size_kb']:g} KB size budget")
    limit = budgets.get("latency_ms")
    if target == "host" and limit is not None and pick["run_latency_p50_ms"] > limit:
        out["latency_over_budget"] = (
            f"its run measured {variant} at p50 {pick['run_latency_p50_ms']:.4f} ms, over the {limit:g} ms latency "
            f"budget by {100 * (pick['run_latency_p50_ms'] / limit - 1):.0f}% (before training: "
            f"{measured['latency_ms']:.4f} ms); time it again (`pipeline benchmark RUN`) before relying on the budget")
    return out


def plot(path: Path, pts: list[dict], front: list[dict], pick: dict | None, target: str, budgets: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    on_front = {(p["trial_id"], p["variant"]) for p in front}
    x_name = "latency_ms" if not target.startswith("tflm") else "arena_kb"
    x_label = "latency p50 (ms, measured untrained)" if x_name == "latency_ms" else "TFLite Micro arena (KB)"
    for ax, key, label in ((fig.add_subplot(1, 2, 1), x_name, x_label), (fig.add_subplot(1, 2, 2), "size_kb",
                                                                          ".tflite size (KB)")):
        for p in (p for p in pts if p[key] is not None):  # an emulated board's latencies are not taken
            front_point = (p["trial_id"], p["variant"]) in on_front
            ax.errorbar(p[key], 100 * p["accuracy"], yerr=[[100 * (p["accuracy"] - p["low"])],
                                                           [100 * (p["high"] - p["accuracy"])]],
                        fmt="o" if front_point else ".", color="C1" if front_point else "C0", alpha=0.9)
        if pick:
            chosen = [p for p in pts if p["trial_id"] == pick["trial_id"] and p["variant"] == pick["variant"]
                      and p[key] is not None]
            for p in chosen:
                ax.plot(p[key], 100 * p["accuracy"], "*", color="C3", markersize=14, label="pick")
        limit = budgets.get({"latency_ms": "latency_ms", "arena_kb": "ram_kb", "size_kb": "size_kb"}[key])
        if limit is not None:
            ax.axvline(limit, color="C3", linestyle="--", linewidth=1, label="budget")
        if pick or limit is not None:
            ax.legend(loc="lower right")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%), 95% interval")
        ax.grid(alpha=0.3)
    fig.suptitle("Search: every trained trial (orange: the Pareto front)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _summary(r: dict) -> list[str]:
    s, b = r["summary"], r["budgets"]
    return [f"Latency measured on: {r['latency_measured_on']}.",
            f"Budgets: latency {_fmt(b['latency_ms'], 'g')} ms, size {_fmt(b['size_kb'], '.1f')} KB, "
            f"arena {_fmt(b['ram_kb'], '.1f')} KB. Space: {r['space']['description']}.",
            f"{s['candidates']} candidates, {s['dropped_before_training']} dropped before training "
            f"({100 * s['dropped_share']:.0f}%); {s['trials']} trials: {s['trained']} trained, {s['stopped']} "
            f"stopped early, {s['failed']} failed, {s['unfinished']} unfinished; on {len(s['nodes'])} Ray node(s) "
            f"on {len(s['machines'])} machine(s)."
            + (" The search was interrupted: what finished is below; `--resume` continues it." if r["interrupted"]
               else "")
            + (" Measured only (`--measure-only`): no candidate was trained." if r["config"].get("measure_only")
               else "")]


def _pick(r: dict) -> str:
    if not r["pick"]:
        if r["config"].get("measure_only"):
            return "No pick: `--measure-only` trains nothing; the same command without it searches these candidates."
        return ("No pick yet: it is chosen and built when the search ends (`pipeline search --resume`)."
                if r["interrupted"] else "No trial finished training, so there is no pick.")
    p = r["pick"]
    acc = p["test"][p["variant"]]
    text = (f"{p['candidate']} {p['variant']} (trial {p['trial_id']}, learning rate {p['learning_rate']:g}), "
            f"chosen on validation accuracy {p['val_accuracy']:.4f}; its trial's test accuracy {acc['accuracy']:.4f} "
            f"[95% {acc['low']:.4f}-{acc['high']:.4f}].")
    final = p.get("final") or {}
    if final.get("epochs"):
        recipe = final.get("recipe")
        how = (f" with {recipe['zoo_model']}'s recipe ({recipe['optimizer']}, learning rate "
               f"{recipe['learning_rate']:g}, {recipe['warmup_epochs']} warm-up epochs, batch {recipe['batch_size']})"
               if recipe else "")
        text += (f" Trained again for {final['epochs']} epochs{how} ({final['planned']}) in {final['seconds']:.0f} s: "
                 f"validation accuracy {final['val_accuracy']:.4f}, {final['why']}.")
    elif final:
        text += f" Not trained again: {final['planned']}."
    run_test = p.get("run_test")
    text += f" Its run: `{p['run_dir']}`"
    if run_test:
        text += (f", {p.get('run_variant') or p['variant']} test accuracy {run_test['accuracy']:.4f} "
                 f"[95% {run_test['low']:.4f}-{run_test['high']:.4f}]")
    if p.get("run_latency_p50_ms") is not None:
        text += f", measured again there: p50 {p['run_latency_p50_ms']:.3f} ms, {p['run_bytes']:,} bytes"
    return text + "." + "".join(f" **Warning: {p[k]}.**" for k in ("over_budget", "latency_over_budget") if p.get(k))


def sections(r: dict) -> list[dict]:
    """The report as data (heading, paragraphs, figure, table), rendered to Markdown and to HTML alike."""
    front = [[p["candidate"], p["variant"], p["trial_id"],
              f"{p['accuracy']:.4f} [{p['low']:.4f}-{p['high']:.4f}]", _fmt(p["latency_ms"], ".3f"),
              f"{p['size_kb']:.1f}", _fmt(p["arena_kb"], ".1f")] for p in r["front"]]
    trials = [[str(t["number"]), t["trial_id"], t["candidate"], _fmt(t["learning_rate"], "g"), t["status"],
               _fmt(t["epochs_trained"], "d"), _fmt(t["val_accuracy"], ".4f"), (t.get("node_id") or "-")[:8],
               t.get("why", "")] for t in r["trials"]]
    candidates = []
    for row in r["candidates"]:
        if not row["variants"]:
            candidates.append([row["candidate"]["id"], "-", "-", "-", "-", f"no: {row['reason']}"])
        for v, c in row["variants"].items():
            candidates.append([row["candidate"]["id"], v, _fmt(c.get("latency_ms"), ".3f"), f"{c['size_kb']:.1f}",
                               _fmt(c.get("arena_kb"), ".1f"),
                               "yes" if not c["problems"] else "no: " + ", ".join(c["problems"])])
    # A trial stopped before it started has no candidate or epochs yet: every cell is text, "-" for nothing.
    front, trials, candidates = ([["-" if c is None else str(c) for c in row] for row in rows]
                                 for rows in (front, trials, candidates))
    return [
        {"id": "pick", "heading": "The pick", "paragraphs": [_pick(r)]},
        {"id": "front", "heading": "Pareto front", "figure": ("front.png", "Test accuracy (95% intervals) of every "
                                                                            "trained trial against its measured cost"),
         "headers": ["candidate", "variant", "trial", "test accuracy [95%]", "latency ms", "size KB", "arena KB"],
         "rows": front},
        {"id": "trials", "heading": "Every trial",
         "headers": ["#", "trial", "candidate", "lr", "status", "epochs", "val acc", "node", "why"], "rows": trials},
        {"id": "candidates", "heading": "Every candidate, measured before training",
         "headers": ["candidate", "variant", "latency ms", "size KB", "arena KB", "within budgets"],
         "rows": candidates},
    ]


def _title(r: dict) -> str:
    return f"Search on {r['config']['dataset']}, target {r['target']}"


def markdown(r: dict) -> str:
    lines = [f"# {_title(r)}", ""]
    for paragraph in _summary(r):
        lines += [paragraph, ""]
    for part in sections(r):
        lines += [f"## {part['heading']}", ""]
        for paragraph in part.get("paragraphs", []):
            lines += [paragraph, ""]
        if "figure" in part:
            lines += [f"![{part['figure'][1]}]({part['figure'][0]})", ""]
        if "rows" in part:
            lines += ["| " + " | ".join(part["headers"]) + " |", "|" + "---|" * len(part["headers"])]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in part["rows"]]
            lines.append("")
    return "\n".join(lines)


def html(r: dict, png: bytes | None) -> str:
    """The same sections through the report's look (templates/search.html), self-contained: the plot inline."""
    import base64

    import jinja2

    from pipeline.report.render import TEMPLATES

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    figure = "data:image/png;base64," + base64.b64encode(png).decode() if png else None
    return env.get_template("search.html").render(title=_title(r), summary=_summary(r), sections=sections(r),
                                                  figure=figure)
