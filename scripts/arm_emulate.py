#!/usr/bin/env python3
"""Emulated Raspberry Pi OS userlands (Debian bookworm arm64 and armhf): run a bundle's runner,
or serve a board over SSH.

Usage:
    scripts/arm_emulate.py BUNDLE.tar.gz DATA.npz [--arch arm64|armhf] [--runtime SPEC] [--cache DIR]
                           [--model MODEL.tflite]
    scripts/arm_emulate.py --serve PORT --authorized-keys FILE [--arch arm64|armhf] [--cache DIR]

Builds (once, then reuses from the cache) a bookworm userland with `debootstrap --foreign
--variant=minbase` for Raspberry Pi OS 64-bit (arm64, an ARM /proc/cpuinfo of a Cortex-A72 in it) or
32-bit (armhf, Cortex-A7), with python3, python3-venv and python3-pip as on a Pi.

Run mode installs the runtime's wheels with `pip --platform manylinux_2_*_<arch> --target`, unpacks
the bundle and runs, under `qemu-<arch>-static -cpu <the board's core>`:

    python3.11 device/runner.py eval DATA.npz --json [--model BUNDLE/MODEL.tflite]

The runner's JSON goes to stdout, everything else to stderr; the exit code is the runner's
(0 ok, 1 error, 2 usage; a runner killed by a signal gives 128 + the signal number). The script's
own failures: 2 for bad arguments, 3 when the emulated userland cannot be set up.

Serve mode makes the userland a board that `ssh -p PORT root@127.0.0.1` (and `pipeline deploy`)
reaches like a Pi on the network: it mounts binfmt_misc and registers qemu for the architecture (so
the userland's programs run as if native), and starts a stock OpenSSH server on 127.0.0.1:PORT with
a configuration of its own whose ChrootDirectory is the userland, until Ctrl-C. `tests/test_deploy.py`
uses the same functions (`ensure_binfmt`, `prepare_board`, `Board`).

Default runtime: the host's ai-edge-litert on arm64, tflite-runtime 2.14.0 on armhf (ai-edge-litert
publishes no 32-bit ARM wheel). Default cache: ${XDG_CACHE_HOME:-$HOME/.cache}/edgepipe/<arch>-bookworm:
    rootfs/                 the userland (+ proc/cpuinfo), stamp .edgepipe-userland.json
    site-<runtime spec>/    site-packages for that runtime (run mode), stamp .edgepipe-site.json
    .lock                   held while something is being built
Each is built in a `.tmp-*` folder beside it and renamed into place only when complete, so an
interrupted setup is never reused. Delete the cache folder to start over.

Needs root and apt (to install Debian's qemu-user-static, debootstrap and, to serve, openssh-server
when missing), Debian's package mirror and PyPI. Anything timed under emulation (the runner's
"seconds", latencies) says nothing about a real Raspberry Pi: qemu translates every instruction.
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
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SUITE = "bookworm"  # Raspberry Pi OS (2023-) is Debian bookworm, arm64 or armhf, with Python 3.11
PYTHON = "python3.11"
PYTHON_VERSION = "3.11"
GLIBC_MINOR = 36  # bookworm's glibc 2.36: the newest manylinux tag its userland can load
DEFAULT_MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
RECIPE_VERSION = 2
EXIT_SETUP = 3
TFLITE_RUNTIME = "tflite-runtime==2.14.0"
# What a Raspberry Pi OS Lite image has that matters here: Python with venv and pip (PEP 668 refuses
# a system-wide pip install there, so deployments make a virtual environment).
INCLUDE = ("python3-minimal", "libpython3.11-stdlib", "python3", "python3-venv", "python3-pip")
# Debian bullseye (the base of Raspberry Pi OS legacy) has Python 3.9.2, whose tarfile has no `filter=`.
INCLUDE_BULLSEYE = ("python3-minimal", "libpython3.9-stdlib", "python3", "python3-venv", "python3-pip")

# The CPU part of a Raspberry Pi's /proc/cpuinfo. qemu-user resolves absolute paths inside `-L ROOT`
# first (and a chroot has no /proc of its own), so the emulated process reads this file instead of
# the host's x86 one: ai-edge-litert >= 2.2 parses it (through the cpuinfo library) while constructing
# an interpreter and segfaults on the host's file. The `Hardware` line says what this is instead of
# a Pi's `Model` line, so results reported from here (the runner's environment.cpu, the deploy's
# board model) cannot pass for a Raspberry Pi's.
_A72 = """processor\t: {i}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3
"""
_A7 = """processor\t: {i}
model name\t: ARMv7 Processor rev 5 (v7l)
BogoMIPS\t: 38.40
Features\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm
CPU implementer\t: 0x41
CPU architecture: 7
CPU variant\t: 0x0
CPU part\t: 0xc07
CPU revision\t: 5
"""


def _cpuinfo(block: str, core: str) -> str:
    return "\n".join(block.format(i=i) for i in range(4)) + (
        f"\nHardware\t: QEMU user-mode emulation of a {core} (not a Raspberry Pi)\n")


@dataclass(frozen=True)
class Userland:
    arch: str                 # Debian architecture
    machine: str              # what platform.machine() says inside
    qemu: str | None          # Debian's qemu-user-static binary; None: the host runs it natively (in a chroot)
    qemu_cpu: str | None      # the board's core; qemu's default `-cpu max` gave wrong results with some LiteRT releases
    binfmt: str | None        # binfmt_misc entry (/usr/lib/binfmt.d/<binfmt>.conf)
    wheel_arch: str           # manylinux platform suffix
    cpuinfo: str | None
    include: tuple = INCLUDE
    suite: str = SUITE
    python: str = PYTHON
    # Requirements the userland's Debian packages provide: PyPI has no armv7l numpy or Pillow wheel
    # (a Pi gets them from piwheels.org or apt), so the 32-bit userland carries Debian's.
    from_os: tuple = ()

    @property
    def platforms(self) -> list[str]:
        # pip (23.x) does not widen a --platform tag to older manylinux versions, and tflite-runtime
        # 2.14.0's wheels are manylinux_2_34 while ai-edge-litert's are manylinux_2_27: name every tag.
        return [f"manylinux_2_{m}_{self.wheel_arch}" for m in range(GLIBC_MINOR, 16, -1)] + [
            f"manylinux2014_{self.wheel_arch}"]


USERLANDS = {
    "arm64": Userland("arm64", "aarch64", "qemu-aarch64-static", "cortex-a72", "qemu-aarch64", "aarch64",
                      _cpuinfo(_A72, "Cortex-A72")),
    "armhf": Userland("armhf", "armv7l", "qemu-arm-static", "cortex-a7", "qemu-arm", "armv7l",
                      _cpuinfo(_A7, "Cortex-A7"), include=INCLUDE + ("python3-numpy", "python3-pil"),
                      from_os=("numpy", "pillow")),
    # Not a Pi: a Python 3.9 board (Debian bullseye, run natively in a chroot) for the runner and the
    # bundle on the oldest Python the requirements serve, with tflite-runtime.
    "amd64-bullseye": Userland("amd64", "x86_64", None, None, None, "x86_64", None, include=INCLUDE_BULLSEYE,
                               suite="bullseye", python="python3.9"),
}

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


def ensure_tools(userland: Userland, serve: bool = False) -> None:
    """qemu-user-static and debootstrap (and the Debian keyring; to serve, OpenSSH) from Debian's packages,
    if missing."""
    tools = [("debootstrap", "debootstrap")] + ([(userland.qemu, "qemu-user-static")] if userland.qemu else [])
    if serve:
        tools += [("/usr/sbin/sshd", "openssh-server"), ("ssh-keygen", "openssh-client")]
    missing = [pkg for tool, pkg in tools if shutil.which(tool) is None]
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


def emulated(root: Path, userland: Userland, *args: str) -> list[str]:
    if userland.qemu is None:  # the host's own architecture: the userland's Python in a chroot (needs root)
        return ["chroot", str(root), f"/usr/bin/{userland.python}", *args]
    return [userland.qemu, "-cpu", userland.qemu_cpu, "-L", str(root),
            str(root / "usr" / "bin" / userland.python), *args]


def emulated_env(root: Path, site: Path | None) -> dict:
    """A clean environment: the host's PYTHON*, OPENBLAS_CORETYPE=Haswell and such mean nothing on ARM."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin", "LANG": "C.UTF-8", "HOME": os.environ.get("HOME", "/root"),
           "PYTHONNOUSERSITE": "1", "PYTHONUNBUFFERED": "1"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    for key in ("EDGEPIPE_RUNTIME", "TERM"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def probe(root: Path, userland: Userland, site: Path | None = None) -> dict:
    out = subprocess.run(emulated(root, userland, "-c", "import json; " + _PROBE), capture_output=True, text=True,
                         env=emulated_env(root, site), timeout=300)
    if out.returncode != 0:
        raise SetupError(f"the userland's {userland.python} does not start (exit {out.returncode}): "
                         f"{out.stderr.strip()[-400:]}")
    return json.loads(out.stdout)


def userland_recipe(userland: Userland) -> dict:
    return {"version": RECIPE_VERSION, "suite": userland.suite, "arch": userland.arch, "variant": "minbase",
            "include": list(userland.include),
            "cpuinfo_sha256": hashlib.sha256(userland.cpuinfo.encode()).hexdigest() if userland.cpuinfo else None}


def ensure_userland(cache: Path, userland: Userland) -> Path:
    root = cache / "rootfs"
    recipe = userland_recipe(userland)
    if _stamp_ok(root, ".edgepipe-userland.json", recipe):
        cpuinfo = root / "proc" / "cpuinfo"
        with contextlib.suppress(OSError):
            if userland.cpuinfo is None or cpuinfo.read_text() == userland.cpuinfo:
                return root
        log(f"restoring {cpuinfo}")  # without it ai-edge-litert segfaults under emulation
        tmp = cpuinfo.with_name(".cpuinfo.tmp")
        tmp.write_text(userland.cpuinfo)
        os.replace(tmp, cpuinfo)
        return root

    def build(tmp: Path) -> None:
        t0 = time.monotonic()
        mirror = debian_mirror()
        log(f"debootstrap --foreign {userland.suite} {userland.arch} from {mirror} into {tmp}")
        run(["debootstrap", "--foreign", f"--arch={userland.arch}", "--variant=minbase",
             f"--include={','.join(userland.include)}", userland.suite, str(tmp), mirror])
        # binfmt_misc (needed by `debootstrap --second-stage`, which runs the target's maintainer
        # scripts) is often unavailable in containers; unpacking every package is enough to run Python.
        debs = sorted((tmp / "var/cache/apt/archives").glob("*.deb"))
        if not debs:
            raise SetupError(f"debootstrap left no packages in {tmp}/var/cache/apt/archives")
        log(f"unpacking {len(debs)} packages")
        for deb in debs:
            run(["dpkg", "-x", str(deb), str(tmp)])
            deb.unlink()
        # base-passwd's maintainer script would create these; a login needs them to know its user.
        for name in ("passwd", "group"):
            master = tmp / "usr/share/base-passwd" / f"{name}.master"
            if master.is_file() and not (tmp / "etc" / name).exists():
                shutil.copyfile(master, tmp / "etc" / name)
        # libblas3 and liblapack3 put their libraries in place through update-alternatives in their
        # maintainer scripts, which never ran: link them where numpy looks for them.
        for lib in sorted(tmp.glob("usr/lib/*/*/lib*.so.3")):
            if lib.parent.name in ("blas", "lapack") and not (lib.parent.parent / lib.name).exists():
                (lib.parent.parent / lib.name).symlink_to(f"{lib.parent.name}/{lib.name}")
        if userland.cpuinfo is not None:
            (tmp / "proc").mkdir(exist_ok=True)
            (tmp / "proc" / "cpuinfo").write_text(userland.cpuinfo)
        info = probe(tmp, userland)
        if info.get("machine") != userland.machine:
            raise SetupError(f"the emulated Python reports machine {info.get('machine')!r}, not {userland.machine}")
        log(f"userland ready: Python {info['python']} on {info['machine']} ({time.monotonic() - t0:.0f} s setup)")

    log(f"building the {userland.suite} {userland.arch} userland in {root} (once; later runs reuse it)")
    _build_atomically(root, ".edgepipe-userland.json", recipe, build)
    return root


# ---------------------------------------------------------------- runtime packages (run mode)

_SPEC = re.compile(r"^(ai[-_.]edge[-_.]litert|tflite[-_.]runtime)==([0-9][0-9A-Za-z.+-]*)$", re.IGNORECASE)


def parse_runtime(spec: str) -> tuple[str, str, str]:
    """'ai-edge-litert==2.3.0' -> (dist, version, import module)."""
    m = _SPEC.match(spec.strip())
    if not m:
        raise ValueError(f"--runtime {spec!r}: expected ai-edge-litert==X.Y.Z or tflite-runtime==X.Y.Z "
                         "(an exact version, so the cached packages can be named by it)")
    dist = re.sub(r"[-_.]+", "-", m.group(1).lower())
    module = "ai_edge_litert.interpreter" if dist == "ai-edge-litert" else "tflite_runtime.interpreter"
    return dist, m.group(2), module


def site_requirements(dist: str, version: str, userland: Userland) -> list[str]:
    # tflite-runtime 2.14.0 was compiled against numpy 1.x and fails to import with numpy 2.
    numpy = "numpy<2" if dist == "tflite-runtime" else "numpy"
    return [r for r in (f"{dist}=={version}", numpy, "pillow") if r.split("<")[0] not in userland.from_os]


def ensure_site(cache: Path, root: Path, spec: str, userland: Userland) -> Path:
    dist, version, module = parse_runtime(spec)
    site = cache / f"site-{dist}=={version}"
    reqs = site_requirements(dist, version, userland)
    recipe = {"version": RECIPE_VERSION, "python": PYTHON_VERSION, "platforms": userland.platforms,
              "requirements": reqs}
    if _stamp_ok(site, ".edgepipe-site.json", recipe):
        return site

    def build(tmp: Path) -> None:
        log(f"pip: {userland.machine} wheels of {' '.join(reqs)} into {site}")
        platform_args = [arg for p in userland.platforms for arg in ("--platform", p)]
        # What the userland's Debian packages provide (from_os) is not fetched again: no --deps then.
        deps = ["--no-deps"] if userland.from_os else []
        run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
             "--target", str(tmp), "--only-binary=:all:", "--python-version", PYTHON_VERSION,
             "--implementation", "cp", "--abi", "cp311", *platform_args, *deps, *reqs],
            env={**os.environ, "PIP_REQUIRE_VIRTUALENV": "0"})
        # Import once under emulation: proves the wheels load on the board and leaves their bytecode.
        check = (f"import numpy, PIL, {module}; from importlib import metadata; "
                 f"print('{dist}', metadata.version('{dist}'), 'numpy', numpy.__version__)")
        out = subprocess.run(emulated(root, userland, "-c", check), capture_output=True, text=True,
                             env=emulated_env(root, tmp), timeout=900)
        if out.returncode != 0:
            raise SetupError(f"{dist} {version} does not import under emulation: {out.stderr.strip()[-600:]}")
        log(f"emulated import ok: {out.stdout.strip()}")

    _build_atomically(site, ".edgepipe-site.json", recipe, build)
    return site


# ---------------------------------------------------------------- a board over SSH (serve mode)

BINFMT = Path("/proc/sys/fs/binfmt_misc")
# Character devices a login and Python need inside the chroot: (name, major, minor).
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0))


def ensure_binfmt(userland: Userland) -> None:
    """Let the kernel run the userland's binaries through qemu, inside a chroot too (flag F)."""
    if userland.binfmt is None:  # the host's own architecture
        return
    if not (BINFMT / "register").exists():
        if os.geteuid() != 0:
            raise SetupError(f"binfmt_misc is not mounted at {BINFMT} and this is not root; as root: "
                             f"mount -t binfmt_misc binfmt_misc {BINFMT}")
        try:
            run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)])
        except SetupError as e:
            raise SetupError(f"cannot mount binfmt_misc ({e}); this machine (a container?) does not allow it")
    entry = BINFMT / userland.binfmt
    if entry.exists():
        text = entry.read_text()
        flags = re.search(r"^flags:\s*(\S*)", text, re.MULTILINE)
        if text.startswith("enabled") and flags and "F" in flags.group(1):
            return
        raise SetupError(f"{entry} is registered without the F flag or disabled, so it cannot run inside a "
                         f"chroot; remove it (echo -1 > {entry}) and run again")
    conf = Path("/usr/lib/binfmt.d") / f"{userland.binfmt}.conf"
    if not conf.is_file():
        raise SetupError(f"{conf} missing; install Debian's qemu-user-static")
    if os.geteuid() != 0:
        raise SetupError(f"{userland.binfmt} is not registered in binfmt_misc and this is not root")
    (BINFMT / "register").write_text(conf.read_text().strip())


def prepare_board(root: Path, userland: Userland) -> None:
    """What a login over SSH needs and a debootstrap --foreign userland lacks; idempotent.

    Device nodes, /tmp, the host's CA bundle and resolver (processes inside share the host's
    network, so pip reaches PyPI), and the ownership sshd's ChrootDirectory insists on."""
    for part in [*reversed(root.parents), root]:
        st = part.stat()
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise SetupError(f"{part}: sshd's ChrootDirectory needs every component owned by root and not "
                             "group- or world-writable; use a --cache folder that is")
    for name, major, minor in DEVICES:
        node = root / "dev" / name
        if not node.exists():
            node.parent.mkdir(exist_ok=True)
            os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(node, 0o666)
    (root / "tmp").mkdir(exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    for host_file, inside in (("/etc/ssl/certs/ca-certificates.crt", "etc/ssl/certs/ca-certificates.crt"),
                              ("/etc/resolv.conf", "etc/resolv.conf")):
        if Path(host_file).is_file():
            (root / inside).parent.mkdir(parents=True, exist_ok=True)
            (root / inside).unlink(missing_ok=True)  # may be a dangling symlink in the userland
            shutil.copyfile(host_file, root / inside)
    if userland.qemu is None and Path("/proc/cpuinfo").is_file():
        # A native board runs on this CPU, and a real one always has /proc. Without /proc/cpuinfo the
        # interpreter's CPU detection (the cpuinfo library) fails, and tflite-runtime's int8 kernels take
        # gemmlowp instead of ruy's AVX2 path: outputs 1 LSB apart from this host's on some images.
        (root / "proc").mkdir(exist_ok=True)
        shutil.copyfile("/proc/cpuinfo", root / "proc" / "cpuinfo")
    check = subprocess.run(["chroot", str(root), "/usr/bin/python3", "-c",
                            "import platform; print(platform.machine())"],
                           capture_output=True, text=True, timeout=300, env={"QEMU_CPU": userland.qemu_cpu or "",
                                                                             "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    if check.returncode != 0 or check.stdout.strip() != userland.machine:
        raise SetupError(f"chroot {root} python3 does not run as {userland.machine} (exit {check.returncode}: "
                         f"{(check.stdout + check.stderr).strip()[-300:]})")


class Board:
    """A stock OpenSSH server on 127.0.0.1:port whose every login is chrooted into an emulated userland.

    Its configuration, host key, pid file and log live in `workdir`; `stop()` ends only this server."""

    def __init__(self, userland: Userland, root: Path, port: int, workdir: Path, authorized_keys: str):
        self.userland, self.root, self.port, self.workdir = userland, root, port, Path(workdir)
        self.authorized_keys = authorized_keys
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.log = self.workdir / "sshd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def host_public_key(self) -> str:
        return " ".join(self.host_key.with_suffix(".pub").read_text().split()[:2])

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_public_key}\n"

    def start(self, timeout: float = 15) -> Board:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.host_key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"edgepipe-{self.userland.arch}",
                            "-f", str(self.host_key)], check=True)
        keys = self.workdir / "authorized_keys"
        keys.write_text(self.authorized_keys)
        config = self.workdir / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
            f"PidFile {self.workdir / 'sshd.pid'}", f"AuthorizedKeysFile {keys}",
            "PermitRootLogin prohibit-password", "PubkeyAuthentication yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "PrintMotd no",
            "X11Forwarding no", "AllowTcpForwarding no", "MaxSessions 30", "MaxStartups 30:30:60",
            f"ChrootDirectory {self.root}",
            # Reaches qemu through the environment of every process of a session (binfmt passes it on).
            *([f"SetEnv QEMU_CPU={self.userland.qemu_cpu}"] if self.userland.qemu else []), ""]))
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation folder
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(config), "-E", str(self.log)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")
                log_tail = self.log.read_text(errors="replace") if self.log.exists() else ""
                raise SetupError(f"sshd on port {self.port} exited with {self.proc.returncode}: "
                                 f"{(err + log_tail).strip()[-500:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return self
            time.sleep(0.1)
        self.stop()
        raise SetupError(f"sshd did not listen on 127.0.0.1:{self.port} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_boards(names: dict, workdir: Path, fresh: bool = True) -> tuple[list, Path]:
    """Serve each userland ({alias: USERLANDS key}) as a board on a free port of 127.0.0.1.

    Returns the started Boards and an ssh_config for `ssh -F` (and `pipeline deploy --ssh-config`)
    in which each alias logs in as root with a key made here and a known_hosts holding the boards'
    keys. `fresh`: remove what deploys left on the boards (~/edgepipe, keeping pip's download cache),
    so the next deploy is a first one. Stop the boards with Board.stop()."""
    workdir.mkdir(parents=True, exist_ok=True)
    key = workdir / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    boards, known, hosts = [], "", ""
    try:
        for alias, arch in names.items():
            userland = USERLANDS[arch]
            root = setup_board(userland, default_cache(arch))
            if fresh:
                _forget_deploys(root / "root")
            board = Board(userland, root, free_port(), workdir / f"sshd-{alias}",
                          key.with_suffix(".pub").read_text()).start()
            boards.append(board)
            known += board.known_hosts_line()
            hosts += f"Host {alias}\n  HostName 127.0.0.1\n  Port {board.port}\n  User root\n"
    except BaseException:
        for board in boards:
            board.stop()
        raise
    (workdir / "known_hosts").write_text(known)
    config = workdir / "ssh_config"
    config.write_text(hosts + f"Host *\n  IdentityFile {key}\n  IdentitiesOnly yes\n"
                      f"  UserKnownHostsFile {workdir / 'known_hosts'}\n")
    return boards, config


def _forget_deploys(home: Path) -> None:
    deployed, cache = home / "edgepipe", home / ".edgepipe-pip-cache"
    if (deployed / "cache").is_dir():
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(deployed / "cache", cache)
    shutil.rmtree(deployed, ignore_errors=True)
    if cache.is_dir():
        deployed.mkdir(parents=True)
        os.replace(cache, deployed / "cache")


def setup_board(userland: Userland, cache: Path) -> Path:
    """Tools, userland, binfmt and the chroot's needs: the root folder a Board serves."""
    with locked(cache):
        ensure_tools(userland, serve=True)
        root = ensure_userland(cache, userland)
        ensure_binfmt(userland)
        prepare_board(root, userland)
    return root


# ---------------------------------------------------------------- run


def host_litert_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("ai-edge-litert")
    except metadata.PackageNotFoundError:
        return None


def default_cache(arch: str = "arm64") -> Path:
    userland = USERLANDS[arch]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgepipe" / f"{userland.arch}-{userland.suite}"


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="arm_emulate.py",
        description="Evaluate a bundle's int8 model with its device runner on an emulated Raspberry Pi OS "
                    "userland (Debian bookworm arm64 or armhf under qemu), or serve that userland as a board "
                    "over SSH. Accuracy only: timings under emulation say nothing about a real Pi.")
    p.add_argument("bundle", type=Path, nargs="?", help="bundle .tar.gz written by `pipeline bundle`")
    p.add_argument("data", type=Path, nargs="?", help=".npz with arrays x (uint8 images) and y (labels)")
    p.add_argument("--arch", choices=list(USERLANDS), default="arm64",
                   help="arm64: Raspberry Pi OS 64-bit (Cortex-A72); armhf: 32-bit (Cortex-A7); amd64-bullseye: a "
                        "native Debian 11 board with Python 3.9 (--serve only). Default: %(default)s")
    p.add_argument("--runtime", default=None,
                   help="ai-edge-litert==X.Y.Z or tflite-runtime==2.14.0 (default: the host's ai-edge-litert on "
                        "arm64, tflite-runtime 2.14.0 on armhf)")
    p.add_argument("--cache", type=Path, default=None,
                   help="cache folder (default: ${XDG_CACHE_HOME:-$HOME/.cache}/edgepipe/<arch>-bookworm)")
    p.add_argument("--model", help="model file inside the bundle (default: the bundle's default_model)")
    p.add_argument("--serve", type=int, metavar="PORT",
                   help="serve the userland as a board: sshd on 127.0.0.1:PORT, logins chrooted into it, until Ctrl-C")
    p.add_argument("--authorized-keys", type=Path, help="with --serve: public key(s) allowed to log in as root")
    args = p.parse_args(argv)
    if args.serve is None and (args.bundle is None or args.data is None):
        p.error("BUNDLE and DATA are required (or --serve PORT)")
    if args.serve is not None and not (args.authorized_keys and args.authorized_keys.is_file()):
        p.error("--serve needs --authorized-keys FILE with the public key(s) that may log in")
    return args


def _terminate(signum, frame):
    # Turn SIGTERM/SIGHUP into an exception, so a running setup command is killed and its half-built
    # folder removed (a SIGKILL leaves the folder; the next setup deletes it under the lock).
    raise SystemExit(128 + signum)


def serve(args, userland: Userland, cache: Path) -> int:
    try:
        root = setup_board(userland, cache)
        board = Board(userland, root, args.serve, cache / "sshd", args.authorized_keys.read_text()).start()
    except (SetupError, OSError, subprocess.CalledProcessError) as e:
        log(f"error: {e}")
        return EXIT_SETUP
    log(f"board up: ssh -p {args.serve} root@127.0.0.1 ({userland.suite} {userland.machine}"
        + (f", {userland.qemu} -cpu {userland.qemu_cpu}" if userland.qemu else "") + "); its host key for known_hosts:")
    print(board.known_hosts_line(), end="", flush=True)
    try:
        while board.proc.poll() is None:
            time.sleep(1)
        log(f"sshd exited with {board.proc.returncode}; see {board.log}")
        return EXIT_SETUP
    except KeyboardInterrupt:
        return 0
    finally:
        board.stop()


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
    userland = USERLANDS[args.arch]
    cache = (args.cache or default_cache(args.arch)).expanduser().resolve()
    if args.serve is not None:
        return serve(args, userland, cache)
    if userland.qemu is None:
        log(f"error: --arch {args.arch} is served as a board (--serve); run mode emulates the ARM userlands only")
        return 2
    spec = args.runtime
    if spec is None and userland.arch == "armhf":
        spec = TFLITE_RUNTIME
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
    if dist == "ai-edge-litert" and userland.arch == "armhf":
        log(f"error: --runtime {spec}: ai-edge-litert publishes no 32-bit ARM wheel; "
            f"use {TFLITE_RUNTIME} with --arch armhf")
        return 2
    for path, what in ((args.bundle, "bundle"), (args.data, "data")):
        if not path.is_file():
            log(f"error: {path}: no such {what} file")
            return 2
    data = args.data.resolve()

    t0 = time.monotonic()
    try:
        with locked(cache):
            ensure_tools(userland)
            root = ensure_userland(cache, userland)
            site = ensure_site(cache, root, spec, userland)
        info = probe(root, userland, site)
    except SetupError as e:
        log(f"error: {e}")
        return EXIT_SETUP
    except subprocess.TimeoutExpired as e:
        log(f"error: timed out: {e}")
        return EXIT_SETUP
    log(f"emulated python: machine={info['machine']} python={info['python']} runtime={dist}=={version} "
        f"({userland.qemu} -cpu {userland.qemu_cpu}; setup {time.monotonic() - t0:.1f} s; cache {cache})")
    if info["machine"] != userland.machine:
        log(f"error: the emulated Python reports {info['machine']!r}, not {userland.machine}")
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
                log(f"error: {args.bundle}: has no {path.relative_to(bundle)}; "
                    "pass a bundle written by `pipeline bundle`")
                return 2
        cmd = emulated(root, userland, "device/runner.py", "eval", str(data), "--json", "--model", str(model))
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
