"""What a new user hit (issue 13), driven as a user drives it: the `pipeline` CLI and `device/runner.py`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from tests.test_analyze import data, rescaled, source, trained  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parent.parent
RUNNER = REPO / "device" / "runner.py"
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a board has no repository


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def runner(*args, cwd=None, stdin=None):
    """The repository's runner, or with `cwd` an unpacked bundle's own, as on a board."""
    script = "device/runner.py" if cwd else RUNNER
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, cwd=cwd,
                          env=CLEAN_ENV if cwd else None, input=stdin, timeout=180,
                          text=not isinstance(stdin, bytes))


def _data_args(source):  # noqa: F811
    dataset, data_dir = source
    return ["--dataset", dataset] + (["--data-dir", data_dir] if data_dir else [])


@pytest.fixture(scope="module")
def breaker(tmp_path_factory, source, trained):  # noqa: F811
    """The README's guard example: a model plain int8 breaks, repaired by the guard (int8-cle)."""
    tmp = tmp_path_factory.mktemp("ux")
    rescaled(trained).save(tmp / "breaker.keras")
    result = cli("build", *_data_args(source), "--keras-model", tmp / "breaker.keras", "--out", tmp / "breaker",
                 "--max-accuracy-drop", 2, "--fallback", "auto", "--no-benchmark")
    assert result.exit_code == 0, result.output
    assert "delivers int8-cle, replacing int8" in result.output
    return tmp / "breaker"


def _unpack(archive: Path, dest: Path) -> Path:
    proc = runner("unpack", archive, dest)
    assert proc.returncode == 0, proc.stderr
    return dest


def _host_accuracy(run: Path, variant: str, n: int) -> float:
    """The build's own accuracy on the bundle's first n labelled images (samples/eval.npz: `index` places them
    in the test split, whose predictions the build saved)."""
    with np.load(run / "samples" / "eval.npz") as ev, np.load(run / "predictions.npz") as p:
        index = ev["index"][:n]
        return float((p[f"probs_{variant}"][index].argmax(1) == p["y"][index]).mean())


# ---------------------------------------------------------------- 2, 3: what a run delivers ships

def test_guarded_bundle_ships_and_runs_the_delivered_model(breaker, tmp_path):
    result = cli("bundle", breaker, "--out", tmp_path / "b.tar.gz")
    assert result.exit_code == 0, result.output
    assert "default is model_int8-cle.tflite" in result.output
    pi = _unpack(tmp_path / "b.tar.gz", tmp_path / "pi")
    meta = json.loads((pi / "metadata.json").read_text())
    assert meta["default_model"] == "model_int8-cle.tflite"
    assert sorted(meta["models"]) == ["model_fp32.tflite", "model_int8-cle.tflite"]  # superseded int8 stays home
    assert not (pi / "model_int8.tflite").exists()
    proc = runner("eval", "samples/eval.npz", "--json", cwd=pi)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["model"] == "model_int8-cle.tflite"
    assert out["model_sha256"] == meta["models"]["model_int8-cle.tflite"]["sha256"]
    # The board scores exactly what the host measured for the delivered variant on these images,
    # and the report's headline names that variant.
    n = out["n"]
    assert out["accuracy"] == pytest.approx(_host_accuracy(breaker, "int8-cle", n), abs=1e-12)
    assert out["accuracy"] > _host_accuracy(breaker, "int8", n) + 0.1
    report = json.loads((breaker / "report.json").read_text())
    assert report["delivered"] == {"variant": "int8-cle", "by_guard": True, "superseded": ["int8"]}
    assert (breaker / "report.md").read_text().splitlines()[2].startswith("Delivers int8-cle")


def test_superseded_variant_ships_on_request_labelled(breaker, tmp_path):
    result = cli("bundle", breaker, "--variants", "int8-cle,int8", "--out", tmp_path / "b.tgz")
    assert result.exit_code == 0, result.output
    pi = _unpack(tmp_path / "b.tgz", tmp_path / "pi")
    meta = json.loads((pi / "metadata.json").read_text())
    assert meta["default_model"] == "model_int8-cle.tflite"
    assert meta["models"]["model_int8.tflite"]["superseded_by"] == "int8-cle"
    assert "superseded_by" not in meta["models"]["model_int8-cle.tflite"]
    proc = runner("eval", "samples/eval.npz", "--model", "model_int8.tflite", cwd=pi)
    assert proc.returncode == 0 and "warning: model_int8.tflite: superseded by int8-cle" in proc.stderr


def test_run_without_int8_bundles_its_best_variant(breaker, source, tmp_path):  # noqa: F811
    result = cli("convert", breaker / "model.keras", *_data_args(source), "--quantize", "dynamic,float16",
                 "--out", tmp_path / "noint8")
    assert result.exit_code == 0, result.output
    result = cli("bundle", tmp_path / "noint8")
    assert result.exit_code == 0, result.output
    assert "default is model_dynamic.tflite (the first present of int8, dynamic" in result.output
    pi = _unpack(tmp_path / "noint8.tar.gz", tmp_path / "pi")
    meta = json.loads((pi / "metadata.json").read_text())
    assert meta["default_model"] == "model_dynamic.tflite"
    assert sorted(meta["models"]) == ["model_dynamic.tflite", "model_fp32.tflite"]
    proc = runner("eval", "samples/eval.npz", "--json", cwd=pi)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"] == "model_dynamic.tflite"


# ---------------------------------------------------------------- 8: device results belong to the run

@pytest.fixture(scope="module")
def board(breaker, tmp_path_factory):
    """The breaker's bundle unpacked as on a board, with the eval and bench JSON its runner printed."""
    tmp = tmp_path_factory.mktemp("board")
    assert cli("bundle", breaker, "--out", tmp / "b.tar.gz").exit_code == 0
    pi = _unpack(tmp / "b.tar.gz", tmp / "pi")
    for kind, args in (("eval", ["samples/eval.npz"]), ("bench", ["--runs", 5, "--warmup", 1])):
        proc = runner(kind, *args, "--json", cwd=pi)
        assert proc.returncode == 0, proc.stderr
        (tmp / f"{kind}.json").write_text(proc.stdout)
    return tmp


@pytest.fixture(scope="module")
def sample(board) -> tuple[str, str]:
    """A test digit from the bundle's samples (named NN_<label>.png) that its model gets right, and that label:
    which digits a 1-epoch model gets right depends on the data this machine has (MNIST, or the 8x8 digits)."""
    proc = runner("classify", "samples", "--json", cwd=board / "pi")
    assert proc.returncode == 0, proc.stderr
    for result in json.loads(proc.stdout)["results"]:
        name = Path(result["image"]).name
        label = name.rsplit(".", 1)[0].split("_", 1)[1]
        if result["top"][0]["label"] == label:
            return name, label
    pytest.fail(f"the model gets none of the bundle's samples right: {proc.stdout[:500]}")


def test_every_runner_json_names_kind_schema_and_the_model_sha256(board, sample):
    pi = board / "pi"
    sha = json.loads((pi / "metadata.json").read_text())["models"]["model_int8-cle.tflite"]["sha256"]
    outputs = {kind: json.loads((board / f"{kind}.json").read_text()) for kind in ("eval", "bench")}
    for kind, args in (("info", []), ("classify", [f"samples/{sample[0]}"])):
        proc = runner(kind, *args, "--json", cwd=pi)
        assert proc.returncode == 0, proc.stderr
        outputs[kind] = json.loads(proc.stdout)
    for kind, out in outputs.items():
        assert out["kind"] == kind and out["schema"] == 1 and out["model_sha256"] == sha, kind
        assert out["model"] == "model_int8-cle.tflite", kind
    for kind, args in (("verify", []), ("unpack", [board / "b.tar.gz", board / "again"])):
        proc = runner(kind, *args, "--json", cwd=pi)
        out = json.loads(proc.stdout)
        assert proc.returncode == 0 and out["kind"] == kind and out["schema"] == 1 and "path" in out, kind


def test_report_merges_several_device_files_after_one_option(breaker, board, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(breaker, run)
    result = cli("report", run, "--device-results", board / "eval.json", board / "bench.json")
    assert result.exit_code == 0, result.output
    report = json.loads((run / "report.json").read_text())
    [device] = report["devices"]
    cle = next(v for v in report["variants"] if v["variant"] == "int8-cle")["device"][device["label"]]
    assert cle["accuracy"] == json.loads((board / "eval.json").read_text())["accuracy"] and cle["p50_ms"] > 0
    assert sorted(f["kind"] for f in device["files"]) == ["bench", "eval"]
    assert not any(Path(f["file"]).is_absolute() for f in device["files"])
    # The same, repeating the option, on a fresh copy (deleting files of a run is an edit it would refuse).
    again = tmp_path / "again"
    shutil.copytree(breaker, again)
    result = cli("report", again, "--device-results", board / "eval.json", "--device-results", board / "bench.json")
    assert result.exit_code == 0, result.output
    assert json.loads((again / "report.json").read_text())["devices"][0]["files"] == device["files"]


def test_report_refuses_results_of_a_model_the_run_does_not_contain(breaker, board, tmp_path):
    import hashlib
    import shutil

    run = tmp_path / "run"
    shutil.copytree(breaker, run)
    before = (run / "report.json").read_bytes()
    good = json.loads((board / "eval.json").read_text())
    cases = {"other.json": {**good, "model_sha256": hashlib.sha256(b"another run's model").hexdigest()},
             "old.json": {k: v for k, v in good.items() if k != "model_sha256"},
             "renamed.json": {**good, "model": "model_fp32.tflite"}}
    expected = {"other.json": "a model this run does not contain", "old.json": "names no 'model_sha256'",
                "renamed.json": "this run's model_int8-cle.tflite"}
    for name, content in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        result = cli("report", run, "--device-results", tmp_path / name)
        assert result.exit_code == 1 and expected[name] in result.output, (name, result.output)
        assert len(result.output.strip().splitlines()) == 1
    assert (run / "report.json").read_bytes() == before and not (run / "device_results").exists()


# ---------------------------------------------------------------- 4, 7: eval refuses what it cannot score

@pytest.mark.parametrize("x, y, expected", [
    (np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64), "'x' holds no images"),
    (None, None, "in [0, 1], but the runner takes uint8 pixels 0-255"),
    (None, "onehot", "one-hot or scores; expected one class index per image: save y.argmax(axis=1)"),
    (None, "strings", "expected integer class indices"),
])
def test_eval_refuses_data_it_cannot_score(board, tmp_path, x, y, expected):
    with np.load(board / "pi" / "samples" / "eval.npz") as d:
        x0, y0 = d["x"][:20], d["y"][:20]
    if x is None and y is None:
        x, y = x0.astype(np.float32) / 255, y0  # what a Keras user feeds a model
    elif x is None:
        x, y = x0, (np.eye(10)[y0] if y == "onehot" else np.array([str(v) for v in y0]))
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    proc = runner("eval", tmp_path / "bad.npz", cwd=board / "pi")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0] and "bad.npz" in errors[0], proc.stderr


# ---------------------------------------------------------------- 5, 6: classify every image, as phones save them

@pytest.fixture(scope="module")
def digits(board, sample, tmp_path_factory):
    """A real test digit in the ways a user brings one: upright, sideways with EXIF, inverted, tiny."""
    tmp = tmp_path_factory.mktemp("digits")
    from PIL import Image

    pixels = np.asarray(Image.open(board / "pi" / "samples" / sample[0]))
    upright = Image.fromarray(pixels)
    upright.save(tmp / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": what a phone held upright writes
    upright.rotate(90, expand=True).save(tmp / "sideways.png", exif=exif)
    upright.rotate(90, expand=True).save(tmp / "sideways-no-exif.png")
    Image.fromarray(255 - pixels).save(tmp / "paper.png")  # dark ink on white paper
    upright.resize((1, 1)).save(tmp / "tiny.png")
    (tmp / "doc.pdf").write_bytes(b"%PDF-1.4\n% not an image\n")
    return tmp


def _classify(board, *args):
    proc = runner("classify", *args, "--json", cwd=board / "pi")
    return proc, json.loads(proc.stdout)


def test_classify_reports_every_image_and_each_failure(board, digits, sample):
    label = sample[1]
    proc, out = _classify(board, digits / "upright.png", digits / "doc.pdf", digits / "sideways.png")
    assert proc.returncode == 1 and out["failed"] == 1 and out["ok"] is False
    images = [r["image"] for r in out["results"]]
    assert images == [str(digits / n) for n in ("upright.png", "doc.pdf", "sideways.png")]
    assert out["results"][0]["top"][0]["label"] == label and out["results"][2]["top"][0]["label"] == label
    assert "doc.pdf: not a readable image" in out["results"][1]["error"] and "top" not in out["results"][1]
    text = runner("classify", digits / "upright.png", digits / "doc.pdf", cwd=board / "pi")
    assert text.returncode == 1 and text.stdout.startswith(f"{digits / 'upright.png'}: {label} ")
    assert "doc.pdf: not a readable image" in text.stderr and "1 of 2 image(s)" in text.stderr


def test_classify_reads_folders_and_stdin(board, digits, sample):
    proc, out = _classify(board, "samples")
    assert proc.returncode == 0, proc.stderr
    assert [Path(r["image"]).name for r in out["results"]] == sorted(
        p.name for p in (board / "pi" / "samples").glob("*.png"))  # eval.npz is not an image: skipped
    assert all(r["warnings"] == [] for r in out["results"])  # real test digits raise no doubt
    proc = runner("classify", "-", "--json", cwd=board / "pi", stdin=(digits / "upright.png").read_bytes())
    out = json.loads(proc.stdout)
    assert proc.returncode == 0 and out["results"][0]["image"] == "-"
    assert out["results"][0]["top"][0]["label"] == sample[1]
    proc, out = _classify(board, digits / "empty-folder-missing")
    assert proc.returncode == 1 and "no such image file" in out["results"][0]["error"]


def test_exif_orientation_is_applied(board, digits):
    _, out = _classify(board, digits / "upright.png", digits / "sideways.png", digits / "sideways-no-exif.png")
    upright, sideways, raw = (r["top"] for r in out["results"])
    assert sideways == upright  # the very same pixels once turned upright
    assert raw != upright


def test_opposite_polarity_and_tiny_images_are_flagged(board, digits):
    proc, out = _classify(board, digits / "paper.png", digits / "upright.png", digits / "tiny.png")
    paper, upright, tiny = out["results"]
    assert proc.returncode == 0
    assert any("dark on a light background" in w and "--invert" in w for w in paper["warnings"])
    assert upright["warnings"] == []
    assert any("1x1, far smaller than the model's 28x28 input" in w for w in tiny["warnings"])
    assert "warning: " in proc.stderr and "--invert" in proc.stderr
    proc, out = _classify(board, "--invert", digits / "paper.png")
    assert out["results"][0]["warnings"] == [] and out["results"][0]["top"] == upright["top"]


# ---------------------------------------------------------------- 4: one line for a run that cannot do it

@pytest.fixture(scope="module")
def train_only(tmp_path_factory):
    run = tmp_path_factory.mktemp("train") / "t"
    result = cli("train", "--dataset", "digits", "--epochs", 1, "--out", run)
    assert result.exit_code == 0, result.output
    return run


@pytest.mark.parametrize("command", ["benchmark", "analyze", "report"])
def test_commands_on_a_train_only_run_say_what_makes_the_models(train_only, command):
    result = cli(command, train_only)
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert "\n" not in line and "a `pipeline train` run" in line and f"`pipeline {command}` needs" in line
    assert f"pipeline build --keras-model {train_only}/model.keras" in line


def test_verify_accepts_a_train_only_run(train_only):
    result = cli("verify", train_only, "--json")
    out = json.loads(result.output)
    assert result.exit_code == 0 and out == {"kind": "verify", "schema": 1, "path": str(train_only), "ok": True,
                                             "problems": []}


@pytest.mark.parametrize("command", ["benchmark", "analyze", "report"])
def test_commands_on_a_folder_that_is_not_a_run(tmp_path, command):
    result = cli(command, tmp_path)
    assert result.exit_code == 1 and "not a run directory (no manifest.json)" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_verify_help_names_bundles_too():
    assert "RUN_DIR|BUNDLE" in cli("verify", "--help").output


# ---------------------------------------------------------------- 9: exit codes

@pytest.mark.parametrize("args, expected", [
    (["--dataset", "digits", "--data-dir", "."], "--dataset digits reads no files"),
    (["--data-dir", ".", "--dataset", "digits"], "--dataset digits reads no files"),
    (["--data-dir", "no-such-folder"], "no-such-folder does not exist; expected a folder holding mnist.npz"),
    (["--data-dir", "README.md"], "is a file"),
    (["--dataset", "digits", "--quantize", ""], "empty; pass one or more of"),
    (["--dataset", "digits", "--name", ""], "is not a plain name"),
    (["--dataset", "digits", "--out", ""], "empty or the current folder"),
])
def test_usage_mistakes_exit_2(args, expected, monkeypatch):
    monkeypatch.chdir(REPO)
    result = cli("build", *args)
    assert result.exit_code == 2 and expected in result.output, result.output


def test_ctrl_c_on_build_exits_130(tmp_path):
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "build", "--dataset", "digits", "--epochs", "200",
                             "--out", str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    for line in proc.stdout:
        if line.startswith("training "):  # TensorFlow is loaded and fit() is about to run
            break
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "interrupted" in err and "Traceback" not in err and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 13, 14.3: run names

def test_default_names_take_the_next_free_number_and_say_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = cli("train", "--dataset", "digits", "--epochs", 1)
    assert first.exit_code == 0, first.output
    second = cli("train", "--dataset", "digits", "--epochs", 1)
    assert second.exit_code == 0, second.output
    assert "artifacts/mnist-cnn-digits exists; writing artifacts/mnist-cnn-digits-2" in second.output
    assert (tmp_path / "artifacts" / "mnist-cnn-digits-2" / "model.keras").is_file()
    # --name and --out still mean exactly that folder.
    named = cli("train", "--dataset", "digits", "--epochs", 1, "--name", "mnist-cnn-digits")
    assert named.exit_code == 1 and "--overwrite" in named.output
    # A user's model is named after its file, not after the zoo model of the dataset.
    (tmp_path / "artifacts" / "mnist-cnn-digits" / "model.keras").rename(tmp_path / "mine.keras")
    result = cli("convert", "mine.keras", "--dataset", "digits", "--calibration-samples", 999999)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "artifacts" / "mine-digits" / "model_int8.tflite").is_file()
    assert "--calibration-samples 999999 is more than the" in result.output  # capped, and said so


def test_resume_on_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes").mkdir()
    result = cli("build", "--resume", tmp_path / "notes")
    assert result.exit_code == 1 and "is not a run (no manifest.json)" in result.output
    assert "already complete" not in result.output


# ---------------------------------------------------------------- 11: bundles

def test_bundles_are_reproducible_and_refuse_what_they_would_clobber(breaker, tmp_path):
    a, b = tmp_path / "a" / "run.tar.gz", tmp_path / "b" / "run.tar.gz"
    for out in (a, b):
        assert cli("bundle", breaker, "--out", out).exit_code == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes()[4:8] == b"\0\0\0\0"  # no timestamp in the gzip header
    with tarfile.open(a) as tar:
        members = tar.getmembers()
    assert [m.name for m in members if m.isfile()] == sorted(m.name for m in members if m.isfile())
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "", "")}
    assert {m.mode for m in members if m.isfile()} == {0o644} and {m.mode for m in members if m.isdir()} == {0o755}
    assert len({m.mtime for m in members}) == 1
    result = cli("bundle", breaker, "--out", a)
    assert result.exit_code == 1 and "already exists; pass --overwrite" in result.output
    assert cli("bundle", breaker, "--out", a, "--overwrite").exit_code == 0
    (tmp_path / "thesis.tar.gz").write_text("not ours")
    result = cli("bundle", breaker, "--out", tmp_path / "thesis.tar.gz", "--overwrite")
    assert result.exit_code == 1 and "not a bundle written by `pipeline bundle`" in result.output
    assert (tmp_path / "thesis.tar.gz").read_text() == "not ours"
    result = cli("bundle", breaker, "--out", tmp_path / "run.tar")
    assert result.exit_code == 2 and "name it run.tar.gz" in result.output and not (tmp_path / "run.tar").exists()
    assert cli("bundle", breaker, "--variants", "int8-cle,int8-cle", "--out", tmp_path / "one.tgz").exit_code == 0
    with tarfile.open(tmp_path / "one.tgz") as tar:
        assert [n for n in tar.getnames() if n.endswith(".tflite")] == ["model_int8-cle.tflite"]


# ---------------------------------------------------------------- 10, 14: messages and JSON of the runner

def test_runner_messages(board, tmp_path):
    pi = board / "pi"
    proc = runner("verify", tmp_path / "nonexistent", cwd=pi)
    assert proc.returncode == 2 and "no such folder" in proc.stderr and "metadata.json" not in proc.stderr
    for args in (["eval", "missing.npz"], ["info", "--model", "missing.tflite"], ["unpack", "missing.tar.gz", "x"]):
        proc = runner(*args, cwd=pi)
        assert proc.returncode == 2 and f"error: {args[-1] if args[0] != 'unpack' else args[1]}: no such" in \
            proc.stderr, (args, proc.stderr)
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    proc = runner("unpack", tmp_path / "broken.tar.gz", tmp_path / "dest", cwd=pi)
    assert proc.returncode == 1 and "not a readable .tar.gz bundle" in proc.stderr
    assert not (tmp_path / "dest").exists() and not list(tmp_path.glob(".dest*"))  # nothing left behind
    info = runner("info", cwd=pi)
    assert info.returncode == 0 and not info.stdout.lstrip().startswith("{")
    assert "model_int8-cle.tflite" in info.stdout and "ops" in info.stdout and "DELEGATE" not in info.stdout
    assert "DELEGATE" not in json.loads(runner("info", "--json", cwd=pi).stdout)["ops"]


def test_pipeline_verify_on_a_run_does_not_blame_a_copy(breaker, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(breaker, run)
    flipped = bytearray((run / "model_int8-cle.tflite").read_bytes())
    flipped[300] ^= 1
    (run / "model_int8-cle.tflite").write_bytes(bytes(flipped))
    result = cli("verify", run)
    assert result.exit_code == 1 and "copy the bundle" not in result.output


def test_cross_check_without_xnnpack_compares_like_with_like(tmp_path):
    result = cli("build", "--dataset", "digits", "--epochs", 1, "--out", tmp_path / "run", "--no-xnnpack",
                 "--cross-check", "--threads", 1, "--runs", 5, "--warmup", 1)
    assert result.exit_code == 0, result.output
    bench = json.loads((tmp_path / "run" / "benchmark.json").read_text())
    check = bench["cross_check"]
    assert bench["xnnpack"] is False and check["xnnpack"] is True and check["remeasured_with_xnnpack"] is True
    for v, entry in check["variants"].items():
        if "our_p50_ms" in entry:
            assert entry["our_p50_ms"] != bench["threads"]["1"][v]["latency"]["p50_ms"]


def test_convert_to_float16_downloads_nothing(trained, tmp_path, monkeypatch):  # noqa: F811
    import keras

    def offline(*a, **k):
        raise AssertionError("tried to download MNIST")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
    monkeypatch.chdir(tmp_path)
    trained.save(tmp_path / "mine.keras")
    # Without images the input range cannot be detected: assumed, a -1..1 model would ship fed 0..1.
    result = cli("convert", "mine.keras", "--quantize", "float16")
    assert result.exit_code == 1 and "pass --input-range 0,1 or -1,1 or 0,255" in result.output, result.output
    assert not (tmp_path / "artifacts" / "mine-mnist").exists()
    result = cli("convert", "mine.keras", "--quantize", "float16", "--input-range", "0,1")
    assert result.exit_code == 0, result.output
    assert "mnist is not downloaded" in result.output
    run = tmp_path / "artifacts" / "mine-mnist"
    assert cli("verify", run).exit_code == 0
    assert cli("bundle", run).exit_code == 0  # the float16 model ships, without samples
    with tarfile.open(tmp_path / "artifacts" / "mine-mnist.tar.gz") as tar:
        assert json.load(tar.extractfile("metadata.json"))["default_model"] == "model_float16.tflite"
