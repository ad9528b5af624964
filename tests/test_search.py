"""`pipeline search` end to end: real Ray (local, and a real two-node cluster on 127.0.0.1), real training
on the digits, real measurements; the pick is an ordinary run that `pipeline verify` and `export` accept."""
from __future__ import annotations

import json
import os
import re
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

    # Each candidate's fastest of three rounds: on a 2-core VM one round read the tiny CNNs at 0.036 ms and the next,
    # seconds later, at 0.070 ms, beside a depthwise net at 0.027 ms: a burst that lands on some candidates only.
    costs = {}
    for _ in range(3):
        out = tmp_path_factory.mktemp("feasibility")
        rows = phase_a(SearchConfig(out=str(out), dataset="digits", space="tiny", seed=0), log=lambda *a: None)["rows"]
        for r in rows:
            cost = min(c["latency_ms"] for c in r["variants"].values())
            costs[r["candidate"]["id"]] = min(cost, costs.get(r["candidate"]["id"], cost))
    # The budget sits in the widest gap (by ratio) between two neighbouring costs, at its geometric mean: the
    # search's own measurement, taken later under another load, then has the most room on either side to
    # drop and keep the same candidates (the two-node test compares two searches). Under 2x the split is noise; the
    # 2-core Xeon VM of 2026-12-06 put the gap (ResNet over the larger CNN) at 3.1x to 7x between runs.
    ranked = sorted(costs.values())
    below, above = max(zip(ranked, ranked[1:]), key=lambda pair: pair[1] / pair[0])
    assert above / below > 2.5, f"the tiny space's candidates cost too alike here to split by latency: {costs}"
    return round((below * above) ** 0.5, 4)  # as passed on the command line


@pytest.fixture(scope="module")
def budgeted(latency_budget_ms) -> list[str]:
    """The search's arguments with the machine's own latency budget."""
    return [*SEARCH, "--max-latency-ms", str(latency_budget_ms)]


@pytest.fixture(scope="module")
def guarded(budgeted) -> list[str]:
    """Guarded int8 at a zero budget: any int8 that loses on validation goes to the guard's remedies."""
    return [*budgeted, "--max-accuracy-drop", "0"]


@pytest.fixture(scope="module")
def local_search(tmp_path_factory, guarded) -> Path:
    out = tmp_path_factory.mktemp("search") / "local"
    ok(cli("search", *guarded, "--out", out, cwd=out.parent))
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
    assert report["summary"]["machines"] == [socket.gethostname()]  # one machine, however many Ray starts
    assert "Ray node(s) on 1 machine(s)." in (local_search / "search.md").read_text()
    from device.timing import cpu_features, features_words

    # Where every latency was taken, with the CPU features that decide int8's speed there.
    assert "this host" in report["latency_measured_on"]
    assert features_words(cpu_features()) in report["latency_measured_on"]
    pick = report["pick"]
    row = next(r for r in report["candidates"] if r["candidate"]["id"] == pick["candidate"])
    assert row["variants"][pick["variant"]]["latency_ms"] <= latency_budget_ms
    # Sizes are measured before training on the model as a build delivers it (trained-like biases and BatchNorm,
    # metadata inside, under the name its build gives it). This search is guarded, so int8 was measured under its
    # longest same-graph remedy's name: the size of a remedy the guard delivers, and 8 bytes more than int8's own
    # file (the variant's name is 4 characters shorter, in the model's name and in its description).
    delivered = pick["run_variant"]
    size = (local_search / "pick" / f"model_{delivered}.tflite").stat().st_size
    measured = row["variants"]["int8"]["bytes"]
    assert size == (measured - 8 if delivered == "int8" else measured), (delivered, size, row)
    assert "over_budget" not in pick
    assert report["front"] and all(p["latency_ms"] <= latency_budget_ms for p in report["front"])
    for name in ("search.md", "search.html", "front.png", "search_config.json", "feasibility.json"):
        assert (local_search / name).is_file(), name
    page = (local_search / "search.html").read_text()  # the run report's look, the plot inline
    assert '<table id="trials-table">' in page and "data:image/png;base64," in page
    assert all(f"<td>{t['trial_id']}</td>" in page for t in report["trials"])
    assert "verified" in ok(cli("verify", local_search / "pick", cwd=local_search)).stdout
    manifest = json.loads((local_search / "pick" / "manifest.json").read_text())
    assert manifest["search"]["candidate"]["id"] == pick["candidate"]
    # Built from its saved model with the range it trained with, never a guess from the model.
    assert manifest["input_range"]["range"] == "0,1" and manifest["input_range"]["source"] == "given"
    # What the search picked is what its run delivers: the guard decides the same there as in the trial.
    # The pick's run holds a longer-trained model (below), on which the guard decides again: the run delivers
    # what the report says, at the cost measured for int8.
    delivered = json.loads((local_search / "pick" / "report.json").read_text())["delivered"]["variant"]
    assert delivered == pick["run_variant"] == manifest["search"]["variant"] and delivered.startswith("int8")
    # Phase (c): the pick trained again for the budget's rest, at most 20x a trial's one epoch; the digits gain
    # from twenty epochs over one, so its run holds the longer model, trained as its config says.
    final = pick["final"]
    assert final["epochs"] == 20 and final["used"] and final["val_accuracy"] >= pick["val_accuracy"], final
    assert "one epoch measured in this process" in final["planned"], final
    assert manifest["config"]["epochs"] == 20 and manifest["config"]["keras_model"] == final["keras_model"]
    assert manifest["search"]["final_training"]["epochs"] == 20
    # ... with the default recipe of the zoo model its family opens up, which its run's config records.
    from pipeline.models import MODELS
    from pipeline.search.space import FAMILIES

    recipe = final["recipe"]
    zoo = MODELS[recipe["zoo_model"]].recipe
    assert recipe["zoo_model"] in FAMILIES[pick["candidate"].split("-")[0]][3]
    assert (manifest["config"]["optimizer"], manifest["config"]["learning_rate"]) == (zoo.optimizer, zoo.learning_rate)
    assert (recipe["optimizer"], recipe["warmup_epochs"]) == (zoo.optimizer, zoo.warmup_epochs)
    run_eval = json.loads((local_search / "pick" / "evaluation.json").read_text())["variants"][delivered]
    assert pick["run_test"]["accuracy"] == run_eval["accuracy"]
    assert "Trained again for 20 epochs" in (local_search / "search.md").read_text()


def test_the_final_training_fits_the_time_left_and_never_shortens_a_trial():
    from pipeline.search.final import MAX_FACTOR, plan_epochs, probe_epoch
    from pipeline.search.run import SearchConfig

    cfg = SearchConfig(out="unused", epochs=5)
    pick = {"train_seconds": 50.0, "epochs_trained": 5}  # 10 s an epoch in its trial
    assert plan_epochs(cfg, pick, 300)[0] == 30
    assert plan_epochs(cfg, pick, 10_000)[0] == MAX_FACTOR * 5
    epochs, why = plan_epochs(cfg, pick, 40)  # 4 epochs fit: fewer than its trial had
    assert epochs == 0 and "trial's model is kept" in why
    assert plan_epochs(SearchConfig(out="unused", final_epochs=3), pick, 0)[0] == 3  # asked for: no time check
    assert plan_epochs(SearchConfig(out="unused", final_epochs=0), pick, 10_000)[0] == 0
    # One epoch measured with every CPU, faster than its trial beside others, plans from its own speed.
    epochs, why = plan_epochs(cfg, pick, 200, epoch_seconds=5.0)
    assert epochs == 40 and "measured in this process" in why
    # No epoch is measured where even twice the trial's speed would hold no longer training, or where
    # --final-epochs says how long.
    assert probe_epoch(cfg, pick, 20, log=print) is None
    assert probe_epoch(SearchConfig(out="unused", final_epochs=3), pick, 10_000, log=print) is None


def test_asha_stops_no_trial_before_half_its_epochs():
    from pipeline.search.run import grace_period

    assert [grace_period(e) for e in (1, 2, 3, 8, 30)] == [1, 1, 1, 4, 15]



@pytest.mark.slow
def test_the_trials_model_is_built_when_the_guard_delivers_the_final_one_in_another_graph(local_search, tmp_path,
                                                                                          monkeypatch):
    """The longer-trained model replaces the trial's only if the guard delivers it in the graph measured before
    training. The guard's verdict is forced here (a remedy that changes the graph cannot be made to happen on
    demand); what follows from it runs for real: the trial's checkpoint is built, and its run says why."""
    from pipeline.search import final
    from pipeline.search.run import load_config
    from pipeline.search.space import Candidate

    pick = json.loads((local_search / "search.json").read_text())["pick"]
    assert pick["final"]["used"]
    trial_dir = next((local_search / "tune").glob(f"run_trial_{pick['trial_id']}_*"))
    pick["checkpoint"] = str(max(trial_dir.glob("checkpoint_*")))
    out = tmp_path / "search"
    out.mkdir()
    cfg = load_config(local_search)
    monkeypatch.setattr(final, "competing", lambda trial, base: None)
    run = final.materialise(cfg, out, pick, log=lambda *a: None)

    assert run == out / "pick" and not pick["final"]["used"] and "another graph" in pick["final"]["why"]
    manifest = json.loads((run / "manifest.json").read_text())
    kept = out / "models" / f"trial-{pick['trial_id']}" / Candidate.parse(pick["candidate"]).keras_file
    assert manifest["config"]["keras_model"] == str(kept) and kept.is_file()
    assert manifest["config"]["epochs"] == cfg.epochs  # the trial's training, not the final one's
    assert manifest["search"]["final_training"]["used"] is False
    assert manifest["search"]["variant"] == pick["run_variant"] == pick["variant"]
    assert "verified" in ok(cli("verify", run, cwd=out)).stdout

@pytest.mark.slow
def test_guarded_int8_competes_as_the_guard_delivers_it(local_search):
    report = json.loads((local_search / "search.json").read_text())
    trained = {t["trial_id"]: t for t in report["trials"] if t["status"] == "trained"}
    assert trained and all(t["guard"] and "int8_drop_pp" in t["guard"] for t in trained.values())
    for trial_id, t in trained.items():
        mine = {p["variant"] for p in report["points"] if p["trial_id"] == trial_id}
        guard = t["guard"]
        if guard["int8_is"] == "int8":  # within the budget: int8 itself
            assert mine == {"int8"} and guard["int8_drop_pp"] <= 1e-6, (mine, guard)
        elif guard["same_graph_as_int8"]:  # repaired without changing the graph: the remedy, at int8's cost
            assert mine == {guard["int8_is"]} and guard["int8_is"] in t["test"], (mine, guard)
        else:  # rejected, or repaired into another graph whose cost was never measured: out
            assert not mine and "does not compete" in t["why"], (mine, guard)


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
def test_two_node_cluster_runs_the_same_search_with_the_same_front(local_search, guarded, tmp_path):
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
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "search", *guarded, "--out", str(out),
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
    # The flash the export writes is the size feasibility measured before training.
    assert summary["flash_bytes"] == pick["variants"]["int8"]["bytes"], (summary["flash_bytes"], pick["variants"])


def test_a_remedy_competes_at_int8s_cost_only_when_it_runs_int8s_graph(tmp_path):
    """Read from real flatbuffers: equalization (the guard's first remedy) keeps int8's graph, so the cost measured
    for int8 before training holds for it; a model with other operators is another graph."""
    import numpy as np

    from pipeline.config import BuildConfig
    from pipeline.convert import convert
    from pipeline.guard.equalize import equalize
    from pipeline.search.space import Candidate
    from pipeline.search.trial import _graph
    from pipeline.train import seed_everything

    seed_everything(0)
    model = Candidate("cnn", 0.5, 1, 28).build(1, 10)
    images = np.random.default_rng(0).uniform(0, 1, (32, 28, 28, 1)).astype("float32")
    cfg = BuildConfig(dataset="digits", out=str(tmp_path / "unused"))
    equalized, record = equalize(model, images)
    assert equalized is not None, record
    files = {}
    for name, m, variant in (("int8", model, "int8"), ("int8-cle", equalized, "int8"), ("fp32", model, "fp32")):
        files[name] = tmp_path / f"{name}.tflite"
        files[name].write_bytes(convert(m, variant, cfg, images))
    assert files["int8"].read_bytes() != files["int8-cle"].read_bytes()  # other weights ...
    assert _graph(files["int8"]) == _graph(files["int8-cle"])  # ... on the same graph
    assert _graph(files["int8"]) != _graph(files["fp32"])


def test_the_front_takes_int8_as_the_guard_delivers_it():
    from pipeline.search.report import choose, points

    cost = {"int8": {"latency_ms": 0.1, "size_kb": 20.0}, "fp32": {"latency_ms": 0.1, "size_kb": 80.0}}
    feasibility = {"rows": [{"candidate": {"id": "c"}, "fitting_variants": ["int8", "fp32"], "variants": cost}]}
    test = {v: {"accuracy": 0.9, "low": 0.8, "high": 0.95, "n": 100} for v in ("int8", "int8-cle", "int8-mixed",
                                                                                "fp32")}

    def trial(n, val, int8_is, same):
        return {"trial_id": f"t{n}", "number": n, "candidate": "c", "learning_rate": 1e-3, "status": "trained",
                "val_accuracy": val, "node_id": "n", "checkpoint": "ckpt", "test": test,
                "guard": {"int8_drop_pp": 0.0 if int8_is == "int8" else 2.0, "int8_is": int8_is,
                          "same_graph_as_int8": same}}

    trials = [trial(1, 0.7, "int8", True), trial(2, 0.8, "int8-cle", True), trial(3, 0.95, "int8-mixed", False),
              trial(4, 0.9, "fp32", False)]
    got = {(p["trial_id"], p["variant"]) for p in points(trials, feasibility)}
    assert got == {("t1", "int8"), ("t1", "fp32"), ("t2", "int8-cle"), ("t2", "fp32"), ("t3", "fp32"),
                   ("t4", "fp32")}
    # The best validation accuracy (t3) has no int8 that competes: its smallest competing variant is fp32.
    pick = choose(trials, feasibility)
    assert (pick["trial_id"], pick["variant"], pick["variants"]) == ("t3", "fp32", ["fp32"])
    pick = choose(trials[:2], feasibility)
    assert (pick["trial_id"], pick["variant"], pick["variants"]) == ("t2", "int8-cle", ["int8", "fp32"])


def test_the_resnet_family_opens_up_resnet8s_width_and_depth():
    import keras

    from pipeline.models import build_model
    from pipeline.search.space import Candidate

    zoo = build_model("cifar-resnet8", (32, 32, 3), 10)
    same = Candidate.parse("resnet-w1-d1-r32").build(3, 10)
    assert same.count_params() == zoo.count_params() == 78_666
    assert [tuple(w.shape) for w in same.weights] == [tuple(w.shape) for w in zoo.weights]
    assert Candidate.parse("resnet-w1-d1-r32").zoo_model(3) == "cifar-resnet8"
    # A search folder written before the family opened up its depth names it resnet8: its trials still build.
    assert Candidate.parse("resnet8-w0.5-r24") == Candidate.parse("resnet-w0.5-d1-r24")
    # Three blocks per stack at half the width: the CIFAR ResNet-20 (a stem, 18 convs, 2 shortcut convs).
    deep = Candidate.parse("resnet-w0.5-d3-r32").build(3, 10)
    convs = [layer for layer in deep.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 21 and sorted({c.filters for c in convs}) == [8, 16, 32]
    assert sum(isinstance(layer, keras.layers.Add) for layer in deep.layers) == 9


def test_the_mbconv_family_builds_inverted_residuals_and_trains_finally_with_the_depthwise_recipe():
    import keras

    from pipeline.models import MODELS
    from pipeline.search.space import SPACES, Candidate
    from pipeline.search.trial import trial_config

    model = Candidate.parse("mbconv-w1-d2-r32").build(3, 10)
    depthwise = [layer for layer in model.layers if isinstance(layer, keras.layers.DepthwiseConv2D)]
    assert len(depthwise) == 6  # blocks: 1 + 2 + 2 + 1
    # Each expanding block widens its input four times before the depthwise conv; the first block does not expand.
    assert [d.input.shape[-1] for d in depthwise] == [16, 64, 96, 96, 192, 192]
    assert [d.strides for d in depthwise] == [(1, 1), (2, 2), (1, 1), (2, 2), (1, 1), (1, 1)]
    # A skip wherever a block keeps its input's shape: the first block and the second of each middle stage.
    assert sum(isinstance(layer, keras.layers.Add) for layer in model.layers) == 3
    assert model.output_shape == (None, 10)
    # The smallest width and resolution build on one channel too (the digits).
    assert Candidate.parse("mbconv-w0.5-d1-r8").build(1, 10).count_params() > 0
    assert any(c.family == "mbconv" for c in SPACES["default"].candidates("cifar10", 32))
    settings = {"dataset": "digits", "data_dir": None, "seed": 0, "quantize": ["int8"], "epochs": 3,
                "batch_size": 16}
    cfg = trial_config(settings, Candidate.parse("mbconv-w0.5-d1-r8"), None, out="unused")
    zoo = MODELS["cifar-dscnn"].recipe
    assert (cfg.optimizer, cfg.learning_rate) == (zoo.optimizer, zoo.learning_rate)


def test_the_resnet2_family_is_resnet8_without_its_full_resolution_stack_and_trains_finally_as_resnet8():
    import keras

    from pipeline.models import MODELS
    from pipeline.search.space import SPACES, Candidate
    from pipeline.search.trial import trial_config

    model = Candidate.parse("resnet2-w1.25-d1-r32").build(3, 10)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    # The stem at 32x32, then two stacks of 40 and 60 filters at 16x16 and 8x8, each with a 1x1 stride-2 shortcut.
    assert [(c.filters, c.kernel_size, c.strides, c.output.shape[1]) for c in convs] == [
        (16, (3, 3), (1, 1), 32),
        (40, (3, 3), (2, 2), 16), (40, (3, 3), (1, 1), 16), (40, (1, 1), (2, 2), 16),
        (60, (3, 3), (2, 2), 8), (60, (3, 3), (1, 1), 8), (60, (1, 1), (2, 2), 8)]
    # About ResNet-8's parameters (78,666), moved from the full-resolution stack to the two others.
    assert model.count_params() == 79_422 and model.output_shape == (None, 10)
    assert Candidate.parse("resnet2-w1-d2-r8").build(1, 10).count_params() > 0  # two blocks a stack, the digits
    assert {"resnet2-w1-d1-r32", "resnet2-w1.25-d1-r32"} <= {c.id for c in SPACES["default"].candidates("cifar10", 32)}
    settings = {"dataset": "cifar10", "data_dir": None, "seed": 0, "quantize": ["int8"], "epochs": 45,
                "batch_size": 64}
    cfg = trial_config(settings, Candidate.parse("resnet2-w1.25-d1-r32"), None, out="unused")
    zoo = MODELS["cifar-resnet8"].recipe
    assert (cfg.optimizer, cfg.learning_rate, cfg.plain_epochs) == (zoo.optimizer, zoo.learning_rate, 6)


def test_the_final_training_takes_its_familys_zoo_recipe_whatever_the_channels():
    from pipeline.models import MODELS
    from pipeline.search.space import Candidate
    from pipeline.search.trial import RECIPE, trial_config

    settings = {"dataset": "digits", "data_dir": None, "seed": 0, "quantize": ["int8"], "epochs": 3,
                "batch_size": 16}
    # A depthwise net on grayscale digits: cifar-dscnn's recipe, in a config whose model takes one channel.
    cfg = trial_config(settings, Candidate.parse("dscnn-w0.25-r8"), None, out="unused")
    zoo = MODELS["cifar-dscnn"].recipe
    assert (cfg.optimizer, cfg.learning_rate, cfg.warmup_epochs) == (zoo.optimizer, zoo.learning_rate,
                                                                      zoo.warmup_epochs)
    assert MODELS[cfg.model].channels == 1 and (cfg.epochs, cfg.batch_size) == (3, 16)
    cnn = trial_config(settings, Candidate.parse("cnn-w0.5-d1-r8"), None, out="unused")
    assert (cnn.optimizer, cnn.learning_rate) == (MODELS["mnist-cnn"].recipe.optimizer,
                                                  MODELS["mnist-cnn"].recipe.learning_rate)
    trial = trial_config(settings, Candidate.parse("dscnn-w0.25-r8"), 3e-3, out="unused")
    assert (trial.optimizer, trial.learning_rate, trial.warmup_epochs) == (RECIPE["optimizer"], 3e-3, 0)
    # ResNet-8's recipe ends plain for the same share of the final training's epochs; the trials never do.
    cifar = {**settings, "dataset": "cifar10", "epochs": 90}
    assert trial_config(cifar, Candidate.parse("resnet-w1-d1-r32"), None, out="unused").plain_epochs == 12
    assert trial_config(cifar, Candidate.parse("resnet-w1-d1-r32"), 3e-3, out="unused").plain_epochs == 0
    assert trial_config(cifar, Candidate.parse("dscnn-w1-r32"), None, out="unused").plain_epochs == 0


def test_the_pick_run_over_a_budget_is_said():
    from pipeline.search.report import run_over_budget

    measured = {"latency_ms": 0.0380, "bytes": 100_000}
    budgets = {"latency_ms": 0.039, "size_kb": 100.0, "ram_kb": None}
    within = {"run_bytes": 100_000, "run_latency_p50_ms": 0.0389}
    assert run_over_budget(within, "int8", measured, budgets, "host") == {}
    over = run_over_budget({"run_bytes": 102_401, "run_latency_p50_ms": 0.0429}, "int8", measured, budgets, "host")
    assert "102,401 bytes, over the 100 KB size budget" in over["over_budget"]
    assert "p50 0.0429 ms, over the 0.039 ms latency budget by 10% (before training: 0.0380 ms)" in \
        over["latency_over_budget"]
    # A board's latency budget was checked on the board: the run's host figure says nothing about it.
    slow = {"run_bytes": 1_000, "run_latency_p50_ms": 0.5}
    assert run_over_budget(slow, "int8", measured, budgets, "pi@192.0.2.7") == {}
    assert run_over_budget(slow, "int8", measured, {"latency_ms": None, "size_kb": None}, "host") == {}


def test_refusals_are_one_line(tmp_path):
    proc = cli("search", "--dataset", "digits", "--target", "tflm:nano33ble", "--max-latency-ms", "5",
               "--out", tmp_path / "s", cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "say nothing about the board's speed" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "s").exists()
    proc = cli("search", "--dataset", "digits", "--target", "pi@raspberrypi.local", "--out", tmp_path / "s",
               cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "--target pi@raspberrypi.local: " in proc.stderr  # unreachable, or no ssh
    assert "Traceback" not in proc.stderr and not (tmp_path / "s").exists()


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


def _wait(driver: subprocess.Popen, found, what: str, seconds: float = 900):
    deadline = time.monotonic() + seconds
    while not (hit := found()):
        assert driver.poll() is None, f"the search ended before {what}: {driver.returncode}"
        assert time.monotonic() < deadline, f"no {what} within {seconds:.0f} s"
        time.sleep(1)
    return hit


@pytest.mark.slow
def test_a_crash_and_a_ctrl_c_cost_only_what_they_stop(budgeted, tmp_path):
    """One search takes both blows: a trial's worker is killed as a crash would end it, then the driver gets
    Ctrl-C once another trial has ended. The crash costs that trial only; --resume keeps the trials that ended
    (not trained again) and runs the rest."""
    out, said = tmp_path / "search", tmp_path / "driver.out"
    with said.open("w") as stdout, (tmp_path / "driver.err").open("w") as stderr:
        driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "search", *budgeted, "--out", str(out)],
                                  cwd=tmp_path, env=env(), stdout=stdout, stderr=stderr, text=True)
    try:
        workers = _wait(driver, lambda: [p for p, cmd in _descendants(driver.pid).items()
                                         if cmd.startswith("ray::ImplicitFunc.train")], "trial worker")
        os.kill(min(workers), signal.SIGKILL)
        # The driver's own line for a trial that ended: its result is in the experiment, not only on disk.
        _wait(driver, lambda: "validation accuracy" in said.read_text(), "trial that ended")
        driver.send_signal(signal.SIGINT)  # the driver only, as a terminal's Ctrl-C reaches it (Ray's block it)
        driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    stderr = (tmp_path / "driver.err").read_text()
    assert driver.returncode == 130, said.read_text()[-2000:] + stderr[-2000:]
    assert f"--resume {out}" in stderr and "Traceback" not in stderr
    first = json.loads((out / "search.json").read_text())
    failed = [t["trial_id"] for t in first["trials"] if t["status"] == "failed"]
    kept = {t["trial_id"]: t["val_accuracy"] for t in first["trials"] if t["status"] == "trained"}
    assert first["interrupted"] and len(failed) == 1 and kept and first["pick"] is None, first["trials"]
    assert not (out / "pick").exists()
    _as_saved_before_the_crash(out / "tune", failed[0])
    ok(cli("search", "--resume", out, cwd=tmp_path))
    final = json.loads((out / "search.json").read_text())
    assert not final["interrupted"] and len(final["trials"]) == 4, final["trials"]
    assert [t["trial_id"] for t in final["trials"] if t["status"] == "failed"] == failed
    assert "crashed before the search was interrupted" in next(t for t in final["trials"]
                                                                if t["status"] == "failed")["why"]
    assert sum(t["status"] == "trained" for t in final["trials"]) == 3, final["trials"]
    assert {t["trial_id"]: t["val_accuracy"] for t in final["trials"] if t["trial_id"] in kept} == kept
    assert "failed" in (out / "search.md").read_text()
    assert "verified" in ok(cli("verify", out / "pick", cwd=tmp_path)).stdout


def _as_saved_before_the_crash(experiment: Path, trial_id: str) -> None:
    """Ray may save the experiment before it records a trial's crash (it did twice on a loaded machine): the
    trial is then RUNNING in the saved state, and a resumed Tune trains it again. The state is left as that race
    leaves it, so that what stops the retrain is checked on every run, loaded or not."""
    for path in experiment.glob("experiment_state-*.json"):
        state = json.loads(path.read_text())
        for trial in state["trial_data"]:
            fields = json.loads(trial[0])
            if fields["trial_id"] == trial_id:
                fields["status"] = "RUNNING"
                trial[0] = json.dumps(fields)
        path.write_text(json.dumps(state))


@pytest.mark.slow
def test_a_space_no_larger_than_the_trials_trains_each_configuration_once(tmp_path):
    """One candidate under the size budget and two learning rates are two configurations: three trials
    would train one of them twice (Optuna repeats in a space this small); the search trains each once."""
    out = tmp_path / "small"
    proc = ok(cli("search", "--dataset", "digits", "--space", "tiny", "--trials", "3", "--epochs", "1",
                  "--batch-size", "16", "--seed", "0", "--budget-minutes", "20", "--max-size-kb", "25", "--out", out,
                  cwd=REPO))
    feasibility = json.loads((out / "feasibility.json").read_text())
    feasible = [r["candidate"]["id"] for r in feasibility["rows"] if r["feasible"]]
    assert len(feasible) == 1, feasibility["rows"]  # int8 sizes are the converter's: dscnn-w0.25 alone fits 25 KB
    report = json.loads((out / "search.json").read_text())
    trained = [(t["candidate"], t["learning_rate"]) for t in report["trials"]]
    assert sorted(trained) == sorted({(feasible[0], lr) for lr in (1e-3, 3e-3)}), trained
    assert "only 2 configurations (candidate, learning rate) for 3 trials" in proc.stdout + proc.stderr
    assert not report["interrupted"] and report["pick"]


def _drive(searcher, space, trials: int, first: int = 0) -> list[tuple]:
    """Tune's calls to a searcher, without Ray: suggest, then complete with a score that favours one
    candidate and the higher rate, so Optuna's sampler has something to exploit (and to repeat)."""
    searcher.set_search_properties("val_accuracy", "max", space)
    seen = []
    for i in range(first, first + trials):
        config = searcher.suggest(f"t{i}")
        seen.append((config["candidate"], config["learning_rate"]))
        score = 0.9 - 0.1 * int(config["candidate"][1:]) + (0.05 if config["learning_rate"] > 2e-3 else 0)
        searcher.on_trial_complete(f"t{i}", result={"val_accuracy": score, "config": config})
    return seen


def test_a_space_larger_than_the_trials_never_trains_a_configuration_twice(tmp_path):
    """Twelve configurations, ten trials: Optuna (seed 0) proposes two repeats here and leaves a candidate out; the
    search's sampler trains every candidate once first, in the order given, at the first rate, then passes
    Optuna's proposals through and asks again on a repeat, and keeps that across --resume (save, restore)."""
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.search_generator import SearchGenerator

    from pipeline.search.sampling import plan

    feasible = [f"c{i}" for i in range(6)]
    space, searcher, samples = plan(feasible, 10, seed=0)
    assert samples == 10
    bare = _drive(OptunaSearch(seed=0), plan(feasible, 10, seed=0)[0], 10)
    assert len(set(bare)) < len(bare), "Optuna no longer repeats here: the test would not show the fix"
    first = _drive(searcher, space, 5)
    # Saved and restored the way Tune's experiment checkpoint does it (wrappers' state, then Optuna's file).
    SearchGenerator(searcher).save_to_dir(str(tmp_path), "s")
    space, restored, _ = plan(feasible, 10, seed=0)
    SearchGenerator(restored).restore_from_dir(str(tmp_path))
    seen = first + _drive(restored, space, 5, first=5)
    assert len(set(seen)) == 10, seen
    # Every candidate once before any twice, in the order given: Optuna alone never trains c5 in these ten trials.
    assert "c5" not in {c for c, _ in bare}, "Optuna tries every candidate here: the test would not show the rule"
    assert seen[:6] == [(c, 3e-3) for c in feasible], seen
    # Then Optuna's proposals, which it learnt the first pass from: the configurations left, each once.
    assert all(lr == 1e-3 for _, lr in seen[6:]), seen


def test_the_first_pass_trains_the_largest_candidates_first():
    from pipeline.search.feasibility import by_weights

    def row(name, feasible=True, **variants):
        return {"candidate": {"id": name}, "feasible": feasible, "variants": variants,
                "fitting_variants": [v for v in variants if not variants[v].get("over")]}

    rows = [row("small-r32", int8={"bytes": 20_000, "latency_ms": 0.01}),
            row("slow", int8={"bytes": 30_000, "latency_ms": 0.038}),
            row("small-r24", int8={"bytes": 20_000, "latency_ms": 0.006}),
            row("large", int8={"bytes": 95_000, "latency_ms": 0.02}, fp32={"bytes": 300_000, "over": True}),
            row("dropped", False, int8={"bytes": 99_000, "latency_ms": 0.05})]
    # By weights, never by a measured latency; a file that does not fit is not counted; equal sizes as listed.
    assert by_weights(rows) == ["large", "slow", "small-r32", "small-r24"]


def test_measure_only_measures_every_candidate_against_the_budgets_and_trains_none(budgeted, tmp_path):
    out = tmp_path / "costs"
    proc = ok(cli("search", *budgeted, "--measure-only", "--out", out, cwd=tmp_path))
    report = json.loads((out / "search.json").read_text())
    rows = report["candidates"]
    assert len(rows) == len(report["space"]["candidates"]) == 4
    assert all(c["latency_ms"] > 0 and c["size_kb"] > 0 for r in rows for c in r["variants"].values())
    dropped = [r for r in rows if not r["feasible"]]
    assert dropped and len(dropped) < len(rows) and all("latency" in r["reason"] for r in dropped)
    assert report["trials"] == [] and report["pick"] is None and not (out / "tune").exists()
    assert not (out / "pick").exists()
    page = (out / "search.md").read_text()
    assert "`--measure-only` trains nothing" in page and all(r["candidate"]["id"] in page for r in rows)
    assert "report in" in proc.stdout + proc.stderr


def test_a_candidate_slowed_by_a_burst_is_timed_again_before_it_is_dropped(monkeypatch, tmp_path, latency_budget_ms):
    """A 60-minute search read the zoo's ResNet-8 at 0.058 ms with a tight spread, seconds after it read 0.039 ms,
    and dropped it from a 0.04 ms budget. Here every first reading is as slow as a burst of another process makes
    it; the candidates that fit are timed again, kept, and judged on the median of their rounds."""
    from pipeline.measure import benchmark
    from pipeline.search.feasibility import CONFIRM_ROUNDS
    from pipeline.search.run import SearchConfig, phase_a

    real = benchmark.measure_latency

    def burst(run_dir, variants, *args, **kwargs):
        out = real(run_dir, variants, *args, **kwargs)
        if Path(run_dir).name.startswith("edgepipe-feasibility-"):  # each candidate's first reading
            for v in variants:
                out[v]["latency"]["p50_ms"] *= 50
        return out

    monkeypatch.setattr(benchmark, "measure_latency", burst)
    logged: list[str] = []
    cfg = SearchConfig(out=str(tmp_path / "s"), dataset="digits", space="tiny", seed=0,
                       max_latency_ms=latency_budget_ms)
    rows = phase_a(cfg, log=logged.append)["rows"]
    kept, dropped = [r for r in rows if r["feasible"]], [r for r in rows if not r["feasible"]]
    assert kept and dropped, [(r["candidate"]["id"], r.get("reason")) for r in rows]
    for row in rows:
        (cost,) = row["variants"].values()
        rounds = cost["latency_rounds_ms"]
        assert len(rounds) == 1 + CONFIRM_ROUNDS and rounds[0] == max(rounds)
        assert cost["latency_ms"] == sorted(rounds)[1] == cost["latency"]["p50_ms"]
        assert (cost["latency_ms"] <= latency_budget_ms) == row["feasible"]
    assert all(r["reason"].startswith("over budget before training: int8: latency") for r in dropped)
    assert sum("timed 2 times more" in line for line in logged) == len(rows)


@pytest.mark.parametrize("lost", ["turned into another error", "swallowed by a finalizer"])
def test_a_ctrl_c_while_candidates_are_measured_stops_the_search(monkeypatch, tmp_path, lost):
    """Phase (a) drops a candidate the converter cannot take and goes on; a Ctrl-C that TensorFlow turned into
    another error ("ValueError: None values not supported", seen) was one such, and one swallowed while a finalizer
    ran went unseen: either way the search went on to measure the rest and train for the whole budget. The Ctrl-C
    is real; the stand-in is TensorFlow's handling of it."""
    from pipeline import interrupts
    from pipeline.search import feasibility
    from pipeline.search.run import SearchConfig, phase_a

    real, measured = feasibility.measure_model, []

    class Finalizer:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    def ctrl_c_inside(*args, **kwargs):
        measured.append(args[-1])
        if len(measured) == 1:
            if lost == "swallowed by a finalizer":
                finalizer = Finalizer()
                del finalizer
            else:
                try:
                    signal.raise_signal(signal.SIGINT)
                except KeyboardInterrupt:
                    raise ValueError("None values not supported.")
        return real(*args, **kwargs)

    monkeypatch.setattr(feasibility, "measure_model", ctrl_c_inside)
    cfg = SearchConfig(out=str(tmp_path / "s"), dataset="digits", space="tiny", seed=0, max_size_kb=25)
    with pytest.raises(KeyboardInterrupt), interrupts.ctrl_c():
        phase_a(cfg, log=lambda *a: None)
    assert len(measured) == 1, measured  # stopped before the next candidate


def test_the_picks_file_is_the_size_feasibility_measured(tmp_path):
    """The bytes checked against --max-size-kb before training are the bytes the pick's run delivers: its build
    embeds the model's name (its .keras file's) in the TFLite metadata, and feasibility embeds the same name."""
    import keras

    from pipeline.search import final
    from pipeline.search.feasibility import _as_trained
    from pipeline.search.run import SearchConfig, phase_a
    from pipeline.search.space import Candidate

    cfg = SearchConfig(out=str(tmp_path / "search"), dataset="digits", space="tiny", epochs=1, batch_size=16)
    row = phase_a(cfg, log=lambda *a: None)["rows"][0]
    Path(cfg.out).mkdir()
    cand = Candidate.parse(row["candidate"]["id"])
    # A trial's checkpoint of that candidate: its weights as trained-like as feasibility makes them.
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    keras.backend.clear_session()  # as a trial builds its model, in a fresh Keras session
    keras.utils.set_random_seed(cfg.seed)
    model = cand.build(1, 10)
    _as_trained(model, cfg.seed)
    model.save(checkpoint / "model.keras")
    pick = {"candidate": cand.id, "trial_id": "abc12_00000", "checkpoint": str(checkpoint), "learning_rate": 1e-3,
            "variant": "int8", "variants": ["int8"], "final": {}}
    run = final.materialise(cfg, Path(cfg.out), pick, log=lambda *a: None)
    assert (run / "model_int8.tflite").stat().st_size == row["variants"]["int8"]["bytes"]


def test_under_the_guard_no_delivered_int8_file_is_larger_than_feasibility_measured(tmp_path):
    """A remedy on int8's graph (equalization's int8-cle) embeds its own, longer variant name: under the guard,
    feasibility measures int8 under the longest such name, so the remedy's file as a build delivers it is
    exactly the bytes checked against --max-size-kb, and int8's own a few bytes fewer."""
    import keras
    import numpy as np

    import pipeline
    from pipeline import build as stages
    from pipeline.convert import convert
    from pipeline.guard.equalize import equalize
    from pipeline.metadata import embed_files
    from pipeline.search.feasibility import _as_trained
    from pipeline.search.run import SearchConfig, phase_a
    from pipeline.search.space import Candidate
    from pipeline.search.trial import trial_config
    from pipeline.train import load_user_model, seed_everything

    cfg = SearchConfig(out=str(tmp_path / "search"), dataset="digits", space="tiny", epochs=1, batch_size=16,
                       max_accuracy_drop=1.0)
    feasibility = phase_a(cfg, log=lambda *a: None)
    row = feasibility["rows"][0]
    cand = Candidate.parse(row["candidate"]["id"])
    keras.backend.clear_session()  # as a trial builds its model, in a fresh Keras session (layer names)
    seed_everything(cfg.seed)
    model = cand.build(1, 10)
    _as_trained(model, cfg.seed)
    model.save(tmp_path / cand.keras_file)  # loaded back, as a build loads the trained model
    model = load_user_model(tmp_path / cand.keras_file, None)
    images = np.random.default_rng(0).uniform(0, 1, (32, cand.resolution, cand.resolution, 1)).astype("float32")
    equalized, record = equalize(model, images)
    assert equalized is not None, record
    run_cfg = trial_config(cfg.settings(), cand, 1e-3, keras_model=str(tmp_path / cand.keras_file),
                           out=str(tmp_path / "run"))
    for variant, m in (("int8", model), ("int8-cle", equalized)):
        (tmp_path / f"model_{variant}.tflite").write_bytes(convert(m, "int8", run_cfg, images))
    data, _, _ = stages.load_inputs(run_cfg, stages.STAGES, lambda *a: None)
    embed_files(tmp_path, ("int8", "int8-cle"), run_cfg.model_name, data.name, data.spec.to_dict(),
                pipeline.__version__, log=lambda *a: None)
    sizes = {v: (tmp_path / f"model_{v}.tflite").stat().st_size for v in ("int8", "int8-cle")}
    assert sizes["int8"] < sizes["int8-cle"] == row["variants"]["int8"]["bytes"], (sizes, row["variants"]["int8"])


def test_resume_refuses_other_options_rather_than_ignoring_them(tmp_path):
    proc = cli("search", "--resume", tmp_path / "s", "--max-size-kb", "1", "--dataset", "cifar10", "--trials", "99",
               cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "drop --dataset, --max-size-kb, --trials" in proc.stderr


def test_resume_continues_in_the_folder_it_names_from_anywhere(tmp_path):
    """A search started with a relative --out, moved, and resumed from another folder goes on where it is now."""
    (tmp_path / "a").mkdir()
    ok(cli("search", *SEARCH, "--measure-only", "--out", "m2", cwd=tmp_path / "a"))
    saved = json.loads((tmp_path / "a" / "m2" / "search_config.json").read_text())
    assert saved["out"] == str(tmp_path / "a" / "m2")
    (tmp_path / "a" / "m2").rename(tmp_path / "a" / "moved")
    (tmp_path / "a" / "moved" / "search.json").unlink()
    ok(cli("search", "--resume", "a/moved", cwd=tmp_path))
    assert (tmp_path / "a" / "moved" / "search.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"] and not (tmp_path / "a" / "m2").exists()


@pytest.mark.parametrize("option", ["--max-latency-ms", "--max-size-kb", "--budget-minutes", "--max-accuracy-drop"])
def test_a_budget_that_is_not_a_number_is_refused(option, tmp_path):
    """nan passes a range check (its comparisons are false) and would then hold nothing back; inf minutes never
    end. Both are refused on the command line and in a configuration (an edited search_config.json)."""
    from pipeline.search import SearchError
    from pipeline.search.run import SearchConfig

    for value in ("nan", "inf"):
        proc = cli("search", "--dataset", "digits", option, value, "--out", tmp_path / "s", cwd=tmp_path, timeout=120)
        assert proc.returncode == 2 and "is not a finite number" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "s").exists()
        with pytest.raises(SearchError, match=f"{option}: got {value}, expected a finite number"):
            SearchConfig(out="unused", **{option[2:].replace("-", "_"): float(value)})


@pytest.mark.slow
def test_a_search_in_which_no_trial_finished_fails_and_says_where_the_report_is(tmp_path):
    """Trials of 500 epochs in a one-minute budget: the time budget stops every one; the search reports them and
    fails rather than ending as if it had found something."""
    out = tmp_path / "short"
    proc = cli("search", "--dataset", "digits", "--space", "tiny", "--trials", "2", "--epochs", "500", "--batch-size",
               "16", "--budget-minutes", "1", "--final-epochs", "0", "--out", out, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert "no trial finished training" in error and str(out / "search.md") in error, error
    report = json.loads((out / "search.json").read_text())
    assert report["pick"] is None and report["trials"] and not report["summary"]["trained"], report["trials"]
    assert not (out / "pick").exists()


def test_a_new_search_that_fails_on_its_data_leaves_no_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = cli("search", "--dataset", "cifar10", "--data-dir", tmp_path / "empty", "--space", "tiny", "--out",
               tmp_path / "s", cwd=tmp_path, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "s").exists()  # the corrected command is not refused for a non-empty --out


@pytest.mark.slow
def test_resume_after_measuring_and_before_any_trial_starts_the_trials(tmp_path):
    """Stopped between feasibility and Tune's first save (Ctrl-C while Ray starts, Ray failing to start), a search
    holds its configuration and feasibility.json and no experiment; --resume runs the trials from the start. The
    folder is made as such a stop leaves it: measured (--measure-only), its configuration then that of a search."""
    out = tmp_path / "s"
    ok(cli("search", "--dataset", "digits", "--space", "tiny", "--trials", "2", "--epochs", "1", "--batch-size", "16",
           "--max-size-kb", "25", "--final-epochs", "0", "--measure-only", "--out", out, cwd=tmp_path))
    saved = json.loads((out / "search_config.json").read_text())
    (out / "search_config.json").write_text(json.dumps({**saved, "measure_only": False}))
    for name in ("search.json", "search.md", "search.html", "front.png"):
        (out / name).unlink()
    ok(cli("search", "--resume", out, cwd=tmp_path))
    report = json.loads((out / "search.json").read_text())
    assert len(report["trials"]) == 2 and report["pick"], report["trials"]
    assert "verified" in ok(cli("verify", out / "pick", cwd=tmp_path)).stdout


def test_more_cpus_per_trial_than_this_machine_has_is_refused_for_a_local_ray(tmp_path):
    """A local Ray has this machine's cores: a trial asking for more would never start, and every trial would wait
    out the budget."""
    proc = cli("search", "--dataset", "digits", "--cpus-per-trial", os.cpu_count() + 1, "--out", tmp_path / "s",
               cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"--cpus-per-trial {os.cpu_count() + 1}: this machine has {os.cpu_count()} CPUs" in proc.stderr
    assert not (tmp_path / "s").exists()


def _ours_alive(pids) -> list[int]:
    """The processes of `pids` still running (a zombie has ended: only its parent's wait is missing)."""
    alive = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(pid)
        except (OSError, IndexError):
            continue
    return alive


@pytest.mark.slow
def test_ctrl_c_while_ray_starts_leaves_no_ray_behind(tmp_path):
    """Ray is started inside the search's try: interrupted while it starts, its processes are ended and its
    temporary folder removed."""
    out = tmp_path / "s"
    with (tmp_path / "driver.out").open("w") as stdout, (tmp_path / "driver.err").open("w") as stderr:
        driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "search", *SEARCH, "--out", str(out)],
                                  cwd=tmp_path, env=env(), stdout=stdout, stderr=stderr, text=True)
    try:
        ray = _wait(driver, lambda: {p: c for p, c in _descendants(driver.pid).items()
                                     if "edgepipe-ray-" in c}, "Ray starting", seconds=300)
        temp = {Path(t) for c in ray.values() for t in re.findall(r"/tmp/edgepipe-ray-[a-z0-9_]+", c)}
        seen = set(ray)
        driver.send_signal(signal.SIGINT)
        while driver.poll() is None:
            seen |= set(_descendants(driver.pid))
            time.sleep(0.2)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, (tmp_path / "driver.err").read_text()[-2000:]
    # ray.shutdown() ends the raylet; its agents notice and end on their own, in seconds (a minute when loaded).
    deadline = time.monotonic() + 120
    while _ours_alive(seen) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _ours_alive(seen), {p: c for p, c in _descendants(1).items() if p in _ours_alive(seen)}
    assert temp and not any(t.exists() for t in temp), temp


@pytest.mark.slow
def test_the_first_ctrl_c_during_the_final_training_interrupts_it(tmp_path):
    """Tune installs its own Ctrl-C handler for the trials; once they are done the search's own is back, so the
    final training stops at the first Ctrl-C."""
    out, said = tmp_path / "s", tmp_path / "driver.out"
    with said.open("w") as stdout, (tmp_path / "driver.err").open("w") as stderr:
        driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "search", "--dataset", "digits", "--space",
                                   "tiny", "--trials", "2", "--epochs", "1", "--batch-size", "16", "--max-size-kb",
                                   "25", "--final-epochs", "500", "--out", str(out)],
                                  cwd=tmp_path, env={**env(), "PYTHONUNBUFFERED": "1"}, stdout=stdout, stderr=stderr,
                                  text=True)
    try:
        _wait(driver, lambda: "again for 500 epochs" in said.read_text(), "final training", seconds=600)
        time.sleep(3)
        driver.send_signal(signal.SIGINT)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    stderr = (tmp_path / "driver.err").read_text()
    assert driver.returncode == 130 and "Traceback" not in stderr, said.read_text()[-2000:] + stderr[-2000:]
