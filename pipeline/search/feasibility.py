"""Phase (a): what each candidate costs on the target, measured before any training.

Latency, size and the TFLite Micro arena do not depend on the trained weights, so each candidate is
built untrained, converted with random calibration images and measured where the search's target
says: on this host through device/core.py (the benchmark's interleaved timing), or under TFLite
Micro for a microcontroller (its arena; a host build of TFLM says nothing about a board's speed, so
no latency is taken there). A candidate none of whose variants meets the budgets is dropped with
the reason before any training.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import BuildConfig
from pipeline.search.space import Candidate

KIB = 1024
# Enough for a stable median of sub-millisecond models; the pick is measured again by its own build.
FEASIBILITY_RUNS, FEASIBILITY_WARMUP = 50, 10


class SearchError(Exception):
    """The search cannot run as asked; the message names the option and the fix."""


@dataclass(frozen=True)
class Target:
    kind: str  # "host" | "tflm"
    board: str | None = None

    @classmethod
    def parse(cls, text: str) -> Target:
        from pipeline.micro.export import BOARDS

        if text == "host":
            return cls("host")
        if text.startswith("tflm:"):
            board = text.split(":", 1)[1]
            if board not in BOARDS:
                raise SearchError(f"--target {text}: unknown board '{board}'; choose tflm:BOARD with BOARD one of "
                                  f"{', '.join(BOARDS)}")
            return cls("tflm", board)
        raise SearchError(f"--target {text}: measuring on a board over SSH (a named device or user@host) is not "
                          "supported by the search yet; use --target host or tflm:BOARD")

    def __str__(self) -> str:
        return "host" if self.kind == "host" else f"tflm:{self.board}"


@dataclass(frozen=True)
class Budgets:
    latency_ms: float | None = None
    size_kb: float | None = None  # the .tflite file (flash, on a microcontroller)
    ram_kb: float | None = None  # the TFLite Micro arena

    def check(self, target: Target) -> Budgets:
        """The budgets that apply on this target, refusing the ones it cannot measure."""
        if target.kind == "tflm":
            if self.latency_ms is not None:
                raise SearchError(f"--max-latency-ms: the target {target} is measured with TFLite Micro's host "
                                  "build, whose timings say nothing about the board's speed; drop "
                                  "--max-latency-ms (size and arena are measured exactly)")
            from pipeline.micro.export import board_budget

            board = board_budget(target.board)
            return Budgets(None, self.size_kb if self.size_kb is not None else board.flash / KIB,
                           self.ram_kb if self.ram_kb is not None else board.ram / KIB)
        if self.ram_kb is not None:
            raise SearchError("--max-ram-kb: the arena is a TFLite Micro figure; use it with --target tflm:BOARD")
        return self

    def problems(self, cost: dict) -> list[str]:
        out = []
        if self.latency_ms is not None and cost["latency_ms"] > self.latency_ms:
            out.append(f"latency {cost['latency_ms']:.3f} ms > {self.latency_ms:g} ms")
        if self.size_kb is not None and cost["size_kb"] > self.size_kb:
            out.append(f"size {cost['size_kb']:.1f} KB > {self.size_kb:g} KB")
        if self.ram_kb is not None and cost.get("arena_kb") is not None and cost["arena_kb"] > self.ram_kb:
            out.append(f"arena {cost['arena_kb']:.1f} KB > {self.ram_kb:g} KB")
        return out


def where_measured(target: Target) -> str:
    """The words every latency of the search carries: which machine and how."""
    if target.kind == "tflm":
        return f"no latency: TFLite Micro's host build (arena and size only) for board {target.board}"
    cpu = _cpu_model()
    return f"this host ({platform.node()}, {cpu}), 1 thread, XNNPACK, device/core.py"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(candidates: list[Candidate], cfg: BuildConfig, variants: tuple[str, ...], target: Target,
            budgets: Budgets, spec: dict, classes: int, log=print) -> list[dict]:
    """One row per candidate: every variant's measured cost and, when none fits, why it was dropped."""
    import keras

    rows = []
    for i, cand in enumerate(candidates):
        keras.backend.clear_session()
        keras.utils.set_random_seed(cfg.seed)
        row = {"candidate": cand.to_dict(), "variants": {}}
        try:
            model = cand.build(spec["channels"], classes)
            row["variants"] = measure_model(model, cfg, variants, target, spec)
        except Exception as e:  # a candidate the converter or TFLM cannot take is dropped, not the search
            row.update(feasible=False, reason=f"not measurable: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            log(f"feasibility {i + 1}/{len(candidates)} {cand.id}: {row['reason']}")
            rows.append(row)
            continue
        for cost in row["variants"].values():
            cost["problems"] = budgets.problems(cost)
        fitting = [v for v, c in row["variants"].items() if not c["problems"]]
        row["feasible"], row["fitting_variants"] = bool(fitting), fitting
        if not fitting:
            row["reason"] = "over budget before training: " + "; ".join(
                f"{v}: {', '.join(c['problems'])}" for v, c in row["variants"].items())
        costs = ", ".join(f"{v} {_cost_words(c)}" for v, c in row["variants"].items())
        log(f"feasibility {i + 1}/{len(candidates)} {cand.id}: {costs}"
            + ("" if fitting else " -> dropped"))
        rows.append(row)
    return rows


def _cost_words(cost: dict) -> str:
    parts = [f"{cost['size_kb']:.1f} KB"]
    if cost.get("latency_ms") is not None:
        parts.append(f"{cost['latency_ms']:.3f} ms")
    if cost.get("arena_kb") is not None:
        parts.append(f"arena {cost['arena_kb']:.1f} KB")
    return "/".join(parts)


def measure_model(model, cfg: BuildConfig, variants, target: Target, spec: dict) -> dict:
    """{variant: cost} of an untrained Keras model; `spec` is the data's preprocessing (its size is the model's)."""
    import keras

    from pipeline.convert import convert

    spec = {**spec, "height": model.input_shape[1], "width": model.input_shape[2]}
    if target.kind == "tflm":  # as the TFLM export converts: batch 1 and int8 input and output
        inputs = keras.Input(model.input_shape[1:], batch_size=1)
        model = keras.Model(inputs, model(inputs), name=model.name)
        cfg = dataclasses.replace(cfg, int8_io="int8")
    from device.core import normalize

    # Random pixels, normalized as training images are: the ranges are wrong for trained weights, but
    # size, latency and arena do not depend on them.
    pixels = np.random.default_rng(cfg.seed).integers(0, 256, (32, *model.input_shape[1:]), dtype=np.uint8)
    calibration = normalize(pixels, spec).astype(np.float32)
    out = {}
    with tempfile.TemporaryDirectory(prefix="edgepipe-feasibility-") as tmp:
        for v in variants:
            flatbuffer = convert(model, v, cfg, calibration)
            (Path(tmp) / f"model_{v}.tflite").write_bytes(flatbuffer)
            out[v] = {"bytes": len(flatbuffer), "size_kb": len(flatbuffer) / KIB, "latency_ms": None}
            if target.kind == "tflm":
                out[v]["arena_kb"] = _arena(Path(tmp) / f"model_{v}.tflite", flatbuffer, spec) / KIB
        if target.kind == "host":
            from pipeline.measure.benchmark import measure_latency

            lat = measure_latency(tmp, variants, {"preprocess": spec}, threads=1, xnnpack=True,
                                  runs=FEASIBILITY_RUNS, warmup=FEASIBILITY_WARMUP)
            for v in variants:
                out[v]["latency_ms"] = lat[v]["latency"]["p50_ms"]
                out[v]["latency"] = {k: lat[v]["latency"][k] for k in ("p25_ms", "p50_ms", "p75_ms", "n")}
    return out


def _arena(path: Path, flatbuffer: bytes, spec: dict) -> int:
    """The arena TFLite Micro measures for one inference on a random image, prepared by device/core.py."""
    from device.core import Model
    from pipeline.micro.runtime import measure_arena

    model = Model(path, metadata={"preprocess": spec}, verify=False)
    pixels = np.random.default_rng(0).integers(0, 256, (1, spec["height"], spec["width"], spec["channels"]),
                                               dtype=np.uint8)
    return measure_arena(flatbuffer, model.prepare(pixels))["measured"]


def environment() -> dict:
    return {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0]}
