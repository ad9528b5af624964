"""Shared fixtures: one small real build on the real MNIST subset, reused by every test that needs one."""
from __future__ import annotations

import os
import signal
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
