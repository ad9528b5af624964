"""Phase (a): what each candidate costs on the target, measured before any training.

Latency, size and the TFLite Micro arena do not depend on the trained weights, so each candidate is
built untrained, converted with random calibration images and measured where the search's target
says: on this host through device/core.py (the benchmark's interleaved timing), on a board over SSH
(all candidates in one payload, benchmarked by the board's runner in one session: search/board.py),
or under TFLite Micro for a microcontroller (its arena; a host build of TFLM says nothing about a
board's speed, so no latency is taken there). An emulated board's timings are qemu's, so none is
used as a latency either. A candidate none of whose variants meets the budgets is dropped with the
reason before any training.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import interrupts
from pipeline.config import BuildConfig
from pipeline.search import SearchError
from pipeline.search.space import Candidate

KIB = 1024
# On the host, 50 invokes of a 0.05 ms model are a 2.5 ms window that one burst of another process can fill
# (one CI run measured a 0.045 ms candidate at 0.274 ms): 400 keep the median steady for what costs 20-400 ms.
HOST_RUNS, HOST_WARMUP = 400, 40
# A burst of another process slows a whole window of invokes evenly (a tight spread, so no spread warning shows it)
# and never speeds one up: a 60-minute search read the zoo's ResNet-8 at 0.058 ms with a p25-p75 of 0.057-0.059,
# seconds after the same model read 0.039 ms, and dropped it from a 0.04 ms budget. A candidate over the latency
# budget alone is timed this many times more, after every other candidate, and judged on the median of its rounds.
CONFIRM_ROUNDS = 2  # even: with the first, an odd count of rounds


@dataclass(frozen=True)
class Target:
    kind: str  # "host" | "tflm" | "board" (a named device or [user@]host[:port], over SSH)
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
        from pipeline.boards.devices import BoardNameError, resolve

        try:
            resolve(text)
        except BoardNameError as e:
            raise SearchError(f"--target {text}: {e}; or use --target host or tflm:BOARD")
        return cls("board", text)

    def __str__(self) -> str:
        return {"host": "host", "tflm": f"tflm:{self.board}"}.get(self.kind, self.board)


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

    def check_board(self, board) -> None:
        """Refuse a latency budget on an emulated board (search/board.py's BoardSession), before anything runs."""
        if board.emulated and self.latency_ms is not None:
            raise SearchError(f"--max-latency-ms: board {board.device.name} is emulated ({board.probe.get('model')}): "
                              "qemu's timings say nothing about a board's speed; drop --max-latency-ms (sizes are "
                              "measured exactly) or search on a real board")

    def problems(self, cost: dict) -> list[str]:
        out = []
        if self.latency_ms is not None and cost["latency_ms"] > self.latency_ms:
            out.append(f"latency {cost['latency_ms']:.3f} ms > {self.latency_ms:g} ms")
        if self.size_kb is not None and cost["size_kb"] > self.size_kb:
            out.append(f"size {cost['size_kb']:.1f} KB > {self.size_kb:g} KB")
        if self.ram_kb is not None and cost.get("arena_kb") is not None and cost["arena_kb"] > self.ram_kb:
            out.append(f"arena {cost['arena_kb']:.1f} KB > {self.ram_kb:g} KB")
        return out


def where_measured(target: Target, board=None) -> str:
    """The words every latency of the search carries: which machine and how (`board`: the BoardSession)."""
    if target.kind == "tflm":
        return f"no latency: TFLite Micro's host build (arena and size only) for board {target.board}"
    if target.kind == "board":
        b = board.describe()
        where = (f"board {b['board']} ({b['target']}): {b['cpu']}, {b['machine']}, {b['cores']} cores, {b['os']}, "
                 "1 thread, XNNPACK, the board's runner.py bench over SSH")
        return (f"no latency: {where}; EMULATED under qemu, whose timings say nothing about a board's speed (kept "
                "as emulator_latency_ms, never used); sizes from the .tflite files") if b["emulated"] else where
    from device.timing import cpu_features, features_words

    return (f"this host ({platform.node()}, {_cpu_model()}: {features_words(cpu_features())}), 1 thread, XNNPACK, "
            "device/core.py")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(candidates: list[Candidate], cfg: BuildConfig, variants: tuple[str, ...], target: Target,
            budgets: Budgets, spec: dict, classes: int, log=print, board=None) -> list[dict]:
    """One row per candidate: every variant's measured cost and, when none fits, why it was dropped.
    `board`: the BoardSession of a board target, where all candidates are benchmarked at once."""
    import keras

    rows, sized = [], {}
    with tempfile.TemporaryDirectory(prefix="edgepipe-candidates-") as kept:
        for i, cand in enumerate(candidates):
            interrupts.check()  # a Ctrl-C swallowed while the last candidate was measured
            keras.backend.clear_session()
            keras.utils.set_random_seed(cfg.seed)
            row = {"candidate": cand.to_dict(), "variants": {}}
            keep = Path(kept) / cand.id if board is not None or target.kind == "host" else None
            try:
                model = cand.build(spec["channels"], classes)
                sized[cand.id] = _sized(spec, model)
                row["variants"] = measure_model(model, cfg, variants, target, spec, cand.keras_file, keep=keep)
            except Exception as e:  # a candidate the converter or TFLM cannot take is dropped, not the search
                interrupts.check()  # unless it was a Ctrl-C that TensorFlow turned into another error
                row.update(feasible=False,
                           reason=f"not measurable: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            rows.append(row)
            if board is None or "reason" in row:
                _judge(row, budgets, f"feasibility {i + 1}/{len(candidates)}", log)
            else:
                log(f"feasibility {i + 1}/{len(candidates)} {cand.id}: converted, "
                    + ", ".join(f"{v} {c['size_kb']:.1f} KB" for v, c in row["variants"].items()))
        if board is not None:
            _measure_on_board(rows, Path(kept), spec, board, log)
            for i, row in enumerate(rows):
                if row["variants"]:  # the ones not converted were judged above
                    _judge(row, budgets, f"feasibility {i + 1}/{len(rows)}", log)
        elif target.kind == "host":
            _confirm_latency(rows, Path(kept), sized, budgets, log)
    return rows


def _confirm_latency(rows: list[dict], kept: Path, sized: dict, budgets: Budgets, log) -> None:
    """Time again (CONFIRM_ROUNDS) every variant that only its latency keeps out of the budgets, and judge its row
    on the median of the rounds' p50s, each round's kept in `latency_rounds_ms`."""
    from pipeline.measure.benchmark import measure_latency

    for i, row in enumerate(rows):
        slow = [v for v, c in row["variants"].items()
                if c["problems"] and c.get("latency_ms") is not None and not budgets.problems({**c, "latency_ms": 0})]
        if row.get("feasible") or not slow:
            continue
        cand = row["candidate"]["id"]
        for v in slow:
            cost = row["variants"][v]
            rounds = [cost["latency"]]
            for _ in range(CONFIRM_ROUNDS):
                lat = measure_latency(kept / cand, [v], {"preprocess": sized[cand]}, threads=1, xnnpack=True,
                                      runs=HOST_RUNS, warmup=HOST_WARMUP)
                rounds.append({k: lat[v]["latency"][k] for k in ("p25_ms", "p50_ms", "p75_ms", "n")})
            # An odd number of rounds: the median round is one that was measured, its quartiles with it.
            cost["latency"] = sorted(rounds, key=lambda r: r["p50_ms"])[len(rounds) // 2]
            cost["latency_ms"], cost["latency_rounds_ms"] = cost["latency"]["p50_ms"], [r["p50_ms"] for r in rounds]
        row.pop("reason")
        log(f"feasibility {i + 1}/{len(rows)} {cand}: over the latency budget, timed {CONFIRM_ROUNDS} times more: "
            + "; ".join(f"{v} " + ", ".join(f"{ms:.4f}" for ms in row["variants"][v]["latency_rounds_ms"]) + " ms"
                        for v in slow))
        _judge(row, budgets, f"feasibility {i + 1}/{len(rows)}", log)


def _sized(spec: dict, model) -> dict:
    """The data's preprocessing at the model's input size."""
    return {**spec, "height": model.input_shape[1], "width": model.input_shape[2]}


def by_weights(rows: list[dict]) -> list[str]:
    """The feasible candidates, the largest files first (the order the search trains them in first): under a budget
    the models with more weights are likelier the more accurate (MCUNet's TinyNAS chooses its search space by the
    same observation), so a search that ends before it has trained every candidate has trained those. A file's size
    is exact where a latency is a measurement: ordered by the share of a latency budget, two searches with one seed
    trained their candidates in another order and Optuna proposed another configuration after them. Equal sizes (a
    resolution changes no weight) keep the order listed."""
    size = {r["candidate"]["id"]: min(r["variants"][v]["bytes"] for v in r["fitting_variants"])
            for r in rows if r["feasible"]}
    return sorted(size, key=lambda c: -size[c])


def _judge(row: dict, budgets: Budgets, prefix: str, log) -> None:
    """The row's verdict against the budgets, logged; a row already dropped (not measurable) keeps its reason."""
    cand = row["candidate"]["id"]
    if "reason" in row:
        row["feasible"] = False
        log(f"{prefix} {cand}: {row['reason']}")
        return
    for cost in row["variants"].values():
        cost["problems"] = budgets.problems(cost)
    fitting = [v for v, c in row["variants"].items() if not c["problems"]]
    row["feasible"], row["fitting_variants"] = bool(fitting), fitting
    if not fitting:
        row["reason"] = "over budget before training: " + "; ".join(
            f"{v}: {', '.join(c['problems'])}" for v, c in row["variants"].items())
    costs = ", ".join(f"{v} {_cost_words(c)}" for v, c in row["variants"].items())
    log(f"{prefix} {cand}: {costs}" + ("" if fitting else " -> dropped"))


def _measure_on_board(rows: list[dict], kept: Path, spec: dict, board, log) -> None:
    """Every converted candidate in one payload, benchmarked on the board in its one session; the latencies
    (or, emulated, the emulator's timings kept apart) and where they were measured go into the rows."""
    from pipeline.search.board import bench, carried_wheels, write_payload

    models = [(row["candidate"]["id"], v, kept / row["candidate"]["id"] / f"model_{v}.tflite",
               {**spec, "height": row["candidate"]["resolution"], "width": row["candidate"]["resolution"]})
              for row in rows if "reason" not in row for v in row["variants"]]
    if not models:  # every candidate failed to convert: nothing to send
        return
    payload = kept / "payload.tar.gz"
    wheels = carried_wheels(board, kept / "wheels", log)
    where = write_payload(payload, models, wheels, kept / "wheels")
    log(f"feasibility: {len(models)} model(s) in one payload ({payload.stat().st_size / 1e6:.1f} MB"
        + (f", with the runtime's wheels for {', '.join(wheels)}" if wheels else "") + f") for board "
        f"{board.device.name}")
    results = bench(board, payload, list(where.values()), wheels, log)
    measured_on = board.describe()
    for row in rows:
        if "reason" in row:
            continue
        row["measured_on"] = measured_on
        for v, cost in row["variants"].items():
            result = results[where[(row["candidate"]["id"], v)]]
            if "error" in result:
                row["reason"] = f"not measurable on the board: {v}: {result['error']}"
                continue
            latency = {k: result["latency"][k] for k in ("p25_ms", "p50_ms", "p75_ms", "n")}
            if board.emulated:
                cost["emulator_latency_ms"] = latency["p50_ms"]
            else:
                cost["latency_ms"], cost["latency"] = latency["p50_ms"], latency


def _cost_words(cost: dict) -> str:
    parts = [f"{cost['size_kb']:.1f} KB"]
    if cost.get("latency_ms") is not None:
        parts.append(f"{cost['latency_ms']:.3f} ms")
    if cost.get("emulator_latency_ms") is not None:
        parts.append(f"{cost['emulator_latency_ms']:.3f} ms under qemu (not a latency)")
    if cost.get("arena_kb") is not None:
        parts.append(f"arena {cost['arena_kb']:.1f} KB")
    return "/".join(parts)


def measure_model(model, cfg: BuildConfig, variants, target: Target, spec: dict, name: str,
                  keep: Path | None = None) -> dict:
    """{variant: cost} of an untrained Keras model; `spec` is the data's preprocessing (its size is the model's),
    `name` the model's name in the metadata a build embeds (a candidate's: Candidate.keras_file; a zoo model's: its
    name).
    `keep`: a folder to leave the converted model_<variant>.tflite files in (a board measures them later)."""
    from pipeline.convert import convert
    from pipeline.train import load_user_model

    spec = _sized(spec, model)
    _as_trained(model, cfg.seed)
    out = {}
    with tempfile.TemporaryDirectory(prefix="edgepipe-feasibility-") as tmp:
        # Converted as a build converts it, loaded from its .keras file: the input's name is in the .tflite file,
        # and a model built in this process names it keras_tensor where a loaded one says input_layer (8 bytes
        # more than delivered for a 93,658-byte CNN).
        model.save(Path(tmp) / "untrained.keras")
        model = load_user_model(Path(tmp) / "untrained.keras", None)
        from device.core import normalize

        # Random pixels, normalized as training images are: the ranges are wrong for trained weights, but
        # size, latency and arena do not depend on them.
        pixels = np.random.default_rng(cfg.seed).integers(0, 256, (32, *model.input_shape[1:]), dtype=np.uint8)
        calibration = normalize(pixels, spec).astype(np.float32)
        for v in variants:
            flatbuffer = _as_delivered(convert(model, v, cfg, calibration), name, v, cfg, spec)
            if target.kind == "tflm":
                flatbuffer = _as_exported(model, flatbuffer, v, cfg, calibration)
            (Path(tmp) / f"model_{v}.tflite").write_bytes(flatbuffer)
            out[v] = {"bytes": len(flatbuffer), "size_kb": len(flatbuffer) / KIB, "latency_ms": None}
            if target.kind == "tflm":
                out[v]["arena_kb"] = _arena(Path(tmp) / f"model_{v}.tflite", flatbuffer, spec) / KIB
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                (keep / f"model_{v}.tflite").write_bytes(flatbuffer)
        if target.kind == "host":
            from pipeline.measure.benchmark import measure_latency

            lat = measure_latency(tmp, variants, {"preprocess": spec}, threads=1, xnnpack=True,
                                  runs=HOST_RUNS, warmup=HOST_WARMUP)
            for v in variants:
                out[v]["latency_ms"] = lat[v]["latency"]["p50_ms"]
                out[v]["latency"] = {k: lat[v]["latency"][k] for k in ("p25_ms", "p50_ms", "p75_ms", "n")}
    return out


def _as_trained(model, seed: int) -> None:
    """Distinct random values for every weight but the kernels (random already): biases, BatchNorm's scale and
    shift and its statistics. Untrained they are zeros and ones, and the converter then folds identity
    BatchNorms and shares identical constant buffers: an untrained dscnn-w1 at 32 px converted to 97,992 bytes
    and the same model trained to 103,432, which a size budget of 100 KB let through."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        name = w.path.rsplit("/", 1)[-1]
        if "kernel" in name:
            continue
        shape = tuple(w.shape)
        positive = name in ("gamma", "moving_variance")
        w.assign((rng.uniform(0.5, 1.5, shape) if positive else rng.normal(0.0, 0.1, shape)).astype(w.dtype))


def _as_delivered(flatbuffer: bytes, name: str, variant: str, cfg: BuildConfig, spec: dict) -> bytes:
    """The model with the TFLite metadata (labels inside) that a build embeds: the flash holds the whole file."""
    import pipeline
    from pipeline.metadata import MetadataError, embed

    if variant == "int8" and cfg.max_accuracy_drop is not None:
        # The guard may deliver a remedy on int8's graph in its place, whose file embeds its own, longer name (8
        # bytes more for ResNet-8): named as the longest, the bytes checked are the most its run can hold.
        from pipeline.guard import ALL_INT8

        variant = max((f"int8-{r}" for r in ALL_INT8), key=len)
    try:
        return embed(flatbuffer, name=f"{name} {variant} ({cfg.dataset})", version=pipeline.__version__,
                     description=f"{name} trained on {cfg.dataset} by edgepipe, {variant} variant; "
                                 f"{len(spec['labels'])} classes", preprocess=spec, log=lambda *a: None)
    except MetadataError:  # a build delivers this model without metadata too
        return flatbuffer


def _as_exported(model, delivered: bytes, variant: str, cfg: BuildConfig, calibration: np.ndarray) -> bytes:
    """What `pipeline export` writes to a microcontroller's flash for the run's `delivered` file (as its
    lean_model decides): that file unchanged, or, for int8 with run-time shape ops or float input or output, the
    model converted again with batch 1 and int8 input and output, without metadata. Measuring the batch-1 model
    always, a depthwise net the export takes unchanged read 1.6 KB over the flash it needs."""
    from pipeline.convert import convert
    from pipeline.micro.runtime import DYNAMIC_BATCH_OPS, batch_one, read_graph

    lean = {op for op, _ in read_graph(delivered)}.isdisjoint(DYNAMIC_BATCH_OPS) and cfg.int8_io == "int8"
    if variant != "int8" or lean:
        return delivered
    return convert(batch_one(model), "int8", dataclasses.replace(cfg, int8_io="int8"), calibration)


def _arena(path: Path, flatbuffer: bytes, spec: dict) -> int:
    """The arena TFLite Micro measures for one inference on a random image, prepared by device/core.py."""
    from device.core import Model
    from pipeline.micro.runtime import measure_arena

    model = Model(path, metadata={"preprocess": spec}, verify=False)
    pixels = np.random.default_rng(0).integers(0, 256, (1, spec["height"], spec["width"], spec["channels"]),
                                               dtype=np.uint8)
    return measure_arena(flatbuffer, model.prepare(pixels))["measured"]


def environment() -> dict:
    from device.timing import cpu_features

    return {"cpu": _cpu_model(), "cpu_features": cpu_features(), "cpu_count": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0]}
