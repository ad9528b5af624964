"""Shared fixtures: one small real build on the real MNIST subset, reused by every test that needs one, and the
emulated boards behind OpenSSH (`lab`), built once for the deploy and the board search tests."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A shell that starts the suite in the background (`cmd &` without job control) hands it SIGINT as
# ignored, and an ignored signal stays ignored in every program it starts: the tests that press Ctrl-C
# on a `pipeline` command would press nothing, as the commands rightly keep an inherited SIG_IGN. A
# handler of our own is reset to the default in each child, so the children get Python's usual Ctrl-C.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

MNIST_DIR = Path(os.environ.get("EDGEPIPE_MNIST_DIR", REPO.parent / "shared" / "datasets" / "mnist-9k"))


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "mnist.npz").is_file():
        pytest.skip(f"real MNIST subset not found at {MNIST_DIR} (set EDGEPIPE_MNIST_DIR)")
    return MNIST_DIR


def real_digits() -> tuple[str, str | None]:
    """The real MNIST subset when this machine has it, else scikit-learn's real 8x8 digits in the
    MNIST layout, so the end-to-end tests run everywhere (tests that need the file itself use mnist_dir)."""
    if (MNIST_DIR / "mnist.npz").is_file():
        return "mnist", str(MNIST_DIR)
    return "digits", None


@pytest.fixture(scope="session")
def mnist_run(tmp_path_factory) -> Path:
    """mnist-cnn, 2 epochs on real digits, every variant, a short benchmark at 1 thread."""
    from pipeline.build import build
    from pipeline.config import BuildConfig

    dataset, data_dir = real_digits()
    out = tmp_path_factory.mktemp("runs") / "mnist-cnn"
    cfg = BuildConfig(dataset=dataset, data_dir=data_dir, model="mnist-cnn", quantize=("all",), epochs=2,
                      bench_runs=30, bench_warmup=3, threads=(1,), out=str(out))
    return build(cfg, log=lambda *a: None)


@pytest.fixture(scope="session")
def mnist_test():
    """The test split the mnist_run build was evaluated on: uint8 (N, 28, 28, 1) and int64 labels."""
    from pipeline.data import load_dataset

    data = load_dataset(*real_digits(), seed=0)
    return data.x_test, data.y_test


# ---------------------------------------------------------------- emulated boards over SSH


def cli(*args: str, env=None, timeout: int = 1800, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)
    if check:
        assert proc.returncode == 0, (f"pipeline {' '.join(args)}: exit {proc.returncode}\n"
                                      f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
    return proc


def base_env(tmp: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "XDG_CONFIG_HOME": str(tmp / "config")}


def arm_emulate():
    spec = importlib.util.spec_from_file_location("arm_emulate", REPO / "scripts" / "arm_emulate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["arm_emulate"] = module
    spec.loader.exec_module(module)
    return module


class Lab:
    """The emulated boards (pi64: arm64 + ai-edge-litert, pi32: armhf + tflite-runtime, py39: a native
    Debian bullseye with Python 3.9), each behind its own sshd, and an ssh_config naming them."""

    def __init__(self, tmp: Path, roots: dict, boards: dict, env: dict, ssh_config: Path):
        self.tmp, self.roots, self.boards, self.env, self.ssh_config = tmp, roots, boards, env, ssh_config

    def deploy(self, run: Path, *args: str, check: bool = True, timeout: int = 2400):
        return cli("deploy", str(run), "--ssh-config", str(self.ssh_config), *args, env=self.env, timeout=timeout,
                   check=check)

    def forget_deploys(self, name: str) -> None:
        """Leave a board as a first deploy finds it (pip's download cache stays), for the tests that follow."""
        arm_emulate()._forget_deploys(self.roots[name] / "root")


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """Built once per session (about two minutes): tests/test_deploy.py and tests/test_search_board.py share it."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("emulated boards need root on Linux: binfmt_misc, chroot and a second sshd")
    arm = arm_emulate()
    tmp = tmp_path_factory.mktemp("lab")
    names = {"pi64": "arm64", "pi32": "armhf", "py39": "amd64-bullseye"}
    try:
        # Each test session starts from boards no deploy has touched (pip's download cache stays).
        started, config = arm.start_boards(names, tmp, fresh=True)
    except arm.SetupError as e:
        if "binfmt_misc" in str(e) or "ChrootDirectory" in str(e) or "not root" in str(e):
            pytest.skip(f"cannot emulate a board here: {e}")
        raise
    boards = dict(zip(names, started))
    try:
        other = tmp / "other_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
        other_pub = " ".join(other.with_suffix(".pub").read_text().split()[:2])
        p64 = boards["pi64"].port
        (tmp / "wrong_known_hosts").write_text(f"[127.0.0.1]:{p64} {other_pub}\n")
        (tmp / "new_known_hosts").write_text("")
        # pi64 again under two more names: once with a different key on record, once with none.
        config.write_text(f"""Host pi64-wrongkey
  HostName 127.0.0.1
  Port {p64}
  User root
  UserKnownHostsFile {tmp / 'wrong_known_hosts'}
Host pi64-newkey
  HostName 127.0.0.1
  Port {p64}
  User root
  UserKnownHostsFile {tmp / 'new_known_hosts'}
""" + config.read_text())
        env = base_env(tmp)
        cli("device", "add", "pi64", "pi64", env=env)  # by ~/.ssh/config alias
        cli("device", "add", "pi32", f"root@127.0.0.1:{boards['pi32'].port}", env=env)  # by address
        yield Lab(tmp, {n: b.root for n, b in boards.items()}, boards, env, config)
    finally:
        for board in boards.values():
            board.stop()
