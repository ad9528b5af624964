#!/usr/bin/env python3
"""Run a bundle's device runner on an emulated Raspberry Pi OS 64-bit userland (Debian bookworm arm64).

Usage:
    scripts/arm_emulate.py BUNDLE.tar.gz DATA.npz [--runtime ai-edge-litert==X.Y.Z | --runtime tflite-runtime==2.14.0]
                           [--cache DIR] [--model MODEL.tflite]

Builds (once, then reuses from the cache) a bookworm arm64 userland with `debootstrap --foreign
--arch=arm64 --variant=minbase`, puts a Raspberry Pi 4 /proc/cpuinfo in it, installs the aarch64
wheels of the runtime with `pip --platform manylinux_2_*_aarch64 --target`, unpacks the bundle and
runs, under `qemu-aarch64-static -cpu cortex-a72` (the Pi 4's core):

    python3.11 device/runner.py eval DATA.npz --json --model BUNDLE/model_int8.tflite

The runner's JSON goes to stdout, everything else to stderr; the exit code is the runner's
(0 ok, 1 error, 2 usage; a runner killed by a signal gives 128 + the signal number). The script's
own failures: 2 for bad arguments, 3 when the emulated userland cannot be set up.

Default runtime: the ai-edge-litert version installed on this host. Default cache:
${XDG_CACHE_HOME:-$HOME/.cache}/edgepipe/arm64-bookworm, laid out as
    rootfs/                 the arm64 userland (+ proc/cpuinfo of a Pi 4), stamp .edgepipe-userland.json
    site-<runtime spec>/    aarch64 site-packages for that runtime, stamp .edgepipe-site.json
    .lock                   held while something is being built
Each is built in a `.tmp-*` folder beside it and renamed into place only when complete, so an
interrupted setup is never reused. Delete the cache folder to start over.

Needs root and apt (to install Debian's qemu-user-static and debootstrap when missing), Debian's
package mirror and PyPI. Anything timed under emulation (the runner's "seconds", latencies) says
nothing about a real Raspberry Pi: qemu translates every instruction.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

SUITE = "bookworm"  # Raspberry Pi OS 64-bit (2023-) is Debian bookworm arm64 with Python 3.11
ARCH = "arm64"
PYTHON = "python3.11"
PYTHON_VERSION = "3.11"
QEMU = "qemu-aarch64-static"
QEMU_CPU = "cortex-a72"  # Raspberry Pi 4; qemu's default `-cpu max` gave wrong results with some LiteRT releases
INCLUDE = ("python3-minimal", "libpython3.11-stdlib")
GLIBC_MINOR = 36  # bookworm's glibc 2.36: the newest manylinux tag its userland can load
# pip (23.x) does not widen a --platform tag to older manylinux versions, and tflite-runtime 2.14.0's
# aarch64 wheel is manylinux_2_34 while ai-edge-litert's is manylinux_2_27: name every tag it may use.
PLATFORMS = [f"manylinux_2_{m}_aarch64" for m in range(GLIBC_MINOR, 16, -1)] + ["manylinux2014_aarch64"]
DEFAULT_MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
RECIPE_VERSION = 1
EXIT_SETUP = 3

# The CPU part of a Raspberry Pi 4's /proc/cpuinfo (4x Cortex-A72) under a 64-bit kernel. qemu-user
# resolves absolute paths inside `-L ROOT` first, so the emulated process reads this file instead of
# the host's x86 one: ai-edge-litert >= 2.2 parses it (through the cpuinfo library) while constructing
# an interpreter and segfaults on the host's file. The Pi's `Hardware`/`Model` lines are not needed;
# the `Hardware` line says what this is instead, so results reported from here (the runner's
# environment.cpu) cannot pass for a Raspberry Pi's.
_CPU = """processor\t: {i}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3
"""
CPUINFO = "\n".join(_CPU.format(i=i) for i in range(4)) + (
    "\nHardware\t: QEMU user-mode emulation of a Cortex-A72 (not a Raspberry Pi)\n")

_PROBE = ("import platform, sys; print(json.dumps({'machine': platform.machine(), "
          "'python': platform.python_version(), 'byteorder': sys.byteorder}))")


class SetupError(Exception):
    """The emulated userland or its packages cannot be prepared; the message says what to do."""


def log(msg: str) -> None:
    print(f"arm_emulate: {msg}", file=sys.stderr, flush=True)


def run(cmd, **kwargs) -> None:
    """Run a setup command with its output on stderr (stdout is reserved for the runner's JSON).

    In a process group of its own, so that an interruption kills it with all its children
    (debootstrap's downloads) before the half-built folder is removed."""
    try:
        # The children inherit the cache lock: if this script is SIGKILLed, an orphaned debootstrap
        # keeps the lock until it exits, so the next setup cannot clean up under its feet.
        proc = subprocess.Popen(cmd, stdout=sys.stderr, start_new_session=True, pass_fds=_LOCK_FDS, **kwargs)
    except FileNotFoundError as e:
        raise SetupError(f"{cmd[0]}: not found ({e})")
    try:
        returncode = proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if returncode != 0:
        raise SetupError(f"`{' '.join(map(str, cmd[:4]))} ...` failed with exit code {returncode}")


# ---------------------------------------------------------------- host tools


def ensure_tools() -> None:
    """qemu-user-static and debootstrap (and the Debian keyring) from Debian's packages, if missing."""
    missing = [pkg for tool, pkg in ((QEMU, "qemu-user-static"), ("debootstrap", "debootstrap"))
               if shutil.which(tool) is None]
    if not Path(KEYRING).is_file():
        missing.append("debian-archive-keyring")
    if shutil.which("dpkg") is None:
        raise SetupError("dpkg not found: this script needs a Debian-based host")
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SetupError(f"missing {', '.join(missing)}; install as root: "
                         f"apt-get install -y --no-install-recommends {' '.join(missing)}")
    log(f"installing {', '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-q"], env=env)
    run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env)


def debian_mirror() -> str:
    """The Debian archive URI from this machine's own apt sources (deb822 or one-line format)."""
    if os.environ.get("EDGEPIPE_DEBIAN_MIRROR"):
        return os.environ["EDGEPIPE_DEBIAN_MIRROR"]
    uris: list[str] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", Path(path).read_text()):
                fields = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.lstrip().startswith("#"):
                        key, value = line.split(":", 1)
                        fields[key.strip().lower()] = value.strip()
                if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                    uris += fields.get("uris", "").split()
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                parts = re.sub(r"\[[^]]*\]", " ", line).split()
                if len(parts) >= 2 and parts[0] == "deb":
                    uris.append(parts[1])
    for uri in uris:
        if "debian" in uri and "security" not in uri and "ports" not in uri:
            return uri.rstrip("/")
    return DEFAULT_MIRROR


# ---------------------------------------------------------------- cache


_LOCK_FDS: tuple[int, ...] = ()


@contextlib.contextmanager
def locked(cache: Path):
    global _LOCK_FDS
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another setup in {cache} to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        _LOCK_FDS = (f.fileno(),)
        try:
            yield
        finally:
            _LOCK_FDS = ()


def _stamp_ok(folder: Path, stamp: str, recipe: dict) -> bool:
    try:
        return json.loads((folder / stamp).read_text()).get("recipe") == recipe
    except (OSError, ValueError):
        return False


def _build_atomically(final: Path, stamp: str, recipe: dict, build) -> None:
    """build(tmp) fills a fresh folder beside `final`; it replaces `final` only once complete."""
    parent = final.parent
    for stale in parent.glob(f".{final.name}.tmp-*"):  # left by an interrupted setup (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
    try:
        build(tmp)
        (tmp / stamp).write_text(json.dumps({"recipe": recipe, "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                                            indent=2))
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-old-", dir=parent))
            os.rename(final, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def emulated(root: Path, *args: str) -> list[str]:
    return [QEMU, "-cpu", QEMU_CPU, "-L", str(root), str(root / "usr" / "bin" / PYTHON), *args]


def emulated_env(root: Path, site: Path | None) -> dict:
    """A clean environment: the host's PYTHON*, OPENBLAS_CORETYPE=Haswell and such mean nothing on ARM."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": os.environ.get("HOME", "/root"),
           "PYTHONNOUSERSITE": "1", "PYTHONUNBUFFERED": "1"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    for key in ("EDGEPIPE_RUNTIME", "TERM"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def probe(root: Path, site: Path | None = None) -> dict:
    out = subprocess.run(emulated(root, "-c", "import json; " + _PROBE), capture_output=True, text=True,
                         env=emulated_env(root, site), timeout=300)
    if out.returncode != 0:
        raise SetupError(f"the emulated {PYTHON} does not start (exit {out.returncode}): {out.stderr.strip()[-400:]}")
    return json.loads(out.stdout)


def userland_recipe() -> dict:
    return {"version": RECIPE_VERSION, "suite": SUITE, "arch": ARCH, "variant": "minbase",
            "include": list(INCLUDE), "cpuinfo_sha256": hashlib.sha256(CPUINFO.encode()).hexdigest()}


def ensure_userland(cache: Path) -> Path:
    root = cache / "rootfs"
    recipe = userland_recipe()
    if _stamp_ok(root, ".edgepipe-userland.json", recipe):
        cpuinfo = root / "proc" / "cpuinfo"
        with contextlib.suppress(OSError):
            if cpuinfo.read_text() == CPUINFO:
                return root
        log(f"restoring {cpuinfo}")  # without it ai-edge-litert segfaults under emulation
        tmp = cpuinfo.with_name(".cpuinfo.tmp")
        tmp.write_text(CPUINFO)
        os.replace(tmp, cpuinfo)
        return root

    def build(tmp: Path) -> None:
        t0 = time.monotonic()
        mirror = debian_mirror()
        log(f"debootstrap --foreign {SUITE} {ARCH} from {mirror} into {tmp}")
        run(["debootstrap", "--foreign", f"--arch={ARCH}", "--variant=minbase", f"--include={','.join(INCLUDE)}",
             SUITE, str(tmp), mirror])
        # binfmt_misc (needed by `debootstrap --second-stage`, which runs the target's maintainer
        # scripts) is often unavailable in containers; unpacking every package is enough to run Python.
        debs = sorted((tmp / "var/cache/apt/archives").glob("*.deb"))
        if not debs:
            raise SetupError(f"debootstrap left no packages in {tmp}/var/cache/apt/archives")
        log(f"unpacking {len(debs)} packages")
        for deb in debs:
            run(["dpkg", "-x", str(deb), str(tmp)])
            deb.unlink()
        (tmp / "proc").mkdir(exist_ok=True)
        (tmp / "proc" / "cpuinfo").write_text(CPUINFO)
        info = probe(tmp)
        if info.get("machine") != "aarch64":
            raise SetupError(f"the emulated Python reports machine {info.get('machine')!r}, not aarch64")
        log(f"userland ready: Python {info['python']} on {info['machine']} ({time.monotonic() - t0:.0f} s setup)")

    log(f"building the {SUITE} {ARCH} userland in {root} (once; later runs reuse it)")
    _build_atomically(root, ".edgepipe-userland.json", recipe, build)
    return root


# ---------------------------------------------------------------- runtime packages

_SPEC = re.compile(r"^(ai[-_.]edge[-_.]litert|tflite[-_.]runtime)==([0-9][0-9A-Za-z.+-]*)$", re.I)


def parse_runtime(spec: str) -> tuple[str, str, str]:
    """'ai-edge-litert==2.3.0' -> (dist, version, import module)."""
    m = _SPEC.match(spec.strip())
    if not m:
        raise ValueError(f"--runtime {spec!r}: expected ai-edge-litert==X.Y.Z or tflite-runtime==X.Y.Z "
                         "(an exact version, so the cached packages can be named by it)")
    dist = re.sub(r"[-_.]+", "-", m.group(1).lower())
    module = "ai_edge_litert.interpreter" if dist == "ai-edge-litert" else "tflite_runtime.interpreter"
    return dist, m.group(2), module


def site_requirements(dist: str, version: str) -> list[str]:
    # tflite-runtime 2.14.0 was compiled against numpy 1.x and fails to import with numpy 2.
    numpy = "numpy<2" if dist == "tflite-runtime" else "numpy"
    return [f"{dist}=={version}", numpy, "pillow"]


def ensure_site(cache: Path, root: Path, spec: str) -> Path:
    dist, version, module = parse_runtime(spec)
    site = cache / f"site-{dist}=={version}"
    reqs = site_requirements(dist, version)
    recipe = {"version": RECIPE_VERSION, "python": PYTHON_VERSION, "platforms": PLATFORMS, "requirements": reqs}
    if _stamp_ok(site, ".edgepipe-site.json", recipe):
        return site

    def build(tmp: Path) -> None:
        log(f"pip: aarch64 wheels of {' '.join(reqs)} into {site}")
        platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
        run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
             "--target", str(tmp), "--only-binary=:all:", "--python-version", PYTHON_VERSION,
             "--implementation", "cp", "--abi", "cp311", *platform_args, *reqs],
            env={**os.environ, "PIP_REQUIRE_VIRTUALENV": "0"})
        # Import once under emulation: proves the wheels load on aarch64 and leaves their bytecode.
        check = (f"import numpy, PIL, {module}; from importlib import metadata; "
                 f"print('{dist}', metadata.version('{dist}'), 'numpy', numpy.__version__)")
        out = subprocess.run(emulated(root, "-c", check), capture_output=True, text=True,
                             env=emulated_env(root, tmp), timeout=900)
        if out.returncode != 0:
            raise SetupError(f"{dist} {version} does not import under emulation: {out.stderr.strip()[-600:]}")
        log(f"emulated import ok: {out.stdout.strip()}")

    _build_atomically(site, ".edgepipe-site.json", recipe, build)
    return site


# ---------------------------------------------------------------- run


def host_litert_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("ai-edge-litert")
    except metadata.PackageNotFoundError:
        return None


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgepipe" / "arm64-bookworm"


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="arm_emulate.py",
        description="Evaluate a bundle's int8 model with its device runner on an emulated Raspberry Pi OS "
                    "64-bit userland (Debian bookworm arm64, qemu -cpu cortex-a72). Accuracy only: "
                    "timings under emulation say nothing about a real Pi.")
    p.add_argument("bundle", type=Path, help="bundle .tar.gz written by `pipeline bundle`")
    p.add_argument("data", type=Path, help=".npz with arrays x (uint8 images) and y (labels)")
    p.add_argument("--runtime", default=None,
                   help="ai-edge-litert==X.Y.Z or tflite-runtime==2.14.0 (default: the host's ai-edge-litert)")
    p.add_argument("--cache", type=Path, default=None,
                   help="cache folder (default: ${XDG_CACHE_HOME:-$HOME/.cache}/edgepipe/arm64-bookworm)")
    p.add_argument("--model", help="model file inside the bundle (default: the bundle's default_model)")
    return p.parse_args(argv)


def _terminate(signum, frame):
    # Turn SIGTERM/SIGHUP into an exception, so a running setup command is killed and its half-built
    # folder removed (a SIGKILL leaves the folder; the next setup deletes it under the lock).
    raise SystemExit(128 + signum)


def _default_model(bundle: Path) -> str:
    """The model the bundle's runner runs by default (metadata.json's default_model)."""
    try:
        return json.loads((bundle / "metadata.json").read_text()).get("default_model") or "model_int8.tflite"
    except (OSError, ValueError, AttributeError):
        return "model_int8.tflite"


def main(argv=None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    spec = args.runtime
    if spec is None:
        version = host_litert_version()
        if version is None:
            log("error: ai-edge-litert is not installed on this host; pass --runtime ai-edge-litert==X.Y.Z")
            return 2
        spec = f"ai-edge-litert=={version}"
    try:
        dist, version, _ = parse_runtime(spec)
    except ValueError as e:
        log(f"error: {e}")
        return 2
    for path, what in ((args.bundle, "bundle"), (args.data, "data")):
        if not path.is_file():
            log(f"error: {path}: no such {what} file")
            return 2
    data = args.data.resolve()
    cache = (args.cache or default_cache()).expanduser().resolve()

    t0 = time.monotonic()
    try:
        with locked(cache):
            ensure_tools()
            root = ensure_userland(cache)
            site = ensure_site(cache, root, spec)
        info = probe(root, site)
    except SetupError as e:
        log(f"error: {e}")
        return EXIT_SETUP
    except subprocess.TimeoutExpired as e:
        log(f"error: timed out: {e}")
        return EXIT_SETUP
    log(f"emulated python: machine={info['machine']} python={info['python']} runtime={dist}=={version} "
        f"(qemu-aarch64 -cpu {QEMU_CPU}; setup {time.monotonic() - t0:.1f} s; cache {cache})")
    if info["machine"] != "aarch64":
        log(f"error: the emulated Python reports {info['machine']!r}, not aarch64")
        return EXIT_SETUP

    with tempfile.TemporaryDirectory(prefix="arm_emulate-") as tmp:
        bundle = Path(tmp) / "bundle"
        bundle.mkdir()
        try:
            with tarfile.open(args.bundle, "r:gz") as tar:
                tar.extractall(bundle, filter="data")
        except (OSError, tarfile.TarError, EOFError) as e:
            log(f"error: {args.bundle}: not a readable bundle .tar.gz ({e})")
            return 2
        runner, model = bundle / "device" / "runner.py", bundle / (args.model or _default_model(bundle))
        for path in (runner, model):
            if not path.is_file():
                log(f"error: {args.bundle}: has no {path.relative_to(bundle)}; pass a bundle written by `pipeline bundle`")
                return 2
        cmd = emulated(root, "device/runner.py", "eval", str(data), "--json", "--model", str(model))
        log(f"running under emulation: {PYTHON} device/runner.py eval {data} --json --model {model}")
        proc = subprocess.run(cmd, cwd=bundle, env=emulated_env(root, site))  # inherits stdout and stderr
    log("note: any time in the runner's output was measured under qemu and says nothing about a Raspberry Pi")
    if proc.returncode < 0:
        sig = -proc.returncode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        log(f"error: the runner was killed by {name} under emulation"
            + (f" (is {root}/proc/cpuinfo an ARM one?)" if sig == signal.SIGSEGV else ""))
        return 128 + sig
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
