"""The report's notes: what the measured numbers mean, worked out from them, never written by hand.

Each note names a variant and says what is unusual and why: a wide spread, int16x8's missing
acceleration, int8 slower than expected (and the CPU feature that decides it), Keras and fp32 .tflite
disagreeing, litert-benchmark's figures against ours, more threads being slower, a device result
worth a remark.
"""
from __future__ import annotations

from device.timing import features_words, wide_spread
from pipeline.measure.stats import change_words

# int8 moves a quarter of fp32's bytes and its kernels do 4x the MACs per instruction; once the
# kernels dominate an invoke, int8 should take at most this fraction of fp32's time at one thread.
INT8_EXPECTED_RATIO = 0.45
# Keras and its fp32 .tflite run the same float math; larger differences mean the converter changed it.
KERAS_PARITY_ABS = 1e-4


def threads_label(n) -> str:
    return f"{n} thread" if int(n) == 1 else f"{n} threads"


def notes(report: dict, bench: dict | None) -> list[dict]:
    """Everything a reader should not miss, each as {kind, variant, text}, worked out from the data."""
    by_v, notes = {v["variant"]: v for v in report["variants"]}, []
    if bench is None:
        notes.append(_note("no_benchmark", None, "no benchmark.json (built with --no-benchmark): latency, "
                           "speed-up and memory are missing; run `pipeline benchmark RUN_DIR` to add them"))
    else:
        notes += _spread_notes(report["variants"])
        notes += _thread_notes(report["variants"], report["table_threads"], report["environment"]["cores"])
        notes += _int16x8_notes(by_v, report)
        notes += _int8_notes(by_v, report)
        notes += _cross_check_notes(bench)
        notes += _op_profile_notes(bench)
        notes += [_note("memory", v["variant"], f"{v['variant']}: the fresh-process memory measurement failed "
                        f"({v['memory']['error']})") for v in report["variants"] if (v["memory"] or {}).get("error")]
    notes += learning_notes(report)
    notes += _significance_notes(report["variants"])
    notes += _metadata_notes(report.get("tflite_metadata") or {})
    notes += _keras_notes(report["keras"])
    notes += _device_notes(report)
    notes += _board_notes(report)
    return notes


def _note(kind: str, variant: str | None, text: str) -> dict:
    return {"kind": kind, "variant": variant, "text": text}


def _spread_notes(variants: list[dict]) -> list[dict]:
    out = []
    for v in variants:
        wide = [(t, lat) for t, lat in v["latency"].items() if wide_spread(lat)]
        figures = "; ".join(f"at {threads_label(t)} the interquartile range {lat['p25_ms']:.4f}-{lat['p75_ms']:.4f} ms "
                            f"is {100 * lat['iqr_ms'] / lat['p50_ms']:.0f}% of the median {lat['p50_ms']:.4f} ms "
                            f"(max {lat['max_ms']:.4f})" for t, lat in wide)
        if wide:
            out.append(_note("wide_spread", v["variant"], f"{v['variant']}: wide spread, {figures}; the machine was "
                             "busy or throttling, so compare medians of variants measured together only"))
    return out


def _thread_notes(variants: list[dict], base: int, cores: int) -> list[dict]:
    out = []
    for t in sorted({t for v in variants for t in v["latency"] if int(t) != base}, key=int):
        # Within 10% two medians of a noisy machine are the same speed.
        slower = [v for v in variants if v["latency"][t]["p50_ms"] > 1.1 * v["p50_ms"]]
        figures = ", ".join(f"{v['variant']} {v['latency'][t]['p50_ms']:.4f} against {v['p50_ms']:.4f} ms"
                            for v in slower)
        if slower:
            out.append(_note("more_threads_slower", None, (
                f"{threads_label(t)} are slower than {threads_label(base)} (p50) for {figures}: waking and "
                f"synchronizing threads costs more than splitting this model's work saves on this {cores}-core "
                f"machine, so run it with {threads_label(base)}")))
    return out


def _int16x8_notes(by_v: dict, report: dict) -> list[dict]:
    if "int16x8" not in by_v:
        return []
    v, t = by_v["int16x8"], report["table_threads"]
    xnnpack = "" if report["benchmark"]["xnnpack"] else " (XNNPACK was off for every variant in this benchmark)"
    return [_note("int16x8_not_accelerated", "int16x8", (
        f"int16x8 is not accelerated by XNNPACK, which has no int16-activation kernels, so it runs on "
        f"TFLite's reference kernels: p50 {v['p50_ms']:.3f} ms against fp32's {by_v['fp32']['p50_ms']:.4f} ms "
        f"at {threads_label(t)}, {v['p50_ms'] / by_v['fp32']['p50_ms']:.0f}x slower{xnnpack}. It is there for accuracy "
        f"({100 * v['accuracy']:.2f}%, {v['change_pp']:+.2f} pp vs fp32), not speed"))]


def _int8_notes(by_v: dict, report: dict) -> list[dict]:
    if "int8" not in by_v or by_v["int8"]["p50_ms"] / by_v["fp32"]["p50_ms"] <= INT8_EXPECTED_RATIO:
        return []
    fp32, int8, t = by_v["fp32"], by_v["int8"], report["table_threads"]
    env = report["environment"] or {}
    ratio, features = int8["p50_ms"] / fp32["p50_ms"], env.get("cpu_features")
    slower = "slower than" if ratio > 1 else f"not the expected <= {INT8_EXPECTED_RATIO}x of"
    head = (f"int8 is {slower} fp32 on {env.get('cpu')} ({features_words(features)}): p50 {int8['p50_ms']:.4f} ms "
            f"against {fp32['p50_ms']:.4f} ms at {threads_label(t)}, {ratio:.2f}x. ")
    if not report["benchmark"]["xnnpack"]:
        why = "Why: XNNPACK was off, and TFLite's built-in int8 kernels are not the optimized ones."
    elif not features or features.get("int8_dot_product") is None:
        why = ("Why unknown: this machine does not say whether its CPU has int8 dot-product instructions "
               "(no /proc/cpuinfo), which decide whether XNNPACK's int8 kernels beat its fp32 ones.")
    elif not features["int8_dot_product"]:
        why = ("Why: this CPU has no int8 dot-product instructions (AVX-VNNI or AVX512-VNNI on x86, dotprod on "
               "ARM), so XNNPACK's int8 kernels widen every product to 16 bits and lose to its fp32 ones; "
               "litert-benchmark's C++ figures show the same, and on a CPU with them (a Pi 5's Cortex-A76, "
               "unlike a Pi 4's A72) int8 is expected to be faster.")
    else:
        macs = report["benchmark"]["macs_per_inference"]
        work = f"{macs / 1e6:.2f} M multiply-accumulates per image" if macs else "little arithmetic"
        why = (f"Why: the CPU has int8 dot-product instructions, so the kernels are not the cause; the model does "
               f"{work}, and int8 adds quantize and requantize steps around every op, which weigh most on "
               "small models.")
    spread = [v for v in ("fp32", "int8") if by_v[v]["latency"][str(t)].get("warning")]
    tail = f" The spread of {' and '.join(spread)} was also wide." if spread else ""
    return [_note("int8_speedup_below_target", "int8", head + why + tail)]


# A largest class this many times its fair share (1/classes) makes "always answer it" a rate worth checking.
IMBALANCED = 1.5
# Notes that mean the model did not learn what it was meant to; the CLI prints them as warnings.
LEARNING_KINDS = ("at_chance", "majority_class", "zero_recall", "overfitting")
TRY = {"build": "try more images per class, a smaller model (--model cifar-cnn or mnist-cnn for grayscale), more "
                "--epochs, or a lower --learning-rate",
       "user": "the model was given (--keras-model): check that it was trained on these classes, in this order, and "
               "with this input range (--input-range)",
       "search": "give the search more time (--budget-minutes) or more images per class"}


def learning_notes(report: dict) -> list[dict]:
    """Accuracy no better than guessing or than always answering the largest class, a class never
    recognised, and validation accuracy that stopped improving while training accuracy climbed."""
    learning, out = report.get("learning") or {}, []
    counts, labels = learning.get("test_counts"), learning.get("labels")
    try_ = TRY[learning.get("trained_by", "build")]
    if not counts or not labels:
        return out
    n, k = sum(counts), len(counts)
    majority = max(counts) / n
    imbalanced = majority >= IMBALANCED / k
    top = labels[counts.index(max(counts))]
    for v in report["variants"]:
        ci, name = v.get("interval_95") or {}, v["variant"]
        acc = f"{100 * v['accuracy']:.2f}%"
        if ci and ci["low"] <= 1 / k <= ci["high"]:
            out.append(_note("at_chance", name, f"{name}: test accuracy {acc} is at chance: its 95% interval "
                             f"{100 * ci['low']:.1f}-{100 * ci['high']:.1f}% holds 1/{k} = {100 / k:.1f}%, so the "
                             f"model learned nothing usable; {try_}"))
        elif imbalanced and (ci and ci["low"] <= majority <= ci["high"] or v["accuracy"] <= majority):
            out.append(_note("majority_class", name, f"{name}: test accuracy {acc} is no better than always "
                             f"answering '{top}' ({100 * majority:.1f}% of the test images); the folder is "
                             f"imbalanced: add images of the other classes, or {try_}"))
        zero = [c for c, r in (learning.get("recall") or {}).get(name, {}).items() if r == 0]
        if zero:
            out.append(_note("zero_recall", name, f"{name}: class(es) {', '.join(repr(c) for c in zero)} never "
                             f"recognised (zero recall on the test split); {try_}"))
    train, val = learning.get("train_accuracy") or [], learning.get("val_accuracy") or []
    if len(val) >= 3 and len(train) == len(val):
        best = max(range(len(val)), key=val.__getitem__)
        # Stopped: no better validation figure in the last two or more epochs; climbing: training gained 5 pp
        # meanwhile and ends 10 pp above validation.
        if best <= len(val) - 3 and train[-1] - train[best] >= 0.05 and train[-1] - val[-1] >= 0.10:
            out.append(_note("overfitting", None, (
                f"validation accuracy stopped improving at epoch {best + 1} ({100 * val[best]:.1f}%) while training "
                f"accuracy climbed to {100 * train[-1]:.1f}% by epoch {len(train)}: the model memorises the "
                "training images; try more images or augmentation (on by default for folders), fewer --epochs, "
                "or a smaller model")))
    return out


def _significance_notes(variants: list[dict]) -> list[dict]:
    """Whether each change against fp32 is real, in words (exact McNemar on the images they disagree on)."""
    return [_note("accuracy_change", v["variant"], change_words(v["variant"], v["change_pp"], v["mcnemar_vs_fp32"]))
            for v in variants if v.get("mcnemar_vs_fp32")]


def _metadata_notes(status: dict) -> list[dict]:
    """Models that standard apps (MediaPipe Tasks, the Task Library) cannot open on their own, and why."""
    return [_note("no_tflite_metadata", name.removeprefix("model_").removesuffix(".tflite"),
                  f"{name} carries no TFLite metadata (labels, normalization), so apps such as MediaPipe Tasks "
                  f"cannot use it as it is: {s['reason']}")
            for name, s in status.items() if s and not s.get("present")]


def _keras_notes(keras: dict | None) -> list[dict]:
    if keras and (keras["fp32_tflite_agreement"] < 1 or keras["fp32_tflite_max_abs_diff"] > KERAS_PARITY_ABS):
        return [_note("keras_mismatch", "fp32", (
            f"possible conversion bug: the fp32 .tflite and the Keras model disagree (top-1 agreement "
            f"{100 * keras['fp32_tflite_agreement']:.2f}%, max |prob diff| {keras['fp32_tflite_max_abs_diff']:.2e}, "
            f"expected 100% and <= {KERAS_PARITY_ABS:.0e}); fp32 applies no quantization, so look at the "
            "converter, the preprocessing, or ops the model uses"))]
    return []


def _cross_check_notes(bench: dict) -> list[dict]:
    check, out = bench.get("cross_check") or {"variants": {}}, []
    # With --no-xnnpack ours were measured again with XNNPACK for the check: that p50 is not the table's.
    ours = "our p50 with XNNPACK (measured again for this check; the table's is without)" \
        if check.get("remeasured_with_xnnpack") else "our p50"
    for v, entry in check["variants"].items():
        if error := entry.get("litert_benchmark", {}).get("error"):
            out.append(_note("cross_check_failed", v, f"cross-check {v}: litert-benchmark gave no median ({error})"))
        elif entry.get("agree") is False:
            out.append(_note("cross_check_disagrees", v, (
                f"cross-check {v}: litert-benchmark's median {entry['their_median_ms']:.4f} ms and {ours} "
                f"{entry['our_p50_ms']:.4f} ms at {threads_label(check['threads'])} disagree; {entry.get('why', '')}")))
        elif entry.get("agree"):
            residual = entry["our_p50_ms"] - entry["their_median_ms"]
            out.append(_note("cross_check", v, (
                f"cross-check {v}: {ours} {entry['our_p50_ms']:.4f} ms is litert-benchmark's median "
                f"{entry['their_median_ms']:.4f} ms {residual:+.4f} ms at {threads_label(check['threads'])}; "
                "the difference is Python's per-invoke cost (set_tensor, invoke and get_tensor calls), which "
                "the C++ tool does not pay")))
    return out


def _op_profile_notes(bench: dict) -> list[dict]:
    support = bench.get("op_profile")
    if not support:  # benchmarked before this was recorded
        return []
    if support["available"]:
        return [_note("op_profile", None, f"time per op: {support['how']}")]
    return [_note("op_profile", None, f"no per-op profile is available: {support['why']}; the latencies are "
                  "whole invokes")]


def _device_notes(report: dict) -> list[dict]:
    out = []
    for d in report["devices"]:
        interp, parts = d["interpreter"] or {}, []
        for f in d["files"]:
            if f["kind"] == "eval":
                parts.append(f"{f['variant']} evaluated on {f['n']} images of {f['data']} (the host used "
                             f"{report['test_images']} test images, so accuracies may differ by the sample)")
            elif f.get("emulated"):
                parts.append(f"{f['variant']} benchmarked under emulation (its timings are not reported)")
            else:
                parts.append(f"{f['variant']} benchmarked at {threads_label(f['threads'])}, XNNPACK "
                             f"{'on' if f['xnnpack'] else 'off'}, {f['runs']} runs"
                             + (f" [{f['warning']}]" if f["warning"] else ""))
        features = (d.get("environment") or {}).get("cpu_features")
        out.append(_note("device", None, f"device {d['label']} ({interp.get('name')} {interp.get('version')}"
                         + (f"; {features_words(features)}" if features else "") + "): " + "; ".join(parts)))
    return out


def _board_notes(report: dict) -> list[dict]:
    """Boards `pipeline deploy` reached: failures, emulation, and device accuracy against the host's."""
    record = report.get("boards") or {}
    ref, out = record.get("reference") or {}, []
    for name, b in (record.get("boards") or {}).items():
        if not b["ok"]:
            shown = any(name == d["label"] for d in report["devices"])
            out.append(_note("board_failed", None, f"board {name}: the deploy of {b['finished']} failed: {b['reason']}"
                             + ("; the figures shown for it are from an earlier deploy" if shown else "")))
            continue
        if b["board"].get("emulated"):
            out.append(_note("board_emulated", None, f"board {name} is emulated ({b['board'].get('model')}): its "
                             "accuracy is real, its latencies measure the emulator on this host, not a board, "
                             "and are not shown"))
        host = ref.get("interpreter") or {}
        for variant, a in b.get("accuracy", {}).items():
            same = (f"{100 * a['device']:.2f}% on the {a['n']} images of {ref.get('data')}, the host's figure "
                    f"with the same images")
            if a["same_interpreter"] and a["equal"]:
                text = (f"{name}: {variant} accuracy equals the host's ({same} and interpreter, "
                        f"{host.get('name')} {host.get('version')})")
            elif a["same_interpreter"]:
                text = (f"{name}: {variant} accuracy {100 * a['device']:.2f}% differs from the host's "
                        f"{100 * a['host']:.2f}% on the same {a['n']} images with the same interpreter: this should "
                        "not happen; check the board's runtime install")
            elif a["equal"]:
                text = (f"{name}: {variant} accuracy equals the host's ({same}), though the board runs "
                        f"{b['interpreter']['name']} {b['interpreter']['version']} and the host {host.get('name')} "
                        f"{host.get('version')}")
            else:
                text = (f"{name}: {variant} accuracy {100 * a['device']:.2f}% against the host's "
                        f"{100 * a['host']:.2f}% on the same {a['n']} images: the board runs "
                        f"{b['interpreter']['name']} {b['interpreter']['version']}, the host {host.get('name')} "
                        f"{host.get('version')}, whose int8 "
                        "kernels round differently, so images whose top two scores nearly tie can flip")
            out.append(_note("board_accuracy", variant, text))
    return out
