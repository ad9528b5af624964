"""The report against independent computations on one tiny real build (digits, every variant, 1 thread).

Every figure the report shows is recomputed here from the raw files (predictions.npz, the models on
disk, the benchmark's raw samples, the runner's own JSON), never read back from the report itself.
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
RUNNER = REPO / "device" / "runner.py"
VARIANTS = ["fp32", "dynamic", "float16", "int8", "int16x8"]
PLOTS = {"accuracy_vs_latency.png", "latency.png", "confusion_fp32_int8.png"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from pipeline.build import build
    from pipeline.config import BuildConfig

    out = tmp_path_factory.mktemp("report") / "digits-cnn"
    cfg = BuildConfig(dataset="digits", model="mnist-cnn", epochs=1, quantize=("all",), bench_runs=20,
                      bench_warmup=2, threads=(1,), out=str(out))
    return build(cfg, log=lambda *a: None)


@pytest.fixture(scope="module")
def report(run) -> dict:
    return json.loads((run / "report.json").read_text())


@pytest.fixture(scope="module")
def predictions(run) -> dict:
    with np.load(run / "predictions.npz") as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="module")
def samples(run) -> dict:
    """The benchmark's raw timed samples at 1 thread, per variant, in ms."""
    bench = json.loads((run / "benchmark.json").read_text())
    return {v: np.asarray(bench["threads"]["1"][v]["samples_ms"]) for v in VARIANTS}


@pytest.fixture
def copy(run, tmp_path) -> Path:
    """A private copy of the run, for tests that re-render or tamper with its files."""
    return Path(shutil.copytree(run, tmp_path / "run"))


def by_variant(report: dict) -> dict:
    return {v["variant"]: v for v in report["variants"]}


def md_table(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]


def test_report_is_versioned_and_lists_every_variant_in_order(report):
    assert report["kind"] == "report" and report["schema"] == 1
    assert [v["variant"] for v in report["variants"]] == VARIANTS
    for v in report["variants"]:
        assert {"bytes", "size_ratio", "accuracy", "change_pp", "agreement", "p50_ms", "p90_ms", "p99_ms",
                "speedup", "latency", "memory", "gmac_per_s"} <= set(v), v["variant"]
        assert v["memory"]["peak_rss_mb"] > 0
    assert report["environment"]["cores"] >= 1 and report["table_threads"] == 1


def test_accuracy_change_and_agreement_match_the_saved_predictions(report, predictions):
    y, rows = predictions["y"], by_variant(report)
    fp32_pred = predictions["probs_fp32"].argmax(1)
    fp32_acc = (fp32_pred == y).mean()
    assert len(y) == report["test_images"]
    for v in VARIANTS:
        pred = predictions[f"probs_{v}"].argmax(1)
        assert rows[v]["accuracy"] == pytest.approx((pred == y).mean(), abs=1e-12), v
        assert rows[v]["change_pp"] == pytest.approx(100 * ((pred == y).mean() - fp32_acc), abs=1e-9), v
        assert rows[v]["agreement"] == pytest.approx((pred == fp32_pred).mean(), abs=1e-12), v
    assert report["keras"]["accuracy"] == pytest.approx((predictions["probs_keras"].argmax(1) == y).mean())


def test_sizes_and_ratios_match_the_files_on_disk(report, run):
    fp32 = (run / "model_fp32.tflite").stat().st_size
    for v in report["variants"]:
        size = (run / f"model_{v['variant']}.tflite").stat().st_size
        assert v["bytes"] == size and v["size_ratio"] == pytest.approx(size / fp32)
    assert by_variant(report)["int8"]["size_ratio"] < 0.4


def test_percentiles_and_speedup_match_the_raw_samples(report, samples):
    rows = by_variant(report)
    for v in VARIANTS:
        assert len(samples[v]) == 20
        p50, p90, p99 = np.percentile(samples[v], [50, 90, 99])
        assert rows[v]["p50_ms"] == pytest.approx(p50, rel=1e-6), v
        assert rows[v]["p90_ms"] == pytest.approx(p90, rel=1e-6), v
        assert rows[v]["p99_ms"] == pytest.approx(p99, rel=1e-6), v
        assert rows[v]["speedup"] == pytest.approx(np.median(samples["fp32"]) / np.median(samples[v]), rel=1e-6)
        assert rows[v]["latency"]["1"]["p50_ms"] == rows[v]["p50_ms"]


def test_markdown_has_one_table_with_one_row_per_variant(report, run):
    md = (run / "report.md").read_text()
    table = md_table(md)
    assert table[0][:2] == ["variant", "size"] and "speed-up vs fp32" in table[0]
    assert set(table[1]) <= {"---", "---:"}
    assert [row[0] for row in table[2:]] == VARIANTS
    rows = by_variant(report)
    for row in table[2:]:
        assert row[table[0].index("accuracy")] == f"{100 * rows[row[0]]['accuracy']:.2f}%"
    assert md.index("## Notes") > md.index(f"| {VARIANTS[-1]} |")


def test_summary_table_is_plain_text_with_every_variant(run):
    from pipeline.report.render import summary_table

    lines = summary_table(run).splitlines()
    assert "|" not in "".join(lines) and lines[0].startswith("variant")
    assert [line.split()[0] for line in lines[2:]] == VARIANTS


def test_plots_are_valid_pngs(report, run):
    assert set(report["plots"]) == PLOTS
    for name in PLOTS:
        data = (run / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        with Image.open(run / name) as img:
            img.verify()
        with Image.open(run / name) as img:
            img.load()
            assert img.format == "PNG" and img.width > 300 and img.height > 200, name


def test_html_is_self_contained_and_embeds_every_plot(run):
    page = (run / "report.html").read_text()
    embedded = [part.split('"', 1)[0] for part in page.split('src="data:image/png;base64,')[1:]]
    assert sorted(base64.b64decode(b) for b in embedded) == sorted((run / n).read_bytes() for n in PLOTS)
    assert 'src="http' not in page and ".png\"" not in page
    assert page.count("<tr>") == 1 + len(VARIANTS)


def test_notes_follow_the_measurements(report, samples, predictions):
    notes = report["notes"]
    kinds = [n["kind"] for n in notes]
    slowdown = np.median(samples["int16x8"]) / np.median(samples["fp32"])
    [int16x8] = [n["text"] for n in notes if n["kind"] == "int16x8_not_accelerated"]
    assert "XNNPACK" in int16x8 and f"{slowdown:.0f}x slower" in int16x8
    ratio = np.median(samples["int8"]) / np.median(samples["fp32"])
    int8 = [n["text"] for n in notes if n["kind"] == "int8_speedup_below_target"]
    assert bool(int8) == (ratio > 0.45)
    if int8:
        assert f"{ratio:.2f}x" in int8[0] and "Why:" in int8[0]
    quartiles = {v: np.percentile(samples[v], [25, 50, 75]) for v in VARIANTS}
    wide = {v for v, (p25, p50, p75) in quartiles.items() if (p75 - p25) / p50 > 0.15}
    assert {n["variant"] for n in notes if n["kind"] == "wide_spread"} == wide
    keras_matches = ((predictions["probs_keras"].argmax(1) == predictions["probs_fp32"].argmax(1)).all()
                     and np.abs(predictions["probs_keras"] - predictions["probs_fp32"]).max() <= 1e-4)
    assert ("keras_mismatch" in kinds) != keras_matches


def test_tampered_measurements_become_notes(copy):
    from pipeline.artifacts import write_json
    from pipeline.report.render import render

    evaluation = json.loads((copy / "evaluation.json").read_text())
    evaluation["keras"].update(fp32_tflite_agreement=0.99, fp32_tflite_max_abs_diff=0.2)
    write_json(copy / "evaluation.json", evaluation)
    bench = json.loads((copy / "benchmark.json").read_text())
    bench["cross_check"] = {"threads": 1, "variants": {"int8": {
        "litert_benchmark": {"median_ms": 0.5}, "their_median_ms": 0.5, "our_p50_ms": 0.01, "agree": False,
        "why": "different API and moment"}}}
    dynamic = bench["threads"]["1"]["dynamic"]["latency"]
    dynamic.update(p25_ms=0.85 * dynamic["p50_ms"], p75_ms=1.15 * dynamic["p50_ms"], iqr_ms=0.3 * dynamic["p50_ms"])
    bench["threads"]["2"] = json.loads(json.dumps(bench["threads"]["1"]))
    bench["threads"]["2"]["fp32"]["latency"]["p50_ms"] *= 2
    write_json(copy / "benchmark.json", bench)
    notes = render(copy, log=lambda *a: None)["notes"]
    [keras] = [n["text"] for n in notes if n["kind"] == "keras_mismatch"]
    assert "possible conversion bug" in keras and "99.00%" in keras
    [check] = [n["text"] for n in notes if n["kind"] == "cross_check_disagrees"]
    assert "int8" in check and "different API and moment" in check
    spread = [n["text"] for n in notes if n["kind"] == "wide_spread" and n["variant"] == "dynamic"]
    assert len(spread) == 1 and "at 1 thread the interquartile range" in spread[0] and "30% of the median" in spread[0]
    [threads] = [n["text"] for n in notes if n["kind"] == "more_threads_slower"]
    assert "2 threads are slower than 1 thread" in threads and "fp32" in threads and "int8" not in threads
    assert "possible conversion bug" in (copy / "report.md").read_text()


def test_report_without_benchmark_still_shows_accuracy(copy, report):
    from pipeline.report.render import render

    (copy / "benchmark.json").unlink()
    again = render(copy, log=lambda *a: None)
    assert [v["accuracy"] for v in again["variants"]] == [v["accuracy"] for v in report["variants"]]
    assert all(v["p50_ms"] is None for v in again["variants"])
    assert again["plots"] == ["confusion_fp32_int8.png"] and not (copy / "latency.png").exists()
    from pipeline.report.notes import LEARNING_KINDS

    # Latency notes go with the benchmark; what the accuracy says (a 1-epoch model misses classes) stays.
    assert [n["kind"] for n in again["notes"] if n["kind"] not in ("accuracy_change", *LEARNING_KINDS)] == \
        ["no_benchmark"]
    assert [row[0] for row in md_table((copy / "report.md").read_text())[2:]] == VARIANTS


def runner_json(*args) -> dict:
    proc = subprocess.run([sys.executable, str(RUNNER), *map(str, args), "--json"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_device_results_add_labelled_columns(copy, predictions, tmp_path):
    from pipeline.report.render import render

    with np.load(copy / "samples" / "eval.npz") as d:
        x, y, index = d["x"][:40], d["y"][:40], d["index"][:40]
    np.savez(tmp_path / "few.npz", x=x, y=y)
    model = copy / "model_int8.tflite"
    outputs = {"bench": runner_json("bench", "--model", model, "--runs", 20, "--warmup", 2),
               "eval": runner_json("eval", tmp_path / "few.npz", "--model", model)}
    files = []
    for kind, out in outputs.items():
        files.append(tmp_path / f"{kind}.json")
        files[-1].write_text(json.dumps(out))
    merged = render(copy, device_results=files, log=lambda *a: None)

    env = outputs["bench"]["environment"]
    [device] = merged["devices"]
    assert env["cpu"] in device["label"] and env["machine"] in device["label"]
    from device.timing import features_words

    # The board's own CPU features, from its runner's environment, name the machine its latency holds on.
    [note] = [n["text"] for n in merged["notes"] if n["kind"] == "device"]
    assert env["cpu_features"]["family"] and features_words(env["cpu_features"]) in note
    int8 = by_variant(merged)["int8"]["device"][device["label"]]
    # The eval images are 40 test images (`index` says which), whose int8 predictions the build saved.
    expected = (predictions["probs_int8"][index].argmax(1) == y).mean()
    assert int8["accuracy"] == pytest.approx(expected) and int8["n"] == 40
    assert int8["p50_ms"] == pytest.approx(np.median(outputs["bench"]["samples_ms"]))
    table = md_table((copy / "report.md").read_text())
    header = table[0]
    assert f"{device['label']} accuracy" in header and f"{device['label']} p50 ms" in header
    rows = {row[0]: row for row in table[2:]}
    assert rows["int8"][header.index(f"{device['label']} accuracy")] == f"{100 * expected:.2f}%"
    device_p50 = float(rows["int8"][header.index(f"{device['label']} p50 ms")])
    assert device_p50 == pytest.approx(np.median(outputs["bench"]["samples_ms"]), abs=6e-5)  # 4 decimals shown
    assert rows["fp32"][header.index(f"{device['label']} p50 ms")] == "-"
    assert f"{device['label']} p50 ms" in (copy / "report.html").read_text()
    assert by_variant(json.loads((copy / "report.json").read_text()))["int8"]["device"] == {device["label"]: int8}
    # The merged files stay with the run: a later render without --device-results keeps the columns,
    # and merging the same file again does not count it twice.
    again = render(copy, log=lambda *a: None)
    assert by_variant(again)["int8"]["device"] == {device["label"]: int8}
    assert len(list((copy / "device_results").glob("*.json"))) == len(files)
    again = render(copy, device_results=files, log=lambda *a: None)
    assert by_variant(again)["int8"]["device"] == {device["label"]: int8}


@pytest.mark.parametrize("content, expected", [
    (b"\x00\x01 not json", "not JSON"),
    (b"[1, 2]", "expected the output of"),
    (json.dumps({"kind": "bench", "schema": 2, "model": "model_int8.tflite"}).encode(), "schema 2"),
    (json.dumps({"kind": "info", "schema": 1, "model": "model_int8.tflite"}).encode(), "kind 'info'"),
    (json.dumps({"kind": "eval", "schema": 1, "model": "/pi/model_int4.tflite", "accuracy": 0.9, "n": 5,
                 "environment": {"cpu": "Cortex-A72", "machine": "aarch64"}}).encode(), "model_int4.tflite"),
    (json.dumps({"kind": "bench", "schema": 1, "model": "model_int8.tflite",
                 "environment": {"cpu": "Cortex-A72", "machine": "aarch64"}}).encode(), "latency.p50_ms"),
])
def test_bad_device_results_raise_report_error_naming_the_file(copy, tmp_path, content, expected):
    bad = tmp_path / "from-the-pi.json"
    bad.write_bytes(content)
    message = refused(copy, bad)
    assert str(bad) in message and expected in message and "\n" not in message


def refused(copy: Path, results: Path) -> str:
    """The one line merging `results` into the run `copy` is refused with; its report.json stays as it was."""
    from pipeline.report.render import ReportError, render

    before = (copy / "report.json").read_bytes()
    with pytest.raises(ReportError) as err:
        render(copy, device_results=[results], log=lambda *a: None)
    assert (copy / "report.json").read_bytes() == before
    return str(err.value)


@pytest.fixture(scope="module")
def board_outputs(run, tmp_path_factory) -> dict:
    """What the real runner prints for the run's int8 model: eval on its samples, bench, each as run by default."""
    model = run / "model_int8.tflite"
    return {"eval": runner_json("eval", run / "samples" / "eval.npz", "--model", model),
            "bench": runner_json("bench", "--model", model, "--runs", 5, "--warmup", 1, "--loads", 1,
                                 "--preprocess-runs", 1)}


@pytest.mark.parametrize("kind, option, value, differs", [
    ("eval", "--input-range", "0,255", "pixel * 1 + 0 where this run's metadata.json says pixel * 0.00392157 + 0"),
    ("bench", "--labels", "labels.txt", "labels other than those this run's metadata.json lists"),
])
def test_device_results_measured_with_other_preprocessing_are_refused(copy, board_outputs, tmp_path, kind, option,
                                                                       value, differs):
    """An --input-range or --labels override is no measurement of the run: raw 0-255 pixels fed to a model trained
    on 0..1 ones score near chance, and would stand as the run's device accuracy."""
    meta = json.loads((copy / "metadata.json").read_text())["preprocess"]
    # The runner records what it fed and which option chose it; by default, the run's own preprocessing.
    assert board_outputs[kind]["preprocessing"] == {"scale": meta["scale"], "offset": meta["offset"],
                                                    "labels": meta["labels"], "overrides": {}}
    (tmp_path / "labels.txt").write_text("".join(f"digit {label}\n" for label in meta["labels"]))
    given = str(tmp_path / value) if option == "--labels" else value
    data = [copy / "samples" / "eval.npz"] if kind == "eval" else ["--runs", 5, "--warmup", 1, "--loads", 1]
    out = runner_json(kind, *data, "--model", copy / "model_int8.tflite", option, given)
    assert out["preprocessing"]["overrides"] == {option[2:].replace("-", "_"): given}
    measured = tmp_path / f"{kind}.json"
    measured.write_text(json.dumps(out))
    message = refused(copy, measured)
    assert message == f"{measured}: measured with {option} {given}: {differs}; run the runner again without {option}"
    assert not (copy / "device_results").exists()


def test_device_results_of_runners_before_the_preprocessing_record_merge_as_before(copy, board_outputs, tmp_path):
    """Bundles whose runner did not record its preprocessing are on boards: their results still merge."""
    from pipeline.report.render import render

    older = tmp_path / "eval.json"
    older.write_text(json.dumps({k: v for k, v in board_outputs["eval"].items() if k != "preprocessing"}))
    merged = render(copy, device_results=[older], log=lambda *a: None)
    [device] = merged["devices"]
    assert by_variant(merged)["int8"]["device"][device["label"]]["accuracy"] == board_outputs["eval"]["accuracy"]


@pytest.mark.parametrize("kind, keys, value, expected", [
    ("eval", ["board"], "pi", """'board' is "pi"; expected an object"""),
    ("bench", ["board"], {"name": "pi", "emulated": "no"}, "'emulated' true or false"),
    ("eval", ["accuracy"], 7.5, "'accuracy' is 7.5; expected a fraction from 0 to 1"),
    ("eval", ["accuracy"], float("nan"), "'accuracy' is nan; expected a finite number"),
    ("eval", ["n"], 0, "'n' is 0; expected an integer of at least 1"),
    ("bench", ["latency", "p50_ms"], -0.5, "'latency.p50_ms' is -0.5; expected a number of at least 0"),
    ("bench", ["latency", "p99_ms"], float("inf"), "'latency.p99_ms' is inf; expected a finite number"),
    ("bench", ["memory", "peak_rss_mb_after_load"], float("nan"), "'memory.peak_rss_mb_after_load' is nan"),
    ("bench", ["load", "warm", "p50_ms"], "fast", "'load.warm.p50_ms'"),
])
def test_device_figures_out_of_range_are_refused_in_one_line(copy, board_outputs, tmp_path, kind, keys, value,
                                                             expected):
    """A hand-edited result must not show as 750.00% or nan% (nor write NaN, which is not JSON, to report.json)."""
    data = json.loads(json.dumps(board_outputs[kind]))
    inner = data
    for key in keys[:-1]:
        inner = inner[key]
    inner[keys[-1]] = value
    edited = tmp_path / f"{kind}.json"
    edited.write_text(json.dumps(data))
    message = refused(copy, edited)
    assert message.startswith(f"{edited}: ") and expected in message and "\n" not in message


@pytest.mark.parametrize("features, why", [
    ({"family": "x86", "flags": ["avx2"], "int8_dot_product": False}, "no int8 dot-product instructions"),
    ({"family": "arm", "flags": ["asimd", "asimddp"], "int8_dot_product": True}, "the kernels are not the cause"),
])
def test_int8_slowdown_is_explained_by_the_cpu(copy, features, why):
    """A measured int8 slow-down names the machine and its features, never Python's per-call cost."""
    from pipeline.artifacts import write_json
    from pipeline.report.render import render

    bench = json.loads((copy / "benchmark.json").read_text())
    bench["environment"]["cpu_features"] = features
    lat = bench["threads"]["1"]
    lat["int8"]["latency"]["p50_ms"] = 1.5 * lat["fp32"]["latency"]["p50_ms"]
    write_json(copy / "benchmark.json", bench)
    report = render(copy, log=lambda *a: None)
    [int8] = [n["text"] for n in report["notes"] if n["kind"] == "int8_speedup_below_target"]
    assert "int8 is slower than fp32 on " + bench["environment"]["cpu"] in int8 and "1.50x" in int8
    assert why in int8 and "Python" not in int8
    context = (copy / "report.md").read_text().split("## Notes")[0]
    assert " ".join(features["flags"]) in context and "speed-ups hold on this machine" in context


def test_agreeing_cross_check_states_the_residual(copy):
    from pipeline.artifacts import write_json
    from pipeline.report.render import render

    bench = json.loads((copy / "benchmark.json").read_text())
    bench["cross_check"] = {"threads": 1, "variants": {"fp32": {
        "litert_benchmark": {"median_ms": 0.08}, "their_median_ms": 0.08, "our_p50_ms": 0.095, "agree": True}}}
    write_json(copy / "benchmark.json", bench)
    notes = render(copy, log=lambda *a: None)["notes"]
    [check] = [n["text"] for n in notes if n["kind"] == "cross_check"]
    assert "+0.0150 ms" in check and "Python's per-invoke cost" in check
    assert not [n for n in notes if n["kind"] == "cross_check_disagrees"]


def test_cross_check_remeasured_with_xnnpack_is_not_passed_off_as_the_tables_p50(copy):
    """With --no-xnnpack the cross-check measures ours again with XNNPACK (litert-benchmark always runs it): the
    note's p50 is that one, several times faster than the table's, and must say so."""
    from pipeline.artifacts import write_json
    from pipeline.report.render import render

    bench = json.loads((copy / "benchmark.json").read_text())
    table_p50 = bench["threads"]["1"]["fp32"]["latency"]["p50_ms"]
    bench["xnnpack"] = False
    bench["cross_check"] = {"threads": 1, "xnnpack": True, "remeasured_with_xnnpack": True, "variants": {
        "fp32": {"litert_benchmark": {"median_ms": 0.03}, "their_median_ms": 0.03, "our_p50_ms": table_p50 / 4,
                 "agree": True},
        "int8": {"litert_benchmark": {"median_ms": 0.5}, "their_median_ms": 0.5, "our_p50_ms": 0.01, "agree": False,
                 "why": "different API"}}}
    write_json(copy / "benchmark.json", bench)
    notes = render(copy, log=lambda *a: None)["notes"]
    for kind in ("cross_check", "cross_check_disagrees"):
        [check] = [n["text"] for n in notes if n["kind"] == kind]
        assert "our p50 with XNNPACK (measured again for this check; the table's is without)" in check, check


def test_the_warm_up_said_is_the_warm_up_run(run):
    """Each timed block opens with at least one warm-up run: --warmup 2 over 5 blocks ran 5, not the 2 the report
    said (with --warmup 0, five runs said to be none)."""
    bench = json.loads((run / "benchmark.json").read_text())
    ran = {bench["threads"]["1"][v]["warmup"]["n"] for v in VARIANTS}
    assert bench["warmup"] == 2 and ran == {5}
    assert f"{bench['runs']} timed runs after 5 warm-up," in (run / "report.md").read_text()


def test_report_says_whether_a_per_op_profile_exists(report):
    import importlib.util

    spec = importlib.util.find_spec("ai_edge_litert.tools.benchmark_litert_model")
    offered = spec is not None and "enable_op_profiling" in Path(spec.origin).read_text()
    [note] = [n["text"] for n in report["notes"] if n["kind"] == "op_profile"]
    assert note.startswith("time per op: litert-benchmark") if offered else \
        note.startswith("no per-op profile is available: LiteRT's Python API has no per-op profiler")
