"""Fail closed (issue 18: 1, 2, 10, 12): a run changed since it was written is refused by every command
that would record it again; an unreadable guard record delivers nothing and the runner does not guess;
bundles unpack within limits and nothing is skipped in silence; the umask is read, never set; and
device/ has no import cycle (issue 21).
"""
from __future__ import annotations

import ast
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from device import integrity
from pipeline.artifacts import updating

REPO = Path(__file__).resolve().parent.parent
PIPELINE = [sys.executable, "-m", "pipeline.cli"]
RUNNER = REPO / "device" / "runner.py"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
MIB = 1 << 20


def _run(*args, env=None, cwd=None, preexec_fn=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env=env or ENV, cwd=cwd, preexec_fn=preexec_fn)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("Error: ", "error: "))]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A finished run with two quantized variants (so a run has two McNemar tests), by the real command."""
    out = tmp_path_factory.mktemp("integrity") / "tiny"
    proc = _run(*PIPELINE, "build", "--dataset", "digits", "--epochs", "1", "--quantize", "int8,dynamic",
                "--runs", "5", "--warmup", "1", "--threads", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def run(built, tmp_path) -> Path:
    dest = tmp_path / "runs" / "tiny"  # alone in its folder, so anything written beside it shows
    shutil.copytree(built, dest)
    return dest


def _flip(path: Path, at: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _agree(run: Path, name: str) -> None:
    """Make the manifest list a file as it is now: a run written that way, not edited afterwards."""
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": (run / name).stat().st_size, "sha256": integrity.sha256_file(run / name)}
    (run / "manifest.json").write_text(json.dumps(manifest))


# ---------------------------------------------------------------- 1: a changed run is never recorded again

UPDATING = {
    "report": ["report"],
    "benchmark": ["benchmark", "--runs", "5", "--warmup", "1", "--threads", "1"],
    "analyze": ["analyze"],
    "export": ["export"],
    "deploy": ["deploy", "--device", "pi@127.0.0.1:9"],  # refused before any connection is tried
}


# analyze imports Keras before it takes the run (some 30 s on a loaded machine).
@pytest.mark.parametrize("command", [pytest.param(c, marks=pytest.mark.slow) if c == "analyze" else c
                                     for c in UPDATING])
def test_a_command_refuses_a_run_edited_since_it_was_written(run, tmp_path, command):
    _flip(run / "labels.txt")
    manifest = (run / "manifest.json").read_bytes()
    args = UPDATING[command]
    env = {**ENV, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    proc = _run(*PIPELINE, args[0], run, *args[1:], env=env)
    errors = _errors(proc.stderr)
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert "labels.txt" in errors[0] and f"pipeline verify {run}" in errors[0] and "Traceback" not in proc.stderr
    # Nothing recorded, nothing half-written beside the run, no export folder.
    assert (run / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in run.parent.iterdir()) == ["tiny"]
    # `pipeline verify` still fails, with the same line the refusal gave.
    check = _run(*PIPELINE, "verify", run)
    assert check.returncode == 1
    line = next(x.strip()[2:] for x in check.stderr.splitlines() if x.strip().startswith("- labels.txt"))
    assert line in errors[0]


def test_report_on_an_intact_run_hashes_again_only_what_it_wrote(run, monkeypatch):
    from pipeline import artifacts
    from pipeline.report import render

    before = json.loads((run / "manifest.json").read_text())["files"]
    hashed = []
    with updating(run, "report", log=lambda *a: None) as (work, _):
        real = artifacts.sha256_file
        monkeypatch.setattr(artifacts, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
        render.render(work, log=lambda *a: None)
    written = {"report.json", "report.md", "report.html", "accuracy_vs_latency.png", "latency.png"}
    assert set(hashed) <= written | {p.name for p in run.glob("confusion_*.png")}, hashed
    assert "labels.txt" not in hashed and "model_int8.tflite" not in hashed
    after = json.loads((run / "manifest.json").read_text())["files"]
    assert after["labels.txt"] == before["labels.txt"] and after["model_int8.tflite"] == before["model_int8.tflite"]
    assert _run(*PIPELINE, "verify", run).returncode == 0


# ---------------------------------------------------------------- 2: the guard fails closed

@pytest.mark.parametrize("damage", ["truncated", "no guard entry", "deleted"])
def test_an_unreadable_guard_record_refuses_bundle_export_and_deploy(run, tmp_path, damage):
    analysis = run / "analysis.json"
    analysis.write_text('{"schema": 1, "guard": {"delivered": "int8-cle", "superseded": ["int8"]}}')
    _agree(run, "analysis.json")  # as if the build had written it so: the manifest agrees
    if damage == "truncated":
        analysis.write_text('{"schema": 1, "guard": {"delivered": "int8-cle", "supers')
        _agree(run, "analysis.json")
    elif damage == "no guard entry":
        analysis.write_text('{"schema": 1}')
        _agree(run, "analysis.json")
    else:
        analysis.unlink()
    env = {**ENV, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    for args in (["bundle", run, "--out", tmp_path / "b.tar.gz"], ["export", run],
                 ["deploy", run, "--device", "pi@127.0.0.1:9"]):
        proc = _run(*PIPELINE, *args, env=env)
        errors = _errors(proc.stderr)
        assert proc.returncode == 1 and len(errors) == 1, (args[0], proc.stderr[-3000:])
        assert "analysis.json" in errors[0] and "pipeline build --overwrite" in errors[0], errors[0]
    assert not (tmp_path / "b.tar.gz").exists() and sorted(p.name for p in run.parent.iterdir()) == ["tiny"]


def test_runner_refuses_to_guess_a_default_model(run, tmp_path):
    assert _run(*PIPELINE, "bundle", run, "--out", tmp_path / "b.tar.gz").returncode == 0
    assert _run(sys.executable, RUNNER, "unpack", tmp_path / "b.tar.gz", tmp_path / "pi").returncode == 0
    meta_path = tmp_path / "pi" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["default_model"]
    meta_path.write_text(json.dumps(meta))
    proc = _run(sys.executable, "device/runner.py", "info", cwd=tmp_path / "pi")
    errors = _errors(proc.stderr)
    assert proc.returncode == 1 and len(errors) == 1 and "default_model" in errors[0] and "--model" in errors[0]
    proc = _run(sys.executable, "device/runner.py", "info", "--model", "model_int8.tflite", cwd=tmp_path / "pi")
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> Path:
    """A run whose guard judged int8 against a 0 pp budget and tried every remedy, by the real command."""
    out = tmp_path_factory.mktemp("guarded") / "run"
    # Two epochs: one leaves mnist-cnn (with its dropout) near 60%, where no remedy holds 0 pp on the test split.
    proc = _run(*PIPELINE, "build", "--dataset", "digits", "--epochs", "2", "--fallback", "auto",
                "--max-accuracy-drop", "0", "--no-benchmark", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_a_guard_that_rejected_int8_without_a_remedy_delivers_fp32(guarded, tmp_path):
    from pipeline.guard import _verdict

    run = tmp_path / "runs" / "run"
    shutil.copytree(guarded, run)
    # The record the guard writes when no remedy met the budget (here QAT usually meets it, so its remedies
    # are marked over budget), recorded through the manifest as a step would: the run stays verifiable.
    with updating(run, "test", log=lambda *a: None) as (work, _):
        analysis = json.loads((work / "analysis.json").read_text())
        guard = analysis["guard"]
        assert guard["needed"] and guard["remedies"], guard
        tried = [{**r, "status": "over_budget"} if "accuracy" in r else r for r in guard["remedies"]]
        analysis["guard"] = _verdict(0.0, True, tried, False, guard["seconds"])
        assert analysis["guard"]["delivered"] is None and analysis["guard"]["superseded"] == []
        (work / "analysis.json").write_text(json.dumps(analysis))
    assert "verified" in _run(*PIPELINE, "verify", run).stdout
    written = analysis["guard"]["written"]

    proc = _run(*PIPELINE, "bundle", run, "--out", tmp_path / "b.tar.gz")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _run(sys.executable, RUNNER, "unpack", tmp_path / "b.tar.gz", tmp_path / "pi").returncode == 0
    meta = json.loads((tmp_path / "pi" / "metadata.json").read_text())
    assert meta["default_model"] == "model_fp32.tflite", meta["default_model"]
    assert not {"model_int8.tflite", *(f"model_{v}.tflite" for v in written)} & set(meta["models"])
    proc = _run(sys.executable, "device/runner.py", "eval", "samples/eval.npz", "--json", cwd=tmp_path / "pi")
    assert proc.returncode == 0 and json.loads(proc.stdout)["model"] == "model_fp32.tflite", proc.stderr[-2000:]

    assert _run(*PIPELINE, "report", run).returncode == 0
    assert json.loads((run / "report.json").read_text())["delivered"]["variant"] == "fp32"

    proc = _run(*PIPELINE, "export", run, "--out", tmp_path / "tflm")
    errors = _errors(proc.stderr)
    assert proc.returncode == 1 and len(errors) == 1 and "rejected int8" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "tflm").exists()


# ---------------------------------------------------------------- 11: Holm across a run's tests, said in the report

def test_report_adjusts_the_runs_mcnemar_tests_together_and_says_so(run):
    proc = _run(*PIPELINE, "report", run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    tests = {v["variant"]: v["mcnemar_vs_fp32"] for v in report["variants"] if v.get("mcnemar_vs_fp32")}
    assert sorted(tests) == ["dynamic", "int8"]
    for t in tests.values():
        assert t["tests"] == 2 and t["p_holm"] >= t["p_value"] and t["significant"] == (t["p_holm"] < 0.05)
    notes = [n["text"] for n in report["notes"] if n["kind"] == "accuracy_change"]
    assert len(notes) == 2 and all("after Holm's adjustment for the 2 variants" in n for n in notes), notes
    assert "Holm" in (run / "report.html").read_text() and "McNemar p (Holm)" in (run / "report.md").read_text()


# ---------------------------------------------------------------- 10: bundle extraction within limits

def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _left_beside(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}"))


@pytest.mark.parametrize("limit, members, says", [
    # A decompression bomb: 8 MiB of zeros is some 8 KB compressed.
    ({"max_member_bytes": MIB}, {"metadata.json": b"{}", "model.tflite": bytes(8 * MIB)},
     "'model.tflite' would unpack to 8,388,608 bytes, above the 1,048,576 byte limit"),
    ({"max_total_bytes": MIB}, {f"m{i}.bin": bytes(MIB // 2) for i in range(3)},
     "'m2.bin' takes the unpacked size above the 1,048,576 byte limit"),
    ({"max_members": 20}, {f"f{i}": b"x" for i in range(30)}, "more than 20 members"),
])
def test_extraction_refuses_what_exceeds_its_limits_before_writing(tmp_path, limit, members, says):
    archive = _tar(tmp_path / "evil.tar.gz", members)
    with pytest.raises(integrity.DeviceError, match="refused") as e:
        integrity.extract_bundle(archive, tmp_path / "dest", **limit)
    assert says in str(e.value)
    assert not (tmp_path / "dest").exists() and _left_beside(tmp_path / "dest") == []


def _sparse_bundle(tmp_path: Path) -> Path:
    """A real GNU tar archive with one sparse member of 4 GiB (a few KB on disk and in the archive)."""
    if shutil.which("tar") is None:
        pytest.skip("no `tar` on this machine to write a sparse member")
    src = tmp_path / "src"
    src.mkdir()
    (src / "metadata.json").write_text("{}")
    with open(src / "model.tflite", "wb") as f:
        f.truncate(4 << 30)
    if (src / "model.tflite").stat().st_blocks * 512 > MIB:
        pytest.skip(f"{tmp_path}'s file system cannot hold a sparse file, so a 4 GiB member cannot be made here")
    archive = tmp_path / "sparse.tar.gz"
    proc = _run("tar", "--sparse", "-czf", archive, "-C", src, "metadata.json", "model.tflite")
    assert proc.returncode == 0, proc.stderr
    assert archive.stat().st_size < MIB
    return archive


def _file_size_limit():
    # The old code would write 4 GiB of zeros: this limit turns that into a failed write, not a full disk.
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * MIB, 64 * MIB))


def test_a_4_gib_sparse_member_is_refused_by_runner_and_verify(tmp_path):
    archive = _sparse_bundle(tmp_path)
    dest = tmp_path / "dest"
    proc = _run(sys.executable, RUNNER, "unpack", archive, dest, preexec_fn=_file_size_limit)
    errors = _errors(proc.stderr)
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-2000:]
    assert "'model.tflite' would unpack to 4,294,967,296 bytes, above the" in errors[0]
    assert not dest.exists() and _left_beside(dest) == []
    proc = _run(*PIPELINE, "verify", archive, preexec_fn=_file_size_limit)
    assert proc.returncode == 1 and "would unpack to 4,294,967,296 bytes" in proc.stderr, proc.stderr[-2000:]


def test_board_helper_refuses_a_bad_member_rather_than_skipping_it(tmp_path, monkeypatch):
    from pipeline.boards import remote

    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        link = tarfile.TarInfo("device/runner.py")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(remote.AgentError, match="'device/runner.py' is not a file or folder"):
        remote._extract(str(archive), str(tmp_path / "out"), lambda n: n.startswith("device/"))
    assert not (tmp_path / "out").exists()

    bomb = _tar(tmp_path / "bomb.tar.gz", {"wheels/x.whl": bytes(8 * MIB)})
    monkeypatch.setattr(remote, "MAX_MEMBER_BYTES", MIB)
    with pytest.raises(remote.AgentError, match="'wheels/x.whl' would unpack to 8,388,608 bytes"):
        remote._extract(str(bomb), str(tmp_path / "out"), lambda n: n.startswith("wheels/"))
    assert not (tmp_path / "out").exists()


def test_board_helper_hashes_members_streaming(tmp_path):
    from pipeline.boards import remote

    archive = _tar(tmp_path / "b.tar.gz", {"model.tflite": bytes(32 * MIB)})
    (tmp_path / "unpacked").mkdir()
    (tmp_path / "unpacked" / "model.tflite").write_bytes(bytes(32 * MIB))
    tracemalloc.start()
    try:
        assert remote._compare_unpacked(str(archive), str(tmp_path / "unpacked")) == "same"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MIB, f"{peak:,} bytes held to hash a 32 MiB member"


def test_board_helper_has_the_runners_limits():
    from pipeline.boards import remote

    assert (remote.MAX_MEMBERS, remote.MAX_MEMBER_BYTES, remote.MAX_TOTAL_BYTES) == \
        (integrity.MAX_MEMBERS, integrity.MAX_MEMBER_BYTES, integrity.MAX_TOTAL_BYTES)


def _tree(root: Path) -> list[str]:
    """Every path under root with its kind, symbolic links not followed: what a refusal must leave as it was."""
    return sorted(f"{p.relative_to(root)} {'link' if p.is_symlink() else 'dir' if p.is_dir() else 'file'}"
                  for p in root.rglob("*"))


def test_unpack_refuses_a_destination_it_cannot_use_in_one_line(tmp_path):
    """Each was an OSError traceback: the current folder, a symbolic link (dangling or not), a folder under a
    file, a folder that cannot be written."""
    archive = _tar(tmp_path / "b.tar.gz", {"metadata.json": b"{}"})
    work = tmp_path / "work"
    (work / "empty").mkdir(parents=True)
    (work / "link").symlink_to("empty")
    (work / "dangling").symlink_to(tmp_path / "nowhere")
    (work / "afile").write_text("a user's file")
    cases = [(".", work / "empty", "is the current folder"), ("link", work, "is a symbolic link"),
             ("dangling", work, "is a symbolic link"), ("afile/sub/x", work, f"{work / 'afile'} is not a folder")]
    if Path("/sys").is_dir():  # even root cannot make a folder in sysfs
        cases.append(("/sys/edgepipe-unpack", work, "cannot unpack there"))
    before = _tree(work)
    for dest, cwd, says in cases:
        proc = _run(sys.executable, RUNNER, "unpack", archive, dest, cwd=cwd)
        errors = _errors(proc.stderr)
        assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr, (dest, proc.stderr)
        assert len(errors) == 1 and errors[0].startswith(f"error: {dest}: ") and says in errors[0], (dest, errors)
        assert _tree(work) == before, dest
    assert not Path("/sys/edgepipe-unpack").exists()


def test_unpack_leaves_nothing_when_refused_or_unverified(tmp_path):
    """docs/runner.md: a failure leaves nothing. A refused archive left the parent folders it had made; a
    bundle that unpacked but did not verify stayed in place."""
    evil = _tar(tmp_path / "evil.tar.gz", {"metadata.json": b"{}", "../escaped": b"x"})
    unverified = _tar(tmp_path / "b.tar.gz", {"metadata.json": b"{}"})
    for archive in (evil, unverified):
        proc = _run(sys.executable, RUNNER, "unpack", archive, tmp_path / "new" / "deep" / "pi", "--json")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "new").exists() and not (tmp_path / "escaped").exists(), archive
    out = json.loads(proc.stdout)  # the unverified one: the problems are still reported, in JSON and in text
    assert out["ok"] is False and "metadata.json: metadata has no 'preprocess' section" in out["problems"][0]
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    proc = _run(sys.executable, RUNNER, "unpack", unverified, empty)
    assert proc.returncode == 1 and proc.stdout.startswith(f"{empty}: PROBLEMS (nothing unpacked was kept)")
    assert list(empty.iterdir()) == [] and oct(empty.stat().st_mode & 0o777) == "0o700"  # as the user made it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tar.gz", "empty", "evil.tar.gz"]



def test_a_disk_that_cannot_take_the_bundle_is_said_as_such_not_blamed_on_the_archive(tmp_path):
    """A full disk read 'not a readable .tar.gz bundle': the user would fetch a good bundle again. The kernel
    refuses writes beyond RLIMIT_FSIZE with EFBIG (Python ignores SIGXFSZ), as a full disk refuses with ENOSPC."""
    archive = _tar(tmp_path / "b.tar.gz", {"metadata.json": b"{}", "model.tflite": bytes(4 * MIB)})
    dest = tmp_path / "pi"
    proc = _run(sys.executable, RUNNER, "unpack", archive, dest,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (MIB, MIB)))
    errors = _errors(proc.stderr)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and errors[0].startswith(f"error: {dest}: cannot write the unpacked model.tflite "
                                                     "(File too large); free space"), errors
    assert "not a readable" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tar.gz"]  # nothing half-written is left


# ---------------------------------------------------------------- 12: umask and /proc

UMASK_PROBE = """
import json, os, stat, sys
from pathlib import Path
os.umask(0o027)
from device import integrity
from pipeline import artifacts
calls, real = [], os.umask
os.umask = lambda mask: calls.append(oct(mask)) or real(mask)
dest = integrity.extract_bundle(Path(sys.argv[1]), Path(sys.argv[2]))
artifacts.atomic_write(dest / "written", b"x")
mode = lambda p: oct(stat.S_IMODE(p.stat().st_mode))
print(json.dumps({"calls": calls, "umask": integrity.UMASK, "folder": mode(dest), "file": mode(dest / "written"),
                  "member": mode(dest / "metadata.json")}))
"""


def test_umask_is_read_once_never_set(tmp_path):
    archive = _tar(tmp_path / "b.tar.gz", {"metadata.json": b"{}"})
    proc = _run(sys.executable, "-c", UMASK_PROBE, archive, tmp_path / "dest")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    # No thread can create a 0666 file while another reads the umask: nobody sets it to read it.
    assert out == {"calls": [], "umask": 0o027, "folder": "0o750", "file": "0o640", "member": "0o644"}


def test_peak_memory_closes_the_proc_file():
    proc = _run(sys.executable, "-X", "dev", "-W", "always::ResourceWarning", "-c",
                "from device.timing import peak_rss_mb; import gc; assert peak_rss_mb() > 0; gc.collect()")
    assert proc.returncode == 0 and "ResourceWarning" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------- issue 21: device/ imports downward only

def _device_imports() -> dict[str, set[str]]:
    """Each device module's imports (at any depth of the file, functions included)."""
    graph = {}
    for path in sorted((REPO / "device").glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names |= ({f"device.{a.name}" for a in node.names} if node.module == "device" else {node.module})
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        graph[f"device.{path.stem}"] = names
    return graph


def test_device_modules_have_no_import_cycle_and_need_nothing_from_pipeline():
    graph = _device_imports()
    assert not [(m, n) for m, names in graph.items() for n in names if n.split(".")[0] == "pipeline"]
    edges = {m: {n for n in names if n in graph and n != m} for m, names in graph.items()}
    done, path = set(), []

    def visit(module):
        assert module not in path, f"import cycle: {' -> '.join([*path[path.index(module):], module])}"
        if module in done:
            return
        path.append(module)
        for n in sorted(edges[module]):
            visit(n)
        path.pop()
        done.add(module)

    for module in sorted(edges):
        visit(module)
