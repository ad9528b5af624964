"""Robustness: tampered runs and bundles are caught, interrupted builds leave nothing that looks
finished, resumed builds reuse what verified, concurrent builds do not collide, and a model that
crashes the interpreter is an error message, not a dead runner.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from device import integrity
from pipeline.verify import verify_path

REPO = Path(__file__).resolve().parent.parent
RUNNER = REPO / "device" / "runner.py"
PIPELINE = [sys.executable, "-m", "pipeline.cli"]
# Tiny but complete: training, two conversions, evaluation, a short benchmark, the report. The MLP: every
# stage and file of a build as with the CNN, at a fraction of its training and conversion time.
TINY = ["--dataset", "digits", "--model", "mnist-mlp", "--epochs", "2", "--runs", "20", "--warmup", "2",
        "--threads", "1"]
TINY_CNN = ["--dataset", "digits", "--epochs", "2", "--runs", "20", "--warmup", "2", "--threads", "1"]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error: ", "Error: "))]


# ---------------------------------------------------------------- verify: run directories

@pytest.fixture
def run_copy(mnist_run, tmp_path) -> Path:
    dest = tmp_path / mnist_run.name
    shutil.copytree(mnist_run, dest)
    return dest


def test_finished_run_verifies(mnist_run):
    assert verify_path(mnist_run) == []
    proc = subprocess.run([*PIPELINE, "verify", str(mnist_run), "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"kind": "verify", "schema": 1, "path": str(mnist_run), "ok": True,
                                       "problems": []}


def _flip(path: Path, at: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _rehash(run: Path, name: str) -> None:
    """Make the manifest agree with a file again, so only the deeper check can catch the change."""
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": (run / name).stat().st_size, "sha256": integrity.sha256_file(run / name)}
    (run / "manifest.json").write_text(json.dumps(manifest))


TAMPERING = {
    "model byte flipped": (lambda r: _flip(r / "model_int8.tflite", 200), "model_int8.tflite: sha256"),
    "model truncated": (lambda r: (r / "model_fp32.tflite").write_bytes((r / "model_fp32.tflite").read_bytes()[:5000]),
                        "model_fp32.tflite: 5000 bytes"),
    "model deleted": (lambda r: (r / "model_dynamic.tflite").unlink(), "model_dynamic.tflite: missing"),
    "report edited": (lambda r: (r / "report.md").write_text("all good\n"), "report.md:"),
    "sample deleted": (lambda r: next((r / "samples").glob("*.png")).unlink(), "samples/"),
    "stray model added": (lambda r: shutil.copy(r / "model_int8.tflite", r / "model_extra.tflite"),
                          "model_extra.tflite: present but not listed"),
    "stray file in a subfolder": (lambda r: (r / "samples" / "x.png").write_bytes(b"x"), "samples/x.png: present"),
    "manifest deleted": (lambda r: (r / "manifest.json").unlink(), "manifest.json: missing"),
    "manifest garbled": (lambda r: (r / "manifest.json").write_text("{not json"), "manifest.json: not readable"),
    "manifest without file table": (
        lambda r: (r / "manifest.json").write_text(json.dumps({"schema": 1})), "has no file table"),
    "manifest path escapes": (
        lambda r: (r / "manifest.json").write_text(json.dumps(
            {"files": {"../../etc/passwd": {"bytes": 1, "sha256": "0" * 64}}})), "outside the run directory"),
    # The manifest is made to agree with the changed file: now only the metadata check can catch it.
    "metadata scale changed": (
        lambda r: (_edit_json(r / "metadata.json", lambda m: m["models"]["model_int8.tflite"]["input"].update(
            scale=0.5)), _rehash(r, "metadata.json")), "model_int8.tflite: input tensor scale differ"),
    "metadata sha256 removed": (
        lambda r: (_edit_json(r / "metadata.json", lambda m: m["models"]["model_int8.tflite"].pop("sha256")),
                   _rehash(r, "metadata.json")), "model_int8.tflite: the metadata records no sha256"),
    "model and manifest changed together": (
        lambda r: (_flip(r / "model_int8.tflite", 200), _rehash(r, "model_int8.tflite")),
        "in the metadata"),  # metadata.json still holds the built model's sha256
}


def _edit_json(path: Path, fn) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampered_run_is_caught(run_copy, case):
    tamper, expected = TAMPERING[case]
    tamper(run_copy)
    problems = verify_path(run_copy)
    assert problems, case
    assert any(expected in p for p in problems), (case, problems)


def test_verify_cli_lists_problems_and_exits_1(run_copy):
    _flip(run_copy / "model_int8.tflite", 300)
    (run_copy / "notes.txt").write_text("mine")
    proc = subprocess.run([*PIPELINE, "verify", str(run_copy)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "model_int8.tflite: sha256" in proc.stderr and "notes.txt: present but not listed" in proc.stderr


def test_hidden_files_are_not_part_of_a_run(run_copy):
    # Editors and file managers drop these; the manifest never lists hidden files, so they do not count.
    (run_copy / ".DS_Store").write_bytes(b"\0")
    assert verify_path(run_copy) == []


# ---------------------------------------------------------------- verify: bundles

@pytest.fixture
def bundle(mnist_run, tmp_path) -> Path:
    from pipeline.ship.bundle import make_bundle

    return make_bundle(mnist_run, tmp_path / "b.tar.gz")


def _rewrite_bundle(src: Path, dest: Path, change) -> Path:
    """Copy a bundle member by member; change(name, data) returns new bytes, or None to drop it."""
    with tarfile.open(src, "r:gz") as tin, tarfile.open(dest, "w:gz") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read() if m.isfile() else None
            if data is not None:
                data = change(m.name, data)
                if data is None:
                    continue
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data) if data is not None else None)
    return dest


def test_bundle_verifies(bundle):
    assert verify_path(bundle) == []


@pytest.mark.parametrize("case,change,expected", [
    ("model flipped", lambda n, d: d[:-1] + bytes([d[-1] ^ 1]) if n == "model_int8.tflite" else d, "sha256"),
    ("model cut short", lambda n, d: d[:1000] if n == "model_fp32.tflite" else d, "1000 bytes"),
    ("model dropped", lambda n, d: None if n == "model_int8.tflite" else d, "model_int8.tflite: missing"),
    ("runner dropped", lambda n, d: None if n == "device/runner.py" else d, "device/runner.py: missing"),
    ("metadata dropped", lambda n, d: None if n == "metadata.json" else d, "metadata.json: missing"),
    ("metadata garbled", lambda n, d: b"{" if n == "metadata.json" else d, "not readable JSON"),
])
def test_tampered_bundle_is_caught_on_host_and_device(bundle, tmp_path, case, change, expected):
    bad = _rewrite_bundle(bundle, tmp_path / "bad.tar.gz", change)
    problems = verify_path(bad)
    assert any(expected in p for p in problems), (case, problems)
    # The runner makes the same check on the device when it unpacks the bundle.
    proc = subprocess.run([sys.executable, str(RUNNER), "unpack", str(bad), str(tmp_path / "unpacked"), "--json"],
                          capture_output=True, text=True, timeout=120)
    if case != "runner dropped":  # the runner checks models and metadata; the host also checks the runner's files
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert any(expected in p for p in json.loads(proc.stdout)["problems"]), proc.stdout


def test_not_a_bundle(tmp_path):
    (tmp_path / "x.tar.gz").write_bytes(b"\x1f\x8b garbage")
    assert "not a readable .tar.gz bundle" in verify_path(tmp_path / "x.tar.gz")[0]
    assert "no such run directory or bundle" in verify_path(tmp_path / "missing")[0]


def test_bundle_escaping_paths_refused(tmp_path):
    with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    problems = verify_path(tmp_path / "evil.tar.gz")
    assert len(problems) == 1 and "refused" in problems[0]
    assert not (tmp_path / "evil.txt").exists()


# ---------------------------------------------------------------- a model that crashes the interpreter

@pytest.fixture(scope="module")
def lying_models(tmp_path_factory, mnist_run) -> list[Path]:
    """Structurally valid models (the flatbuffer verifier accepts them) in which one operator's
    required input is marked optional (-1). The interpreter then reads memory it never set: depending
    on what lies there, it rejects the model or dies of SIGSEGV."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_fuzz import FlatModel, crafted_models

    folder = tmp_path_factory.mktemp("lying")
    seed = (mnist_run / "model_int8.tflite").read_bytes()
    paths = []
    for label, data in crafted_models(seed, FlatModel(seed)):
        if label.startswith("optional@"):
            paths.append(folder / f"{label}.tflite")
            paths[-1].write_bytes(data)
    return paths


def test_interpreter_crash_is_a_clean_error(lying_models):
    crashed = 0
    for model in lying_models:
        proc = subprocess.run([sys.executable, str(RUNNER), "info", "--model", str(model)], capture_output=True,
                              text=True, timeout=120)
        errors = _error_lines(proc.stderr)
        assert proc.returncode == 1 and len(errors) == 1 and model.name in errors[0], (model, proc.stderr)
        assert proc.stdout == "" and "Traceback" not in proc.stderr
        if "the interpreter crashed (SIG" in errors[0]:
            crashed += 1
            break  # the isolation worked where it was needed; enough for a quick test (test_fuzz has more)
    if not crashed:
        pytest.skip(f"the interpreter survived all {len(lying_models)} lying models this time")


def test_child_crash_becomes_one_error_line(capfd):
    """The isolation itself, deterministically: a command whose process dies of a signal."""
    import argparse

    from device import runner

    def die(args):
        import faulthandler

        faulthandler.disable()  # pytest's would print a stack dump from the child
        os.kill(os.getpid(), signal.SIGSEGV)

    def fine(args):
        return {"ok": True, "said": "hello"}

    assert runner._in_child(argparse.Namespace(fn=die, model=Path("m.tflite"), json=True, command="info")) == 1
    out, err = capfd.readouterr()
    assert out == "" and err.strip() == ("error: m.tflite: the interpreter crashed (SIGSEGV) on this model; the file "
                                         "is damaged or malicious (no metadata.json beside it records a sha256 to "
                                         "check it against)")
    assert runner._in_child(argparse.Namespace(fn=fine, model=Path("m.tflite"), json=True, command="info")) == 0
    out, err = capfd.readouterr()
    assert json.loads(out) == {"ok": True, "said": "hello"} and err == ""


def test_unverified_model_runs_isolated_and_still_works(mnist_run, tmp_path):
    """Isolation must not change results: a lone copy of the model classifies exactly like the original."""
    lone = tmp_path / "lone.tflite"
    shutil.copy(mnist_run / "model_int8.tflite", lone)
    digits = sorted((mnist_run / "samples").glob("*.png"))[:3]
    outs = []
    for model in (mnist_run / "model_int8.tflite", lone):
        proc = subprocess.run([sys.executable, str(RUNNER), "classify", "--json", "--model", str(model),
                               *map(str, digits)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outs.append([r["top"] for r in json.loads(proc.stdout)["results"]])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("to", ["group", "parent"])
def test_ctrl_c_stops_an_isolated_command_once(mnist_run, tmp_path, to):
    """Ctrl-C signals the whole process group; `kill -INT` only the runner. Either way: one clean line."""
    lone = tmp_path / "lone.tflite"
    shutil.copy(mnist_run / "model_int8.tflite", lone)
    proc = subprocess.Popen([sys.executable, str(RUNNER), "bench", "--model", str(lone), "--runs", "100000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stderr = []
    for line in proc.stderr:  # the child has loaded the model (and warned it has no metadata): now measuring
        stderr.append(line)
        if line.startswith("warning:"):
            break
    time.sleep(0.2)
    if to == "group":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    out, rest = proc.communicate(timeout=60)
    stderr = "".join(stderr) + rest
    assert proc.returncode == 130 and out == "", (proc.returncode, stderr)
    assert _error_lines(stderr) == ["error: interrupted"] and "Traceback" not in stderr, stderr


def test_verify_never_loads_a_model_it_cannot_check(run_copy, lying_models):
    # Replace a model and drop its hash from the metadata: verify must refuse, not load (and crash on) it.
    shutil.copy(lying_models[0], run_copy / "model_int8.tflite")
    _edit_json(run_copy / "metadata.json", lambda m: m["models"]["model_int8.tflite"].pop("sha256"))
    proc = subprocess.run([sys.executable, str(RUNNER), "verify", str(run_copy), "--json"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert any("records no sha256" in p for p in json.loads(proc.stdout)["problems"])


# ---------------------------------------------------------------- interrupted builds

class Build:
    """A `pipeline build` subprocess whose stdout is watched line by line for stage markers."""

    def __init__(self, args: list[str], cwd: Path):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.proc = subprocess.Popen([*PIPELINE, "build", *args], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self.stderr = ""
        self._seen = threading.Condition()
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_stdout(self):
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def _read_stderr(self):
        self.stderr = self.proc.stderr.read()

    # Limits, not waits (both poll): a late marker can take minutes on a machine shared with other jobs.
    def wait_for(self, pattern: str, timeout: float = 600) -> bool:
        """True once a stdout line matches; False if the build ended (or timed out) first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                if any(rx.search(line) for line in self.lines):
                    return True
                if self.proc.poll() is not None and not self._threads[0].is_alive():
                    return False
                if not self._seen.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                    if time.monotonic() > deadline:
                        return False

    def finish(self, timeout: float = 600) -> int:
        rc = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=10)
        return rc

    @property
    def stdout(self) -> str:
        return "\n".join(self.lines)


# (stage, marker, seconds after it, signal). A marker is a regex for a line on stdout, or
# "done:STAGE" once the staging folder's progress records STAGE as finished (the report stage
# prints nothing until it is done). Spread over every stage; the times after a marker land inside
# the work that follows it (calibration after "converted fp32", memory after "latency int8", ...).
KILL_POINTS = [
    ("setup", r"^data: ", 0.0, signal.SIGKILL),
    ("training", r"^training ", 0.3, signal.SIGINT),
    ("training", r"^epoch 1/", 0.1, signal.SIGKILL),  # the line that ends epoch 1: epoch 2 is running
    ("conversion", r"^converted fp32", 0.0, signal.SIGINT),
    ("conversion", r"^converted fp32", 0.25, signal.SIGKILL),
    ("metadata", r"^converted int8", 0.0, signal.SIGKILL),
    ("evaluation", r"^accuracy +fp32", 0.0, signal.SIGINT),
    ("benchmark", r"^latency +fp32", 0.0, signal.SIGKILL),
    ("benchmark", r"^latency +int8", 0.05, signal.SIGINT),
    ("report", "done:benchmark", 0.0, signal.SIGINT),
    ("report", "done:benchmark", 0.2, signal.SIGKILL),
    ("commit", r"^report: wrote", 0.0, signal.SIGKILL),
    ("commit", r"^report: wrote", 0.0, signal.SIGINT),
]
# One run interrupted again and again, each time resumed: every resume must reuse more.
CHAIN = [
    ("conversion", r"^converted fp32", 0.1, signal.SIGKILL),
    ("evaluation", r"^accuracy +int8", 0.0, signal.SIGINT),
    ("benchmark", r"^latency +fp32", 0.0, signal.SIGKILL),
    # At once: on a fast CPU (AVX-512) the tiny CNN's whole report took less than 0.2 s, and the SIGINT came
    # after the build had finished (exit 0).
    ("report", "done:benchmark", 0.0, signal.SIGINT),
]


def _kill_at(build: Build, marker: str, delay: float, sig: int, staging: Path) -> tuple[bool, int]:
    """Signal the build `delay` s after `marker`; returns (was it still running, exit code)."""
    if marker.startswith("done:"):
        seen = _wait_for_stage(build, staging / ".progress.json", marker[5:])
    else:
        seen = build.wait_for(marker)
    assert seen, f"marker {marker!r} never appeared:\n{build.stdout}\n{build.stderr[-2000:]}"
    if delay:
        time.sleep(delay)
    running = build.proc.poll() is None
    if running:
        build.proc.send_signal(sig)
    return running, build.finish()


def _wait_for_stage(build: Build, progress: Path, stage: str, timeout: float = 600) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and build.proc.poll() is None:
        try:
            if stage in json.loads(progress.read_text()):
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    return False


def _check_after_kill(build: Build, sig: int, rc: int, final: Path, where: str) -> str:
    """The interrupted build died the way it should, and left no run that fails verification."""
    if sig == signal.SIGKILL:
        assert rc in (-signal.SIGKILL, 0), (where, rc)
    else:
        # cli.py turns KeyboardInterrupt into one line; no traceback, ever.
        assert "Traceback" not in build.stderr, (where, build.stderr[-3000:])
        if rc != 0:
            assert rc == 130 and "interrupted" in build.stderr, (where, rc, build.stderr[-2000:])
    if not final.exists():
        return "absent"
    problems = verify_path(final)
    assert problems == [], (where, problems)
    return "verified"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("interrupt")


@pytest.fixture(scope="module")
def interrupted(workdir) -> dict:
    """Every KILL_POINT, two builds at a time: {run name: (stage, signal, was it signalled, exit code, run
    state, stages its staging folder records as done)}. The resume tests carry on from these builds."""
    def one(i_point):
        i, (stage, marker, delay, sig) = i_point
        name = f"k{i:02d}-{stage}"
        build = Build([*TINY, "--name", name], workdir)
        staging = workdir / "artifacts" / f".{name}.partial"
        running, rc = _kill_at(build, marker, delay, sig, staging)
        state = _check_after_kill(build, sig, rc, workdir / "artifacts" / name, f"{name} {sig.name}")
        done = []
        if state == "absent":
            # Nothing looks finished, and no process holds the run's lock any more.
            lock = workdir / "artifacts" / f".{name}.lock"
            if lock.exists():
                with open(lock) as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if (staging / ".progress.json").exists():
                done = list(json.loads((staging / ".progress.json").read_text()))
        return name, (stage, sig.name, running, rc, state, done)

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, enumerate(KILL_POINTS)))


@pytest.mark.slow
def test_interrupted_builds_leave_nothing_that_verifies_wrongly(interrupted):
    results = list(interrupted.values())
    print("\ninterruption points:")
    for r in results:
        print(f"  {r[0]:<11} {r[1]:<8} {'signalled' if r[2] else 'finished first'}, exit {r[3]}, run {r[4]}, "
              f"stages done: {', '.join(r[5]) or '-'}")
    stopped = [r for r in results if r[2] and r[3] != 0]
    assert len(stopped) >= 10, results
    assert {r[0] for r in stopped} >= {"training", "conversion", "evaluation", "benchmark", "report"}
    assert sum(r[4] == "absent" for r in results) >= 8  # most kills land before the commit


@pytest.mark.slow
def test_resume_after_repeated_interruptions(workdir):
    # On the CNN it was written for: with the MLP, one run's SIGINT 0.2 s into the report of a resumed
    # build ended in exit 0 instead of a stop (not yet understood; see the branch's report).
    name = "chain"
    final = workdir / "artifacts" / name
    staging = workdir / "artifacts" / f".{name}.partial"
    build = Build([*TINY_CNN, "--name", name], workdir)
    for n, (stage, marker, delay, sig) in enumerate(CHAIN):
        running, rc = _kill_at(build, marker, delay, sig, staging)
        assert running and rc != 0, (stage, rc, build.stdout)
        assert _check_after_kill(build, sig, rc, final, f"chain {stage}") == "absent"
        assert (staging / "config.json").is_file()
        if n:
            assert "resuming the interrupted build" in build.stdout
            assert "training " not in build.stdout  # the trained model was reused, not trained again
        # by name the first times, by directory the last
        target = name if n < len(CHAIN) - 1 else str(Path("artifacts") / name)
        build = Build(["--resume", target], workdir)
    rc = build.finish()
    assert rc == 0, build.stdout + build.stderr[-3000:]
    assert "resuming the interrupted build" in build.stdout
    assert "reused from the interrupted build: train, convert, evaluate, benchmark" in build.stdout, build.stdout
    assert "training " not in build.stdout and "converted" not in build.stdout and "latency" not in build.stdout
    assert verify_path(final) == []
    assert not staging.exists()
    assert not list(final.rglob(".*"))  # no lock, progress or temporary file made it into the run
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["reused_stages"] == ["train", "convert", "evaluate", "benchmark"]
    assert manifest["config"]["epochs"] == 2 and manifest["config"]["bench_runs"] == 20  # the saved options

    proc = subprocess.run([*PIPELINE, "build", "--resume", name], cwd=workdir, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "already complete" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_resume_rejects_a_damaged_stage(workdir, interrupted):
    """A finished stage whose file changed on disk is done again, and so is every stage built on it:
    a model trained again means converting again, even though the old .tflite files are intact."""
    # The build KILL_POINTS interrupted as it began evaluating: training and conversion were done.
    name = "k06-evaluation"
    assert KILL_POINTS[6][1] == r"^accuracy +fp32"
    stage, _, running, rc, state, done = interrupted[name]
    assert running and rc != 0 and state == "absent", interrupted[name]
    assert set(done) == {"train", "convert"}, done
    _flip(workdir / "artifacts" / f".{name}.partial" / "model.keras", 100)
    build = Build(["--resume", name], workdir)
    assert build.finish() == 0, build.stderr[-3000:]
    assert "nothing from the interrupted build could be reused" in build.stdout
    assert "training " in build.stdout and "converted int8" in build.stdout
    assert verify_path(workdir / "artifacts" / name) == []


# ---------------------------------------------------------------- concurrency

@pytest.mark.slow
def test_concurrent_builds(tmp_path):
    # Different names into one artifacts folder at once: both finish and verify.
    a, b = Build([*TINY, "--name", "one"], tmp_path), Build([*TINY, "--name", "two"], tmp_path)

    # Meanwhile the same name again: it sees the first's lock and refuses in one line; the first is unharmed.
    assert a.wait_for(r"^data: ")  # printed once the first holds the run directory
    same = Build([*TINY, "--name", "one"], tmp_path)
    assert same.finish() == 1
    errors = _error_lines(same.stderr)
    assert len(errors) == 1 and "another build" in errors[0] and "is writing" in errors[0], same.stderr
    assert "Traceback" not in same.stderr

    assert a.finish() == 0, a.stderr[-3000:]
    assert b.finish() == 0, b.stderr[-3000:]
    assert verify_path(tmp_path / "artifacts" / "one") == [] and verify_path(tmp_path / "artifacts" / "two") == []
