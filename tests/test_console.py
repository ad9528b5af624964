"""The console a person sees: only edgepipe's lines, progress, native output kept in build.log."""
from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Lines TensorFlow, its converter and LiteRT print themselves (issue 14); none may reach the terminal.
NATIVE = ("All log messages before absl::InitializeLog", "oneDNN custom operations", "Could not find cuda drivers",
          "failed call to cuInit", "use_unbounded_threadpool", "fully_quantize:", "XNNPACK delegate",
          "cudart_stub", "I0000 ", "W0000 ", "E0000 ")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n
pytestmark = pytest.mark.slow  # seven real builds and trainings in subprocesses, about two minutes

BUILD = ["build", "--dataset", "digits", "--epochs", "1", "--runs", "5", "--warmup", "1", "--threads", "1"]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def _pipeline(*args, prelude: str = "", **env) -> subprocess.CompletedProcess:
    code = f"{prelude}\nfrom pipeline.cli import main\nmain({list(map(str, args))!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=_env(**env), cwd=REPO)


@pytest.fixture(scope="module")
def quiet_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("console") / "run"
    return out, _pipeline(*BUILD, "--out", out, TERM="dumb")


def test_build_shows_only_edgepipe_lines(quiet_build):
    out, proc = quiet_build
    assert proc.returncode == 0, proc.stderr
    shown = proc.stdout + proc.stderr
    assert [n for n in NATIVE if n in shown] == []
    assert "training epoch 1/1" in proc.stdout and f"wrote {out}" in proc.stdout and "accuracy" in proc.stdout
    # The native lines were not lost: build.log has them beside edgepipe's own, time-stamped lines.
    log = (out / "build.log").read_text()
    assert "All log messages before absl::InitializeLog" in log and "fully_quantize:" in log
    assert re.search(r"^\[edgepipe \d\d:\d\d:\d\d\] wrote ", log, re.M)


def test_plain_output_has_no_control_characters(quiet_build):
    _, proc = quiet_build
    assert not CONTROL.search(proc.stdout) and not CONTROL.search(proc.stderr)
    # Not a terminal: one line per finished stage instead of bars.
    for stage in ("converting", "evaluating", "benchmark @1 thread(s)"):
        assert [line for line in proc.stdout.splitlines() if line.startswith(stage + ":")], stage


def test_the_log_does_not_break_verify(quiet_build):
    out, _ = quiet_build
    proc = _pipeline("verify", out)
    assert proc.returncode == 0 and proc.stdout.strip() == f"{out}: verified", proc.stdout + proc.stderr


def test_verbose_shows_native_output_live(tmp_path):
    proc = _pipeline("train", "--dataset", "digits", "--epochs", "1", "--out", tmp_path / "run", "-v")
    assert proc.returncode == 0, proc.stderr
    assert "All log messages before absl::InitializeLog" in proc.stdout + proc.stderr
    assert "epoch 1/1:" in proc.stdout


def test_terminal_gets_live_progress_and_still_no_native_lines(tmp_path):
    leader, follower = pty.openpty()
    args = ["train", "--dataset", "digits", "--epochs", "2", "--out", str(tmp_path / "run")]
    code = f"from pipeline.cli import main\nmain({args!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=follower, stderr=follower, stdin=subprocess.DEVNULL,
                            env=_env(TERM="xterm-256color", COLUMNS="120"), cwd=REPO)
    os.close(follower)
    seen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 300)
        if not ready:
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=60) == 0, seen.decode(errors="replace")
    text = seen.decode(errors="replace")
    assert "ETA" in text and "steps" in text and "\x1b[" in text  # a live bar, redrawn in place
    assert "epoch 2/2:" in text
    assert [n for n in NATIVE if n in text] == []


def test_a_failure_ends_in_one_line_that_names_the_log(tmp_path):
    # A bug inside the converter (not the user's mistake): one line, the traceback in the log.
    prelude = ("import pipeline.convert as c\n"
               "def broken(*a, **k):\n    raise RuntimeError('converter exploded')\n"
               "c.convert = broken")
    proc = _pipeline(*BUILD, "--out", tmp_path / "run", "--no-benchmark", prelude=prelude)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()
    assert len(last) == 1 and "converter exploded" in last[0], proc.stderr
    log = Path(re.search(r"are in (\S+\.log)", last[0]).group(1))
    # Training had finished: the staging folder stays for --resume, with the log in it.
    assert f"`pipeline build --resume {tmp_path}/run` continues from the last finished stage" in last[0]
    assert log == tmp_path / ".run.partial" / "build.log" and log.is_file()
    text = log.read_text()
    assert "Traceback" in text and "RuntimeError: converter exploded" in text and "training epoch" in text
    assert [n for n in NATIVE if n in proc.stdout + proc.stderr] == []


def test_a_user_error_is_one_line_and_leaves_no_log(tmp_path):
    before = set(Path("/tmp").glob("edgepipe-*.log"))
    proc = _pipeline("build", "--dataset", "mnist", "--data-dir", tmp_path, "--out", tmp_path / "run")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert set(Path("/tmp").glob("edgepipe-*.log")) <= before
