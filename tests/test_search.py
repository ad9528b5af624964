"""`pipeline search` end to end: real Ray (local, and a real two-node cluster on 127.0.0.1), real training
on the digits, real measurements; the pick is an ordinary run that `pipeline verify` and `export` accept."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SEARCH = ["--dataset", "digits", "--space", "tiny", "--trials", "4", "--epochs", "1", "--batch-size", "16",
          "--seed", "0", "--budget-minutes", "20"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}


def cli(*args, cwd, timeout=1500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def trained_points(report: dict) -> list[tuple]:
    """What the seed decides: each trained trial's candidate, learning rate, variant and test accuracy."""
    return sorted((p["candidate"], p["learning_rate"], p["variant"], round(p["accuracy"], 6)) for p in report["points"])


@pytest.fixture(scope="module")
def latency_budget_ms(tmp_path_factory) -> float:
    """A latency budget that splits the tiny space's candidates on this machine, measured by the
    search's own feasibility phase: a fixed figure holds on one CPU only (int8 is ~3x faster with AVX-512 VNNI,
    which would let ResNet-8 through; a slower CPU would drop every candidate)."""
    from pipeline.search.run import SearchConfig, phase_a

    out = tmp_path_factory.mktemp("feasibility")
    rows = phase_a(SearchConfig(out=str(out), dataset="digits", space="tiny", seed=0), log=lambda *a: None)["rows"]
    costs = {r["candidate"]["id"]: min(c["latency_ms"] for c in r["variants"].values()) for r in rows}
    # The budget sits in the widest gap (by ratio) between two neighbouring costs, at its geometric mean: the
    # search's own measurement, taken later under another load, then has the most room on either side to
    # drop and keep the same candidates (the two-node test compares two searches). Under 2x the split is noise.
    ranked = sorted(costs.values())
    below, above = max(zip(ranked, ranked[1:]), key=lambda pair: pair[1] / pair[0])
    assert above / below > 4, f"the tiny space's candidates cost too alike here to split by latency: {costs}"
    return round((below * above) ** 0.5, 4)  # as passed on the command line


@pytest.fixture(scope="module")
def budgeted(latency_budget_ms) -> list[str]:
    """The search's arguments with the machine's own latency budget."""
    return [*SEARCH, "--max-latency-ms", str(latency_budget_ms)]


@pytest.fixture(scope="module")
def local_search(tmp_path_factory, budgeted) -> Path:
    out = tmp_path_factory.mktemp("search") / "local"
    ok(cli("search", *budgeted, "--out", out, cwd=out.parent))
    return out


@pytest.mark.slow
def test_local_search_drops_over_budget_before_training_and_picks_a_verified_run(local_search, latency_budget_ms):
    report = json.loads((local_search / "search.json").read_text())
    dropped = [r for r in report["candidates"] if not r["feasible"]]
    assert dropped and all("latency" in r["reason"] for r in dropped)
    assert len(dropped) < len(report["candidates"])
    assert report["summary"]["dropped_before_training"] == len(dropped)
    dropped_ids = {r["candidate"]["id"] for r in dropped}
    assert len(report["trials"]) == 4 and not dropped_ids & {t["candidate"] for t in report["trials"]}
    assert all(t["node_id"] for t in report["trials"])
    assert "this host" in report["latency_measured_on"]
    pick = report["pick"]
    row = next(r for r in report["candidates"] if r["candidate"]["id"] == pick["candidate"])
    assert row["variants"][pick["variant"]]["latency_ms"] <= latency_budget_ms
    assert report["front"] and all(p["latency_ms"] <= latency_budget_ms for p in report["front"])
    for name in ("search.md", "search.html", "front.png", "search_config.json", "feasibility.json"):
        assert (local_search / name).is_file(), name
    assert "verified" in ok(cli("verify", local_search / "pick", cwd=local_search)).stdout
    manifest = json.loads((local_search / "pick" / "manifest.json").read_text())
    assert manifest["search"]["candidate"]["id"] == pick["candidate"]
    assert pick["variant"] in manifest["config"]["quantize"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_node(args: list[str], temp: Path, auth: dict) -> subprocess.Popen:
    """One Ray node in the foreground (--block), in its own process group so that it is ended by its own PID."""
    return subprocess.Popen(["ray", "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                             f"--temp-dir={temp}", "--disable-usage-stats", *args], env={**env(), **auth},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _alive_nodes(address: str, auth: dict) -> int:
    code = (f"import ray; ray.init(address='{address}', _node_ip_address='127.0.0.1', log_to_driver=False); "
            "print(sum(n['Alive'] for n in ray.nodes()))")
    proc = subprocess.run([sys.executable, "-c", code], env={**env(), **auth}, capture_output=True, text=True,
                          timeout=120)
    return int(proc.stdout.split()[-1]) if proc.returncode == 0 and proc.stdout.split() else 0


@pytest.mark.slow
def test_two_node_cluster_runs_the_same_search_with_the_same_front(local_search, budgeted, tmp_path):
    from pipeline.search.report import pareto

    # Ray 2.59+ asks for a token on a cluster: this test's own, passed as Ray reads it (never ~/.ray).
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    address = f"127.0.0.1:{_free_port()}"
    short = Path(f"/tmp/ep-ray-{os.getpid()}")  # Ray's socket paths must stay under 107 characters
    nodes = [_ray_node(["--head", f"--port={address.split(':')[1]}", "--include-dashboard=false"], short / "head",
                       auth)]
    try:
        time.sleep(5)
        nodes.append(_ray_node([f"--address={address}"], short / "worker", auth))
        deadline = time.monotonic() + 180
        while _alive_nodes(address, auth) < 2:
            assert time.monotonic() < deadline, "the worker node did not join the head within 3 minutes"
            time.sleep(5)
        out = tmp_path / "cluster"
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "search", *budgeted, "--out", str(out),
                               "--address", address], cwd=tmp_path, env={**env(), **auth}, capture_output=True,
                              text=True, timeout=1500)
        ok(proc)
    finally:
        for node in reversed(nodes):  # SIGTERM: `ray start --block` drains, then ends the processes it started
            os.killpg(node.pid, signal.SIGTERM)
        for node in nodes:
            node.wait(timeout=120)
        shutil.rmtree(short, ignore_errors=True)
    local = json.loads((local_search / "search.json").read_text())
    cluster = json.loads((out / "search.json").read_text())
    assert len(cluster["summary"]["nodes"]) == 2, cluster["trials"]
    assert trained_points(cluster) == trained_points(local)
    # Latencies are measurements, so the same trials are put on the front with the local costs.
    costs = {(p["candidate"], p["variant"]): p for p in local["points"]}
    moved = [{**p, **{k: costs[(p["candidate"], p["variant"])][k] for k in ("latency_ms", "size_kb", "arena_kb")}}
             for p in cluster["points"]]
    assert trained_points({"points": pareto(moved)}) == trained_points({"points": local["front"]})
    assert "verified" in ok(cli("verify", out / "pick", cwd=tmp_path)).stdout


@pytest.mark.slow
def test_tflm_target_pick_arena_fits_the_board(tmp_path):
    out = tmp_path / "tflm"
    ok(cli("search", "--dataset", "digits", "--space", "tiny", "--trials", "2", "--epochs", "1", "--batch-size",
           "16", "--target", "tflm:nano33ble", "--max-ram-kb", "30", "--out", out, cwd=tmp_path))
    report = json.loads((out / "search.json").read_text())
    assert any(not r["feasible"] and "arena" in r["reason"] for r in report["candidates"])
    assert report["latency_measured_on"].startswith("no latency")
    export = tmp_path / "export"
    ok(cli("export", out / "pick", "--board", "nano33ble", "--out", export, cwd=tmp_path))
    summary = json.loads((out / "pick" / "tflm.json").read_text())
    assert summary["arena"]["measured"] <= 30 * 1024, summary["arena"]
    pick = next(r for r in report["candidates"] if r["candidate"]["id"] == report["pick"]["candidate"])
    assert pick["variants"]["int8"]["arena_kb"] <= 30


def test_refusals_are_one_line(tmp_path):
    proc = cli("search", "--dataset", "digits", "--target", "tflm:nano33ble", "--max-latency-ms", "5",
               "--out", tmp_path / "s", cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "say nothing about the board's speed" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "s").exists()
    proc = cli("search", "--dataset", "digits", "--target", "pi@raspberrypi.local", "--out", tmp_path / "s",
               cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "--target pi@raspberrypi.local: " in proc.stderr  # unreachable, or no ssh
    assert "Traceback" not in proc.stderr and not (tmp_path / "s").exists()


@pytest.mark.slow
def test_ctrl_c_keeps_finished_trials_and_resume_continues(tmp_path):
    out = tmp_path / "interrupted"
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "search", *SEARCH, "--out", str(out)],
                              cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900
    while not list((out / "tune").glob("*/checkpoint_*")):  # a trial has finished: its checkpoint is stored
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
        time.sleep(2)
    driver.send_signal(signal.SIGINT)  # the driver only, as a terminal's Ctrl-C reaches it (Ray's processes block it)
    stdout, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert f"--resume {out}" in stderr and "Traceback" not in stderr
    first = json.loads((out / "search.json").read_text())
    kept = {t["trial_id"]: t["val_accuracy"] for t in first["trials"] if t["status"] == "trained"}
    assert first["interrupted"] and kept and first["pick"] is None
    assert not (out / "pick").exists()
    ok(cli("search", "--resume", out, cwd=tmp_path))
    final = json.loads((out / "search.json").read_text())
    assert not final["interrupted"] and len(final["trials"]) == 4
    assert all(t["status"] == "trained" for t in final["trials"]), final["trials"]
    # The trials finished before Ctrl-C are kept as they were, not trained again.
    assert {t["trial_id"]: t["val_accuracy"] for t in final["trials"] if t["trial_id"] in kept} == kept
    assert "verified" in ok(cli("verify", out / "pick", cwd=tmp_path)).stdout


def _descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of every process below `pid`, from /proc (ours only: started by our search)."""
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = commands.get(child, "")
                frontier.append(child)
    return found


@pytest.mark.slow
def test_a_crashing_trial_costs_only_that_trial(budgeted, tmp_path):
    out = tmp_path / "crash"
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "search", *budgeted, "--out", str(out)],
                              cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900
    while True:  # the first trial's worker process, killed as a crash would end it
        trials = [p for p, cmd in _descendants(driver.pid).items() if cmd.startswith("ray::ImplicitFunc.train")]
        if trials:
            os.kill(min(trials), signal.SIGKILL)
            break
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
        time.sleep(1)
    stdout, stderr = driver.communicate(timeout=1500)
    assert driver.returncode == 0, stdout[-2000:] + stderr[-2000:]
    report = json.loads((out / "search.json").read_text())
    failed = [t for t in report["trials"] if t["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["why"], report["trials"]
    assert sum(t["status"] == "trained" for t in report["trials"]) == 3
    assert "failed" in (out / "search.md").read_text()
    assert "verified" in ok(cli("verify", out / "pick", cwd=tmp_path)).stdout
