"""The report's figures as PNG bytes: accuracy against latency, latency distributions, confusion matrices.

Figures are drawn on an explicit Agg canvas instead of through pyplot: no global figure state and no
GUI backend to pick, so rendering works headless, inside a build, and in several processes at once.
Each function returns PNG bytes, or None when the run lacks the data the figure needs.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.artifacts import atomic_write

# One colour per variant in every figure, so a reader matches them at a glance.
COLORS = {"fp32": "#1f77b4", "dynamic": "#ff7f0e", "float16": "#2ca02c", "int8": "#d62728", "int16x8": "#9467bd"}
# Marker area (points^2) of the largest model; the others scale by file size, so area reads as size.
MAX_MARKER_AREA = 1600.0
MIN_MARKER_AREA = 40.0


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _color(variant: str) -> str:
    return COLORS.get(variant, "#7f7f7f")


def accuracy_vs_latency(variants: list[dict], threads: int) -> bytes | None:
    """One marker per variant: p50 latency (log x) against accuracy, marker area proportional to file size."""
    rows = [v for v in variants if v.get("p50_ms")]
    if not rows:
        return None
    largest = max(v["bytes"] for v in rows)
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.add_subplot()
    for v in rows:
        area = max(MIN_MARKER_AREA, MAX_MARKER_AREA * v["bytes"] / largest)
        ax.scatter(v["p50_ms"], 100 * v["accuracy"], s=area, color=_color(v["variant"]), alpha=0.55,
                   edgecolors="black", linewidths=0.8, zorder=3,
                   label=f"{v['variant']}: {v['bytes'] / 1024:.0f} KiB, p50 {v['p50_ms']:.3g} ms")
    # Variants often share an accuracy, so names go in a legend rather than beside overlapping markers.
    legend = ax.legend(loc="best", fontsize=9, title="variant: file size, p50")
    for handle in legend.legend_handles:
        handle.set_sizes([80])
    ax.set_xscale("log")
    lo, hi = min(v["p50_ms"] for v in rows), max(v["p50_ms"] for v in rows)
    # A visible span even when every variant runs alike.
    ax.set_xlim(lo / 1.6, hi * 1.6)
    accs = [100 * v["accuracy"] for v in rows]
    pad = max(0.5, (max(accs) - min(accs)) * 0.3)
    ax.set_ylim(min(accs) - pad, max(accs) + pad)
    ax.set_xlabel(f"p50 latency per image, ms ({threads} thread{'s' if threads > 1 else ''}, log scale)")
    ax.set_ylabel("top-1 accuracy on the test split, %")
    ax.set_title("Accuracy vs latency (marker area = file size)")
    ax.grid(True, which="both", alpha=0.3)
    return _png(fig)


def latency_distributions(bench: dict | None, variants: list[str]) -> bytes | None:
    """Box plots of the raw timed samples per variant, one panel per thread count, log y.

    Log scale because the variants span two orders of magnitude (int16x8 runs on reference kernels).
    """
    if not bench or not bench.get("threads"):
        return None
    thread_counts = sorted(bench["threads"], key=int)
    fig = Figure(figsize=(max(6.0, 1.2 * len(variants) * len(thread_counts) + 2), 4.8), layout="constrained")
    axes = fig.subplots(1, len(thread_counts), sharey=True, squeeze=False)[0]
    for ax, t in zip(axes, thread_counts):
        shown = [v for v in variants if bench["threads"][t].get(v, {}).get("samples_ms")]
        samples = [bench["threads"][t][v]["samples_ms"] for v in shown]
        box = ax.boxplot(samples, patch_artist=True, whis=(1, 99), flierprops={"markersize": 2, "alpha": 0.5},
                         medianprops={"color": "black"})
        for patch, v in zip(box["boxes"], shown):
            patch.set_facecolor(_color(v))
            patch.set_alpha(0.6)
        ax.set_xticks(range(1, len(shown) + 1), shown, rotation=20)
        ax.set_yscale("log")
        ax.set_title(f"{t} thread{'s' if int(t) > 1 else ''}")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("latency per image, ms (log scale)")
    # Two lines: on a narrow figure (one thread count, few variants) one line is wider than the figure.
    fig.suptitle(f"Latency distributions, {bench.get('runs')} timed runs each\n(box: quartiles and median; "
                 "whiskers: p1-p99)", fontsize=10)
    return _png(fig)


def confusion_pair(evaluation: dict, labels: list[str]) -> bytes | None:
    """fp32 and int8 confusion matrices side by side on one colour scale; counts written in the cells."""
    if "int8" not in evaluation["variants"] or "fp32" not in evaluation["variants"]:
        return None
    mats = {v: np.asarray(evaluation["variants"][v]["confusion"]) for v in ("fp32", "int8")}
    # Folder datasets bring their own class names: long ones are shortened so the cells keep their size.
    labels = [name if len(name) <= 14 else name[:13] + "…" for name in labels]
    vmax = max(int(m.max()) for m in mats.values())
    size = max(4.0, 0.45 * len(labels) + 1.5)
    fig = Figure(figsize=(2 * size + 1, size), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (v, m) in zip(axes, mats.items()):
        image = ax.imshow(m, cmap="Blues", vmin=0, vmax=vmax)
        accuracy = evaluation["variants"][v]["accuracy"]
        ax.set_title(f"{v}: accuracy {100 * accuracy:.2f}%")
        ax.set_xticks(range(len(labels)), labels, rotation=90 if max(map(len, labels)) > 2 else 0)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        for (i, j), count in np.ndenumerate(m):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                        color="white" if count > vmax / 2 else "black")
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="images")
    return _png(fig)


def layer_errors(layers: list[dict], ideal: float, suspect: float) -> bytes:
    """Per-layer int8 error against pure rounding (`ideal`) and the `suspect` threshold."""
    labels = [f"{r['layer']} ({r['op']})" + (" [float]" if r.get("float_in") else "") for r in layers]
    values = [r["rmse_over_scale"] for r in layers]
    fig = Figure(figsize=(7.5, 0.35 * len(layers) + 1.6))
    ax = fig.subplots()
    bars = ax.barh(labels, values, color=["#c0392b" if r["suspect"] else "#2e86c1" for r in layers])
    ax.bar_label(bars, fmt="%.2f", padding=3, fontsize=8)
    ax.axvline(ideal, color="grey", ls="--", lw=1, label=f"rounding only ({ideal:.2f})")
    ax.axvline(suspect, color="#c0392b", ls=":", lw=1, label=f"suspect (> {suspect})")
    ax.set_xlim(0, max(values + [1.0]) * 1.15)
    ax.invert_yaxis()
    ax.set_xlabel("RMSE of the op's int8 output / its quantization step")
    ax.set_title("int8 error per layer (QuantizationDebugger, validation images)", fontsize=10)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def save(run_dir: Path, pngs: dict[str, bytes], names) -> None:
    """Write the drawn figures among `names`; one this run no longer has data for must not linger from an
    earlier render, so it goes."""
    for name in names:
        if name in pngs:
            atomic_write(run_dir / name, pngs[name])
        else:
            (run_dir / name).unlink(missing_ok=True)
