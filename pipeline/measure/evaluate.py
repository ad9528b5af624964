"""Accuracy of every variant on the test split, through the device runner's core.

Everything here is measured with `device.core.Model`, the code that ships, so a bug in the
runner's quantization shows up as lost accuracy in the report rather than only on the device.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from device.core import Model, check_finite, normalize, score, softmax
from pipeline import console
from pipeline.measure import stats


def summarize_predictions(probs: np.ndarray, y: np.ndarray, labels, baseline: np.ndarray | None) -> dict:
    """The runner's score() of saved probabilities, plus how far they are from the fp32 baseline."""
    out = score(probs, y, labels)
    pred = out.pop("predictions")
    if baseline is not None:
        out["agreement_with_fp32"] = float((pred == baseline.argmax(axis=1)).mean())
        out["mean_abs_prob_diff_vs_fp32"] = float(np.abs(probs - baseline).mean())
    return out


def evaluate_variants(run_dir: Path, variants, x_test: np.ndarray, y_test: np.ndarray, metadata: dict,
                      keras_model=None, log=print) -> tuple[dict, dict[str, np.ndarray]]:
    """Returns (evaluation dict, {name: probabilities}) for fp32 first, then the other variants."""
    y = np.asarray(y_test).reshape(-1).astype(np.int64)
    labels = metadata["preprocess"]["labels"]
    probs: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    with console.progress("evaluating", total=len(variants) * len(y), unit="images") as bar:
        for variant in variants:
            bar.advance(0, description=f"evaluating {variant}")
            t0 = time.perf_counter()
            model = Model(Path(run_dir) / f"model_{variant}.tflite", metadata=metadata)
            probs[variant] = model.predict(x_test)
            # Named by variant: the file is in the staging folder, which a refused build removes.
            check_finite(f"{variant} (model_{variant}.tflite) on the test split", probs[variant])
            seconds[variant] = time.perf_counter() - t0
            bar.advance(len(y))
    baseline = probs["fp32"]
    result = {"n": int(len(y)), "variants": {}}
    for variant in variants:
        entry = summarize_predictions(probs[variant], y, labels, None if variant == "fp32" else baseline)
        entry["change_pp_vs_fp32"] = 100.0 * (entry["accuracy"] - float((baseline.argmax(1) == y).mean()))
        entry["seconds"] = seconds[variant]
        entry["interval_95"] = stats.accuracy_with_interval(y, probs[variant].argmax(1))
        if variant != "fp32":
            entry["mcnemar_vs_fp32"] = stats.paired_change(y, baseline.argmax(1), probs[variant].argmax(1))
        result["variants"][variant] = entry
        ci = entry["interval_95"]
        test = entry.get("mcnemar_vs_fp32")
        paired = f", McNemar p {test['p_value']:.2g}" if test else ""
        log(f"accuracy {variant:>8}: {entry['accuracy']:.4f} [95% {ci['low']:.4f}-{ci['high']:.4f}] "
            f"({entry['change_pp_vs_fp32']:+.2f} pp{paired}), {seconds[variant]:.2f} s for {len(y)} images")
    stats.adjust_across_variants(result["variants"])
    if keras_model is not None:
        keras_probs = keras_model.predict(normalize(x_test, metadata["preprocess"]), batch_size=256, verbose=0)
        if metadata.get("output") == "logits":
            keras_probs = softmax(keras_probs)
        probs["keras"] = keras_probs
        result["keras"] = {
            "accuracy": float((keras_probs.argmax(1) == y).mean()),
            "fp32_tflite_max_abs_diff": float(np.abs(keras_probs - baseline).max()),
            "fp32_tflite_agreement": float((keras_probs.argmax(1) == baseline.argmax(1)).mean()),
        }
        log(f"accuracy    keras: {result['keras']['accuracy']:.4f} (fp32 .tflite max |diff| "
            f"{result['keras']['fp32_tflite_max_abs_diff']:.2e})")
    return result, probs
