"""`pipeline search`: feasibility, Ray Tune trials, the Pareto report and the pick as an ordinary run.

The search folder holds search_config.json (written first, so --resume knows what was asked),
feasibility.json (phase a), tune/ (Ray Tune's experiment, restorable), search.json/.md/.html and
front.png (the report), models/ (the pick's trained model) and pick/ (the pick, built by the ordinary
`pipeline build` stages: verify, bundle, deploy, export and compare take it as any run).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ray.tune import Callback

from pipeline.artifacts import write_json
from pipeline.console import say
from pipeline.search import SearchError
from pipeline.search.feasibility import Budgets, Target, by_weights, environment, measure, where_measured
from pipeline.search.final import FINAL_SHARE, materialise, plan_epochs, probe_epoch, train_final
from pipeline.search.sampling import configurations, plan
from pipeline.search.space import SPACES, Candidate
from pipeline.search.trial import LEARNING_RATES, run_trial, trial_config

CONFIG, FEASIBILITY, EXPERIMENT = "search_config.json", "feasibility.json", "tune"


@dataclass(frozen=True)
class SearchConfig:
    """Every choice a search makes; saved first as search_config.json and read back by --resume."""
    out: str
    dataset: str = "digits"
    data_dir: str | None = None
    seed: int = 0
    target: str = "host"
    max_latency_ms: float | None = None
    max_size_kb: float | None = None
    max_ram_kb: float | None = None
    quantize: tuple[str, ...] = ("int8",)  # the variants that compete; fp32 is always built as the baseline
    max_accuracy_drop: float | None = None  # int8 competes as the accuracy guard delivers it (--fallback auto)
    budget_minutes: float = 60.0
    trials: int = 20
    address: str | None = None  # a Ray cluster; None starts a local Ray sized to this machine's cores
    space: str = "default"
    epochs: int = 10
    final_epochs: int | None = None  # the pick trained again (phase c); None: as many as the budget's rest holds
    batch_size: int = 64
    cpus_per_trial: int = 1
    # A board target is reached with the user's OpenSSH, as `pipeline deploy` reaches it.
    ssh_config: str | None = None
    accept_new_host_key: bool = False
    connect_timeout: int = 10
    measure_only: bool = False  # phase (a) alone: every candidate measured and judged, none trained

    def __post_init__(self):
        from pipeline.config import VARIANTS

        if self.space not in SPACES:
            raise SearchError(f"--space: unknown '{self.space}'; choose from {', '.join(SPACES)}")
        unknown = [v for v in self.quantize if v not in VARIANTS]
        if unknown or not self.quantize:
            raise SearchError(f"--quantize: got {list(self.quantize)}; choose from {', '.join(VARIANTS)}")
        for name in ("max_latency_ms", "max_size_kb", "max_ram_kb", "max_accuracy_drop", "budget_minutes"):
            # nan passes every range check (its comparisons are false) and then holds nothing back.
            if getattr(self, name) is not None and not math.isfinite(getattr(self, name)):
                raise SearchError(f"--{name.replace('_', '-')}: got {getattr(self, name)}, expected a finite number")
        target = Target.parse(self.target)
        if target.kind == "tflm" and set(self.quantize) - {"int8", "int16x8"}:
            raise SearchError(f"--quantize {','.join(self.quantize)}: a microcontroller runs integer models; "
                              "use int8 (or int16x8) with --target tflm:BOARD")
        Budgets(self.max_latency_ms, self.max_size_kb, self.max_ram_kb).check(target)
        for name, low in (("trials", 1), ("epochs", 1), ("final_epochs", 0), ("batch_size", 1), ("cpus_per_trial", 1)):
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise SearchError(f"--{name.replace('_', '-')}: got {getattr(self, name)}, expected >= {low}")
        if self.max_accuracy_drop is not None and not self.max_accuracy_drop >= 0:
            raise SearchError(f"--max-accuracy-drop: got {self.max_accuracy_drop}, expected percentage points >= 0")
        if self.max_accuracy_drop is not None and "int8" not in self.quantize:
            raise SearchError("--max-accuracy-drop guards int8, which does not compete here: add int8 to --quantize "
                              "or drop --max-accuracy-drop")
        if self.address is None and self.cpus_per_trial > os.cpu_count():
            raise SearchError(f"--cpus-per-trial {self.cpus_per_trial}: this machine has {os.cpu_count()} CPUs and a "
                              "local Ray no more, so no trial could start; ask for at most "
                              f"{os.cpu_count()}, or run the trials on a cluster with --address")
        if not self.budget_minutes > 0:
            raise SearchError(f"--budget-minutes: got {self.budget_minutes}, expected minutes > 0")

    @property
    def budgets(self) -> Budgets:
        return Budgets(self.max_latency_ms, self.max_size_kb, self.max_ram_kb).check(Target.parse(self.target))

    def settings(self) -> dict:
        """What a trial needs, as plain data (it may run on another machine)."""
        return {"dataset": self.dataset, "data_dir": self.data_dir, "seed": self.seed, "epochs": self.epochs,
                "batch_size": self.batch_size, "quantize": list(self.quantize),
                "max_accuracy_drop": self.max_accuracy_drop, "experiment": str(Path(self.out).resolve() / EXPERIMENT)}

    def to_dict(self) -> dict:
        return {**asdict(self), "quantize": list(self.quantize)}


def search(cfg: SearchConfig, *, resume: bool = False, log=print) -> Path:
    out = Path(cfg.out).resolve()
    started = time.time()
    if resume and (out / FEASIBILITY).is_file():
        feasibility = json.loads((out / FEASIBILITY).read_text())
        from ray import tune

        if not cfg.measure_only and not tune.Tuner.can_restore(str(out / EXPERIMENT)):
            # Stopped after measuring and before Tune first saved its experiment (Ctrl-C while Ray started, Ray
            # failing to start): no trial can be continued, so the trials start as a new search's would.
            shutil.rmtree(out / EXPERIMENT, ignore_errors=True)
            resume = False
    else:  # a new search, or one interrupted while measuring: that phase runs (again) from the start
        if not resume and out.exists() and any(out.iterdir()):
            raise SearchError(f"--out {out}: exists and is not empty; pick another --name/--out, or continue an "
                              f"interrupted search with --resume {out}")
        fresh = not out.exists()
        try:
            with _board(cfg, out, log) as board:  # a board refuses (unreachable, emulated) before anything is written
                out.mkdir(parents=True, exist_ok=True)
                write_json(out / CONFIG, cfg.to_dict())
                feasibility = phase_a(cfg, log, board)
        except Exception:
            # A new search that failed here (bad data, say) leaves no folder for the corrected command to refuse;
            # an interrupted one keeps its folder, as the console's --resume line says.
            if not resume:
                shutil.rmtree(out, ignore_errors=True)
                if not fresh:
                    out.mkdir()
            raise
        write_json(out / FEASIBILITY, feasibility)
        resume = False  # no trials were started: Tune starts the experiment
    feasible = by_weights(feasibility["rows"])
    if not feasible:
        from pipeline.search.report import write_report

        write_report(out, cfg, feasibility, [], None, log)
        raise SearchError(f"no candidate meets the budgets ({_budget_words(cfg)}) even untrained; every one is "
                          f"listed with its measured cost in {out / 'search.md'}: relax a budget or widen --space")
    if cfg.measure_only:
        from pipeline.search.report import write_report

        write_report(out, cfg, feasibility, [], None, log)
        return out
    budget = cfg.budget_minutes * 60
    remaining = budget - (time.time() - started if not resume else 0)
    reserve = budget * FINAL_SHARE if cfg.final_epochs != 0 else 0.0
    trials, interrupted = phase_b(cfg, out, feasible, max(remaining - reserve, 60.0), resume, log)
    from pipeline.search.report import choose, write_report

    if interrupted:  # what finished is reported now; the pick waits for the search to end (--resume)
        write_report(out, cfg, feasibility, trials, None, log, interrupted=True)
        raise KeyboardInterrupt
    pick = choose(trials, feasibility)
    pick_dir = None
    if pick:
        # A resumed search does not know how long it ran before: its final training gets the reserved share.
        deadline = time.time() + reserve if resume else started + budget
        per_epoch = probe_epoch(cfg, pick, deadline - time.time(), log)
        epochs, why = plan_epochs(cfg, pick, deadline - time.time(), per_epoch)
        pick["final"] = {**(train_final(cfg, out, pick, epochs, log) if epochs else {"epochs": 0, "used": False}),
                         "planned": why}
        pick_dir = materialise(cfg, out, pick, log)
    write_report(out, cfg, feasibility, trials, pick, log, pick_dir=pick_dir)
    if pick is None:  # a search that delivers nothing has failed, whatever it reports
        trained = sum(t["status"] == "trained" for t in trials)
        raise SearchError(
            f"no trial finished training within --budget-minutes {cfg.budget_minutes:g}, so there is no pick; each "
            f"trial and why it ended is in {out / 'search.md'}: raise --budget-minutes or lower --epochs"
            if not trained else
            f"none of the {trained} trained trial(s) has a variant that competes (the accuracy guard kept no int8 in "
            f"the graph measured before training), so there is no pick; each trial and why is in "
            f"{out / 'search.md'}: raise --max-accuracy-drop")
    return out


@contextlib.contextmanager
def _board(cfg: SearchConfig, out: Path, log):
    """The board of a board target, held (connected, locked, probed) while phase (a) runs; None otherwise."""
    if Target.parse(cfg.target).kind != "board":
        yield None
        return
    from pipeline.boards.ssh import SshOptions
    from pipeline.search.board import board_session

    options = SshOptions(cfg.ssh_config, cfg.accept_new_host_key, cfg.connect_timeout)
    with board_session(cfg.target, options, out.name, log) as board:
        cfg.budgets.check_board(board)
        yield board


def phase_a(cfg: SearchConfig, log, board=None) -> dict:
    from pipeline import build as stages
    from pipeline.data import DATASETS

    side = DATASETS[cfg.dataset].input_shape[0]  # the standard size; the space's resolutions are fractions of it
    base = trial_config(cfg.settings(), Candidate("cnn", 1.0, 1, side), LEARNING_RATES[0],
                        out=str(Path(cfg.out) / "unused"))
    data, _, _ = stages.load_inputs(base, stages.STAGES, log)
    candidates = SPACES[cfg.space].candidates(cfg.dataset, side)
    target = Target.parse(cfg.target)
    log(f"search: {len(candidates)} candidates in space '{cfg.space}'; measuring each untrained on {target} "
        f"({where_measured(target, board)})")
    t0 = time.perf_counter()
    spec = data.spec.to_dict()
    rows = measure(candidates, base, cfg.quantize, target, cfg.budgets, spec, len(data.spec.labels), log=log,
                   board=board)
    dropped = sum(not r["feasible"] for r in rows)
    log(f"search: {dropped} of {len(rows)} candidates dropped before training, {len(rows) - dropped} to train")
    return {"target": str(target), "latency_measured_on": where_measured(target, board),
            **({"board": board.describe()} if board is not None else {}), "budgets": asdict(cfg.budgets),
            "space": SPACES[cfg.space].to_dict(cfg.dataset, side), "data": data.source, "environment": environment(),
            "seconds": time.perf_counter() - t0, "rows": rows}


def _budget_words(cfg: SearchConfig) -> str:
    b = cfg.budgets
    parts = [f"{name} {value:g} {unit}" for name, value, unit in (("latency", b.latency_ms, "ms"),
                                                                  ("size", b.size_kb, "KB"), ("arena", b.ram_kb, "KB"))
             if value is not None]
    return ", ".join(parts) or "no budgets"


def _ray_init(cfg: SearchConfig, temp: str | None, log) -> None:
    """Ray for the trials: the cluster at --address, or a local one of this machine's cores in `temp` (its own
    temp dir, ended by ray.shutdown(); never `ray stop`, which ends every Ray on the machine)."""
    import ray

    if cfg.address:
        host = cfg.address.split(":")[0]
        local = {"_node_ip_address": host} if host in ("127.0.0.1", "localhost") else {}
        ray.init(address=cfg.address, log_to_driver=False, **local)
        cpus = ray.cluster_resources().get("CPU", 0)
        log(f"ray: connected to {cfg.address} ({len(ray.nodes())} node(s), {cpus:g} CPUs)")
        # A trial runs on one node: asking for more CPUs than any node has, every trial waits out the budget.
        largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=0)
        if cfg.cpus_per_trial > largest:
            raise SearchError(f"--cpus-per-trial {cfg.cpus_per_trial}: no node of the cluster at {cfg.address} has "
                              f"that many (the largest has {largest:g}), so no trial could start; start a new "
                              f"search with --cpus-per-trial {int(largest)} or fewer")
        return
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, _temp_dir=temp,
             configure_logging=False)
    log(f"ray: local, {os.cpu_count()} CPUs")


def phase_b(cfg: SearchConfig, out: Path, feasible: list[str], seconds: float, resume: bool, log):
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    # Short: Ray's socket paths under it must fit 107 characters.
    temp = None if cfg.address else tempfile.mkdtemp(prefix="edgepipe-ray-")
    try:  # Ray started inside: a start that fails or is interrupted is ended and its temp dir removed too
        _ray_init(cfg, temp, log)
        trainable = tune.with_resources(tune.with_parameters(run_trial, settings=cfg.settings()),
                                        {"cpu": cfg.cpus_per_trial})
        path = str(out / EXPERIMENT)
        if resume:
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False)
            log(f"search: continuing the trials in {path}")
        else:
            space, search_alg, samples = plan(feasible, cfg.trials, cfg.seed)
            if search_alg is None:
                n = len(configurations(feasible))
                log(f"search: only {n} configurations (candidate, learning rate) for {cfg.trials} trials: "
                    f"each is trained once, so {n} trials")
            # ASHA's rungs at grace_period(), twice that ... epochs; only budgets that hold decide feasibility.
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    metric="val_accuracy", mode="max", search_alg=search_alg,
                    scheduler=ASHAScheduler(time_attr="epoch", max_t=cfg.epochs, grace_period=grace_period(cfg.epochs),
                                            reduction_factor=2),
                    num_samples=samples, time_budget_s=seconds),
                run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out), verbose=0, callbacks=[TrialLines()],
                                          failure_config=tune.FailureConfig(max_failures=0)))
            log(f"search: up to {cfg.trials} trials of {len(feasible)} feasible candidates, {cfg.cpus_per_trial} "
                f"CPU(s) each, within {seconds / 60:.1f} minutes")
        # Ctrl-C: Tune stops the trials, saves the experiment and returns what finished (a second Ctrl-C
        # interrupts at once); the trials that did not end are what --resume continues.
        t0 = time.monotonic()
        handler = signal.getsignal(signal.SIGINT)
        try:
            grid = tuner.fit()
        finally:  # Tune leaves its own Ctrl-C handler installed: the final training's first Ctrl-C went to it
            signal.signal(signal.SIGINT, handler)
        status = {t.trial_id: t.status for t in tune.ExperimentAnalysis(path).trials}
        trials = [_trial_row(r, status) for r in grid]
        # Tune returns normally after Ctrl-C: trials left unfinished, or fewer trials than asked for with time
        # left (stopped between two trials), say it was interrupted.
        planned = min(cfg.trials, len(configurations(feasible)))
        interrupted = any(t["status"] == "unfinished" for t in trials) or (
            len(trials) < planned and time.monotonic() - t0 < seconds - 5 and not resume)
    finally:
        ray.shutdown()
        if temp:
            _remove_when_unused(temp)
    trials.sort(key=lambda t: t["number"])
    return trials, interrupted


def _remove_when_unused(temp: str, seconds: float = 120) -> None:
    """Remove a local Ray's temp dir once no process names it. Interrupted while Ray starts, ray.shutdown() does
    not know the processes already started; they write their logs there until they end (a minute when the machine
    is loaded), and a dir removed before that comes back (seen in CI)."""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and any(_names(c, temp) for c in Path("/proc").glob("[0-9]*/cmdline")):
            time.sleep(0.5)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _names(cmdline: Path, temp: str) -> bool:
    try:
        return temp.encode() in cmdline.read_bytes()
    except OSError:  # the process ended while we looked
        return False


def grace_period(epochs: int) -> int:
    """Epochs every trial trains before ASHA may stop it: half of them. After one epoch BatchNorm nets read
    33-46% on CIFAR-10's validation split whatever they end at: in a 60-minute search ASHA stopped
    resnet8-w1-r32 (learning rate 3e-3) at 33% after one epoch, while the same net at 24 px, 39% after one,
    ended first at 73% after eight. After four of the eight, both ResNet-8s that trained on already led."""
    return max(1, epochs // 2)


class TrialLines(Callback):
    """One console line per trial that ends (Tune's own progress table is off: verbose=0). It says through
    console.say, a module function, because Tune pickles its callbacks with the experiment for --resume."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        say(f"search: trial {trial.trial_id} ({trial.config.get('candidate')}, learning rate "
            f"{trial.config.get('learning_rate'):g}) ended after {result.get('epoch', 0)} epoch(s), validation "
            f"accuracy {result.get('val_accuracy', float('nan')):.4f}")

    def on_trial_error(self, iteration, trials, trial, **info):
        say(f"search: trial {trial.trial_id} ({trial.config.get('candidate')}) failed; the search goes on")


def _trial_row(result, status: dict) -> dict:
    metrics = result.metrics or {}
    config = result.config or {}
    # Tune names a trial's folder run_trial_<id>_<n>_...: n is the order the search algorithm proposed it in.
    name = Path(result.path).name
    # A grid's trial ids hold an underscore (abc12_00003): the id is the one in the folder's name.
    trial_id = metrics.get("trial_id") or next((t for t in status if f"_{t}_" in name), name.split("_")[2])
    number = name.split(f"{trial_id}_", 1)[1].split("_")[0]
    row = {"trial_id": trial_id, "number": int(number), "candidate": config.get("candidate"),
           "learning_rate": config.get("learning_rate"), "epochs_trained": metrics.get("epoch"),
           "val_accuracy": metrics.get("val_accuracy"), "node_id": metrics.get("node_id"),
           "hostname": metrics.get("hostname"), "trial_seconds": metrics.get("trial_seconds"),
           "train_seconds": metrics.get("train_seconds")}
    if result.error is not None:
        last = str(result.error).strip().splitlines()[-1][:300] if str(result.error).strip() else ""
        row.update(status="failed", why=f"{type(result.error).__name__}: {last}")
    elif status.get(trial_id) != "TERMINATED":
        row.update(status="unfinished", why=f"{status.get(trial_id, 'not started').lower()} when the search stopped; "
                                            "--resume continues it")
    elif "test_json" in metrics:
        guard = json.loads(metrics.get("guard_json", "null"))
        if guard:
            row["why"] = _guard_words(guard)
        row.update(status="trained", test=json.loads(metrics["test_json"]), guard=guard,
                   checkpoint=result.checkpoint.path if result.checkpoint else None)
    elif "epoch" not in metrics:
        row.update(status="stopped", why="stopped by the time budget (--budget-minutes) before its first epoch ended")
    else:  # ASHA stops a trial at a rung; the time budget stops every trial still running when it ends
        row.update(status="stopped", why=f"stopped after {metrics['epoch']} epoch(s) (validation accuracy "
                                         f"{metrics['val_accuracy']:.4f}) by ASHA or by the end of the time budget")
    return row


def _guard_words(guard: dict) -> str:
    words = f"int8 {0.0 - guard['int8_drop_pp']:+.2f} pp vs fp32 on validation"
    if guard["int8_is"] == "int8":
        return words + ", within --max-accuracy-drop"
    if not guard["int8_is"].startswith("int8"):
        return words + "; the guard rejected int8 and no remedy met the budget: int8 does not compete for this trial"
    if guard["same_graph_as_int8"]:
        return words + f"; the guard delivers {guard['int8_is']} (int8's graph, so int8's measured cost) in its place"
    return words + (f"; the guard delivers {guard['int8_is']}, whose graph differs from int8's and was not measured "
                    "before training: int8 does not compete for this trial")


def load_config(folder: Path) -> SearchConfig:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise SearchError(f"--resume {folder}: no {CONFIG} there, so it is not a search folder; pass the folder a "
                          "`pipeline search` wrote")
    d = json.loads(path.read_text())
    # The folder is the one named, wherever it was started or moved since: the saved `out` may be another.
    return replace(SearchConfig(out=d["out"]), **{**d, "quantize": tuple(d["quantize"]),
                                                   "out": str(Path(folder).resolve())})
