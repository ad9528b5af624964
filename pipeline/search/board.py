"""Feasibility on a board over SSH: every candidate of the round in one payload, benchmarked in one session.

The board is reached as `pipeline deploy` reaches it (pipeline/boards/): the user's OpenSSH, one
connection, the board's deploy lock held for the whole measurement, the runtime the payload's
requirements.txt chooses for that board installed into (or found in) its virtual environment, the
payload unpacked and verified by its own runner, then `runner.py bench` for every model in one call.
The session opens before any candidate is converted, so a board that cannot be reached, or an
emulated board given a latency budget, is refused before the search writes anything.

The payload is a bundle of the untrained candidates: the runner, requirements.txt, and for each input
resolution a metadata.json (that resolution's preprocessing, each model's sha256 and tensors) beside
its models. The first resolution sits at the root, where the runner's unpack verifies it; the others
in folders r<H>x<W>/, which the runner checks model by model against the metadata beside them. A
board that has no environment for the runtime yet also gets the runtime's wheels for its platform in
wheels/, as `pipeline bundle --wheels` carries them, so its pip installs from them (--no-index)
instead of resolving against the package index: under qemu that resolution alone costs a minute.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path

import device
from device.core import METADATA_NAME, Model
from device.integrity import sha256_file
from pipeline.artifacts import CREATED_BY, file_entry
from pipeline.boards.deploy import BoardDeploy, DeployConfig
from pipeline.boards.devices import BoardNameError, Device, resolve
from pipeline.boards.payload import Bundle, board_folder, runtime_for
from pipeline.boards.ssh import BoardError, Cancelled, SshConnection, SshOptions
from pipeline.search import SearchError

# Connect to the last benchmark: a board seen for the first time installs its runtime from the index.
BOARD_TIMEOUT_S = 3600
# On a board (and under qemu) each invoke is dear; the pick is measured again by its own build.
FEASIBILITY_RUNS, FEASIBILITY_WARMUP = 50, 10


@dataclass
class BoardSession:
    """A board held for the search: its connection (under the board's deploy lock) and what it said it is."""
    spec: str
    device: Device
    connection: SshConnection
    probe: dict
    status: dict
    folder: str  # the payload's folder below ~/edgepipe on the board
    cpu: str | None = None  # as the board's runner reports it (its /proc/cpuinfo), once it has run
    runtime: dict | None = None  # the deploy's record of the environment used: requirements, key, source

    @property
    def emulated(self) -> bool:
        return bool(self.probe.get("emulated"))

    def describe(self) -> dict:
        """What feasibility.json records as the machine every latency was measured on."""
        p = self.probe
        return {"board": self.device.name, "target": self.device.target, "cpu": self.cpu or p.get("model"),
                "model": p.get("model"), "machine": p.get("machine"), "cores": p.get("cores"), "os": p.get("os"),
                "python": p.get("python"), "emulated": self.emulated, "runtime": self.runtime}


@contextlib.contextmanager
def board_session(spec: str, options: SshOptions, search_name: str, log):
    """Connect to the board, take its deploy lock and probe it; yields a BoardSession. Every failure of the
    board, here or while measuring in the block, is one SearchError line naming --target."""
    try:
        device = resolve(spec)
    except BoardNameError as e:
        raise SearchError(f"--target {spec}: {e}")
    connection = SshConnection(device, options, time.monotonic() + BOARD_TIMEOUT_S, BOARD_TIMEOUT_S)
    folder = board_folder(f"search-{search_name}")
    try:
        connection.open()
        # clean: what an earlier search of this name left there is never taken for this one's payload
        with connection.session({"run": folder, "sha256": "", "clean": True}, log) as first:
            yield BoardSession(spec, device, connection, first["probe"], first["status"], folder)
    except BoardError as e:
        raise SearchError(f"--target {spec}: {e}")
    except Cancelled:
        raise KeyboardInterrupt
    finally:
        connection.close()


def carried_wheels(board: BoardSession, folder: Path, log) -> dict:
    """What the payload carries of the runtime for this board: wheels.json's {platform: entry}, the wheels
    downloaded here into folder/<platform>/; {} when the board already has the environment, or this host
    cannot fetch every wheel it needs (the board's pip then reads the index, as a deploy's does)."""
    from pipeline.ship.bundle import WHEEL_PLATFORMS, download_wheels, wheel_key

    choice = runtime_for(board.probe, Bundle(Path(), board.folder, "", 0, requirements(), {}, {}))
    key = wheel_key(choice.machine, board.probe["markers"]["python_version"])
    if choice.venv in board.status["venvs"] or key not in WHEEL_PLATFORMS:
        return {}
    (folder / key).mkdir(parents=True)
    entry = download_wheels(requirements(), key, folder / key, log=log)
    if entry["missing"] or entry["without_dependencies"] or not entry["files"]:
        log(f"feasibility: this host could not fetch every wheel for {key}; board {board.device.name} installs "
            "the runtime from the package index")
        return {}
    return {key: entry}


def write_payload(path: Path, models: list[tuple[str, str, Path, dict]], wheels: dict | None = None,
                  wheel_dir: Path | None = None) -> dict[tuple[str, str], str]:
    """The payload .tar.gz of (candidate id, variant, .tflite, preprocessing) models, and the `wheels` that
    carried_wheels put in wheel_dir; returns each model's path inside it. Reproducible, as a bundle is: the
    same models make the same bytes."""
    from pipeline.ship.bundle import RUNNER_FILES, WHEELS_DIR, WHEELS_INDEX, write_archive

    groups: dict[tuple, tuple[dict, list]] = {}
    for cand, variant, file, spec in models:
        groups.setdefault((spec["height"], spec["width"], spec["channels"]), (spec, []))[1].append(
            (cand, variant, file))
    members, where = {}, {}
    for i, ((h, w, _), (spec, files)) in enumerate(groups.items()):
        prefix = "" if i == 0 else f"r{h}x{w}/"
        meta = {"schema": 1, "created_by": CREATED_BY, "kind": "search feasibility payload (untrained models)",
                "preprocess": spec, "models": {}}
        for cand, variant, file in files:
            name = f"{cand}_{variant}.tflite"
            info = Model(file, metadata={"preprocess": spec}, verify=False).info()
            meta["models"][name] = {"variant": variant, "candidate": cand, **file_entry(file),
                                    "input": info["input"], "output": info["output"]}
            members[prefix + name] = file.read_bytes()
            where[(cand, variant)] = prefix + name
        members[prefix + METADATA_NAME] = json.dumps(meta, indent=2).encode()
    device_dir = Path(device.__file__).resolve().parent
    members.update({f"device/{name}": (device_dir / name).read_bytes() for name in RUNNER_FILES})
    members["requirements.txt"] = requirements().encode()
    for key, entry in (wheels or {}).items():
        members.update({f"{WHEELS_DIR}/{key}/{name}": (wheel_dir / key / name).read_bytes() for name in entry["files"]})
    if wheels:
        members[WHEELS_INDEX] = json.dumps(wheels, indent=2).encode()
    write_archive(path, members)
    return where


def requirements() -> str:
    """The payload's requirements.txt: a bundle's, so the board gets (or reuses) the environment a deploy makes."""
    from pipeline.ship.bundle import REQUIREMENTS

    return REQUIREMENTS.format(litert=importlib_metadata.version("ai-edge-litert"))


def bench(board: BoardSession, payload: Path, models: list[str], wheels: dict, log) -> dict[str, dict]:
    """{model path in the payload: the runner's bench JSON, or {"error": why}}, all in this board's session;
    `wheels`: what the payload carries (carried_wheels)."""
    bundle = Bundle(payload, board.folder, sha256_file(payload), payload.stat().st_size, requirements(), {}, wheels)
    steps = BoardDeploy(board.device, bundle, DeployConfig(devices=(board.spec,)), log)
    steps.connection = board.connection
    choice = steps.choose_runtime(board.probe, board.status)
    steps.check_board(board.probe, board.status, choice)
    steps.copy(board.status)
    steps.install(choice, board.status)
    board.runtime = steps.entry["runtime"]  # "existing", or installed from the payload's "bundle" or the "index"
    steps.unpack(choice, board.status)
    runs = [["bench", "--json", "--model", m, "--runs", str(FEASIBILITY_RUNS), "--warmup", str(FEASIBILITY_WARMUP),
             "--threads", "1", "--loads", "1"] for m in models]
    steps.say(f"benchmarking {len(models)} untrained model(s) with the runner")
    outputs = board.connection.json({"cmd": "runs", "run": board.folder, "venv": choice.venv, "runs": runs},
                                    "benchmarking the candidates")
    results = {}
    for model, out in zip(models, outputs):
        try:
            data = json.loads(out["stdout"]) if out["code"] == 0 else None
        except ValueError:
            data = None
        if data is None:
            lines = [line for line in out["stderr"].splitlines() if line.strip()]
            results[model] = {"error": f"runner.py bench failed on board {board.device.name} (exit {out['code']}): "
                                       + (lines[-1].strip() if lines else "no message")}
            continue
        results[model] = data
        board.cpu = board.cpu or data["environment"]["cpu"]
    return results

