"""Shared fixtures: one small real build on the real MNIST subset, reused by every test that needs one."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MNIST_DIR = Path(os.environ.get("EDGEPIPE_MNIST_DIR", REPO.parent / "shared" / "datasets" / "mnist-9k"))


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "mnist.npz").is_file():
        pytest.skip(f"real MNIST subset not found at {MNIST_DIR} (set EDGEPIPE_MNIST_DIR)")
    return MNIST_DIR


@pytest.fixture(scope="session")
def mnist_run(tmp_path_factory, mnist_dir) -> Path:
    """mnist-cnn, 2 epochs on 7,200 real digits, every variant, a short benchmark at 1 thread."""
    from pipeline.build import build
    from pipeline.config import BuildConfig

    out = tmp_path_factory.mktemp("runs") / "mnist-cnn"
    cfg = BuildConfig(dataset="mnist", data_dir=str(mnist_dir), quantize=("all",), epochs=2,
                      bench_runs=30, bench_warmup=3, threads=(1,), out=str(out))
    return build(cfg, log=lambda *a: None)


@pytest.fixture(scope="session")
def mnist_test(mnist_dir):
    import numpy as np

    with np.load(mnist_dir / "mnist.npz") as d:
        return d["x_test"][..., None], d["y_test"].astype("int64")
