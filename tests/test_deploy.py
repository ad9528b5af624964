"""`pipeline deploy` and `pipeline device`, proven against emulated Raspberry Pis behind a real OpenSSH server.

The slow tests build (once, cached in ~/.cache/edgepipe) the userlands of Raspberry Pi OS 64-bit
(Debian bookworm arm64) and 32-bit (armhf), register qemu in binfmt_misc so their programs run as
if native, and start two stock `sshd` on 127.0.0.1 whose ChrootDirectory is each userland: boards
that `ssh` reaches exactly as it reaches a Pi. They deploy a real MNIST int8 model to both and check
that each board's accuracy equals the same interpreter's on this host, image for image, with
ai-edge-litert on the 64-bit board and tflite-runtime 2.14.0 on the 32-bit one. Timings taken under
emulation are the emulator's: nothing here treats them as a board's speed.

The fast tests cover what needs no board: names and destinations, the runtime choice, the board-side
helper run locally, extraction, the reproducible bundle and the runner's bench output.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Lab, base_env, cli, real_digits
from tests.conftest import arm_emulate as _arm_emulate

REPO = Path(__file__).resolve().parent.parent
TFLITE_RUNTIME = "2.14.0"
RUNNER_PATTERN = "edgepipe/venvs/.*device/runner.py"  # a runner started by deploy, as seen from the host


# ---------------------------------------------------------------- names, destinations, the device list


@pytest.mark.parametrize("target", ["pi;reboot", "pi@host;rm -rf /", "$(reboot)", "`id`", "-oProxyCommand=x",
                                    "pi@-oProxyCommand=x", "a b", "pi@ho'st", 'pi@"host"', "pi@host|cat",
                                    "pi@host:99999", "pi@host:22x", "pi@host&", "", "pi@", "@host", "pi@host:",
                                    "pi@[::1;]:22", "pi@host\nother", "pi@host:\u00b2"])  # '²' isdigit(), int() fails
def test_destinations_with_shell_metacharacters_are_refused(target):
    from pipeline.boards.devices import BoardNameError, parse_target

    with pytest.raises(BoardNameError):
        parse_target(target)


def test_destinations_parse():
    from pipeline.boards.devices import parse_target

    d = parse_target("pi@raspberrypi.local", "pi4")
    assert (d.name, d.user, d.host, d.port, d.target) == ("pi4", "pi", "raspberrypi.local", None,
                                                          "pi@raspberrypi.local")
    d = parse_target("pi@10.0.0.7:2222")
    assert (d.name, d.user, d.host, d.port) == ("pi-10.0.0.7-2222", "pi", "10.0.0.7", 2222)
    d = parse_target("[fe80::1]:22")
    assert (d.host, d.ssh_host, d.port, d.user) == ("[fe80::1]", "fe80::1", 22, None)
    assert parse_target("kitchen-pi").host == "kitchen-pi"  # an ~/.ssh/config alias


def test_device_add_list_remove(tmp_path):
    env = base_env(tmp_path)
    assert "no boards yet" in cli("device", "list", env=env).stdout
    cli("device", "add", "pi4", "pi@raspberrypi.local", env=env)
    cli("device", "add", "zero", "pi@10.0.0.7:2222", env=env)
    stored = json.loads((tmp_path / "config" / "edgepipe" / "devices.json").read_text())
    assert stored == {"devices": {"pi4": {"name": "pi4", "host": "raspberrypi.local", "user": "pi"},
                                  "zero": {"name": "zero", "host": "10.0.0.7", "user": "pi", "port": 2222}}}
    assert "password" not in json.dumps(stored)
    assert json.loads(cli("device", "list", "--json", env=env).stdout) == {
        "pi4": {"target": "pi@raspberrypi.local"}, "zero": {"target": "pi@10.0.0.7:2222"}}

    again = cli("device", "add", "pi4", "pi@other", env=env, check=False)
    assert again.returncode == 1 and "--replace" in again.stderr and "Traceback" not in again.stderr
    cli("device", "add", "pi4", "pi@other", "--replace", env=env)
    bad = cli("device", "add", "x;y", "pi@host", env=env, check=False)
    assert bad.returncode == 1 and "board name" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    bad = cli("device", "add", "ok", "pi@host;reboot", env=env, check=False)
    assert bad.returncode == 1 and "not an SSH destination" in bad.stderr

    cli("device", "remove", "zero", env=env)
    assert "zero" not in cli("device", "list", env=env).stdout
    gone = cli("device", "remove", "zero", env=env, check=False)
    assert gone.returncode == 1 and "no board named zero" in gone.stderr


def test_run_names_become_plain_folder_names_on_the_board():
    from pipeline.boards.payload import board_folder
    from pipeline.boards.remote import NAME

    assert board_folder("mnist-cnn-mnist") == "mnist-cnn-mnist"
    for name in ("my run", "run;rm -rf ~", ".hidden", "ü", "$(id)", "a" * 300):
        folder = board_folder(name)
        assert NAME.match(folder) and "/" not in folder, (name, folder)
    assert board_folder("my run") != board_folder("my-run")


# ---------------------------------------------------------------- the runtime each board gets


def _bundle_info(wheels=None):
    from pipeline.boards.payload import Bundle
    from pipeline.ship.bundle import REQUIREMENTS

    return Bundle(Path("b.tar.gz"), "run", "0" * 64, 1, REQUIREMENTS.format(litert="2.3.0"),
                  {"int8": "model_int8.tflite"}, wheels or {})


def _probe(machine: str, python: str, bits: int = 64, model: str = "Raspberry Pi 4 Model B Rev 1.4") -> dict:
    return {"machine": machine, "python": python, "bits": bits, "model": model, "os": "Raspberry Pi OS",
            "markers": {"implementation_name": "cpython", "os_name": "posix", "platform_machine": machine,
                        "platform_python_implementation": "CPython", "platform_release": "6.6",
                        "platform_system": "Linux",
                        "python_full_version": python, "python_version": ".".join(python.split(".")[:2]),
                        "sys_platform": "linux"}}


@pytest.mark.parametrize("machine, python, bits, runtime, numpy", [
    ("aarch64", "3.11.2", 64, "ai-edge-litert==2.3.0", "numpy"),        # Raspberry Pi OS 64-bit (bookworm)
    ("x86_64", "3.12.3", 64, "ai-edge-litert==2.3.0", "numpy"),
    ("armv7l", "3.11.2", 32, "tflite-runtime==2.14.0", "numpy<2"),      # Raspberry Pi OS 32-bit
    ("aarch64", "3.11.2", 32, "tflite-runtime==2.14.0", "numpy<2"),     # 32-bit userland on a 64-bit kernel
    ("aarch64", "3.9.2", 64, "tflite-runtime==2.14.0", "numpy<2"),      # Raspberry Pi OS 64-bit legacy (bullseye)
])
def test_runtime_follows_the_bundle_requirements(machine, python, bits, runtime, numpy):
    from pipeline.boards.payload import runtime_for

    choice = runtime_for(_probe(machine, python, bits), _bundle_info())
    assert runtime in choice.requirements and numpy in choice.requirements and "pillow" in choice.requirements
    assert choice.machine == ("armv7l" if bits == 32 else machine)
    assert choice.wheels is None
    again = runtime_for(_probe(machine, python, bits), _bundle_info())
    assert again.venv == choice.venv  # the same board and requirements reuse one environment
    other = "3.11.9" if python != "3.11.9" else "3.11.8"
    assert runtime_for(_probe(machine, other, bits), _bundle_info()).venv != choice.venv


def test_carried_wheels_are_used_for_their_platform_only():
    from pipeline.boards.payload import runtime_for

    bundle = _bundle_info({"aarch64-cp311": {"files": ["ai_edge_litert-2.3.0-cp311-cp311-manylinux_2_27_aarch64.whl"]}})
    assert runtime_for(_probe("aarch64", "3.11.2"), bundle).wheels == "wheels/aarch64-cp311"
    assert runtime_for(_probe("armv7l", "3.11.2", 32), bundle).wheels is None


@pytest.mark.parametrize("machine, python, model", [("armv6l", "3.11.2", "Raspberry Pi Zero W Rev 1.1"),
                                                     ("armv6l", "3.9.2", "Raspberry Pi Model B Plus Rev 1.2"),
                                                     ("riscv64", "3.11.4", "StarFive VisionFive 2")])
def test_platform_without_a_runtime_gets_a_message_naming_it(machine, python, model):
    from pipeline.boards.payload import runtime_for
    from pipeline.boards.ssh import BoardError

    with pytest.raises(BoardError) as e:
        runtime_for(_probe(machine, python, 32, model), _bundle_info())
    assert machine in str(e.value) and model in str(e.value) and "no LiteRT runtime" in str(e.value)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- the board-side helper, run here


def _helper(home: Path, params: dict, data: bytes | None = None, wait: bool = True):
    """The board-side helper, run by this machine's python3 exactly as deploy runs it over SSH: its
    stdin is the data to receive, or stays open while it runs (closing it means the host went away)."""
    from pipeline.boards.ssh import remote_command

    cmd = ["sh", "-c", remote_command(params)]
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if data is not None:
        return subprocess.run(cmd, env=env, input=data, capture_output=True, timeout=60)
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen(cmd, env=env, stdin=read_end, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        os.close(read_end)
        out, err = proc.communicate(timeout=300)
    finally:
        os.close(write_end)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_helper_takes_one_deploy_at_a_time_and_refuses_a_damaged_copy(tmp_path):
    import hashlib

    first = _helper(tmp_path, {"cmd": "session", "run": "r1", "sha256": "0" * 64, "timeout": 30}, wait=False)
    answer = json.loads(first.stdout.readline())
    assert answer["status"] == {"bundle": "missing", "unpacked": "missing", "venvs": []}
    assert answer["probe"]["python"] == ".".join(map(str, sys.version_info[:3])) and answer["probe"]["venv"] is True
    second = _helper(tmp_path, {"cmd": "session", "run": "r1", "sha256": "0" * 64, "timeout": 1})  # same board
    assert second.returncode == 3 and b"held ~/edgepipe/.lock" in second.stderr
    busy = _helper(tmp_path, {"cmd": "purge"})
    assert busy.returncode == 3 and b"a deploy to this board is running" in busy.stderr
    first.stdin.close()  # the host side ends: the lock goes with it
    assert first.wait(timeout=30) == 0

    data = b"bundle bytes"
    wrong = _helper(tmp_path, {"cmd": "receive", "run": "r1", "sha256": hashlib.sha256(b"other").hexdigest(),
                               "size": len(data)}, data)
    assert wrong.returncode == 3 and b"arrived damaged" in wrong.stderr
    assert sorted(p.name for p in (tmp_path / "edgepipe" / "r1").iterdir()) == []  # nothing half-written kept
    for evil in ("../x", "a/b", ".hidden", "x;y"):
        bad = _helper(tmp_path, {"cmd": "session", "run": evil, "sha256": "0" * 64, "timeout": 5})
        assert bad.returncode == 3 and b"not a plain name" in bad.stderr
    assert _helper(tmp_path, {"cmd": "purge"}).returncode == 0
    assert not (tmp_path / "edgepipe").exists() and tmp_path.exists()


def _reason(proc: subprocess.CompletedProcess, step: str) -> str:
    """The one line deploy shows for a helper call that ended like `proc`."""
    from pipeline.boards.devices import parse_target
    from pipeline.boards.ssh import BoardError, SshConnection, SshOptions

    connection = SshConnection(parse_target("board"), SshOptions(), time.monotonic() + 60, 60)
    try:
        with pytest.raises(BoardError) as e:
            connection._failed(proc.returncode, proc.stderr.decode(), step)
    finally:
        connection.close()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_board_without_python3_is_named_as_such(tmp_path):
    from pipeline.boards.ssh import remote_command

    (tmp_path / "bin").mkdir()
    for tool in ("sh",):  # a login shell, and no python3 on the PATH
        (tmp_path / "bin" / tool).symlink_to(shutil.which(tool))
    proc = subprocess.run(["sh", "-c", remote_command({"cmd": "purge"})], capture_output=True, timeout=60,
                          env={"HOME": str(tmp_path), "PATH": str(tmp_path / "bin")})
    assert proc.returncode == 127
    assert _reason(proc, "probing the board").startswith("no python3 on the board; install it")


def test_a_failed_install_says_what_pip_could_not_find(tmp_path):
    proc = _helper(tmp_path, {"cmd": "venv", "run": "r1", "venv": "k1", "module": "json",
                              "requirements": ["edgepipe-no-such-package==0.0.1"], "wheels": None})
    reason = _reason(proc, "installing the runtime")
    assert reason.startswith("pip could not install edgepipe-no-such-package==0.0.1 from the package index")
    assert "No matching distribution found for edgepipe-no-such-package==0.0.1" in reason
    assert not (tmp_path / "edgepipe" / "venvs" / "k1" / ".edgepipe-ready").exists()  # never taken for ready


def test_a_new_environment_installs_with_the_boards_own_pip(tmp_path):
    """A board whose python3 has pip gets no second pip in each environment (venv's ensurepip: a minute under
    qemu); its own pip, seen through the system site packages, installs into the environment."""
    here = subprocess.run(["python3", "-c", "import pip, sys; print(sys.prefix == sys.base_prefix)"],
                          capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    if here.stdout.strip() != "True":
        pytest.skip("python3 on this PATH has no pip of its own outside a virtual environment")
    # What this python3 already has: pip finds every requirement satisfied and needs no index.
    proc = _helper(tmp_path, {"cmd": "venv", "run": "r1", "venv": "k1", "module": "json",
                              "requirements": ["numpy", "pillow"], "wheels": None})
    assert proc.returncode == 0, proc.stderr.decode()
    env = tmp_path / "edgepipe" / "venvs" / "k1"
    assert (env / ".edgepipe-ready").is_file()
    assert not list(env.glob("lib/python*/site-packages/pip")), "venv installed a pip of its own"
    used = subprocess.run([str(env / "bin" / "python"), "-c", "import sys, pip; print(sys.prefix)"],
                          capture_output=True, text=True)
    assert used.returncode == 0 and Path(used.stdout.strip()) == env, used.stderr


# ---------------------------------------------------------------- extraction and the bundle


def _tar(path: Path, add) -> Path:
    import io

    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("metadata.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
        add(tar)
    return path


@pytest.mark.parametrize("case", ["symlink", "hardlink", "device", "absolute", "dotdot", "fifo"])
def test_extraction_refuses_anything_but_files_and_folders_inside(tmp_path, case):
    import io

    from device.integrity import DeviceError, extract_bundle

    def add(tar):
        info = tarfile.TarInfo({"absolute": "/tmp/escaped", "dotdot": "samples/../../escaped"}.get(case, "evil"))
        if case == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif case == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
        elif case == "device":
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        elif case == "fifo":
            info.type = tarfile.FIFOTYPE
        else:
            info.size = 3
        tar.addfile(info, io.BytesIO(b"bad") if info.isfile() else None)

    with pytest.raises(DeviceError, match="refused"):
        extract_bundle(_tar(tmp_path / "evil.tar.gz", add), tmp_path / "dest")
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/escaped").exists()
    assert not (tmp_path / "dest" / "metadata.json").exists()  # checked before anything is written


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """mnist-cnn, 1 epoch, int8, on the real digits (the MNIST subset when present)."""
    dataset, data_dir = real_digits()
    out = tmp_path_factory.mktemp("deploy") / "mnist-int8"
    cli("build", "--dataset", dataset, *(["--data-dir", data_dir] if data_dir else []), "--model", "mnist-cnn",
        "--quantize", "int8", "--epochs", "1", "--no-benchmark", "--out", str(out))
    return out


def test_same_run_same_bundle_bytes(run, tmp_path):
    """What `pipeline deploy` relies on to copy nothing the second time (tests/test_ux.py checks the members)."""
    from device.integrity import sha256_file
    from pipeline.ship.bundle import make_bundle

    a = make_bundle(run, tmp_path / "a" / "run.tar.gz")
    time.sleep(1.1)  # a later second must not change a byte
    b = make_bundle(run, tmp_path / "b" / "run.tar.gz")
    assert sha256_file(a) == sha256_file(b)
    with tarfile.open(a) as tar:
        names = tar.getnames()
    assert "device/board.py" in names and "samples/eval.npz" in names


def test_runner_bench_profile_on_this_host(run, tmp_path):
    from pipeline.ship.bundle import make_bundle

    folder = tmp_path / "unpacked"
    subprocess.run([sys.executable, str(REPO / "device" / "runner.py"), "unpack",
                    str(make_bundle(run, tmp_path / "run.tar.gz")), str(folder)], check=True, timeout=120)
    proc = subprocess.run([sys.executable, "device/runner.py", "bench", "--json", "--runs", "30", "--warmup", "3",
                           "--loads", "3", "--preprocess-runs", "12"], cwd=folder, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    load = out["load"]
    assert load["import_ms"] > 0 and load["cold_ms"] > 0 and load["warm"]["n"] == 3
    assert out["init_ms"] == load["cold_ms"] and out["first_inference_ms"] > 0
    pre = out["preprocess"]
    assert pre["images"] == len(list((folder / "samples").glob("*.png"))) >= 1 and pre["runs"] == 12
    assert all(pre[k]["n"] == 12 and pre[k]["p50_ms"] > 0 for k in ("decode", "resize", "quantize"))
    lat = out["latency"]
    assert lat["n"] == 30 and len(out["samples_ms"]) == 30 and out["warmup"]["n"] == 3
    assert lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    mem = out["memory"]
    assert 0 < mem["peak_rss_mb_after_load"] <= mem["peak_rss_mb_after_inference"] == out["peak_rss_mb"]
    assert out["threads"] == 1 and out["cores"] == os.cpu_count()
    assert set(out["board_state"]) == {"before", "after"}
    assert set(out["board_state"]["before"]) == {"governor", "freq_mhz", "temperature_c", "throttled",
                                                 "throttled_flags"}
    human = subprocess.run([sys.executable, "device/runner.py", "bench", "--runs", "5", "--loads", "1"], cwd=folder,
                           capture_output=True, text=True, timeout=300)
    assert human.returncode == 0 and "load: import" in human.stdout and "preprocess per image" in human.stdout


def _bundle(*args) -> tuple[int, str]:
    """`pipeline bundle ARGS` in this process: (exit code, the last line of its output)."""
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, ["bundle", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output  # no traceback
    return result.exit_code, result.output.strip().splitlines()[-1]


def _changed_runs(run: Path, tmp: Path) -> dict[str, Path]:
    """Copies of the run, each changed after it was written in one way a bundle must not ship."""
    def copy(name: str) -> Path:
        shutil.copytree(run, tmp / name)
        return tmp / name

    labels = copy("labels")
    meta = json.loads((labels / "metadata.json").read_text())
    meta["preprocess"]["labels"] = list(reversed(meta["preprocess"]["labels"]))
    (labels / "metadata.json").write_text(json.dumps(meta))
    guard = copy("guard")  # a guard record nobody wrote: it would switch the shipped default to fp32
    (guard / "analysis.json").write_text(json.dumps({"guard": {"delivered": "fp32", "superseded": ["int8"]}}))
    truncated = copy("truncated")
    (truncated / "manifest.json").write_bytes((truncated / "manifest.json").read_bytes()[:300])
    (copy("no-labels") / "labels.txt").unlink()
    (copy("empty-meta") / "metadata.json").write_text("{")
    (copy("list-meta") / "metadata.json").write_text("[]")
    return {p.name: p for p in tmp.iterdir()}


def test_a_run_changed_since_it_was_written_is_not_bundled(run, tmp_path):
    from pipeline.delivery import GuardRecordError, guard_decision

    for name, changed in _changed_runs(run, tmp_path / "runs").items():
        code, line = _bundle(changed, "--out", tmp_path / f"{name}.tar.gz")
        assert code == 1 and "changed since it was written" in line and "pipeline verify" in line, (name, line)
        assert not list(tmp_path.glob("*.tar.gz")) and not list(tmp_path.glob(".*")), name
    # Whatever reads the guard's decision: a manifest it cannot read is no decision to deliver from.
    with pytest.raises(GuardRecordError, match="whether the accuracy guard ran cannot be told"):
        guard_decision(tmp_path / "runs" / "truncated")


def test_a_staging_folder_is_not_bundled(run, tmp_path):
    staging = tmp_path / ".mnist-int8.partial"
    shutil.copytree(run, staging)  # even one that holds every file of a finished run
    code, line = _bundle(staging, "--out", tmp_path / "s.tar.gz")
    assert code == 1 and "staging folder of an interrupted build" in line and "--resume" in line, line
    assert not (tmp_path / "s.tar.gz").exists()


def test_a_bundle_carries_only_the_samples_the_manifest_lists(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "samples" / ".env").write_text("API_KEY=secret\n")
    (copy / "samples" / ".00_7.png.x1y2.tmp").write_bytes(b"half a png")
    code, line = _bundle(copy, "--out", tmp_path / "b.tar.gz")
    assert code == 0, line
    listed = sorted(f for f in json.loads((copy / "manifest.json").read_text())["files"] if f.startswith("samples/"))
    with tarfile.open(tmp_path / "b.tar.gz") as tar:
        assert sorted(m.name for m in tar.getmembers() if m.name.startswith("samples/") and m.isfile()) == listed


def test_bundle_out_that_cannot_be_written_is_one_line(run, tmp_path):
    code, line = _bundle(run, "--out", run / "labels.txt" / "b.tar.gz")
    assert code == 2 and "labels.txt is a file, not a folder" in line, line
    code, line = _bundle(run, "--out", "/proc/b.tar.gz")
    assert code == 1 and line.startswith("Error: --out /proc/b.tar.gz: cannot write there"), line


def test_metadata_that_is_not_the_builds_is_one_line_even_when_rehashed(run, tmp_path):
    """The manifest edited to match: the run verifies by its hashes, but its metadata is no build's."""
    from pipeline.artifacts import file_table

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for text in ("[]", "{", '{"models": {"model_int8.tflite": {}}}'):
        (copy / "metadata.json").write_text(text)
        manifest = json.loads((copy / "manifest.json").read_text())
        (copy / "manifest.json").write_text(json.dumps({**manifest, "files": file_table(copy)}))
        code, line = _bundle(copy, "--out", tmp_path / "b.tar.gz")
        assert code == 1 and "not the metadata `pipeline build` writes" in line, (text, line)
    assert not (tmp_path / "b.tar.gz").exists()


def test_bundle_command_line_mistakes_and_where_it_writes(run, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    code, line = _bundle(copy, "--out", tmp_path / "run.zip")
    assert code == 2 and "name it run.zip.tar.gz" in line, line
    code, line = _bundle(copy, "--variants", "")
    assert code == 2 and "'--variants': empty" in line, line
    code, line = _bundle(copy, "--out", copy / "run.tar.gz")  # the archive would make the run fail verify
    assert code == 1 and "inside the run directory" in line, line
    assert not list(tmp_path.glob("*.tar.gz")) and not (copy / "run.tar.gz").exists()
    monkeypatch.chdir(copy)
    code, line = _bundle(".")  # named after the folder, beside it, as `bundle run` from its parent does
    assert code == 0 and line.startswith(f"wrote {tmp_path / 'run.tar.gz'}"), line
    with tarfile.open(tmp_path / "run.tar.gz") as tar:
        readme = tar.extractfile("README.md").read().decode()
    assert readme.startswith("# run: ") and "tar xzf run.tar.gz -C run" in readme, readme[:300]


# ---------------------------------------------------------------- emulated boards over SSH


@pytest.fixture(scope="module")
def bundle(run, tmp_path_factory) -> Path:
    """The run's int8 model with the aarch64 wheels of its runtime: pi64 installs offline, pi32 from PyPI."""
    out = tmp_path_factory.mktemp("bundle") / f"{run.name}.tar.gz"
    cli("bundle", str(run), "--variants", "int8", "--wheels", "aarch64-cp311", "--out", str(out))
    return out


@pytest.fixture(scope="module")
def host_eval(bundle, tmp_path_factory):
    """runner.py eval on samples/eval.npz on this x86 host, per interpreter: what each board must reproduce."""
    tmp = tmp_path_factory.mktemp("host-eval")
    folder = tmp / "bundle"
    subprocess.run([sys.executable, str(REPO / "device" / "runner.py"), "unpack", str(bundle), str(folder)],
                   check=True, timeout=120)
    results = {}

    def evaluate(name: str) -> dict:
        if name not in results:
            cmd, env = [sys.executable], {**os.environ, "PYTHONPATH": ""}
            if name == "tflite_runtime":  # numpy < 2 and no ai-edge-litert: a folder of its own, `python -S`
                site = tmp / "site-tflite-runtime"
                pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--only-binary=:all:", "--target",
                                      str(site), f"tflite-runtime=={TFLITE_RUNTIME}", "numpy<2", "pillow"],
                                     capture_output=True, text=True, timeout=900)
                assert pip.returncode == 0, pip.stderr
                cmd.append("-S")
                env["PYTHONPATH"] = str(site)
            proc = subprocess.run([*cmd, "device/runner.py", "eval", "samples/eval.npz", "--json"], cwd=folder,
                                  env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr
            results[name] = json.loads(proc.stdout)
            assert results[name]["interpreter"]["name"] == name
        return results[name]

    return evaluate


def _deploy_record(run: Path) -> dict:
    return json.loads((run / "deploy.json").read_text())


def _device_result(run: Path, board: str, kind: str) -> dict:
    for path in sorted((run / "device_results").glob("*.json")):
        data = json.loads(path.read_text())
        if data["board"]["name"] == board and data["kind"] == kind:
            return data
    raise AssertionError(f"no {kind} result of {board} in {run / 'device_results'}")


@pytest.fixture(scope="module")
def deployed(lab, run, bundle):
    """The first deploy of the run to both boards at once, then the same deploy again: (first, second) records."""
    records = []
    for _ in range(2):
        t0 = time.monotonic()
        proc = lab.deploy(run, "--bundle", str(bundle), "--device", "pi64", "--device", "pi32", "--runs", "5",
                          "--warmup", "1")
        records.append({"record": _deploy_record(run), "wall": time.monotonic() - t0, "proc": proc})
    return records


def _interval(entry: dict) -> tuple[float, float]:
    def parse(s):
        return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S%z").timestamp()

    return parse(entry["started"]), parse(entry["finished"])


@pytest.mark.slow
def test_deploy_to_emulated_64_and_32_bit_pis(lab, run, deployed, host_eval):
    first, second = (d["record"]["boards"] for d in deployed)
    pi64, pi32 = first["pi64"], first["pi32"]
    assert pi64["ok"] and pi32["ok"], (pi64["reason"], pi32["reason"])
    # What each board is, as probed: the emulated userlands say so, and are never taken for a Pi.
    assert (pi64["board"]["machine"], pi64["board"]["bits"]) == ("aarch64", 64)
    assert (pi32["board"]["machine"], pi32["board"]["bits"]) == ("armv7l", 32)
    assert pi64["board"]["python"] == pi32["board"]["python"] == "3.11.2"
    assert pi64["board"]["emulated"] and pi32["board"]["emulated"]
    assert "bookworm" in pi64["board"]["os"] and "QEMU" in pi64["board"]["model"]
    # The runtime the bundle's requirements choose, installed into a fresh environment: pi64 from the
    # wheels the bundle carries (no index needed), pi32 from PyPI (tflite-runtime) and Debian (numpy, Pillow).
    assert pi64["copied"] and pi64["installed"] and pi64["runtime"]["source"] == "bundle"
    assert pi32["copied"] and pi32["installed"] and pi32["runtime"]["source"] == "index"
    assert "ai-edge-litert==2.3.0" in pi64["runtime"]["requirements"]
    assert f"tflite-runtime=={TFLITE_RUNTIME}" in pi32["runtime"]["requirements"]
    # Both boards at once: their deploys overlap in time.
    (s64, e64), (s32, e32) = _interval(pi64), _interval(pi32)
    assert s64 < e32 and s32 < e64, (pi64["started"], pi64["finished"], pi32["started"], pi32["finished"])

    # Accuracy on the board equals the same interpreter's on this host, image for image.
    for board, interpreter, version in (("pi64", "ai_edge_litert", "2.3.0"),
                                        ("pi32", "tflite_runtime", TFLITE_RUNTIME)):
        device = _device_result(run, board, "eval")
        host = host_eval(interpreter)
        assert device["interpreter"] == host["interpreter"] == {"name": interpreter, "version": version}
        assert device["n"] == host["n"] == len(np.load(run / "samples" / "eval.npz")["y"])
        assert device["accuracy"] == host["accuracy"] and device["confusion"] == host["confusion"], board
        assert device["environment"]["machine"] == first[board]["board"]["machine"]
        bench = _device_result(run, board, "bench")
        assert bench["latency"]["n"] == 5 and bench["board"]["emulated"]
    assert first["pi64"]["accuracy"]["int8"]["same_interpreter"] and first["pi64"]["accuracy"]["int8"]["equal"]
    assert not first["pi32"]["accuracy"]["int8"]["same_interpreter"]

    # The report: one column pair per board, accuracy shown, emulated latency never shown as a board's.
    report = json.loads((run / "report.json").read_text())
    assert [d["label"] for d in report["devices"]][:2] == ["pi64", "pi32"]
    int8 = next(v for v in report["variants"] if v["variant"] == "int8")
    assert int8["device"]["pi64"]["accuracy"] == _device_result(run, "pi64", "eval")["accuracy"]
    md = (run / "report.md").read_text()
    assert "pi64 accuracy" in md and "pi32 p50 ms" in md and "| emulated |" in md
    assert "## Boards" in md and "measured under emulation" in md
    assert any(n["kind"] == "board_accuracy" and "pi64" in n["text"] and "equals the host's" in n["text"]
               for n in report["notes"])
    assert cli("verify", str(run), env=lab.env).returncode == 0  # the merge left a run that verifies

    # The same deploy again: nothing copied, installed or unpacked; only the measurements run.
    for board in ("pi64", "pi32"):
        again = second[board]
        assert again["ok"] and not again["copied"] and not again["installed"], again
        assert set(again["steps"]) == {"connect", "lock_and_probe", "measure"}, again["steps"]
        assert again["runtime"]["source"] == "existing"
        assert again["seconds"] < first[board]["seconds"]
        print(f"{board}: first deploy {first[board]['seconds']:.1f} s {first[board]['steps']}, "
              f"second {again['seconds']:.1f} s {again['steps']} (load average {os.getloadavg()[0]:.1f})")
    # The second deploy replaced the first's results: one eval and one bench per board.
    names = [json.loads(p.read_text())["board"]["name"] for p in (run / "device_results").glob("*.json")]
    assert sorted(n for n in names if n in ("pi64", "pi32")) == ["pi32", "pi32", "pi64", "pi64"]
    summary = deployed[1]["proc"].stdout
    assert "pi64: ok" in summary and "nothing copied or installed" in summary and "emulated" in summary


@pytest.mark.slow
def test_python39_board_with_tflite_runtime(lab, run, bundle, host_eval):
    """Debian bullseye's Python 3.9.2 (tarfile without `filter=`, Pillow's old API): the bundle unpacks
    with the runner's own checks, and tflite-runtime gives the host's accuracy image for image.

    Exact equality holds only because the board's interpreter sees this CPU as the host's does: its
    int8 kernels are chosen from the CPU features it detects (ruy's AVX2 path, or gemmlowp when
    detection fails, 1 LSB apart on some images). A chroot without /proc/cpuinfo once tipped an image
    whose top two classes then tied, so the board's environment must report the host's CPU features."""
    lab.deploy(run, "--bundle", str(bundle), "--device", "py39", "--runs", "20", "--warmup", "2")
    entry = _deploy_record(run)["boards"]["py39"]
    assert entry["ok"], entry["reason"]
    assert entry["board"]["python"] == "3.9.2" and entry["board"]["machine"] == "x86_64"
    assert not entry["board"]["emulated"] and "bullseye" in entry["board"]["os"]
    assert f"tflite-runtime=={TFLITE_RUNTIME}" in entry["runtime"]["requirements"]
    assert "numpy<2" in entry["runtime"]["requirements"] and entry["runtime"]["source"] == "index"
    assert "unpack" in entry["steps"]
    device, host = _device_result(run, "py39", "eval"), host_eval("tflite_runtime")
    assert device["interpreter"] == host["interpreter"]
    assert device["environment"]["cpu_features"] == host["environment"]["cpu_features"]
    assert device["accuracy"] == host["accuracy"] and device["confusion"] == host["confusion"]
    bench = _device_result(run, "py39", "bench")
    assert bench["preprocess"]["decode"]["n"] == 50 and bench["load"]["warm"]["n"] == 5
    assert bench["environment"]["python"] == "3.9.2"
    md = (run / "report.md").read_text()
    assert "py39 p50 ms" in md and "- py39 (py39)" in md and "load cold" in md  # a board not emulated shows its timings


@pytest.mark.slow
def test_boards_that_fail_fail_alone_with_one_line(lab, run, bundle, deployed):
    down = f"root@127.0.0.1:{_arm_emulate().free_port()}"
    before = (run / "report.json").read_bytes()
    proc = lab.deploy(run, "--bundle", str(bundle), "--device", "pi64", "--device", down, "--device", "pi64-wrongkey",
                      "--device", "pi64-newkey", "--runs", "3", "--warmup", "0", check=False)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = {line.split(":", 1)[0]: line for line in proc.stdout.splitlines() if ": " in line}
    down_name = down.replace("@", "-").replace(":", "-")
    assert "unreachable: connection refused" in lines[down_name]
    assert "host key refused" in lines["pi64-wrongkey"] and "differs" in lines["pi64-wrongkey"]
    assert "host key refused" in lines["pi64-newkey"] and "--accept-new-host-key" in lines["pi64-newkey"]
    assert lines["pi64"].startswith("pi64: ok")
    assert "3 of 4 board(s) failed" in proc.stderr
    record = _deploy_record(run)["boards"]
    assert record["pi64"]["ok"] and not record[down_name]["ok"] and not record["pi64-wrongkey"]["ok"]
    assert (run / "report.json").read_bytes() != before  # pi64 landed
    report = json.loads((run / "report.json").read_text())
    failed = [n["text"] for n in report["notes"] if n["kind"] == "board_failed"]
    assert len(failed) == 3 and all("\n" not in t for t in failed)
    assert cli("verify", str(run), env=lab.env).returncode == 0
    assert (lab.tmp / "new_known_hosts").read_text() == ""  # an unknown key is never written without asking


@pytest.mark.slow
def test_timeout_stops_the_board_and_its_runner(lab, run, bundle, deployed):
    proc = lab.deploy(run, "--bundle", str(bundle), "--device", "pi64", "--runs", "1000000", "--timeout", "25",
                      check=False)
    assert proc.returncode == 1 and "pi64: FAILED: timed out after 25 s (--timeout) while measuring" in proc.stdout
    _assert_no_runner_left()


def _assert_no_runner_left(seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while subprocess.run(["pgrep", "-f", RUNNER_PATTERN], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, subprocess.run(["pgrep", "-af", RUNNER_PATTERN], capture_output=True,
                                                           text=True).stdout
        time.sleep(0.5)


@pytest.mark.slow
def test_ctrl_c_stops_every_board_and_merges_nothing(lab, run, bundle, deployed):
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "deploy", str(run), "--bundle", str(bundle),
                             "--ssh-config", str(lab.ssh_config), "--device", "pi64", "--device", "pi32",
                             "--runs", "1000000"], cwd=REPO, env=lab.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    measuring = set()
    for line in proc.stderr:
        if "measuring" in line:
            measuring.add(line.split(":", 1)[0])
        if measuring == {"pi64", "pi32"}:
            break
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "nothing was merged" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    _assert_no_runner_left()


@pytest.mark.slow
def test_changed_bundle_on_the_board_is_refused_and_two_deploys_to_one_board_do_not_collide(lab, run, bundle, deployed):
    model = lab.roots["pi64"] / "root" / "edgepipe" / run.name / "bundle" / "model_int8.tflite"
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    refused = lab.deploy(run, "--bundle", str(bundle), "--device", "pi64", "--runs", "3", check=False)
    assert refused.returncode == 1
    assert "pi64: FAILED: the bundle unpacked on the board was changed (changed: model_int8.tflite)" in refused.stdout

    # Two deploys to the same board at once, one of them deleting the run's folder there first
    # (--clean): the board's lock makes one wait for the other, and both land.
    args = [sys.executable, "-m", "pipeline.cli", "deploy", str(run), "--bundle", str(bundle), "--ssh-config",
            str(lab.ssh_config), "--device", "pi64", "--runs", "3", "--warmup", "0"]
    a = subprocess.Popen([*args, "--clean"], cwd=REPO, env=lab.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    time.sleep(1)
    b = subprocess.Popen(args, cwd=REPO, env=lab.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (out_a, err_a), (out_b, err_b) = a.communicate(timeout=1200), b.communicate(timeout=1200)
    assert a.returncode == 0, out_a + err_a
    assert b.returncode == 0, out_b + err_b
    assert "another deploy to this board is running" in err_a + err_b
    assert model.read_bytes() != bytes(data)  # --clean copied the bundle afresh
    assert cli("verify", str(run), env=lab.env).returncode == 0
    assert _deploy_record(run)["boards"]["pi64"]["ok"]


@pytest.mark.slow
def test_accept_new_host_key_then_purge_removes_only_the_deploy_folder(lab, run, deployed):
    home = lab.roots["pi64"] / "root"
    marker = home / "not-ours.txt"
    marker.write_text("the user's file")
    env = lab.env
    cli("device", "add", "newkey", "pi64-newkey", env=env)
    refused = cli("device", "remove", "newkey", "--purge", "--ssh-config", str(lab.ssh_config), env=env, check=False)
    assert refused.returncode == 1 and "not in known_hosts" in refused.stderr
    assert (home / "edgepipe").is_dir()
    cli("device", "remove", "newkey", "--purge", "--accept-new-host-key", "--ssh-config", str(lab.ssh_config), env=env)
    assert f"[127.0.0.1]:{lab.boards['pi64'].port}" in (lab.tmp / "new_known_hosts").read_text()
    assert not (home / "edgepipe").exists() and marker.read_text() == "the user's file"
    assert "newkey" not in cli("device", "list", env=env).stdout
    marker.unlink()


# ---------------------------------------------------------------- a real sshd on 127.0.0.1, this host as the board


class LocalBoard:
    """A stock OpenSSH server on 127.0.0.1 whose logins run on this host, with a HOME and PATH of the
    test's own (sshd's SetEnv): a board that needs no emulation. `python3` on that PATH is this
    interpreter, so the runtime is already installed and the deploy needs no network."""

    def __init__(self, workdir: Path, alias: str, path: str, client_key: Path):
        self.alias, self.port, self.workdir = alias, _arm_emulate().free_port(), workdir / f"sshd-{alias}"
        self.home = self.workdir / "home"
        self.home.mkdir(parents=True)
        self.host_key = self.workdir / "host_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)], check=True)
        config = self.workdir / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
            f"PidFile {self.workdir / 'sshd.pid'}", f"AuthorizedKeysFile {client_key}.pub",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "StrictModes no", "PrintMotd no", "MaxSessions 30", f"SetEnv HOME={self.home} PATH={path}",
            ""]))
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(config), "-E", str(self.workdir / "log")],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import socket

        deadline = time.monotonic() + 15
        while True:
            assert self.proc.poll() is None, (self.workdir / "log").read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"sshd on port {self.port} never listened"
                time.sleep(0.1)

    def ssh_config(self, client_key: Path, known_hosts: Path) -> str:
        with known_hosts.open("a") as f:
            f.write(f"[127.0.0.1]:{self.port} " + " ".join(self.host_key.with_suffix(".pub").read_text().split()[:2])
                    + "\n")
        return (f"Host {self.alias}\n  HostName 127.0.0.1\n  Port {self.port}\n  User root\n"
                f"  IdentityFile {client_key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {known_hosts}\n")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Two boards on this host: `here`, a healthy one, and `broken`, whose python3 answers `{}` to
    every call (a board-side helper that says something deploy does not expect)."""
    if sys.platform != "linux" or os.geteuid() != 0 or not Path("/usr/sbin/sshd").exists():
        pytest.skip("a local board needs root and OpenSSH's server (apt install openssh-server)")
    tmp = tmp_path_factory.mktemp("local")
    key = tmp / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    fake = tmp / "fake-bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\necho '{}'\n")
    (fake / "python3").chmod(0o755)
    boards = []
    try:
        boards.append(LocalBoard(tmp, "here", f"{Path(sys.executable).parent}:/usr/bin:/bin", key))
        boards.append(LocalBoard(tmp, "broken", f"{fake}:/usr/bin:/bin", key))
        config = tmp / "ssh_config"
        config.write_text("".join(b.ssh_config(key, tmp / "known_hosts") for b in boards))
        env = base_env(tmp)
        yield Lab(tmp, {}, {b.alias: b for b in boards}, env, config)
    finally:
        for board in boards:
            board.stop()


def _files(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("entry", [
    {"name": "evil", "host": "-oProxyCommand=touch {marker}"},
    {"name": "evil", "host": "localhost", "user": "-oProxyCommand=touch {marker}"},
    {"name": "evil", "host": "localhost -oProxyCommand=touch {marker}"},
    {"name": "evil", "host": "localhost", "port": "22 -oProxyCommand=touch {marker}"},
    {"name": "other", "host": "localhost"},  # stored under a name that is not its own
])
def test_a_crafted_devices_file_is_refused_in_one_line_and_nothing_runs(run, tmp_path, entry):
    env = base_env(tmp_path)
    marker = tmp_path / "MARKER"
    stored = {k: v.format(marker=marker) if isinstance(v, str) else v for k, v in entry.items()}
    devices = tmp_path / "config" / "edgepipe" / "devices.json"
    devices.parent.mkdir(parents=True)
    devices.write_text(json.dumps({"devices": {"evil": stored}}))
    before = _files(run)
    for args in (["deploy", str(run), "--device", "evil", "--timeout", "30"], ["device", "list"],
                 ["device", "remove", "evil", "--purge"]):
        proc = cli(*args, env=env, check=False, timeout=120)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and str(devices) in lines[0] and "board 'evil'" in lines[0], (args, proc.stderr)
        assert "fix or remove that entry" in lines[0] and "Traceback" not in proc.stderr
    assert not marker.exists()
    assert _files(run) == before


def test_ssh_reads_the_destination_as_a_destination(tmp_path):
    """Even a Device that skipped every check (`--` ends ssh's options): ssh refuses the host name,
    and never takes it for an option (before `--`, the master failed with ssh's usage line)."""
    from pipeline.boards.devices import Device
    from pipeline.boards.ssh import BoardError, SshConnection, SshOptions

    marker = tmp_path / "MARKER"
    connection = SshConnection(Device("evil", f"-oProxyCommand=touch {marker}"), SshOptions(),
                               time.monotonic() + 60, 60)
    try:
        with pytest.raises(BoardError) as e:
            connection.open()
        with pytest.raises(BoardError):
            connection.call({"cmd": "purge"}, "removing ~/edgepipe")
    finally:
        connection.close()
    assert "usage: ssh" not in str(e.value) and "hostname contains invalid characters" in str(e.value)
    assert not marker.exists()


def test_a_deploy_that_reached_no_board_leaves_the_run_unchanged(run, tmp_path):
    down = f"root@127.0.0.1:{_arm_emulate().free_port()}"
    before = _files(run)
    proc = cli("deploy", str(run), "--device", down, "--timeout", "60", env=base_env(tmp_path), check=False,
               timeout=300)
    assert proc.returncode == 1 and "unreachable: connection refused" in proc.stdout, proc.stdout + proc.stderr
    assert "1 of 1 board(s) failed" in proc.stderr and "nothing was merged, the run is unchanged" in proc.stderr
    assert _files(run) == before


@pytest.mark.slow
def test_an_unexpected_error_on_one_board_is_its_line_and_the_others_merge(local, run):
    proc = local.deploy(run, "--device", "here", "--device", "broken", "--runs", "3", "--warmup", "0",
                        "--timeout", "600", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "broken: FAILED: unexpected KeyError on the host: 'probe'" in proc.stdout, proc.stdout
    assert any(line.startswith("here: ok") for line in proc.stdout.splitlines()), proc.stdout + proc.stderr
    assert "1 of 2 board(s) failed: broken" in proc.stderr
    record = _deploy_record(run)["boards"]
    assert record["here"]["ok"] and not record["broken"]["ok"]
    assert record["here"]["accuracy"]["int8"]["equal"]  # this host's interpreter, on this host: the same answers
    assert _device_result(run, "here", "eval")["board"]["name"] == "here"
    assert cli("verify", str(run), env=local.env).returncode == 0


def test_a_killed_deploy_leaves_no_ssh_master(local, run):
    """SIGKILL gives deploy no chance to close anything: the master's ControlPersist ends it."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "deploy", str(run), "--ssh-config",
                             str(local.ssh_config), "--device", "here", "--runs", "1000000"], cwd=REPO,
                            env=local.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "measuring" in line:
                break
        masters = subprocess.run(["pgrep", "-af", f"{local.ssh_config}.*ControlMaster=yes"], capture_output=True,
                                 text=True).stdout.splitlines()
        paths = {arg.split("=", 1)[1] for line in masters for arg in line.split() if arg.startswith("ControlPath=")}
        assert len(paths) == 1, masters  # the one master of this deploy, alive while it measures
        control = paths.pop()
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-f", control], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, subprocess.run(["pgrep", "-af", control], capture_output=True,
                                                           text=True).stdout
        time.sleep(0.5)
    _assert_no_runner_left()
