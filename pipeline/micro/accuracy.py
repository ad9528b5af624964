"""Accuracy of a TFLite Micro export under TFLM's kernels, against LiteRT and the run's own variant.

The export is judged on the run's labelled test images (samples/eval.npz): TFLM and LiteRT on the same
model and images, and the run's variant as the run's evaluation ran it; refused when they disagree.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from device.core import Model
from pipeline.micro import runtime
from pipeline.micro.runtime import ExportError

MAX_DIFFERING = 50  # differing images listed by index; the count is always complete
AGREEMENT_PP = 2.0  # TFLM vs the run's int8 accuracy, see agreement_tolerance()


def check_accuracy(run_dir: Path, path: Path, model_bytes: bytes, arena: dict, meta: dict, x, y, index,
                   variant: str, file: str, log) -> dict:
    """TFLM against LiteRT and against the run's own figures on the run's labelled test images (`index`: where
    they are in its test split, and so in predictions.npz); refused when they disagree (see _check_agreement)."""
    n = len(y)
    log(f"tflm: running {n:,} test images through TFLite Micro and LiteRT")
    probs_path = run_dir / "predictions.npz"
    run_probs = None
    if probs_path.is_file():
        with np.load(probs_path) as p:
            run_probs = p[f"probs_{variant}"][index] if f"probs_{variant}" in p.files else None
    labels = list(meta["preprocess"]["labels"])
    accuracy = compare(model_bytes, path, arena["recommended"], meta["preprocess"],
                       x, y, labels, run_probs)
    evaluation = (json.loads((run_dir / "evaluation.json").read_text())
                  if (run_dir / "evaluation.json").is_file() else {})
    reported = evaluation.get("variants", {}).get(variant, {}).get("accuracy")
    accuracy["report_accuracy"] = reported if n == evaluation.get("n") else None
    accuracy["run_accuracy"] = _run_accuracy(run_dir / file, meta, x, y)
    _check_agreement(accuracy, variant, n, log)
    return accuracy


def compare(model_bytes: bytes, model_path: Path, arena: int, pre: dict, x, y, labels, run_probs=None) -> dict:
    """TFLM and LiteRT on the same model and images: accuracy of each, agreement, the images that differ.

    LiteRT runs twice: as the report measured it (XNNPACK, whose int8 kernels round differently) and with
    its built-in kernels, which TFLM's reference kernels should match output for output."""
    litert = Model(model_path, metadata={"preprocess": pre}, verify=False)
    builtin = Model(model_path, metadata={"preprocess": pre}, verify=False, xnnpack=False)
    prepared = litert.prepare(x)
    tflm_raw = runtime.micro_outputs(model_bytes, arena, prepared)
    litert_raw = runtime.litert_outputs(litert, prepared)
    builtin_raw = runtime.litert_outputs(builtin, prepared)
    p_tflm, p_litert, y = tflm_raw.argmax(1), litert_raw.argmax(1), np.asarray(y)
    differ = np.flatnonzero(p_tflm != p_litert)

    def steps(a, b) -> int:
        return int(np.abs(a.astype(np.int64) - b).max()) if len(a) else 0

    out = {"images": len(y), "accuracy_tflm": float((p_tflm == y).mean()),
           "accuracy_litert": float((p_litert == y).mean()), "agreement": float((p_tflm == p_litert).mean()),
           "max_output_difference": steps(tflm_raw, litert_raw), "differing_count": len(differ),
           "differing": [{"index": int(i), "label": labels[y[i]], "tflm": labels[p_tflm[i]],
                          "litert": labels[p_litert[i]]} for i in differ[:MAX_DIFFERING]],
           "builtin_agreement": float((p_tflm == builtin_raw.argmax(1)).mean()),
           "builtin_identical": bool((tflm_raw == builtin_raw).all()),
           "builtin_max_output_difference": steps(tflm_raw, builtin_raw),
           "litert": f"{litert.runtime.name} {litert.runtime.version}"}
    if run_probs is not None and len(run_probs) == len(y):
        out["agreement_with_run"] = float((run_probs.argmax(1) == p_litert).mean())
    correct = np.flatnonzero((p_tflm == y) & (p_litert == y))
    out["example_index"] = int(correct[0]) if len(correct) else 0
    return out


def _run_accuracy(path: Path, meta: dict, x, y) -> float:
    """The run's own variant on the same images, as the run's evaluation ran it."""
    from device.core import evaluate

    return evaluate(Model(path, metadata=meta, verify=False), x, y)["accuracy"]


def agreement_tolerance(n: int) -> float:
    """Percentage points TFLM may differ from the run's int8: 2 pp, or 3 images on a small test set
    (the export is converted again with batch 1, so a few borderline images may flip)."""
    return max(AGREEMENT_PP, 100 * 3 / max(n, 1))


def _check_agreement(accuracy: dict, variant: str, n: int, log) -> None:
    """Both figures always; a refusal when they differ by more than the tolerance."""
    tflm, run = accuracy["accuracy_tflm"], accuracy["run_accuracy"]
    log(f"tflm: accuracy under TFLite Micro {100 * tflm:.2f}%, the run's {variant} {100 * run:.2f}% on the same "
        f"{n:,} test images")
    tolerance = agreement_tolerance(n)
    if abs(tflm - run) * 100 > tolerance:
        raise ExportError(f"the TFLite Micro model scores {100 * tflm:.2f}% but the run's {variant} {100 * run:.2f}% "
                          f"on the same {n:,} test images (more than {tolerance:.1f} pp apart), so the export is not "
                          "the run's model; nothing was written: check the run's preprocessing in its manifest")
