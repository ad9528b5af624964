"""Run directories: --overwrite replaces only runs, kernel locks, swaps that always leave a run in place,
finished runs changed as one step, honest resume, file modes that follow the umask."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.verify import verify_path
from tests.test_robustness import TINY, Build, _kill_at

REPO = Path(__file__).resolve().parent.parent
PIPELINE = [sys.executable, "-m", "pipeline.cli"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
FAST = ["--dataset", "digits", "--epochs", "1"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mode, p.read_bytes() if p.is_file() else None)
            for p in [folder, *folder.rglob("*")]}


def _beside(final: Path) -> list[str]:
    """Hidden siblings of a run: locks, staging, swap or update folders."""
    return sorted(p.name for p in final.parent.glob(f".{final.name}.*"))


# ---------------------------------------------------------------- --overwrite replaces runs only

@pytest.mark.parametrize("content", ["thesis", "foreign manifest", "empty"])
def test_overwrite_refuses_what_is_not_a_run(tmp_path, content):
    precious = tmp_path / "precious"
    precious.mkdir()
    precious.chmod(0o755)
    if content == "thesis":
        (precious / "thesis.txt").write_text("x")
    elif content == "foreign manifest":
        (precious / "manifest.json").write_text(json.dumps({"schema": 1, "files": {}}))
    before = _snapshot(precious)
    for cmd in (["build", *FAST], ["train", *FAST], ["convert", tmp_path / "none.keras", "--dataset", "digits"]):
        if cmd[0] == "convert":
            (tmp_path / "none.keras").write_text("not used")
        result = invoke(*cmd, "--out", precious, "--overwrite")
        assert result.exit_code == 1, result.output
        line = one_line_error(result.output)
        assert "did not write" in line and "--overwrite" in line, line
        assert _snapshot(precious) == before  # contents and folder modes untouched
        assert _beside(precious) == []


@pytest.mark.parametrize("kind", ["bundle folder", "bundle"])
def test_overwrite_refuses_a_bundle_edgepipe_wrote(mnist_run, tmp_path, monkeypatch, kind):
    """A bundle is edgepipe's, but not a run: an unpacked one holds what the board wrote (its eval.json)."""
    from device.integrity import extract_bundle
    from pipeline.ship.bundle import make_bundle

    monkeypatch.chdir(tmp_path)
    target = make_bundle(mnist_run, tmp_path / "artifacts" / "pi.tar.gz")  # --name NAME names artifacts/NAME
    if kind == "bundle folder":
        target = extract_bundle(target, tmp_path / "artifacts" / "unpacked")
        (target / "eval.json").write_text('{"accuracy": 0.97}')
    before = _snapshot(target) if target.is_dir() else target.read_bytes()
    result = invoke("build", *FAST, "--name", target.name, "--overwrite")
    assert result.exit_code == 1, result.output
    line = one_line_error(result.output)
    assert f"a {kind} written by `pipeline bundle`, not a run directory" in line and "--overwrite" in line, line
    assert (_snapshot(target) if target.is_dir() else target.read_bytes()) == before
    assert _beside(target) == []


def test_overwrite_replaces_a_run_and_modes_follow_the_umask(tmp_path):
    def run(*args):
        return subprocess.run([*PIPELINE, *map(str, args)], capture_output=True, text=True, timeout=300, env=ENV,
                              cwd=tmp_path, preexec_fn=lambda: os.umask(0o027))

    out = tmp_path / "run"
    proc = run("build", *FAST, "--model", "mnist-mlp", "--quantize", "int8", "--runs", "5", "--warmup", "1",
               "--threads", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    wrong = {k: oct(m) for k, m in modes.items() if m != (0o750 if (out / k).is_dir() else 0o640)}
    assert wrong == {}, wrong
    assert verify_path(out) == []

    proc = run("train", *FAST, "--model", "mnist-mlp", "--seed", "1", "--out", out, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["config"]["seed"] == 1
    assert not (out / "model_int8.tflite").exists() and verify_path(out) == []
    assert stat.S_IMODE(out.stat().st_mode) == 0o750 and _beside(out) == []


def test_input_error_leaves_no_staging_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EMPTY").mkdir()
    result = invoke("build", "--data-dir", tmp_path / "EMPTY", "--name", "x")
    assert result.exit_code == 1, result.output
    assert not (tmp_path / "artifacts" / ".x.partial").exists() and _beside(tmp_path / "artifacts" / "x") == []
    result = invoke("build", "--data-dir", tmp_path / "EMPTY", "--name", "x")
    assert "leftovers" not in result.output


def test_a_new_build_keeps_what_an_interrupted_one_would_resume_from(tmp_path):
    """Finished stages or a training checkpoint are kept unless --overwrite; a build killed before either
    left only its config and log, which a new build clears."""
    from pipeline.artifacts import CHECKPOINT, RunDir

    final, staging = tmp_path / "run", tmp_path / ".run.partial"
    for kept, expected in (("stage", "finished stages: train"), ("checkpoint", "a training checkpoint")):
        run = RunDir(final, log=lambda *a: None)
        run.write_json("config.json", {"out": str(final)})
        if kept == "stage":
            run.write("model.keras", b"weights")
            run.stage_done("train", ["model.keras"])
        else:
            run.write(CHECKPOINT, b"epoch 7 of 45")
        run.abandon()
        before = _snapshot(staging)
        result = invoke("build", *FAST, "--out", final)
        assert result.exit_code == 1, result.output
        line = one_line_error(result.output)
        assert expected in line and f"pipeline build --resume {final}" in line and "--overwrite" in line, line
        assert _snapshot(staging) == before and _beside(final) == [".run.partial"] and not final.exists()
        RunDir(final, overwrite=True, log=lambda *a: None).abandon()  # --overwrite starts over
        assert not (staging / "config.json").exists()
    logged = []
    RunDir(final, log=logged.append).abandon()  # nothing but a fresh staging folder: cleared without asking
    assert any("removing the leftovers" in m for m in logged), logged


def test_resume_refuses_other_options(tmp_path):
    result = invoke("build", "--resume", "x", "--epochs", "3", "--seed", "2")
    assert result.exit_code == 2
    assert "--epochs" in result.output and "--seed" in result.output and "--resume" in result.output


# ---------------------------------------------------------------- locks and swaps, with real processes

WRITER = textwrap.dedent("""
    import sys, time
    from pipeline.artifacts import CREATED_BY, RunDir, RunDirError
    final, tag, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
    try:
        run = RunDir(final, overwrite=True, resume="--resume" in sys.argv, log=lambda m: print("log:", m))
    except RunDirError as e:
        print("refused:", e)
        sys.exit(0)
    run.write("payload.txt", tag * 1000)
    print("locked", flush=True)
    time.sleep(hold)
    if "--die" in sys.argv:
        time.sleep(60)
    run.commit({"schema": 1, "created_by": CREATED_BY})
    print("committed")
""")

READER = textwrap.dedent("""
    import hashlib, json, os, sys, time
    final, seconds = sys.argv[1], float(sys.argv[2])
    seen = missing = mismatched = replaced = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            fd = os.open(final, os.O_RDONLY | os.O_DIRECTORY)  # one folder: no mixing of old and new files
        except FileNotFoundError:
            missing += 1
            continue
        try:
            manifest = json.loads(open("manifest.json", opener=lambda p, f: os.open(p, f, dir_fd=fd)).read())
            data = open("payload.txt", "rb", opener=lambda p, f: os.open(p, f, dir_fd=fd)).read()
            seen += 1
            mismatched += manifest["files"]["payload.txt"]["sha256"] != hashlib.sha256(data).hexdigest()
        except (OSError, ValueError, KeyError):
            # Only acceptable if this folder was swapped out meanwhile and is being deleted: the old run.
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(final))
            except FileNotFoundError:
                current = False
            if current:
                mismatched += 1
            else:
                replaced += 1
        finally:
            os.close(fd)
    print(json.dumps({"seen": seen, "missing": missing, "mismatched": mismatched, "replaced": replaced}))
""")


def _py(script: str, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _done(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, (proc.returncode, err[-2000:])
    return out


def test_overwrites_never_leave_the_run_missing(tmp_path):
    """Eight writers at once, five rounds, replacing one run while a reader checks it all the time."""
    final = tmp_path / "run"
    assert "committed" in _done(_py(WRITER, final, "0", 0))
    reader = _py(READER, final, 8)
    outcomes = []
    for _round in range(5):
        writers = [_py(WRITER, final, str(i), random.uniform(0, 0.05)) for i in range(8)]
        outcomes += [_done(w) for w in writers]
    verdict = json.loads(_done(reader))
    assert verdict["seen"] > 100 and verdict["missing"] == 0 and verdict["mismatched"] == 0, verdict
    odd = [o for o in outcomes if ("committed" in o) == ("refused: another build" in o)]
    assert odd == []
    assert sum("committed" in o for o in outcomes) >= 5
    assert _beside(final) == [] and verify_path(final) == []


def test_stale_staging_is_taken_over_by_exactly_one(tmp_path):
    """A writer killed mid-build leaves its staging folder; its lock dies with it. Of two processes that
    then start together, one takes the folder over and the other is refused, ten times over."""
    for i in range(10):
        final = tmp_path / f"run{i}"
        dead = _py(WRITER, final, "d", 0, "--die")
        assert dead.stdout.readline().strip() == "locked"
        dead.send_signal(signal.SIGKILL)
        dead.wait(timeout=30)
        assert (tmp_path / f".run{i}.partial" / "payload.txt").is_file()
        resume = "--resume" if i % 2 else "-"
        a, b = _py(WRITER, final, "a", 1.0, resume), _py(WRITER, final, "b", 1.0, resume)
        outs = [_done(a), _done(b)]
        assert sorted("committed" in o for o in outs) == [False, True], outs
        winner = next(o for o in outs if "committed" in o)
        assert ("resuming the interrupted build" if i % 2 else "removing the leftovers") in winner
        assert "another build (pid" in next(o for o in outs if "committed" not in o)
        assert verify_path(final) == [] and _beside(final) == []


def test_a_killed_swap_is_recovered(tmp_path, monkeypatch):
    """The states a kill can leave between the renames of a swap, recovered by the next process."""
    from pipeline import artifacts

    final = tmp_path / "run"
    assert "committed" in _done(_py(WRITER, final, "1", 0))
    old = json.loads((final / "manifest.json").read_text())
    # Killed after moving the old run aside without an exchange (the fallback): it is restored.
    os.rename(final, tmp_path / ".run.swap")
    (tmp_path / ".run.update").mkdir()
    artifacts.recover(final, log=lambda *a: None)
    assert json.loads((final / "manifest.json").read_text()) == old and _beside(final) == []
    # Killed after the exchange: the old run is beside the new one, and goes.
    shutil.copytree(final, tmp_path / ".run.swap")
    artifacts.recover(final, log=lambda *a: None)
    assert _beside(final) == [] and verify_path(final) == []
    # Without renameat2 (other systems) the swap still ends with the new run in place.
    monkeypatch.setattr(artifacts, "_renameat2", lambda *a: False)
    run = artifacts.RunDir(final, overwrite=True, log=lambda *a: None)
    run.write("payload.txt", "2" * 1000)
    run.commit({"schema": 1, "created_by": artifacts.CREATED_BY})
    assert (final / "payload.txt").read_text() == "2" * 1000 and _beside(final) == [] and verify_path(final) == []


# ---------------------------------------------------------------- changing a finished run

@pytest.fixture
def run_copy(mnist_run, tmp_path) -> Path:
    dest = tmp_path / "runs" / mnist_run.name
    shutil.copytree(mnist_run, dest)
    return dest


def test_benchmark_and_device_results_through_the_cli(run_copy, tmp_path):
    proc = subprocess.run([*PIPELINE, "benchmark", str(run_copy), "--runs", "7", "--warmup", "1", "--threads", "1"],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = json.loads((run_copy / "benchmark.json").read_text())
    assert bench["runs"] == 7 and bench["threads"]["1"]["int8"]["latency"]["n"] == 7
    assert verify_path(run_copy) == []

    proc = subprocess.run([sys.executable, str(REPO / "device" / "runner.py"), "eval", "--model",
                           str(run_copy / "model_int8.tflite"), str(run_copy / "samples" / "eval.npz"), "--json"],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "pi-eval.json").write_text(proc.stdout)
    proc = subprocess.run([*PIPELINE, "report", str(run_copy), "--device-results", str(tmp_path / "pi-eval.json")],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run_copy / "report.json").read_text())
    int8 = next(v for v in report["variants"] if v["variant"] == "int8")
    assert len(report["devices"]) == 1
    assert next(iter(int8["device"].values()))["accuracy"] == json.loads((tmp_path / "pi-eval.json").read_text())[
        "accuracy"]
    assert verify_path(run_copy) == [] and _beside(run_copy) == []


def test_a_symlink_to_a_run_changes_the_run_it_points_to(run_copy, tmp_path):
    from pipeline.artifacts import RunDirError, RunLock

    link = tmp_path / "latest"
    link.symlink_to(run_copy)
    result = invoke("benchmark", link, "--runs", "3", "--warmup", "0", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and link.resolve() == run_copy.resolve()
    assert json.loads((run_copy / "benchmark.json").read_text())["runs"] == 3
    assert verify_path(run_copy) == [] and _beside(run_copy) == [] and _beside(link) == []
    with RunLock(run_copy, "report"):  # one lock whichever name the run is reached by
        with pytest.raises(RunDirError, match="another report"):
            RunLock(link, "benchmark").__enter__()


def test_a_symlink_inside_a_run_is_a_problem(run_copy, tmp_path):
    """A linked folder hides its files from the walk for unlisted ones, though listed files are read through it."""
    from pipeline.artifacts import RunChangedError, check_unchanged

    outside = tmp_path / "outside"
    shutil.move(run_copy / "samples", outside)
    (outside / "planted.png").write_bytes(b"not the build's")
    (run_copy / "samples").symlink_to(outside)
    problems = verify_path(run_copy)
    assert problems == ["samples: a symbolic link; a run holds only the files and folders its build wrote"], problems
    with pytest.raises(RunChangedError, match="samples: a symbolic link"):
        check_unchanged(run_copy, "bundle")


UPDATES = {"report": [], "benchmark": ["--runs", "300", "--warmup", "5", "--threads", "1"], "analyze": []}


@pytest.mark.slow
def test_interrupting_report_benchmark_analyze_leaves_a_run_that_verifies(run_copy):
    """SIGINT and SIGKILL at an early and a late moment of each command that changes a finished run.

    The moments are fractions of each command's own duration, timed alone first, so the signals land
    mid-command on a quiet machine as on a loaded one (two commands run at once below: slower, never
    faster, than alone). Both are counted from the moment the command takes the run's lock: before that
    the interpreter is importing, which takes from 0.3 s to 2 s by the machine's load, and nothing is touched.
    """
    base = run_copy.parent

    def started(cmd: str, run: Path) -> subprocess.Popen:
        """The command, once it holds the run's lock (or has ended)."""
        proc = subprocess.Popen([*PIPELINE, cmd, str(run), *UPDATES[cmd]], env=ENV, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        lock = run.parent / f".{run.name}.lock"
        while not lock.exists() and proc.poll() is None:
            time.sleep(0.005)
        return proc

    def timed(cmd: str) -> float:
        run = base / f"t-{cmd}"
        shutil.copytree(run_copy, run)
        proc = started(cmd, run)
        t0 = time.perf_counter()
        proc.communicate(timeout=600)
        assert proc.returncode == 0, cmd
        return time.perf_counter() - t0

    durations = {cmd: timed(cmd) for cmd in UPDATES}
    # Each signal once per command, one early and one late in it (every interruption costs a command and a
    # follow-up report, each a TensorFlow start).
    plans = [(cmd, fraction * durations[cmd], sig) for cmd in UPDATES for fraction, sig in
             ((0.3, signal.SIGINT), (0.7, signal.SIGKILL))]

    def one(i_plan):
        i, (cmd, delay, sig) = i_plan
        run = base / f"u{i}"
        shutil.copytree(run_copy, run)
        proc = started(cmd, run)
        time.sleep(delay)
        hit = proc.poll() is None
        if hit:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=600)
        if sig == signal.SIGINT and hit and proc.returncode != 0:
            assert "the run is unchanged" in err and "--resume" not in err and "Traceback" not in err, err[-2000:]
        # The next process that takes the lock clears what a killed one left beside the run.
        follow = subprocess.run([*PIPELINE, "report", str(run)], env=ENV, capture_output=True, text=True,
                                timeout=600)
        problems = verify_path(run)
        return cmd, sig.name, round(delay, 2), hit, proc.returncode, problems, follow.returncode, _beside(run)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, enumerate(plans)))
    print(durations, *results, sep="\n")
    for cmd, sig, _delay, _hit, _rc, problems, follow_rc, beside in results:
        assert problems == [] and follow_rc == 0 and beside == [], (cmd, sig, problems, beside)
    # Timed alone, so nearly every signal reaches a running command; one may still miss when the
    # machine's load drops between the timing and the signal.
    assert sum(hit for _, _, _, hit, *_ in results) >= len(plans) - 1, results


def test_a_command_started_with_sigint_ignored_keeps_ignoring_it(run_copy):
    """`nohup pipeline ...` or a script's background job: Ctrl-C to the terminal is not meant for it."""
    proc = subprocess.Popen([*PIPELINE, "analyze", str(run_copy)], env=ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    time.sleep(1.0)
    assert proc.poll() is None, "analyze finished before the signal; the test needs a longer command"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert verify_path(run_copy) == []


# ---------------------------------------------------------------- resume, with real builds

@pytest.mark.slow
def test_two_concurrent_resumes(tmp_path):
    build = Build([*TINY, "--name", "twice"], tmp_path)
    running, rc = _kill_at(build, r"^converted int8", 0.0, signal.SIGKILL, tmp_path / "artifacts" / ".twice.partial")
    assert running and rc == -signal.SIGKILL
    a, b = Build(["--resume", "twice"], tmp_path), Build(["--resume", "twice"], tmp_path)
    rcs = sorted([a.finish(), b.finish()])
    assert rcs == [0, 1], (a.stderr[-2000:], b.stderr[-2000:])
    loser = a if "another build" in a.stderr else b
    assert "another build (pid" in loser.stderr and "Traceback" not in loser.stderr
    assert verify_path(tmp_path / "artifacts" / "twice") == [] and _beside(tmp_path / "artifacts" / "twice") == []


@pytest.mark.slow
def test_resume_notices_a_changed_keras_model(tmp_path):
    from keras import Input, Sequential, layers

    def save(seed):
        import keras

        keras.utils.set_random_seed(seed)
        Sequential([Input((28, 28, 1)), layers.Flatten(), layers.Dense(10, activation="softmax")]).save(
            tmp_path / "mine.keras")

    save(0)
    # TINY's measuring options only: --model and --epochs do not apply to a given model and are refused with it.
    build = Build(["--keras-model", str(tmp_path / "mine.keras"), "--dataset", "digits", "--runs", "20", "--warmup",
                   "2", "--threads", "1", "--name", "m"], tmp_path)
    running, rc = _kill_at(build, r"^accuracy +fp32", 0.0, signal.SIGKILL, tmp_path / "artifacts" / ".m.partial")
    assert running and rc == -signal.SIGKILL
    save(1)
    build = Build(["--resume", "m"], tmp_path)
    assert build.finish() == 0, build.stderr[-3000:]
    assert "using your model" in build.stdout and "converted int8" in build.stdout
    manifest = json.loads((tmp_path / "artifacts" / "m" / "manifest.json").read_text())
    assert "train" not in manifest["reused_stages"] and "convert" not in manifest["reused_stages"]


@pytest.mark.slow
def test_resumed_train_finishes_what_was_asked(tmp_path):
    env = {**ENV}
    # Four epochs: the signal, sent as epoch 1 ends, lands in epoch 2, and the resume has epochs left to train.
    proc = subprocess.Popen([*PIPELINE, "train", "--dataset", "digits", "--epochs", "4", "--name", "t"], cwd=tmp_path,
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:
        if line.startswith("epoch 1/"):  # epoch 2 is running: interrupt the training itself
            break
    # ... once epoch 1's checkpoint is on disk (written just after that line), so the resume can continue from it.
    checkpoint = tmp_path / "artifacts" / ".t.partial" / ".train-checkpoint.npz"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "pipeline build --resume" in err, err[-2000:]
    proc = subprocess.run([*PIPELINE, "build", "--resume", "t"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = tmp_path / "artifacts" / "t"
    assert (final / "model.keras").is_file() and not list(final.glob("*.tflite")) and not (final / "report.md").exists()
    assert verify_path(final) == []
    training = json.loads((final / "manifest.json").read_text())["training"]
    assert len(training["accuracy"]) == 4 and training.get("resumed_after_epoch", 0) >= 1, training


@pytest.mark.slow
def test_guard_is_a_stage_evaluated_once_and_resumed(tmp_path):
    build = Build([*TINY, "--analyze", "--name", "g"], tmp_path)
    running, rc = _kill_at(build, r"^latency +fp32", 0.0, signal.SIGKILL, tmp_path / "artifacts" / ".g.partial")
    assert running and rc == -signal.SIGKILL
    # The test split once, after the guard: one line per variant.
    assert sum(bool(re.match(r"accuracy +int8:", line)) for line in build.lines) == 1, build.stdout
    resumed = Build(["--resume", "g"], tmp_path)
    assert resumed.finish() == 0, resumed.stderr[-3000:]
    manifest = json.loads((tmp_path / "artifacts" / "g" / "manifest.json").read_text())
    assert {"train", "convert", "guard", "evaluate"} <= set(manifest["reused_stages"]), manifest["reused_stages"]
    assert not [line for line in resumed.lines if line.startswith("accuracy ")], resumed.stdout
    assert verify_path(tmp_path / "artifacts" / "g") == []


def test_int8_io_float_predicts_like_int8_io(tmp_path):
    """The same model and calibration with float or int8 I/O: the same predictions, through the real core."""
    import numpy as np

    from device.core import Model
    from pipeline.data import load_dataset

    for io, out in (("int8", "a"), ("float", "b")):
        result = invoke("build", *FAST, "--quantize", "int8", "--int8-io", io, "--no-benchmark",
                        "--out", tmp_path / out)
        assert result.exit_code == 0, result.output
    x = load_dataset("digits", seed=0).x_test
    a = Model(tmp_path / "a" / "model_int8.tflite").predict(x)
    b = Model(tmp_path / "b" / "model_int8.tflite").predict(x)
    assert Model(tmp_path / "a" / "model_int8.tflite").input.dtype == np.int8
    assert Model(tmp_path / "b" / "model_int8.tflite").input.dtype == np.float32
    assert (a.argmax(1) == b.argmax(1)).mean() == 1.0
    assert np.abs(a - b).max() <= 1 / 256 + 1e-6  # at most one step of the int8 output's scale
