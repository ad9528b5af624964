"""`pipeline deploy RUN_DIR --device NAME ...`: a run's models on the user's boards, measured there, in its report.

Per board, in a thread of its own: connect with the user's OpenSSH (ssh.py), take the board's lock
and probe it, choose the runtime the bundle's requirements.txt chooses for that platform (payload.py), copy the
bundle only when the board lacks these exact bytes, create or reuse the virtual environment of those
requirements (from the package index, or from wheels the bundle carries), unpack and verify with the
bundle's own runner, then `runner.py eval` on samples/eval.npz and `runner.py bench` for every model.

The boards that finished are merged into the run's report in one atomic step (device columns named
after the boards, deploy.json with what each board is and how its accuracy compares with the host's on
the same images); a board that failed, for any reason, gets one line there and in the summary. A
deploy in which no board finished leaves the run as it was, and Ctrl-C stops every board and merges
nothing.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.artifacts import RunChangedError, RunDirError, check_unchanged, is_run, updating, write_json
from pipeline.boards.devices import Device, resolve
from pipeline.boards.payload import EVAL_DATA, Bundle, Choice, DeployError, host_reference, open_bundle, runtime_for
from pipeline.boards.ssh import BoardError, Cancelled, SshConnection, SshOptions
from pipeline.interrupts import DeployInterrupted  # noqa: F401 (raised here; failures and the CLI know it)
from pipeline.ship.bundle import RUNNER_FILES

DEPLOY_JSON = "deploy.json"
# A runtime and its numpy need about this much room on the board beside the bundle.
INSTALL_MB = 300


@dataclass(frozen=True)
class DeployConfig:
    devices: tuple[str, ...]
    bundle: str | None = None       # a bundle written by `pipeline bundle` (e.g. with --wheels); default: made here
    runs: int = 200
    warmup: int = 20
    threads: int = 1
    timeout: float = 900.0          # per board, connect to results
    clean: bool = False             # remove the run's folder on the board first, so everything is copied afresh
    ssh: SshOptions = field(default_factory=SshOptions)


# ---------------------------------------------------------------- one board


class Boards:
    """The connections of a deploy, so that Ctrl-C in the main thread can stop them all."""

    def __init__(self):
        self._connections, self._guard, self.cancelled = [], threading.Lock(), False

    def add(self, connection: SshConnection) -> None:
        with self._guard:
            self._connections.append(connection)
            if self.cancelled:
                connection.abort()

    def abort(self) -> None:
        with self._guard:
            self.cancelled = True
            for c in self._connections:
                c.abort()


def deploy_board(device: Device, bundle: Bundle, reference: dict, cfg: DeployConfig, boards: Boards, log) -> dict:
    """Deploy to one board; returns its deploy.json entry with the runner's results under 'results'.

    Whatever ends this board's deploy, of any kind, becomes its one-line reason: the other boards
    go on and the ones that finish are merged."""
    board = BoardDeploy(device, bundle, cfg, log)
    try:
        board.connection = SshConnection(device, cfg.ssh, board.t0 + cfg.timeout, cfg.timeout)
        boards.add(board.connection)
        board.record(board.run(), reference)
    except BoardError as e:
        board.entry["reason"] = str(e)
    except Cancelled:
        board.entry["reason"] = "interrupted"
    except Exception as e:  # a bug, or the host failing for this board (a file, the disk): still only this board
        board.entry["reason"] = f"unexpected {type(e).__name__} on the host: {e}"
    finally:
        if board.connection is not None:
            board.connection.close()
    return board.finish()


class BoardDeploy:
    """The steps of one board's deploy, in the order they run; `entry` is what deploy.json records."""

    def __init__(self, device: Device, bundle: Bundle, cfg: DeployConfig, log):
        self.device, self.bundle, self.cfg, self._log = device, bundle, cfg, log
        self.connection: SshConnection | None = None
        self.t0 = time.monotonic()
        self.entry = {"name": device.name, "target": device.target, "ok": False, "reason": None,
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": {}, "copied": False,
                      "installed": False}

    def say(self, msg: str) -> None:
        self._log(f"{self.device.name}: {msg}")

    def timed(self, step: str, fn, *args, **kwargs):
        start = time.monotonic()
        out = fn(*args, **kwargs)
        self.entry["steps"][step] = round(time.monotonic() - start, 3)
        return out

    def run(self) -> list:
        """Connect, then under the board's lock: probe, check, copy, install, unpack, measure; the runs' outputs."""
        self.timed("connect", self.connection.open)
        start = time.monotonic()
        lock = {"run": self.bundle.run, "sha256": self.bundle.sha256, "clean": self.cfg.clean}
        with self.connection.session(lock, self.say) as first:
            self.entry["steps"]["lock_and_probe"] = round(time.monotonic() - start, 3)
            probe, status = first["probe"], first["status"]
            choice = self.choose_runtime(probe, status)
            self.check_board(probe, status, choice)
            self.copy(status)
            self.install(choice, status)
            self.unpack(choice, status)
            return self.measure(choice)

    def choose_runtime(self, probe: dict, status: dict) -> Choice:
        self.entry["board"] = {k: probe.get(k) for k in ("model", "os", "kernel", "machine", "bits", "cores",
                                                         "memory_mb", "python", "emulated", "state")}
        self.say(f"{probe.get('model') or 'board'}, {probe.get('os')}, Python {probe['python']} {probe['machine']}"
                 + (" (emulated)" if probe.get("emulated") else ""))
        choice = runtime_for(probe, self.bundle)
        self.entry["runtime"] = {"requirements": choice.requirements, "venv": choice.venv, "source": (
            "existing" if choice.venv in status["venvs"] else "bundle" if choice.wheels else "index")}
        return choice

    def check_board(self, probe: dict, status: dict, choice: Choice) -> None:
        """Refuse a board that cannot take this deploy: no venv module, a changed unpacked bundle, no room."""
        if not probe.get("venv"):
            raise BoardError("python3 on the board has no venv module; install it: sudo apt install python3-venv")
        if status["unpacked"].startswith(("changed", "added")):
            raise BoardError(f"the bundle unpacked on the board was changed ({status['unpacked']}), so it is not "
                             "used; deploy with --clean to copy it afresh")
        needed = (self.bundle.size * 2 if status["bundle"] != "same" else 0) + (
            INSTALL_MB << 20 if choice.venv not in status["venvs"] else 0)
        if probe.get("free_mb") is not None and needed and probe["free_mb"] << 20 < needed:
            raise BoardError(f"disk full: {probe['free_mb']} MB free in {probe.get('home')}, about "
                             f"{needed >> 20} MB needed; free some space on the board")

    def copy(self, status: dict) -> None:
        if status["bundle"] == "same":
            return
        b = self.bundle
        self.say(f"copying the bundle ({b.size / 1e6:.1f} MB)")
        self.timed("copy", self.connection.json, {"cmd": "receive", "run": b.run, "sha256": b.sha256, "size": b.size},
                   "copying the bundle", data=b.path)
        self.entry["copied"] = True

    def install(self, choice: Choice, status: dict) -> None:
        if choice.venv in status["venvs"]:
            return
        self.say(f"installing {' '.join(choice.requirements)} into a new environment from "
                 + ("the bundle's wheels" if choice.wheels else "the package index"))
        self.timed("install", self.connection.json, {"cmd": "venv", "run": self.bundle.run, "venv": choice.venv,
                                                     "requirements": choice.requirements, "module": choice.module,
                                                     "wheels": choice.wheels}, "installing the runtime")
        self.entry["installed"] = True

    def unpack(self, choice: Choice, status: dict) -> None:
        if not self.entry["copied"] and status["unpacked"] == "same":
            return
        self.say("unpacking and verifying with the bundle's runner")
        self.timed("unpack", self.connection.json, {"cmd": "unpack", "run": self.bundle.run, "venv": choice.venv,
                                                    "runner_files": list(RUNNER_FILES)}, "unpacking the bundle")

    def measure(self, choice: Choice) -> list:
        """`runner.py eval` on samples/eval.npz and `runner.py bench` for every model, in one call."""
        cfg, runs = self.cfg, []
        for name in self.bundle.models.values():
            runs += [["eval", EVAL_DATA, "--json", "--model", name],
                     ["bench", "--json", "--model", name, "--runs", str(cfg.runs), "--warmup", str(cfg.warmup),
                      "--threads", str(cfg.threads)]]
        self.say(f"measuring {', '.join(self.bundle.models)}: eval on {EVAL_DATA}, bench")
        return self.timed("measure", self.connection.json, {"cmd": "runs", "run": self.bundle.run,
                                                            "venv": choice.venv, "runs": runs}, "measuring")

    def record(self, outputs: list, reference: dict) -> None:
        """The runner's results, with the board named in them, and their accuracy beside the host's."""
        entry = self.entry
        entry["results"] = _results(outputs, self.device, entry["board"])
        entry["interpreter"] = entry["results"][0][1]["interpreter"]
        entry["accuracy"] = _parity(entry["results"], reference, self.bundle)
        entry["ok"] = True

    def finish(self) -> dict:
        entry = self.entry
        entry["seconds"] = round(time.monotonic() - self.t0, 3)
        entry["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.say(f"done in {entry['seconds']:.1f} s" if entry["ok"] else f"FAILED: {entry['reason']}")
        return entry


def _results(outputs: list, device: Device, board: dict) -> list:
    """(file name, runner JSON with the board named in it) for each run; a failed run fails the board."""
    results = []
    for out in outputs:
        args = out["args"]
        model = args[args.index("--model") + 1]
        if out["code"] != 0:
            lines = [line for line in out["stderr"].splitlines() if line.strip()]
            raise BoardError(f"runner.py {args[0]} --model {model} failed on the board (exit {out['code']}): "
                             + (lines[-1].strip() if lines else "no message"))
        try:
            data = json.loads(out["stdout"])
        except ValueError:
            raise BoardError(f"runner.py {args[0]} --model {model} printed no JSON on the board")
        data["board"] = {"name": device.name, "target": device.target, **board}
        results.append((f"{device.name}-{Path(model).stem}-{args[0]}.json", data))
    return results


def _parity(results: list, reference: dict, bundle: Bundle) -> dict:
    """Per variant: the board's accuracy beside the host's on the same images, and whether they must agree."""
    variant_of = {name: variant for variant, name in bundle.models.items()}
    out = {}
    for _, data in results:
        if data["kind"] != "eval":
            continue
        variant = variant_of[Path(data["model"]).name]
        host = reference["variants"][variant]
        out[variant] = {"device": data["accuracy"], "host": host["accuracy"], "n": data["n"],
                        "same_interpreter": data["interpreter"] == reference["interpreter"],
                        "equal": data["accuracy"] == host["accuracy"] and data["confusion"] == host["confusion"]}
    return out


# ---------------------------------------------------------------- many boards, one merge


def deploy(run_dir: Path, cfg: DeployConfig, log=print) -> list[dict]:
    """Deploy to every board in parallel and merge the finished ones into the report; returns the entries."""
    run_dir = Path(run_dir)
    devices = {}
    for spec in cfg.devices:
        device = resolve(spec)
        if device.name in devices:
            raise DeployError(f"board {device.name} is given twice; name each board once")
        devices[device.name] = device
    if not devices:
        raise DeployError("no board given; pass --device NAME (see `pipeline device list`) or --device user@host")
    check_unchanged(run_dir, "deploy")  # before any board: the merge at the end would refuse it anyway
    with tempfile.TemporaryDirectory(prefix="edgepipe-deploy-") as tmp:
        bundle = open_bundle(run_dir, Path(cfg.bundle) if cfg.bundle else None, Path(tmp), log)
        reference = host_reference(run_dir, bundle)
        log(f"deploying {bundle.path.name} ({bundle.size / 1e6:.1f} MB, sha256 {bundle.sha256[:12]}) to "
            f"{', '.join(devices)}")
        boards = Boards()
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(devices)) as pool:
            futures = [pool.submit(deploy_board, d, bundle, reference, cfg, boards, log) for d in devices.values()]
            try:
                while not all(f.done() for f in futures):
                    concurrent.futures.wait(futures, timeout=0.5)
            except KeyboardInterrupt:
                boards.abort()
                concurrent.futures.wait(futures)
                raise DeployInterrupted()
        entries = [f.result() for f in futures]
        if boards.cancelled:
            raise DeployInterrupted()
    if any(e["ok"] for e in entries):
        merge(run_dir, entries, reference, log)
    else:
        log(f"no board finished: {run_dir} is unchanged")
    return entries


# Another writer of the run (a second deploy's merge, `pipeline report`) takes seconds: wait that long.
MERGE_WAIT_S = 300


@contextlib.contextmanager
def _updating(run_dir: Path, log):
    """artifacts.updating, waiting while another process holds the run's lock instead of failing."""
    deadline = time.monotonic() + MERGE_WAIT_S
    while True:
        stack = contextlib.ExitStack()
        try:
            work = stack.enter_context(updating(run_dir, "deploy (merging the boards' results)", log))
            break
        except RunChangedError:
            raise  # waiting does not mend it
        except RunDirError:
            if not is_run(run_dir) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    with stack:
        yield work


def merge(run_dir: Path, entries: list[dict], reference: dict, log) -> None:
    """One atomic update of the run: device results, deploy.json, the report and the manifest."""
    from pipeline.report import render as report
    from pipeline.report.device_results import DEVICE_DIR

    with _updating(run_dir, log) as (stage, _), tempfile.TemporaryDirectory(prefix="edgepipe-results-") as tmp:
        try:
            record = json.loads((stage / DEPLOY_JSON).read_text())
        except (OSError, ValueError):
            record = {"schema": 1, "boards": {}}
        folder, new = stage / DEVICE_DIR, []
        for entry in entries:
            results = entry.pop("results", None)
            if results:
                for old in sorted(folder.glob("*.json")) if folder.is_dir() else []:
                    with open(old) as f:  # this board's earlier results give way to these
                        if (json.load(f).get("board") or {}).get("name") == entry["name"]:
                            old.unlink()
                for name, data in results:
                    path = Path(tmp) / name
                    write_json(path, data)
                    new.append(path)
            record["boards"][entry["name"]] = entry
        record["reference"] = reference
        write_json(stage / DEPLOY_JSON, record)
        report.render(stage, device_results=new, log=log)
    log(f"report: {run_dir / 'report.md'} updated with {sum(e['ok'] for e in entries)} board(s)")


def summary(entries: list[dict]) -> list[str]:
    """One line per board for the terminal."""
    lines = []
    for e in entries:
        if not e["ok"]:
            lines.append(f"{e['name']}: FAILED: {e['reason']}")
            continue
        did = ", ".join(x for x, flag in (("copied the bundle", e["copied"]), ("installed the runtime", e["installed"]))
                        if flag) or "nothing copied or installed"
        parity = "; ".join(
            f"{v} {100 * a['device']:.2f}% " + ("= host" if a["equal"] else f"vs host {100 * a['host']:.2f}%")
            + ("" if a["same_interpreter"] else " (another interpreter)") for v, a in e["accuracy"].items())
        interp = e["interpreter"]
        lines.append(f"{e['name']}: ok in {e['seconds']:.1f} s ({did}); "
                     f"{interp['name']} {interp['version']}; {parity}"
                     + ("; emulated: its timings are the emulator's, not a board's"
                        if e["board"].get("emulated") else ""))
    return lines


def purge(spec: str, options: SshOptions, timeout: float = 120) -> bool:
    """Remove ~/edgepipe (every run, environment and cache deploy put there) from a board."""
    device = resolve(spec)
    connection = SshConnection(device, options, time.monotonic() + timeout, timeout)
    try:
        connection.open()
        return connection.json({"cmd": "purge"}, "removing ~/edgepipe")["removed"]
    finally:
        connection.close()
