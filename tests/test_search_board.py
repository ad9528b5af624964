"""`pipeline search --target DEVICE`: feasibility measured on a board over SSH, proven on the emulated 64-bit
Pi of tests/conftest.py's `lab` (a stock sshd whose logins run in a Raspberry Pi OS arm64 userland under
qemu). Its timings are the emulator's, so the search must refuse a latency budget there and still take a
size budget, measuring every candidate on the board in one session."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest

from tests.conftest import cli

SEARCH = ["--dataset", "digits", "--space", "tiny", "--trials", "2", "--epochs", "1", "--batch-size", "16",
          "--seed", "0", "--budget-minutes", "20"]


def _host_cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


@pytest.fixture(scope="module")
def size_budget_kb(tmp_path_factory) -> float:
    """A size budget that splits the tiny space, from the sizes the search's own conversion gives (the board
    search converts the same way; only where latency is measured differs): the geometric mean of the widest
    gap between neighbouring sizes, so at least one candidate is over it and one under."""
    from pipeline.search.run import SearchConfig, phase_a

    out = tmp_path_factory.mktemp("sizes")
    rows = phase_a(SearchConfig(out=str(out), dataset="digits", space="tiny", seed=0), log=lambda *a: None)["rows"]
    ranked = sorted(r["variants"]["int8"]["size_kb"] for r in rows)
    below, above = max(zip(ranked, ranked[1:]), key=lambda pair: pair[1] / pair[0])
    assert above / below > 1.5, f"the tiny space's candidates are too alike in size to split: {ranked}"
    return round((below * above) ** 0.5, 2)


@pytest.mark.slow
def test_emulated_board_refuses_latency_and_measures_size_budgets_over_ssh(lab, size_budget_kb, tmp_path):
    env = {**lab.env, "RAY_USAGE_STATS_ENABLED": "0"}
    board = ["--target", "pi64", "--ssh-config", str(lab.ssh_config)]

    refused = cli("search", *SEARCH, *board, "--max-latency-ms", "5", "--out", str(tmp_path / "latency"), env=env,
                  check=False, timeout=600)
    assert refused.returncode == 1, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "--max-latency-ms" in refused.stderr and "pi64 is emulated" in refused.stderr
    assert not (tmp_path / "latency").exists()

    out = tmp_path / "size"
    lab.forget_deploys("pi64")  # a board the runtime was never installed on, whichever tests ran before
    try:
        cli("search", *SEARCH, *board, "--max-size-kb", str(size_budget_kb), "--out", str(out), env=env)
        # The payload went to the board and its own runner unpacked and verified it there.
        unpacked = lab.roots["pi64"] / "root" / "edgepipe" / "search-size" / "bundle"
        assert sorted(p.name for p in unpacked.glob("*.tflite")), list(unpacked.parent.glob("*"))
        # The pick is an ordinary run: deploy takes it to the board it was searched for, in the environment
        # the search made there (the same requirements), so nothing is installed again.
        lab.deploy(out / "pick", "--device", "pi64", "--runs", "3", "--warmup", "1")
        deployed = json.loads((out / "pick" / "deploy.json").read_text())["boards"]["pi64"]
        assert deployed["ok"] and not deployed["installed"], deployed
    finally:
        lab.forget_deploys("pi64")  # as the deploy tests expect to find it, whichever order the tests run in

    feasibility = json.loads((out / "feasibility.json").read_text())
    where = feasibility["latency_measured_on"]
    assert feasibility["target"] == "pi64" and feasibility["board"]["board"] == "pi64"
    assert feasibility["board"]["emulated"] and "QEMU" in feasibility["board"]["cpu"]  # what the board reports
    # The fresh board's environment came from the wheels the payload carried (pip resolving against the index
    # under qemu costs a minute), with the requirements a deploy installs, so the deploy above reused it.
    runtime = feasibility["board"]["runtime"]
    assert runtime["source"] == "bundle" and "ai-edge-litert==2.3.0" in runtime["requirements"], runtime
    assert runtime["venv"] == deployed["runtime"]["venv"] and deployed["runtime"]["source"] == "existing"
    assert "board pi64" in where and "EMULATED" in where and _host_cpu() not in where
    rows = feasibility["rows"]
    dropped = [r for r in rows if not r["feasible"]]
    kept = [r for r in rows if r["feasible"]]
    assert dropped and kept
    for row in rows:
        int8 = row["variants"]["int8"]
        assert row["measured_on"]["board"] == "pi64" and row["measured_on"]["emulated"]
        # Benchmarked on the board by its runner; an emulator's timing is recorded, never used as a latency.
        assert int8["latency_ms"] is None and int8["emulator_latency_ms"] > 0
        assert row["feasible"] == (int8["size_kb"] <= size_budget_kb), row
        if not row["feasible"]:
            assert row["reason"].startswith("over budget before training") and "size" in row["reason"], row

    report = json.loads((out / "search.json").read_text())
    trained = {t["candidate"] for t in report["trials"]}
    assert trained and trained <= {r["candidate"]["id"] for r in kept}  # nothing over budget was trained
    assert report["pick"]["candidate"] in trained
    assert cli("verify", str(out / "pick"), env=env).returncode == 0


@pytest.mark.slow
def test_one_payload_holds_every_resolution_and_its_runner_benchmarks_each(tmp_path):
    """The payload a board receives, run here: candidates of two input sizes in one archive, which the
    bundle's own runner unpacks and verifies, then benchmarks model by model at each model's own size."""
    import subprocess
    import sys

    from pipeline.config import BuildConfig
    from pipeline.data import PreprocessSpec
    from pipeline.search.board import write_payload
    from pipeline.search.feasibility import Target, measure_model
    from pipeline.search.space import Candidate

    spec = PreprocessSpec(28, 28, 1, tuple("0123456789")).to_dict()
    models = []
    for side in (28, 20):
        cand = Candidate("cnn", 0.25, 1, side)
        measure_model(cand.build(1, 10), BuildConfig(dataset="digits"), ("int8",), Target("board", "x"), spec,
                      cand.keras_file, keep=tmp_path / cand.id)
        models.append((cand.id, "int8", tmp_path / cand.id / "model_int8.tflite", {**spec, "height": side,
                                                                                      "width": side}))
    payload = tmp_path / "payload.tar.gz"
    where = write_payload(payload, models)
    again = write_payload(tmp_path / "again.tar.gz", models)
    assert again == where and payload.read_bytes() == (tmp_path / "again.tar.gz").read_bytes()  # reproducible
    assert where[("cnn-w0.25-d1-r28", "int8")] == "cnn-w0.25-d1-r28_int8.tflite"
    assert where[("cnn-w0.25-d1-r20", "int8")] == "r20x20/cnn-w0.25-d1-r20_int8.tflite"

    folder = tmp_path / "unpacked"
    unpack = subprocess.run([sys.executable, "device/runner.py", "unpack", str(payload), str(folder), "--json"],
                            cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    assert json.loads(unpack.stdout)["ok"], unpack.stdout + unpack.stderr
    for name in where.values():
        proc = subprocess.run([sys.executable, "device/runner.py", "bench", "--json", "--model", name, "--runs", "5",
                               "--warmup", "1", "--loads", "1"], cwd=folder, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["latency"]["n"] == 5 and out["latency"]["p50_ms"] > 0
        assert "warning" not in proc.stderr  # the metadata beside each model vouched for it


def test_a_board_with_the_runtimes_environment_is_sent_no_wheels(tmp_path):
    """The payload carries the runtime's wheels only to a board without its environment: this host, probed by
    the board-side helper, already has the environment the search's requirements make, so nothing is fetched."""
    from pipeline.boards import remote
    from pipeline.boards.devices import parse_target
    from pipeline.boards.payload import Bundle, runtime_for
    from pipeline.search.board import BoardSession, carried_wheels, requirements

    probe = remote.probe({})
    venv = runtime_for(probe, Bundle(Path(), "search-x", "", 0, requirements(), {}, {})).venv
    board = BoardSession("local", parse_target("127.0.0.1"), None, probe, {"venvs": [venv]}, "search-x")
    lines = []
    assert carried_wheels(board, tmp_path / "wheels", lines.append) == {}
    assert not (tmp_path / "wheels").exists() and not lines  # nothing downloaded, nothing said
