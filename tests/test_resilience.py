"""Failures and interruptions keep what the user paid for: one decision between an interruption, the
user's input, the machine and a bug; a per-epoch training checkpoint that `--resume` continues; a
full disk or a read-only folder is one line and exit 1, never a hang; only edgepipe's lines on screen."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.verify import verify_path

REPO = Path(__file__).resolve().parent.parent
PIPELINE = [sys.executable, "-m", "pipeline.cli"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
SMALL = ["--dataset", "digits", "--model", "mnist-mlp", "--epochs", "1", "--no-benchmark"]
NATIVE = ("All log messages before absl::InitializeLog", "cudart_stub", "fully_quantize:", "XNNPACK delegate",
          "I0000 ", "W0000 ", "E0000 ")


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def _prelude_run(prelude: str, *args, cwd: Path, env: dict = ENV) -> subprocess.Popen:
    """`pipeline ARGS` in a child whose prelude stands in for a part of TensorFlow or a stage."""
    code = (f"{prelude}\nimport sys\nfrom pipeline.cli import entry\n"
            f"sys.argv = ['pipeline', *{list(map(str, args))!r}]\nentry()")
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _weights(model_keras: Path) -> list[np.ndarray]:
    import keras

    return [np.asarray(w) for w in keras.models.load_model(model_keras, compile=False).get_weights()]


# ---------------------------------------------------------------- 18.3: Ctrl-C turned into another error

# TensorFlow's tracing can catch the KeyboardInterrupt of a Ctrl-C and raise something else instead
# (seen: "ValueError: None values not supported"); this conversion stands in for it, the Ctrl-C is real.
SWALLOWS_CTRL_C = """
import time
import pipeline.convert as c
from pipeline import console
def convert_all(*a, **k):
    console.say("converting now")
    try:
        time.sleep(120)
    except KeyboardInterrupt:
        raise ValueError("None values not supported.")
c.convert_all = convert_all
"""


@pytest.mark.slow
def test_ctrl_c_that_tensorflow_turns_into_another_error_is_an_interruption(tmp_path):
    proc = _prelude_run(SWALLOWS_CTRL_C, "build", *SMALL, "--name", "cc", cwd=tmp_path)
    for line in proc.stdout:
        if line.startswith("converting now"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert _errors(err) == ["Error: interrupted; nothing half-written was left behind; `pipeline build --resume cc` "
                            "continues from the last finished stage"], err
    staging = tmp_path / "artifacts" / ".cc.partial"
    assert (staging / "model.keras").is_file() and "train" in json.loads((staging / ".progress.json").read_text())
    done = subprocess.run([*PIPELINE, "build", "--resume", "cc", "-v"], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reused from the interrupted build: train" in done.stdout
    assert verify_path(tmp_path / "artifacts" / "cc") == []


def test_a_ctrl_c_that_a_finalizer_swallows_stops_the_training_at_its_next_step(capfd):
    """Python swallows a KeyboardInterrupt raised while a `__del__` runs (TensorFlow frees functions and tensors
    in finalizers all through an epoch), the likeliest reason a search's final training once went on to epoch 118
    after a Ctrl-C in CI. The Ctrl-C here really lands inside a finalizer, during a real training."""
    import keras

    from pipeline import console, interrupts
    from pipeline.config import BuildConfig
    from pipeline.data import load_dataset
    from pipeline.train import train

    class Finalizer:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    steps = []

    class CtrlCInAFinalizer(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            steps.append(batch)
            if len(steps) == 2:
                finalizer = Finalizer()
                del finalizer

    cfg = BuildConfig(dataset="digits", model="mnist-mlp", epochs=3, batch_size=16, out="unused")
    data = load_dataset("digits", seed=0, log=lambda *a: None)
    hook = sys.unraisablehook
    with pytest.raises(KeyboardInterrupt), interrupts.ctrl_c():
        train(cfg, data, log=lambda *a: None, callbacks=[CtrlCInAFinalizer()])
    assert len(steps) == 2, f"{len(steps)} steps trained: the Ctrl-C was not honoured at the next step"
    assert interrupts.signalled() and sys.unraisablehook is hook
    assert "Exception ignored" not in capfd.readouterr().err  # raised again, so not a traceback to show
    console.Progress(None, "the next command's loop", 1, "steps").advance()  # the Ctrl-C was the last command's
    keras.backend.clear_session()


# ---------------------------------------------------------------- 18.4: a failure after training

BROKEN_REPORT = """
import pipeline.report.render as r
def render(*a, **k):
    raise RuntimeError("renderer exploded")
r.render = render
"""


@pytest.mark.slow
def test_a_bug_after_training_keeps_the_staging_folder_for_resume(tmp_path):
    proc = _prelude_run(BROKEN_REPORT, "build", *SMALL, "--out", tmp_path / "runs" / "r", cwd=tmp_path)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err
    [line] = _errors(err)
    staging = tmp_path / "runs" / ".r.partial"
    assert line == (f"Error: failed: RuntimeError: renderer exploded; `pipeline build --resume {tmp_path}/runs/r` "
                    f"continues from the last finished stage; the traceback and TensorFlow's own output are in "
                    f"{staging}/build.log"), err
    assert "RuntimeError: renderer exploded" in (staging / "build.log").read_text()
    assert set(json.loads((staging / ".progress.json").read_text())) == {"train", "convert", "evaluate"}
    done = subprocess.run([*PIPELINE, "build", "--resume", str(tmp_path / "runs" / "r")], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reused from the interrupted build: train, convert, evaluate" in done.stdout, done.stdout
    assert verify_path(tmp_path / "runs" / "r") == [] and not staging.exists()


@pytest.mark.slow
def test_resume_from_another_folder_reads_the_same_data_and_a_missing_folder_keeps_the_build(tmp_path):
    # The config kept --data-dir as typed: resumed elsewhere it named nothing (or another folder), and that
    # input error deleted the interrupted build it was asked to continue.
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "first" / "images" / cls).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                tmp_path / "first" / "images" / cls / f"{i}.png")
    out = tmp_path / "runs" / "r"
    proc = _prelude_run(BROKEN_REPORT, "build", "--data-dir", "images", "--model", "mnist-mlp", "--image-size", "8x8",
                        "--epochs", "1", "--no-benchmark", "--out", out, cwd=tmp_path / "first")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "renderer exploded" in err, err
    staging = tmp_path / "runs" / ".r.partial"
    assert json.loads((staging / "config.json").read_text())["data_dir"] == str(tmp_path / "first" / "images")

    (tmp_path / "first" / "images").rename(tmp_path / "first" / "moved")
    gone = subprocess.run([*PIPELINE, "build", "--resume", str(out)], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert gone.returncode == 1 and "images" in gone.stderr and f"--resume {out}`" in gone.stderr, gone.stderr
    assert "train" in json.loads((staging / ".progress.json").read_text())

    (tmp_path / "first" / "moved").rename(tmp_path / "first" / "images")
    done = subprocess.run([*PIPELINE, "build", "--resume", str(out)], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reused from the interrupted build: train, convert, evaluate" in done.stdout, done.stdout
    assert verify_path(out) == []


# ---------------------------------------------------------------- 18.5: training resumes mid-way

@pytest.mark.slow
def test_resumed_training_continues_from_its_checkpoint_and_ends_like_a_straight_run(tmp_path):
    # With a moving average of the weights: it too must continue where it stopped, not restart.
    opts = ["--dataset", "digits", "--epochs", "6", "--ema", "0.9", "--no-benchmark"]
    straight = subprocess.run([*PIPELINE, "build", *opts, "--name", "straight"], cwd=tmp_path, env=ENV,
                              capture_output=True, text=True, timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]

    proc = subprocess.Popen([*PIPELINE, "build", *opts, "--name", "cut"], cwd=tmp_path, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:
        if line.startswith("epoch 2/6:"):  # epoch 3 is running
            break
    proc.send_signal(signal.SIGINT)
    first, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "`pipeline build --resume cut`" in err, err[-2000:]
    assert "epoch 6/6" not in first

    resumed = subprocess.run([*PIPELINE, "build", "--resume", "cut"], cwd=tmp_path, env=ENV, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    [cont] = [line for line in resumed.stdout.splitlines() if line.startswith("training: continuing after epoch")]
    done = int(cont.split("epoch ")[1].split("/")[0])
    ran = [line for line in resumed.stdout.splitlines() if line.startswith("epoch ")]
    assert 1 <= done < 6 and len(ran) == 6 - done and ran[0].startswith(f"epoch {done + 1}/6"), resumed.stdout
    assert "nothing from the interrupted build could be reused" not in resumed.stdout

    a, b = tmp_path / "artifacts" / "straight", tmp_path / "artifacts" / "cut"
    for wa, wb in zip(_weights(a / "model.keras"), _weights(b / "model.keras"), strict=True):
        np.testing.assert_array_equal(wa, wb)
    acc = [{v: e["accuracy"] for v, e in json.loads((r / "evaluation.json").read_text())["variants"].items()}
           for r in (a, b)]
    assert acc[0] == acc[1]
    history = [json.loads((r / "manifest.json").read_text())["training"] for r in (a, b)]
    assert len(history[1]["accuracy"]) == 6 and history[0]["val_accuracy"] == history[1]["val_accuracy"]
    assert history[1]["resumed_after_epoch"] == done and "resumed_after_epoch" not in history[0]
    assert verify_path(b) == [] and not list(b.rglob(".*"))  # the checkpoint did not end up in the run


# ---------------------------------------------------------------- 18.8: what --resume accepts

def test_resume_takes_verbose_and_refusals_name_real_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["build", "--resume", "x", "-v"])
    assert result.exit_code == 1 and "no interrupted build found" in result.output, result.output
    result = CliRunner().invoke(main, ["build", "--resume", "x", "--runs", "5", "--no-xnnpack"])
    assert result.exit_code == 2, result.output
    assert "drop --no-xnnpack, --runs (" in result.output and "--bench-runs" not in result.output, result.output


# ---------------------------------------------------------------- 19.8: OS errors are the user's to fix

@contextlib.contextmanager
def _tmpfs(where: Path, size: str, *options: str):
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join((f"size={size}", *options)), "tmpfs", str(where)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_read_only_working_folder_is_one_line_naming_out(tmp_path):
    with _tmpfs(tmp_path / "ro", "1m", "ro") as ro:
        proc = subprocess.run([*PIPELINE, "train", "--dataset", "digits", "--epochs", "1"], cwd=ro, env=ENV,
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert _errors(proc.stderr) == ["Error: artifacts is on a read-only file system; run from a writable folder or "
                                    "pass --out DIR on a writable disk"], proc.stderr


def test_a_symlink_loop_in_the_data_folder_names_the_link(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "data" / cls / f"{i}.png")
    (tmp_path / "data" / "a" / "loop").symlink_to("..")
    proc = subprocess.run([*PIPELINE, "train", "--data-dir", "data", "--epochs", "1", "--name", "x"], cwd=tmp_path,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert _errors(proc.stderr) == [f"Error: data/a/loop is a symbolic link that leads back to {tmp_path}/data, so "
                                    "the folder never ends; remove that link or point it elsewhere"], proc.stderr
    assert not (tmp_path / "artifacts" / ".x.partial").exists()


# ---------------------------------------------------------------- 18.6: a full disk

@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """A finished mnist-mlp run of about 2 MB, with a bundle and a TFLite Micro export beside it."""
    root = tmp_path_factory.mktemp("small")
    proc = subprocess.run([*PIPELINE, "build", *SMALL, "--out", root / "run"], cwd=root, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


def _fill(folder: Path, leave: int) -> None:
    """Take all but `leave` bytes of the file system holding folder."""
    free = shutil.disk_usage(folder).free - leave
    with open(folder / "filler", "wb") as f:
        f.truncate(0)
        os.posix_fallocate(f.fileno(), 0, max(free, 1))


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# (command, arguments after the run, the existing target it may replace: bundle and export get --overwrite)
FULL_DISK = [
    ("build", lambda run: [*SMALL, "--out", run, "--overwrite"], None),
    ("bundle", lambda run: [run, "--out", run.parent / "run.tar.gz", "--overwrite"], "run.tar.gz"),
    ("export", lambda run: [run, "--out", run.parent / "run-tflm", "--overwrite", "--test-images", "50"], "run-tflm"),
    ("report", lambda run: [run], None),
]


@pytest.mark.slow
@pytest.mark.parametrize("command, args, target", FULL_DISK, ids=[c[0] for c in FULL_DISK])
def test_a_full_disk_is_one_line_and_leaves_everything_as_it_was(small_run, tmp_path, command, args, target):
    with _tmpfs(tmp_path / "disk", "8m") as disk:
        run = disk / "run"
        shutil.copytree(small_run, run)
        if target:  # an earlier result the --overwrite must not lose
            earlier = subprocess.run([*PIPELINE, command, *map(str, args(run))], cwd=disk, env=ENV,
                                     capture_output=True, text=True, timeout=600)
            assert earlier.returncode == 0, earlier.stderr[-3000:]
        before = _snapshot(disk)
        _fill(disk, leave=64 * 1024)
        env = {**ENV, "TMPDIR": str(disk)}  # the log on the full disk too
        t0 = time.monotonic()
        proc = subprocess.run([*PIPELINE, command, *map(str, args(run))], cwd=disk, env=env, capture_output=True,
                              text=True, timeout=600)
        seconds = time.monotonic() - t0
        (disk / "filler").unlink()
        # A build keeps its staging folder when training finished (`--resume` continues it); nothing else stays.
        after = {k: v for k, v in _snapshot(disk).items() if not k.startswith(".run.partial/")}
    assert proc.returncode == 1, (seconds, proc.stdout[-2000:], proc.stderr[-3000:])
    [line] = _errors(proc.stderr)
    assert line.startswith("Error: no space left on the disk that holds ") and "Traceback" not in proc.stderr, line
    assert after == before, sorted(set(after) ^ set(before))  # the run and the earlier target, byte for byte


# ---------------------------------------------------------------- 19.9: only edgepipe's lines

def test_export_verify_compare_report_show_only_edgepipe_lines(small_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    for args in (["verify", run], ["report", run], ["compare", run, small_run],
                 ["export", run, "--out", tmp_path / "tflm", "--test-images", "50"]):
        proc = subprocess.run([*PIPELINE, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        shown = proc.stdout + proc.stderr
        assert [n for n in NATIVE if n in shown] == [], (args[0], shown[-3000:])


# TensorFlow writing a lot of its own lines (1 MB, far more than a pipe holds) while the log's disk is full.
FLOODS_FD2 = """
import os
import pipeline.measure.benchmark as b
original = b.benchmark_variants
def benchmark_variants(*a, **k):
    for _ in range(1024):
        os.write(2, b"W0000 native line " + b"x" * 1000 + b"\\n")
    return original(*a, **k)
b.benchmark_variants = benchmark_variants
"""


@pytest.mark.slow
def test_native_output_never_blocks_a_command_whose_log_disk_is_full(small_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    with _tmpfs(tmp_path / "disk", "1m") as disk:
        _fill(disk, leave=16 * 1024)
        proc = _prelude_run(FLOODS_FD2, "benchmark", run, "--runs", "5", "--warmup", "1", "--threads", "1",
                            cwd=tmp_path, env={**ENV, "TMPDIR": str(disk)})
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail("the command hung once its log could not be written")
    assert proc.returncode == 0, err[-3000:]
    assert "W0000" not in out + err and "latency" in out
    assert verify_path(run) == []
