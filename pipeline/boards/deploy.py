"""`pipeline deploy RUN_DIR --device NAME ...`: a run's models on the user's boards, measured there, in its report.

Per board, in a thread of its own: connect with the user's OpenSSH (ssh.py), take the board's lock
and probe it, choose the runtime the bundle's requirements.txt chooses for that platform, copy the
bundle only when the board lacks these exact bytes, create or reuse the virtual environment of those
requirements (from the package index, or from wheels the bundle carries), unpack and verify with the
bundle's own runner, then `runner.py eval` on samples/eval.npz and `runner.py bench` for every model.

The boards that finished are merged into the run's report in one atomic step (device columns named
after the boards, deploy.json with what each board is and how its accuracy compares with the host's on
the same images); a board that failed gets one line there and in the summary. Ctrl-C stops every
board and merges nothing.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import re
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from device import core
from device.integrity import METADATA_NAME, sha256_file
from pipeline.artifacts import RunChangedError, RunDirError, check_unchanged, is_run, updating, write_json
from pipeline.boards.devices import Device, resolve
from pipeline.boards.ssh import BoardError, Cancelled, Session, SshOptions
from pipeline.ship.bundle import RUNNER_FILES, WHEELS_INDEX, make_bundle, select_requirements, wheel_key

DEPLOY_JSON = "deploy.json"
EVAL_DATA = "samples/eval.npz"
# The interpreter each runtime distribution provides, and the platforms it publishes wheels for.
RUNTIMES = {"ai-edge-litert": ("ai_edge_litert.interpreter", ("aarch64", "x86_64")),
            "tflite-runtime": ("tflite_runtime.interpreter", ("armv7l", "aarch64", "x86_64"))}
# A runtime and its numpy need about this much room on the board beside the bundle.
INSTALL_MB = 300


class DeployError(Exception):
    """The run or bundle cannot be deployed as asked; the message says what to do."""


class Interrupted(Exception):
    """Ctrl-C: every board was stopped and nothing was merged."""


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


@dataclass(frozen=True)
class Bundle:
    path: Path
    run: str
    sha256: str
    size: int
    requirements: str
    models: dict           # variant -> file name
    wheels: dict           # wheels.json: platform -> what the bundle carries for it


@dataclass(frozen=True)
class Choice:
    machine: str           # the platform the board's Python loads wheels for
    requirements: list
    runtime: str
    module: str
    venv: str              # the environment's key: Python, platform and requirements
    wheels: str | None     # folder of the bundle's wheels for this platform, if it carries them


# ---------------------------------------------------------------- what is deployed


def open_bundle(run_dir: Path, path: Path | None, workdir: Path, log) -> Bundle:
    """The run's bundle (made into workdir when not given), checked to hold this run's models."""
    try:
        run_meta = json.loads((run_dir / METADATA_NAME).read_text())
    except (OSError, ValueError):
        raise DeployError(f"{run_dir}: no readable {METADATA_NAME}; pass a run directory written by `pipeline build`")
    if not (run_dir / EVAL_DATA).is_file():
        raise DeployError(f"{run_dir}: no {EVAL_DATA} to evaluate on the boards; rebuild the run with `pipeline build`")
    if path is None:
        path = make_bundle(run_dir, workdir / f"{run_dir.name}.tar.gz", log=log)
    try:
        with tarfile.open(path, "r:gz") as tar:
            names = set(tar.getnames())

            def read(name):
                return tar.extractfile(name).read().decode() if name in names else None

            meta, requirements, wheels = read(METADATA_NAME), read("requirements.txt"), read(WHEELS_INDEX)
    except (OSError, tarfile.TarError, EOFError) as e:
        raise DeployError(f"{path}: not a readable bundle ({e}); write one with `pipeline bundle {run_dir}`")
    if meta is None or requirements is None or EVAL_DATA not in names:
        raise DeployError(f"{path}: not a bundle written by `pipeline bundle` (no metadata.json, requirements.txt "
                          f"or {EVAL_DATA})")
    models = json.loads(meta)["models"]
    for name, entry in models.items():
        if run_meta["models"].get(name, {}).get("sha256") != entry.get("sha256"):
            raise DeployError(f"{path}: its {name} is not the one in {run_dir}; the bundle was built from another "
                              f"run, write it again with `pipeline bundle {run_dir}`")
    return Bundle(Path(path), board_folder(run_dir.name), sha256_file(path), Path(path).stat().st_size, requirements,
                  {entry["variant"]: name for name, entry in models.items()}, json.loads(wheels) if wheels else {})


def board_folder(run_name: str) -> str:
    """The run's folder name on the board: the run's own name when it is a plain one, else a plain
    version of it with a hash of the original, so no two runs share a folder by accident."""
    plain = re.sub(r"[^A-Za-z0-9._-]", "-", run_name).lstrip(".-_")[:100]
    if plain == run_name:
        return plain
    return f"{plain or 'run'}-{hashlib.sha256(run_name.encode()).hexdigest()[:8]}"


def choose(probe: dict, bundle: Bundle) -> Choice:
    """The requirements the bundle's requirements.txt selects on this board, as pip would select them."""
    markers = dict(probe["markers"])
    machine = markers["platform_machine"]
    if probe.get("bits") == 32 and machine in ("aarch64", "arm64", "armv8l"):
        # A 32-bit Raspberry Pi OS on a 64-bit kernel (the default on a Pi 4 and 5 since 2023): uname
        # says aarch64, yet its Python loads only armv7l wheels.
        machine = markers["platform_machine"] = "armv7l"
    requirements = select_requirements(bundle.requirements, markers)
    runtime = next((r for r in requirements if re.split(r"[<>=!~;\[ ]", r)[0] in RUNTIMES), None)
    where = f"{machine} with Python {probe['python']} ({probe.get('model') or 'unknown board'}, {probe.get('os')})"
    module, platforms = RUNTIMES.get(re.split(r"[<>=!~;\[ ]", runtime or "")[0], (None, ()))
    if runtime is None or machine not in platforms:
        raise BoardError(f"no LiteRT runtime for {where}: ai-edge-litert has wheels for 64-bit aarch64 and x86_64 "
                         "with Python 3.10+, tflite-runtime 2.14.0 for armv7l, aarch64 and x86_64 with Python up to "
                         "3.11; this platform has neither")
    key = wheel_key(machine, markers["python_version"])
    carried = bundle.wheels.get(key, {}).get("files")
    venv = hashlib.sha256(json.dumps({"python": probe["python"], "machine": machine, "requirements": requirements,
                                      "system_site_packages": True}).encode()).hexdigest()[:16]
    return Choice(machine, requirements, runtime, module, venv, f"wheels/{key}" if carried else None)


def host_reference(run_dir: Path, bundle: Bundle) -> dict:
    """Every model's accuracy and confusion on samples/eval.npz through this host's core: what a board
    with the same interpreter must reproduce exactly."""
    x, y = core.load_npz(run_dir / EVAL_DATA)
    variants, rt = {}, None
    for variant, name in bundle.models.items():
        model = core.Model(run_dir / name)
        rt = model.runtime
        result = core.evaluate(model, x, y, source=EVAL_DATA)
        variants[variant] = {"accuracy": result["accuracy"], "confusion": result["confusion"]}
    return {"data": EVAL_DATA, "n": len(y), "interpreter": {"name": rt.name, "version": rt.version},
            "variants": variants}


# ---------------------------------------------------------------- one board


class Boards:
    """The sessions of a deploy, so that Ctrl-C in the main thread can stop them all."""

    def __init__(self):
        self._sessions, self._guard, self.cancelled = [], threading.Lock(), False

    def add(self, session: Session) -> None:
        with self._guard:
            self._sessions.append(session)
            if self.cancelled:
                session.abort()

    def abort(self) -> None:
        with self._guard:
            self.cancelled = True
            for s in self._sessions:
                s.abort()


def deploy_board(device: Device, bundle: Bundle, reference: dict, cfg: DeployConfig, boards: Boards, log) -> dict:
    """Deploy to one board; returns its deploy.json entry with the runner's results under 'results'."""

    def say(msg):
        log(f"{device.name}: {msg}")

    t0 = time.monotonic()
    entry = {"name": device.name, "target": device.target, "ok": False, "reason": None,
             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": {}, "copied": False, "installed": False}
    session = Session(device, cfg.ssh, t0 + cfg.timeout, cfg.timeout)
    boards.add(session)

    def timed(step, fn, *args, **kwargs):
        start = time.monotonic()
        out = fn(*args, **kwargs)
        entry["steps"][step] = round(time.monotonic() - start, 3)
        return out

    try:
        timed("connect", session.open)
        start = time.monotonic()
        with session.session({"run": bundle.run, "sha256": bundle.sha256, "clean": cfg.clean}, say) as first:
            entry["steps"]["lock_and_probe"] = round(time.monotonic() - start, 3)
            probe, status = first["probe"], first["status"]
            entry["board"] = {k: probe.get(k) for k in ("model", "os", "kernel", "machine", "bits", "cores",
                                                        "memory_mb", "python", "emulated", "state")}
            say(f"{probe.get('model') or 'board'}, {probe.get('os')}, Python {probe['python']} {probe['machine']}"
                + (" (emulated)" if probe.get("emulated") else ""))
            choice = choose(probe, bundle)
            entry["runtime"] = {"requirements": choice.requirements, "venv": choice.venv, "source": (
                "existing" if choice.venv in status["venvs"] else "bundle" if choice.wheels else "index")}
            if not probe.get("venv"):
                raise BoardError("python3 on the board has no venv module; install it: sudo apt install python3-venv")
            if status["unpacked"].startswith(("changed", "added")):
                raise BoardError(f"the bundle unpacked on the board was changed ({status['unpacked']}), so it is not "
                                 "used; deploy with --clean to copy it afresh")
            needed = (bundle.size * 2 if status["bundle"] != "same" else 0) + (
                INSTALL_MB << 20 if choice.venv not in status["venvs"] else 0)
            if probe.get("free_mb") is not None and needed and probe["free_mb"] << 20 < needed:
                raise BoardError(f"disk full: {probe['free_mb']} MB free in {probe.get('home')}, about "
                                 f"{needed >> 20} MB needed; free some space on the board")
            if status["bundle"] != "same":
                say(f"copying the bundle ({bundle.size / 1e6:.1f} MB)")
                timed("copy", session.json, {"cmd": "receive", "run": bundle.run, "sha256": bundle.sha256,
                                             "size": bundle.size}, "copying the bundle", data=bundle.path)
                entry["copied"] = True
            if choice.venv not in status["venvs"]:
                say(f"installing {' '.join(choice.requirements)} into a new environment from "
                    + ("the bundle's wheels" if choice.wheels else "the package index"))
                timed("install", session.json, {"cmd": "venv", "run": bundle.run, "venv": choice.venv,
                                                "requirements": choice.requirements, "module": choice.module,
                                                "wheels": choice.wheels}, "installing the runtime")
                entry["installed"] = True
            if entry["copied"] or status["unpacked"] != "same":
                say("unpacking and verifying with the bundle's runner")
                timed("unpack", session.json, {"cmd": "unpack", "run": bundle.run, "venv": choice.venv,
                                               "runner_files": list(RUNNER_FILES)}, "unpacking the bundle")
            runs = []
            for name in bundle.models.values():
                runs += [["eval", EVAL_DATA, "--json", "--model", name],
                         ["bench", "--json", "--model", name, "--runs", str(cfg.runs), "--warmup", str(cfg.warmup),
                          "--threads", str(cfg.threads)]]
            say(f"measuring {', '.join(bundle.models)}: eval on {EVAL_DATA}, bench")
            outputs = timed("measure", session.json, {"cmd": "runs", "run": bundle.run, "venv": choice.venv,
                                                      "runs": runs}, "measuring")
        entry["results"] = _results(outputs, device, entry["board"])
        entry["interpreter"] = entry["results"][0][1]["interpreter"]
        entry["accuracy"] = _parity(entry["results"], reference, bundle)
        entry["ok"] = True
    except BoardError as e:
        entry["reason"] = str(e)
    except Cancelled:
        entry["reason"] = "interrupted"
    finally:
        session.close()
    entry["seconds"] = round(time.monotonic() - t0, 3)
    entry["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    say(f"done in {entry['seconds']:.1f} s" if entry["ok"] else f"FAILED: {entry['reason']}")
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
                raise Interrupted()
        entries = [f.result() for f in futures]
        if boards.cancelled:
            raise Interrupted()
    merge(run_dir, entries, reference, log)
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

    with _updating(run_dir, log) as (stage, _), tempfile.TemporaryDirectory(prefix="edgepipe-results-") as tmp:
        try:
            record = json.loads((stage / DEPLOY_JSON).read_text())
        except (OSError, ValueError):
            record = {"schema": 1, "boards": {}}
        folder, new = stage / report.DEVICE_DIR, []
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
    session = Session(device, options, time.monotonic() + timeout, timeout)
    try:
        session.open()
        return session.json({"cmd": "purge"}, "removing ~/edgepipe")["removed"]
    finally:
        session.close()
