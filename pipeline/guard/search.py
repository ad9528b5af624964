"""The float-op search: the fewest int8 ops to leave in float so validation accuracy meets a target."""
from __future__ import annotations

from pipeline import console
from pipeline.guard.analyze import Judge, Quantizer

MAX_CANDIDATES = 16       # float-layer groups measured per search round, by quantization error


def search_float_ops(q: Quantizer, judge: Judge, target: float) -> dict:
    """Greedily leave in float the group of ops that raises validation accuracy most, until `target`.

    Candidates are single ops and the region around each op's output tensor (producer, consumers and
    same-scale ops between): damage done by one badly scaled tensor is only undone when both its
    producer and its consumers stay float. The MAX_CANDIDATES groups with the worst quantization
    error are measured each round; the search stops at `target` or when no group helps any more.
    """
    error = {r["index"]: r["rmse_over_scale"] for r in q.layers}
    groups = {frozenset([i]): f"{q.ops[i]['layer']} alone" for i in q.quantized}
    for i in q.quantized:
        groups.setdefault(q.region(i), f"the output of {q.ops[i]['layer']} with its consumers")
    ranked = sorted(groups, key=lambda g: (-max(error[i] for i in g), len(g)))[:MAX_CANDIDATES]
    flatbuffer = q.flatbuffer()
    with console.progress("guard: float-op search", unit="candidates measured") as bar:
        judge = _counted(judge, bar)
        return _search(q, judge, target, groups, ranked, error, flatbuffer)


def _counted(judge, bar):
    def measured(flatbuffer):
        accuracy = judge(flatbuffer)
        bar.advance()
        return accuracy
    return measured


def _search(q, judge, target, groups, ranked, error, flatbuffer) -> dict:
    float_ops, why = frozenset(), {}
    acc = start = judge(flatbuffer)
    rounds = []
    while acc < target:
        tried = []  # (accuracy, -bytes, group, flatbuffer): most accurate first, then smallest
        for g in ranked:
            if not g <= float_ops:
                fb = q.flatbuffer(float_ops | g)
                tried.append((judge(fb), -len(fb), g, fb))
        if not tried or max(tried, key=lambda t: t[:2])[0] <= acc:
            break  # nothing measured helps: more float layers would only cost size
        best, _, g, flatbuffer = max(tried, key=lambda t: t[:2])
        measured = sorted(({"group": groups[c], "accuracy": a} for a, _, c, _ in tried), key=lambda m: -m["accuracy"])
        rounds.append({"round": len(rounds) + 1, "candidates": len(tried), "chosen": groups[g],
                       "accuracy_before": acc, "accuracy_after": best, "measured": measured})
        for i in g - float_ops:
            why[i] = (f"round {len(rounds)}: leaving {groups[g]} float raised validation accuracy "
                      f"{acc:.2%} -> {best:.2%}")
        float_ops, acc = float_ops | g, best
    # A group may carry ops the final set does not need; drop each one that costs no accuracy.
    floor = min(acc, target)
    for i in sorted(float_ops, key=lambda i: error[i]):
        fb = q.flatbuffer(float_ops - {i})
        a = judge(fb)
        if a >= floor:
            float_ops, acc, flatbuffer = float_ops - {i}, a, fb
            why.pop(i)
    layers = [{**{k: r[k] for k in ("index", "layer", "op", "tensor", "rmse_over_scale")}, "why": why[r["index"]]}
              for r in q.layers if r["index"] in float_ops]
    return {"flatbuffer": flatbuffer, "accuracy": acc, "start_accuracy": start, "float_layers": layers,
            "rounds": rounds}


