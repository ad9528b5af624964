"""`pipeline compare`: runs side by side, figures recomputed from each run's own files."""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.measure.stats import wilson


def _build(out, **kw):
    from pipeline.build import build
    from pipeline.config import BuildConfig

    cfg = BuildConfig(**{"dataset": "digits", "model": "mnist-cnn", "bench_runs": 10, "bench_warmup": 2,
                         "threads": (1,), "out": str(out), **kw})
    return build(cfg, log=lambda *a: None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    return _build(tmp / "a", epochs=1), _build(tmp / "b", epochs=2, seed=1, quantize=("int8", "float16"))


def _cli(*args):
    result = CliRunner().invoke(main, ["compare", *map(str, args)])
    return result.exit_code, result.output


def test_json_has_every_variant_with_its_own_figures(runs):
    code, out = _cli(*runs, "--format", "json")
    assert code == 0, out
    result = json.loads(out)
    assert [r["run"] for r in result["runs"]] == ["a", "b"]
    assert result["not_comparable"] == {"accuracy": None, "latency": None}  # same test set, same machine
    for run, row in zip(runs, result["runs"]):
        report = json.loads((run / "report.json").read_text())
        with np.load(run / "predictions.npz") as saved:
            y = saved["y"]
            for v, mine in zip(report["variants"], row["variants"]):
                correct = int((saved[f"probs_{v['variant']}"].argmax(1) == y).sum())
                assert mine["variant"] == v["variant"] and mine["accuracy"] == pytest.approx(correct / len(y))
                assert mine["interval_95"] == pytest.approx(list(wilson(correct, len(y))))
                assert mine["bytes"] == (run / f"model_{v['variant']}.tflite").stat().st_size
                assert mine["p50_ms"]["1"] == v["latency"]["1"]["p50_ms"]
    assert [v["variant"] for v in result["runs"][1]["variants"]] == ["fp32", "float16", "int8"]
    assert result["runs"][1]["recipe"]["epochs"] == 2 and result["runs"][1]["recipe"]["seed"] == 1


def test_text_markdown_html_and_files(runs, tmp_path):
    code, out = _cli(*runs, "--out", tmp_path / "cmp")
    assert code == 0 and "not comparable" not in out
    assert out.splitlines()[0].split()[:6] == ["run", "model", "dataset", "input", "recipe", "variant"]
    code, md = _cli(*runs, "--format", "markdown")
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert code == 0 and len(rows) == 5
    assert {p.name for p in (tmp_path / "cmp").iterdir()} == {"compare.json", "compare.md", "compare.html",
                                                              "compare.png"}
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert page.count("<tr>") == 6 and 'src="data:image/png;base64,' in page and "|---" not in page
    assert (tmp_path / "cmp" / "compare.png").read_bytes().startswith(b"\x89PNG")


def test_other_test_sets_and_machines_are_flagged(runs, mnist_dir, mnist_run, tmp_path):
    # mnist_dir: the other test set is real MNIST's; without that file mnist_run falls back to the same digits.
    # A copy of run b as if benchmarked on a Raspberry Pi: its latency is no longer comparable.
    pi = shutil.copytree(runs[1], tmp_path / "pi")
    report = json.loads((pi / "report.json").read_text())
    report["environment"].update(cpu="Cortex-A72", cores=4, machine="aarch64")
    (pi / "report.json").write_text(json.dumps(report))
    code, out = _cli(runs[0], pi, mnist_run, "--format", "json")
    flags = json.loads(out)["not_comparable"]
    assert code == 0
    assert "Cortex-A72" in flags["latency"] and "AMD" not in flags["latency"].split("pi:")[1].split(";")[0]
    assert "a: 360 test images" in flags["accuracy"] and f"{mnist_run.name}: " in flags["accuracy"]
    code, out = _cli(runs[0], pi, mnist_run)
    assert "accuracy*" in out and "p50 ms @1†" in out and "* accuracy not comparable" in out


def test_machines_with_other_cpu_features_are_flagged(runs, tmp_path):
    """Same CPU name, other features (a VM exposing VNNI): int8 runs other kernels, latency not comparable.
    Both machines' features are set here, so the test holds on a host with VNNI or without."""
    features = {"avx2": {"family": "x86", "flags": ["avx2"], "int8_dot_product": False},
                "vnni": {"family": "x86", "flags": ["avx2", "avx512f", "avx512_vnni"], "int8_dot_product": True}}
    for name, run in (("avx2", runs[0]), ("vnni", runs[1])):
        copy = shutil.copytree(run, tmp_path / name)
        report = json.loads((copy / "report.json").read_text())
        report["environment"]["cpu_features"] = features[name]
        (copy / "report.json").write_text(json.dumps(report))
    code, out = _cli(tmp_path / "avx2", tmp_path / "vnni", "--format", "json")
    latency = json.loads(out)["not_comparable"]["latency"]
    assert code == 0 and "vnni: " in latency and "avx512_vnni, int8 dot-product instructions" in latency
    assert "avx2: " in latency and "no int8 dot-product instructions" in latency.split("vnni:")[0]


@pytest.mark.parametrize("case, expected, code", [
    ("one", "needs at least two runs", 2),
    ("missing", "no such run directory", 2),
    ("file", "a file, not a run directory", 2),
    ("old", "report schema 0, this edgepipe reads schema 1", 1),
    ("unfinished", "no report.json", 1),
    ("twice", "again (given as", 2),  # by path and by another path: labelled apart, it would pass for two runs
    ("foreign", "its manifest.json is not one edgepipe wrote", 1),  # another tool's report.json and manifest.json
    ("not_a_report", "its report.json is not one `pipeline report` wrote", 1),
])
def test_bad_input_is_one_line(runs, tmp_path, monkeypatch, case, expected, code):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results.json").write_text("{}")  # named as a run is (no slash): it is still this file
    args = {"one": [runs[0]], "missing": [runs[0], "nope"], "file": [runs[0], "results.json"]}.get(case)
    if case == "old":
        old = shutil.copytree(runs[1], tmp_path / "old")
        report = json.loads((old / "report.json").read_text())
        (old / "report.json").write_text(json.dumps({**report, "schema": 0}))
        args = [runs[0], old]
    if case == "twice":
        args = [runs[0], runs[1], os.path.relpath(runs[0], tmp_path)]
    if case in ("foreign", "not_a_report"):
        other = shutil.copytree(runs[1], tmp_path / "other") if case == "not_a_report" else tmp_path / "other"
        other.mkdir(exist_ok=True)
        (other / "report.json").write_text("[]")
        if case == "foreign":
            (other / "manifest.json").write_text(json.dumps({"name": "another tool's", "files": []}))
        args = [runs[0], other]
    if case == "unfinished":
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "manifest.json").write_text("{}")
        args = [runs[0], tmp_path / "half"]
    exit_code, out = _cli(*args)
    errors = [line for line in out.splitlines() if line.startswith("Error")]
    assert exit_code == code and len(errors) == 1 and expected in errors[0], out
    assert code == 2 or len(out.strip().splitlines()) == 1, out  # a usage error adds click's usage lines


def test_out_is_never_inside_a_run_and_holds_only_this_comparison(runs, tmp_path):
    code, out = _cli(*runs, "--out", runs[0] / "cmp")
    assert code == 1 and "inside the run directory" in out and len(out.strip().splitlines()) == 1, out
    assert not (runs[0] / "cmp").exists()
    assert _cli(*runs, "--out", tmp_path / "cmp")[0] == 0 and (tmp_path / "cmp" / "compare.png").is_file()
    # Runs without latency figures have no plot: the earlier comparison's plot must not stay beside them.
    unmeasured = []
    for run in runs:
        copy = shutil.copytree(run, tmp_path / "unmeasured" / run.name)
        report = json.loads((copy / "report.json").read_text())
        for v in report["variants"]:
            v.pop("latency", None)
        (copy / "report.json").write_text(json.dumps(report))
        unmeasured.append(copy)
    code, out = _cli(*unmeasured, "--out", tmp_path / "cmp")
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["compare.html", "compare.json", "compare.md"]


def test_an_emulated_boards_latency_is_never_shown_as_the_boards(runs, tmp_path):
    """A board under qemu runs the model at the emulator's speed: the run's report says "emulated" in that
    column, and the comparison must not print the emulator's milliseconds there as the board's latency."""
    import subprocess
    import sys

    from pipeline.measure.benchmark import RUNNER
    from pipeline.report.render import render

    board = shutil.copytree(runs[0], tmp_path / "board")
    proc = subprocess.run([sys.executable, str(RUNNER), "bench", "--model", str(board / "model_int8.tflite"),
                           "--runs", "5", "--warmup", "1", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    measured = {**json.loads(proc.stdout), "board": {"name": "qemu-pi", "emulated": True, "model": "qemu"}}
    (tmp_path / "bench.json").write_text(json.dumps(measured))
    render(board, device_results=[tmp_path / "bench.json"], log=lambda *a: None)
    code, out = _cli(runs[1], board, "--format", "json")
    assert code == 0, out
    [int8] = [v for v in json.loads(out)["runs"][1]["variants"] if v["variant"] == "int8"]
    assert int8["device"]["qemu-pi"]["emulated"] is True
    code, out = _cli(runs[1], board)
    header, _, *rows = out.splitlines()
    [row] = [r for r in rows if r.startswith("board") and " int8 " in r]
    # The board's cells by name, not the row searched for the emulator's milliseconds: the run's own host p50 can
    # read the same (both ran on this machine). Cells are split at two spaces or more (a recipe holds single ones).
    cells = dict(zip(re.split(r"\s{2,}", header.strip()), re.split(r"\s{2,}", row.strip()), strict=True))
    assert code == 0 and list(cells)[-2:] == ["qemu-pi accuracy", "qemu-pi p50 ms"], out
    assert cells["qemu-pi p50 ms"] == "emulated" and cells["qemu-pi accuracy"] == "-", out


def _digits_as_mnist(folder, idx: bool):
    """scikit-learn's digits at MNIST's 28x28, written as mnist.npz or as the four IDX files."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from pipeline.data.sources import IDX_FILES

    digits = load_digits()
    x = np.stack([np.asarray(Image.fromarray((im * 16).astype(np.uint8)).resize((28, 28))) for im in digits.images])
    y = digits.target.astype(np.uint8)
    arrays = {"x_train": x[:1400], "y_train": y[:1400], "x_test": x[1400:], "y_test": y[1400:]}
    folder.mkdir()
    if not idx:
        np.savez(folder / "mnist.npz", **arrays)
        return folder
    for name, a in zip(IDX_FILES, arrays.values()):
        magic = 2051 if a.ndim == 3 else 2049
        (folder / name).write_bytes(b"".join(int(d).to_bytes(4, "big") for d in (magic, *a.shape)) + a.tobytes())
    return folder


def test_one_test_set_read_from_other_files_is_comparable(tmp_path):
    """The data fingerprint is of the arrays: MNIST read from mnist.npz and from its IDX files is one test set,
    and their accuracies are comparable (the format was taken for another test set)."""
    made = [_build(tmp_path / f"run-{kind}", dataset="mnist", data_dir=str(_digits_as_mnist(tmp_path / kind, idx)),
                   model="mnist-mlp", epochs=1, benchmark=False) for kind, idx in (("npz", False), ("idx", True))]
    assert [json.loads((r / "manifest.json").read_text())["data"]["kind"] for r in made] == ["npz", "idx"]
    code, out = _cli(*made, "--format", "json")
    assert code == 0, out
    assert json.loads(out)["not_comparable"]["accuracy"] is None
    code, out = _cli(made[0], _build(tmp_path / "other", epochs=1, benchmark=False), "--format", "json")
    assert "run-npz: 397 test images" in json.loads(out)["not_comparable"]["accuracy"]
