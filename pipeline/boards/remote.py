"""The board's half of `pipeline deploy`: run by the board's own python3 (3.9+, standard library only).

deploy.py sends this file, after device/board.py, in the command line of every SSH call
(`python3 -c BOOTSTRAP <source> <parameters>`, base64 so no login shell can read anything into it)
and reads one JSON line back. Nothing is installed on the board for it, and everything it writes
or removes is below ~/edgepipe:

    ~/edgepipe/.lock                  held (flock) by one deploy at a time, for as long as its `session` call lives
    ~/edgepipe/<run>/bundle.tar.gz    the bundle as copied, checked against the host's sha256
    ~/edgepipe/<run>/bundle/          unpacked and verified by the bundle's own runner
    ~/edgepipe/venvs/<key>/           a virtual environment per requirements set, `.edgepipe-ready` once complete
    ~/edgepipe/cache/pip/             pip's download cache

Errors are one line on stderr starting with `edgepipe: ` and exit code 3. Commands that run for
long (pip, the runner) watch their stdin: when the SSH session ends (the host was interrupted or
lost the connection) stdin closes, and they kill what they started.
"""
import base64
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time

if "edgepipe_board" in sys.modules:  # on the board: deploy.py's bootstrap loaded device/board.py under this name
    board = sys.modules["edgepipe_board"]
else:
    from device import board

ROOT = os.path.join(os.path.expanduser("~"), "edgepipe")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
READY = ".edgepipe-ready"
EXIT_AGENT = 3
# device/integrity.py's limits on what a bundle may unpack to (only board.py is loaded beside this
# file on the board, so they are repeated here; a test keeps the two equal).
MAX_MEMBERS = 10_000
MAX_MEMBER_BYTES = 512 * 1024 * 1024
MAX_TOTAL_BYTES = 2 * 1024 * 1024 * 1024


class AgentError(Exception):
    """One line for the host: what failed on the board and what to do."""


def _name(value: str, what: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise AgentError(f"{what} {value!r} is not a plain name")
    return value


def _run_dir(p: dict) -> str:
    return os.path.join(ROOT, _name(p["run"], "run name"))


def _venv_dir(p: dict) -> str:
    return os.path.join(ROOT, "venvs", _name(p["venv"], "environment key"))


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return _sha256_stream(f)


def _sha256_stream(f) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def _members(tar: tarfile.TarFile, archive: str):
    """The archive's members, each refused (AgentError, never skipped) unless it is a file or folder
    with a plain relative path, within the limits; checked on its header, before its data is read."""
    count = total = 0
    for m in tar:
        parts = m.name.split("/")
        problem = ("is not a file or folder" if not (m.isfile() or m.isdir())
                   else "points outside the bundle" if m.name.startswith("/") or ".." in parts or "" in parts
                   else f"would unpack to {m.size:,} bytes, above the {MAX_MEMBER_BYTES:,} byte limit"
                   if m.size > MAX_MEMBER_BYTES else None)
        count, total = count + 1, total + m.size
        if problem is None and count > MAX_MEMBERS:
            problem = f"is beyond the limit of {MAX_MEMBERS:,} members"
        if problem is None and total > MAX_TOTAL_BYTES:
            problem = f"takes the bundle above the {MAX_TOTAL_BYTES:,} byte limit"
        if problem:
            raise AgentError(f"{archive}: member {m.name!r} {problem}; it is not a bundle written by `pipeline "
                             "bundle`; deploy again")
        yield m


def _watched(cmd: list, cwd=None, env=None, stdout=None, capture: bool = False):
    """Run cmd; kill its process group if our stdin closes first (the host went away).

    Returns the exit code, or (exit code, stdout bytes, stderr text) with capture."""
    pipe = subprocess.PIPE if capture else None
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=pipe if capture else stdout,
                            stderr=pipe, start_new_session=True)

    def watch():
        # os.read, not sys.stdin: a daemon thread blocked inside a buffered reader makes the interpreter
        # abort at exit ("could not acquire lock for <stdin> at interpreter shutdown").
        try:
            while os.read(0, 65536):
                pass
        except OSError:
            pass
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass

    threading.Thread(target=watch, daemon=True).start()
    if not capture:
        return proc.wait()
    out, err = proc.communicate()
    return proc.returncode, out, err.decode("utf-8", "replace")


# ---------------------------------------------------------------- commands


def probe(p: dict) -> dict:
    import importlib.util
    import platform

    info = board.describe()
    try:
        usage = shutil.disk_usage(os.path.expanduser("~"))
        free_mb = usage.free // (1 << 20)
    except OSError:
        free_mb = None
    markers = {"implementation_name": sys.implementation.name, "os_name": os.name,
               "platform_machine": platform.machine(),
               "platform_python_implementation": platform.python_implementation(),
               "platform_release": platform.release(), "platform_system": platform.system(),
               "python_full_version": platform.python_version(),
               "python_version": ".".join(platform.python_version_tuple()[:2]), "sys_platform": sys.platform}
    return {**info, "state": board.state(), "markers": markers, "executable": sys.executable,
            "home": os.path.expanduser("~"), "free_mb": free_mb,
            # Debian and Raspberry Pi OS put ensurepip in python3-venv; without it `python3 -m venv` fails.
            "venv": importlib.util.find_spec("ensurepip") is not None and importlib.util.find_spec("venv") is not None}


def session(p: dict) -> None:
    """Take the board's deploy lock, print the board (probe) and what of this run is on it, then hold
    the lock until stdin closes: the rest of the deploy runs in other calls meanwhile."""
    os.makedirs(ROOT, exist_ok=True)
    f = open(os.path.join(ROOT, ".lock"), "a+")  # noqa: SIM115 -- open for the life of this process: it is the lock
    deadline = time.monotonic() + float(p.get("timeout", 600))
    announced = False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if not announced:
                print("waiting: another deploy to this board is running", file=sys.stderr, flush=True)
                announced = True
            if time.monotonic() > deadline:
                raise AgentError("another deploy to this board held ~/edgepipe/.lock for the whole timeout")
            time.sleep(0.5)
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    f.flush()
    run = _run_dir(p)
    if p.get("clean"):
        shutil.rmtree(run, ignore_errors=True)
    elif os.path.isdir(run):  # hidden: what interrupted deploys left (we hold the lock: nobody is writing them)
        for name in os.listdir(run):
            if name.startswith("."):
                path = os.path.join(run, name)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)
    print(json.dumps({"probe": probe(p), "status": status(p)}), flush=True)
    while os.read(0, 65536):
        pass


def status(p: dict) -> dict:
    run = _run_dir(p)
    archive = os.path.join(run, "bundle.tar.gz")
    bundle = "missing"
    if os.path.isfile(archive):
        bundle = "same" if _sha256(archive) == p["sha256"] else "differs"
    unpacked = _compare_unpacked(archive, os.path.join(run, "bundle")) if bundle == "same" else "missing"
    venvs = os.path.join(ROOT, "venvs")
    ready = sorted(v for v in os.listdir(venvs) if os.path.isfile(os.path.join(venvs, v, READY))) \
        if os.path.isdir(venvs) else []
    return {"bundle": bundle, "unpacked": unpacked, "venvs": ready}


def _compare_unpacked(archive: str, folder: str) -> str:
    """'same' when every file of the unpacked bundle has the archive's bytes and nothing was added."""
    if not os.path.isdir(folder):
        return "missing"
    want = {}
    with tarfile.open(archive, "r:gz") as tar:
        for m in _members(tar, archive):
            if m.isfile():
                with tar.extractfile(m) as f:
                    want[m.name] = _sha256_stream(f)
    for name, digest in sorted(want.items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or _sha256(path) != digest:
            return f"changed: {name}"
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for fn in filenames:
            rel = os.path.relpath(os.path.join(dirpath, fn), folder).replace(os.sep, "/")
            if rel not in want:
                return f"added: {rel}"
    return "same"


def receive(p: dict) -> dict:
    """The bundle from stdin into <run>/bundle.tar.gz, only if its size and sha256 are the host's."""
    run = _run_dir(p)
    os.makedirs(run, exist_ok=True)
    tmp = os.path.join(run, f".bundle.tar.gz.{os.getpid()}")
    h, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            for chunk in iter(lambda: sys.stdin.buffer.read(1 << 20), b""):
                f.write(chunk)
                h.update(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        if size != p["size"] or h.hexdigest() != p["sha256"]:
            raise AgentError(f"the bundle arrived damaged ({size} of {p['size']} bytes, sha256 "
                             f"{h.hexdigest()[:12]}...); deploy again")
        shutil.rmtree(os.path.join(run, "bundle"), ignore_errors=True)  # unpacked from the old archive
        os.replace(tmp, os.path.join(run, "bundle.tar.gz"))
    except OSError as e:
        raise AgentError(f"cannot write {run}: {e.strerror} (is the disk full?)")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"bytes": size}


def _extract(archive: str, dest: str, wanted) -> list:
    """The files whose names `wanted` accepts into dest; any member not a plain file or folder within
    the limits refuses the whole archive (AgentError), whether wanted or not."""
    out = []
    with tarfile.open(archive, "r:gz") as tar:
        for m in _members(tar, archive):
            if not (m.isfile() and wanted(m.name)):
                continue
            target = os.path.join(dest, *m.name.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with tar.extractfile(m) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            out.append(m.name)
    return out


def venv(p: dict) -> dict:
    """Create the environment for a requirements set, or say it is ready; --system-site-packages so the
    OS's numpy and Pillow (apt's python3-numpy, python3-pil) serve where PyPI has no wheel."""
    path = _venv_dir(p)
    if os.path.isfile(os.path.join(path, READY)):
        return {"created": False}
    t0 = time.monotonic()
    shutil.rmtree(path, ignore_errors=True)  # an install that never finished
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # A board whose python3 has pip (Raspberry Pi OS and Debian: python3-pip) lends it to the environment
    # through the system site packages; otherwise venv's ensurepip installs one, running pip from a zip whose
    # every module is compiled afresh: a minute under qemu, seconds on a Pi, for a pip the board already has.
    own_pip = ["--without-pip"] if _system_pip() >= (20, 3) else []  # 20.3: the manylinux_2_x wheel tags
    if _watched([sys.executable, "-m", "venv", "--system-site-packages", *own_pip, path], stdout=sys.stderr) != 0:
        shutil.rmtree(path, ignore_errors=True)
        raise AgentError(f"`{sys.executable} -m venv` failed; install the venv module: sudo apt install python3-venv")
    env = dict(os.environ, PIP_CACHE_DIR=os.path.join(ROOT, "cache", "pip"), PIP_NO_INPUT="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    wheels, source = None, "the package index"
    if p.get("wheels"):  # carried in the bundle for boards without internet
        wheels = os.path.join(_run_dir(p), f".wheels-{os.getpid()}")
        prefix = p["wheels"].rstrip("/") + "/"
        if not _extract(os.path.join(_run_dir(p), "bundle.tar.gz"), wheels, lambda n: n.startswith(prefix)):
            raise AgentError(f"the bundle has no files under {prefix}")
        source = f"the bundle's {prefix}"
    # --no-compile: byte-compiling every file of numpy costs minutes on a slow board; imports compile what they use.
    cmd = [os.path.join(path, "bin", "python"), "-m", "pip", "install", "--only-binary=:all:", "--no-compile"]
    if wheels:
        cmd += ["--no-index", "--find-links", os.path.join(wheels, *p["wheels"].split("/"))]
    try:
        code = _watched(cmd + list(p["requirements"]), env=env, stdout=sys.stderr)
    finally:
        if wheels:
            shutil.rmtree(wheels, ignore_errors=True)
    if code != 0:
        raise AgentError(f"pip could not install {' '.join(p['requirements'])} from {source} (exit {code})")
    check = f"import numpy, PIL, {p['module']}"
    if _watched([os.path.join(path, "bin", "python"), "-c", check], stdout=sys.stderr) != 0:
        raise AgentError(f"the new environment cannot `{check}`")
    with open(os.path.join(path, READY), "w") as f:
        json.dump({"requirements": p["requirements"], "seconds": time.monotonic() - t0}, f)
    return {"created": True, "source": source}


def _system_pip() -> tuple:
    """The version of the pip in python3's system site packages (what an environment made with
    --system-site-packages sees; a pip in the user's ~/.local is not), or () when there is none."""
    import site

    try:
        import pip
    except ImportError:
        return ()
    where = os.path.realpath(pip.__file__)
    system = site.getsitepackages([sys.base_prefix, sys.base_exec_prefix])  # also when python3 is itself a venv's
    if not any(where.startswith(os.path.realpath(f) + os.sep) for f in system):
        return ()
    return tuple(int(n) for n in re.findall(r"[0-9]+", pip.__version__)[:2])


def unpack(p: dict) -> dict:
    """The bundle's own runner unpacks and verifies it into a new folder, which then replaces <run>/bundle."""
    run = _run_dir(p)
    tools, stage = os.path.join(run, f".runner-{os.getpid()}"), os.path.join(run, f".unpack-{os.getpid()}")
    try:
        found = _extract(os.path.join(run, "bundle.tar.gz"), tools,
                         lambda n: n.startswith("device/") and n.split("/", 1)[1] in p["runner_files"])
        if "device/runner.py" not in found:
            raise AgentError("the bundle has no device/runner.py; build it with `pipeline bundle`")
        python = os.path.join(_venv_dir(p), "bin", "python")
        result = subprocess.run([python, os.path.join(tools, "device", "runner.py"), "unpack",
                                 os.path.join(run, "bundle.tar.gz"), stage, "--json"],
                                stdin=subprocess.DEVNULL, capture_output=True)
        try:
            out = json.loads(result.stdout)
        except ValueError:
            raise AgentError("the runner could not unpack the bundle: "
                             + (result.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1])
        if not out.get("ok"):
            raise AgentError("the bundle does not verify on the board: " + "; ".join(out.get("problems", [])))
        final = os.path.join(run, "bundle")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(stage, final)
        return out
    finally:
        shutil.rmtree(tools, ignore_errors=True)
        shutil.rmtree(stage, ignore_errors=True)


def runs(p: dict) -> list:
    """`runner.py ARGS` for each ARGS, with the environment's python in the unpacked bundle."""
    folder = os.path.join(_run_dir(p), "bundle")
    if not os.path.isfile(os.path.join(folder, "device", "runner.py")):
        raise AgentError("the bundle is not unpacked on the board; deploy again")
    out = []
    for args in p["runs"]:
        code, stdout, stderr = _watched([os.path.join(_venv_dir(p), "bin", "python"), "device/runner.py", *args],
                                        cwd=folder, capture=True)
        out.append({"args": args, "code": code, "stdout": stdout.decode("utf-8", "replace"), "stderr": stderr[-2000:]})
    return out


def purge(p: dict) -> dict:
    """Everything deploy ever put on this board: ~/edgepipe, once no deploy holds its lock."""
    if not os.path.isdir(ROOT):
        return {"removed": False}
    with open(os.path.join(ROOT, ".lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AgentError("a deploy to this board is running; try again when it has finished")
        shutil.rmtree(ROOT)
    return {"removed": True}


COMMANDS = {"session": session, "receive": receive, "venv": venv, "unpack": unpack, "runs": runs, "purge": purge}


def main(encoded: str) -> int:
    params = json.loads(base64.b64decode(encoded))
    try:
        out = COMMANDS[params["cmd"]](params)
    except AgentError as e:
        print(f"edgepipe: {e}", file=sys.stderr, flush=True)
        return EXIT_AGENT
    if out is not None:
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__edgepipe_remote__":
    sys.exit(main(sys.argv[-1]))
