"""The transport to a board: the user's own OpenSSH client, one multiplexed connection per board.

Running `ssh` rather than speaking the protocol means ~/.ssh/config (Host aliases, User, Port,
IdentityFile, ProxyJump), keys, the agent and known_hosts apply exactly as on the command line.
BatchMode=yes never asks for a password or passphrase; StrictHostKeyChecking=yes refuses a host
key known_hosts does not hold, unless the user asked for OpenSSH's `accept-new`.

Each board gets one master connection (ControlMaster) that the later calls share, so a deploy pays
for one handshake. The master runs in the background with a short ControlPersist: closed at the end
by `ssh -O exit`, and, when this process is killed before it can do that, gone by itself a few
seconds after the last call's ssh has ended. Every call runs pipeline/boards/remote.py with the
board's python3; its stdin stays open for as long as the call runs, so that when this process dies
the board-side helper sees its stdin close and stops what it started.

Every ssh command line ends its options with `--` before the destination, so no destination,
however it got here, is read as an option.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import selectors
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import device.board
from pipeline.boards import remote
from pipeline.boards.devices import Device

# The board's python3 decodes and runs device/board.py as module `edgepipe_board`, then remote.py.
# Only base64 and this line (no backslashes, no single quotes) reach the board's login shell, so
# the command reads the same to sh, bash, zsh and fish.
BOOTSTRAP = ('import base64,sys,types;m=types.ModuleType("edgepipe_board");'
             'exec(base64.b64decode(sys.argv[1]),m.__dict__);sys.modules["edgepipe_board"]=m;'
             'exec(base64.b64decode(sys.argv[2]),{"__name__":"__edgepipe_remote__"})')
_SOURCES = tuple(base64.b64encode(Path(m.__file__).read_bytes()).decode() for m in (device.board, remote))

# What ssh's stderr says -> the one line a user reads; the first match wins.
SSH_ERRORS = (
    ("REMOTE HOST IDENTIFICATION HAS CHANGED", ("host key refused: it differs from the one known_hosts holds for "
     "{host} (if the board was reinstalled, remove the old key with `ssh-keygen -R {host}`)")),
    ("Host key verification failed", ("host key refused: {host} is not in known_hosts; connect once with "
     "`ssh {target}` to check and accept its key, or pass --accept-new-host-key")),
    ("Connection refused", "unreachable: connection refused (no SSH server listening on {host}{port})"),
    ("Could not resolve hostname", "unreachable: unknown host name {host}"),
    ("timed out", "unreachable: no answer from {host}{port} within {timeout} s"),
    ("No route to host", "unreachable: no route to {host}"),
    ("Network is unreachable", "unreachable: network is unreachable"),
    ("Permission denied", ("login refused: the board accepts none of your keys (copy yours with `ssh-copy-id "
     "{target}`; passwords are never used)")),
)


class BoardError(Exception):
    """Why a board failed, in one line."""


class Cancelled(Exception):
    """The deploy was interrupted (Ctrl-C); nothing of this board is used."""


@dataclass(frozen=True)
class SshOptions:
    config: str | None = None        # -F FILE instead of ~/.ssh/config
    accept_new_host_key: bool = False
    connect_timeout: int = 10


def remote_command(params: dict) -> str:
    encoded = base64.b64encode(json.dumps(params).encode()).decode()
    return shlex.join(["python3", "-c", BOOTSTRAP, *_SOURCES, encoded])


# Seconds the background master waits, once no call uses it, before it exits on its own: long enough
# for the gap between two calls of a deploy, short enough that a killed deploy leaves nothing behind.
CONTROL_PERSIST_S = 5


class SshConnection:
    """One board's connection for one deploy; `abort()` from any thread kills everything it runs."""

    def __init__(self, device: Device, options: SshOptions, deadline: float, timeout: float):
        self.device, self.options, self.deadline, self.timeout = device, options, deadline, timeout
        # The control socket's path must stay short (sun_path is ~100 bytes): a folder under /tmp.
        self._dir = tempfile.mkdtemp(prefix="edgepipe-ssh-", dir="/tmp" if os.path.isdir("/tmp") else None)
        self._procs: set[subprocess.Popen] = set()
        self._guard = threading.Lock()
        self.aborted = False

    # ------------------------------------------------------------ processes

    def _ssh(self, command: str | None = None, master: bool = False, control: str | None = None) -> list[str]:
        o, d = self.options, self.device
        args = ["ssh", *(["-F", o.config] if o.config else []), "-o", "BatchMode=yes",
                "-o", f"StrictHostKeyChecking={'accept-new' if o.accept_new_host_key else 'yes'}",
                "-o", f"ConnectTimeout={o.connect_timeout}", "-o", "ServerAliveInterval=15",
                "-o", "ServerAliveCountMax=4", "-o", "LogLevel=ERROR",
                "-o", f"ControlPath={self._dir}/c", "-o", f"ControlMaster={'yes' if master else 'no'}"]
        if d.port:
            args += ["-p", str(d.port)]
        if d.user:
            args += ["-l", d.user]
        if master:
            # -f -N: once logged in, the master goes to the background and this ssh exits 0.
            args += ["-o", f"ControlPersist={CONTROL_PERSIST_S}", "-f", "-N"]
        if control:
            args += ["-O", control]
        return [*args, "--", d.ssh_host, *([command] if command else [])]

    def _start(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        with self._guard:
            if self.aborted:
                raise Cancelled()
            proc = subprocess.Popen(cmd, **kwargs)
            self._procs.add(proc)
        return proc

    def _forget(self, proc: subprocess.Popen) -> None:
        with self._guard:
            self._procs.discard(proc)

    def remaining(self, step: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise BoardError(f"timed out after {self.timeout:.0f} s (--timeout) while {step}")
        return left

    def _explain(self, stderr: str, step: str) -> str:
        d = self.device
        for needle, text in SSH_ERRORS:
            if needle in stderr:
                return text.format(host=d.ssh_host, port=f" port {d.port}" if d.port else "", target=d.target,
                                   timeout=self.options.connect_timeout)
        last = [line.strip() for line in stderr.splitlines() if line.strip()]
        # ssh also exits with 255 when the remote command was killed by a signal.
        return f"the connection or the board-side process died while {step}: {last[-1] if last else 'no message'}"

    # ------------------------------------------------------------ the connection

    def open(self) -> None:
        """Connect and authenticate once (the master); a refused key or a down board fails here."""
        if shutil.which("ssh") is None:
            raise BoardError("no `ssh` command on this host; install OpenSSH's client (apt install openssh-client)")
        proc = self._start(self._ssh(master=True), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=self.remaining("connecting"))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise BoardError(f"timed out after {self.timeout:.0f} s (--timeout) while connecting")
        finally:
            self._forget(proc)
        if self.aborted:
            raise Cancelled()
        if proc.returncode != 0:
            raise BoardError(self._explain(err.decode(errors="replace"), "connecting"))

    def call(self, params: dict, step: str, data: Path | None = None) -> tuple[bytes, str]:
        """Run one remote.py command; (stdout, stderr), or BoardError with the reason it failed."""
        read_end, write_end = (None, None) if data is not None else os.pipe()
        stdin = open(data, "rb") if data is not None else read_end
        try:
            proc = self._start(self._ssh(remote_command(params)), stdin=stdin, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        finally:
            if data is not None:
                stdin.close()
            else:
                os.close(read_end)
        try:
            out, err = proc.communicate(timeout=self.remaining(step))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise BoardError(f"timed out after {self.timeout:.0f} s (--timeout) while {step}")
        finally:
            if write_end is not None:
                os.close(write_end)  # the helper's stdin closes: it is done anyway
            self._forget(proc)
        if self.aborted:
            raise Cancelled()
        stderr = err.decode(errors="replace")
        if proc.returncode != 0:
            self._failed(proc.returncode, stderr, step)
        return out, stderr

    def json(self, params: dict, step: str, data: Path | None = None) -> dict:
        out, err = self.call(params, step, data)
        try:
            return json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise BoardError(f"unexpected answer from the board while {step}: "
                             + (err.strip().splitlines() or ["no output"])[-1])

    @contextlib.contextmanager
    def session(self, params: dict, log):
        """The board's deploy lock, held while the block runs; yields the first answer (probe and status)."""
        read_end, write_end = os.pipe()
        try:
            proc = self._start(self._ssh(remote_command({**params, "cmd": "session",
                                                         "timeout": self.remaining("locking the board")})),
                               stdin=read_end, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        finally:
            os.close(read_end)
        try:
            yield self._first_answer(proc, log)
        finally:
            os.close(write_end)  # the board-side session ends and releases the lock
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._forget(proc)

    def _first_answer(self, proc: subprocess.Popen, log) -> dict:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        out, err = b"", b""
        with sel:
            while sel.get_map():
                for key, _ in sel.select(timeout=min(1.0, self.remaining("waiting for another deploy to this board"))):
                    chunk = os.read(key.fileobj.fileno(), 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                    elif key.fileobj is proc.stdout:
                        out += chunk
                        if out.endswith(b"\n"):
                            try:
                                return json.loads(out)
                            except ValueError:
                                raise BoardError(f"unexpected answer from the board: {out[:200]!r}")
                    else:
                        err += chunk
                        if chunk.startswith(b"waiting"):
                            log("another deploy to this board is running; waiting for it to finish")
        proc.wait(timeout=10)
        if self.aborted:
            raise Cancelled()
        return self._failed(proc.returncode, err.decode(errors="replace"), "probing the board")

    def _failed(self, code: int, stderr: str, step: str):
        """Raise the one-line reason for a call that exited with `code`."""
        if code == 255:
            raise BoardError(self._explain(stderr, step))
        if code == 127 and "python3" in stderr:
            raise BoardError("no python3 on the board; install it (sudo apt install python3 python3-venv)")
        if code == remote.EXIT_AGENT:
            lines = [line[len("edgepipe: "):] for line in stderr.splitlines() if line.startswith("edgepipe: ")]
            detail = _pip_reason(stderr)
            raise BoardError((lines[-1] if lines else f"the board-side helper failed while {step}")
                             + (f": {detail}" if detail else ""))
        last = [line for line in stderr.splitlines() if line.strip()]
        raise BoardError(f"failed while {step} (exit {code}): {last[-1].strip() if last else 'no message'}")

    def abort(self) -> None:
        with self._guard:
            self.aborted = True
            procs = list(self._procs)
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.kill()

    def close(self) -> None:
        """Stop the background master, if it is listening, and remove its socket's folder."""
        if (Path(self._dir) / "c").exists():
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(self._ssh(control="exit"), stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
        shutil.rmtree(self._dir, ignore_errors=True)


def _pip_reason(stderr: str) -> str | None:
    """pip's own one-line verdict, when the helper failed in pip."""
    for line in reversed(stderr.splitlines()):
        if line.startswith("ERROR: ") and ("No matching distribution" in line or "Could not find" in line
                                           or "No space left" in line or "HTTP" in line):
            return line[len("ERROR: "):].strip()
    return None
