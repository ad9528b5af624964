"""The user's named boards: `pipeline device add pi4 pi@raspberrypi.local`, used by name from then on.

Stored as JSON in the user's config folder ($XDG_CONFIG_HOME/edgepipe/devices.json, by default
~/.config/edgepipe/devices.json). A board is only a name and an SSH destination: keys, agent,
known_hosts and host aliases stay in the user's own OpenSSH set-up, and no password is ever stored.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.artifacts import atomic_write
from pipeline.failures import InputError

# Names become report columns and file names; hosts and users reach the ssh command line. Anything a
# shell or ssh could read as more than a name (spaces, quotes, ;|&$`, a leading '-') is refused.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})|\[[0-9A-Fa-f:.]+\])$")
TARGET = re.compile(r"^(?:(?P<user>[^@]+)@)?(?P<host>\[[^\]]*\]|[^:@]+)(?::(?P<port>[^:]+))?$")


class BoardNameError(InputError):
    """A board's name or destination, given or stored in devices.json, that cannot be used; the message
    says what was expected."""


@dataclass(frozen=True)
class Device:
    name: str
    host: str                 # a host name, an address, or a Host alias of ~/.ssh/config
    user: str | None = None   # None: ssh's own choice (~/.ssh/config User, else the local user)
    port: int | None = None

    @property
    def target(self) -> str:
        return (f"{self.user}@" if self.user else "") + self.host + (f":{self.port}" if self.port else "")

    @property
    def ssh_host(self) -> str:
        return self.host[1:-1] if self.host.startswith("[") else self.host


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise BoardNameError(f"board name {name!r}: use letters, digits, '.', '_' and '-' (at most 64, "
                          "starting with a letter or digit), e.g. pi4")
    return name


def parse_target(target: str, name: str | None = None) -> Device:
    """'[user@]host[:port]' (host may be an ~/.ssh/config alias or [IPv6]) as a Device named `name`."""
    m = TARGET.match(target or "")
    user, host, port = (m.group("user"), m.group("host"), m.group("port")) if m else (None, None, None)
    if not m or not HOST.match(host) or (user is not None and not USER.match(user)):
        raise BoardNameError(f"{target!r} is not an SSH destination; expected [user@]host[:port] with a plain host "
                          "name, address or ~/.ssh/config alias, e.g. pi@raspberrypi.local or pi@10.0.0.7:2222")
    if port is not None and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):  # not '²'
        raise BoardNameError(f"{target!r}: port {port!r} is not a number from 1 to 65535")
    return Device(check_name(name) if name else _default_name(target), host, user, int(port) if port else None)


def _default_name(target: str) -> str:
    # A board given as user@host:port is named after it; characters a name cannot hold become '-'.
    return re.sub(r"[^A-Za-z0-9._-]", "-", target).strip("-._")[:64] or "board"


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "edgepipe" / "devices.json"


def load() -> dict[str, Device]:
    path = config_path()
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise BoardNameError(f"{path}: not readable JSON ({e}); fix or delete it")
    try:
        stored = {name: Device(**entry) for name, entry in raw.get("devices", {}).items()}
    except (TypeError, AttributeError):
        raise BoardNameError(f"{path}: not a devices file written by `pipeline device add`; fix or delete it")
    return {name: _checked(path, name, device) for name, device in stored.items()}


def _checked(path: Path, name: str, device: Device) -> Device:
    """A stored board, held to what `device add` accepts: the file may have been edited by hand or by
    anyone who can write it, and its hosts and users reach the ssh command line."""
    try:
        if not isinstance(device.host, str) or not isinstance(name, str):
            raise BoardNameError(f"host {device.host!r} is not an SSH destination")
        accepted = parse_target(device.target, check_name(name))
    except BoardNameError as e:
        raise BoardNameError(f"{path}: board {name!r}: {e}; fix or remove that entry")
    if accepted != device:
        raise BoardNameError(f"{path}: board {name!r}: {device!r} is not what `pipeline device add {name} "
                             f"{device.target}` would store; fix or remove that entry")
    return device


def save(devices: dict[str, Device]) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"devices": {name: {k: v for k, v in asdict(d).items() if v is not None}
                        for name, d in sorted(devices.items())}}
    atomic_write(path, json.dumps(body, indent=2) + "\n")
    return path


def add(name: str, target: str, replace: bool = False) -> Device:
    device = parse_target(target, name)
    devices = load()
    if name in devices and not replace and devices[name] != device:
        raise BoardNameError(f"board {name} is already {devices[name].target}; pass --replace to point it at {target}")
    devices[name] = device
    save(devices)
    return device


def remove(name: str) -> Device:
    devices = load()
    if name not in devices:
        raise BoardNameError(f"no board named {name}; `pipeline device list` shows the known ones")
    device = devices.pop(name)
    save(devices)
    return device


def resolve(spec: str) -> Device:
    """A --device value: a board's name, else a [user@]host[:port] destination."""
    devices = load()
    if spec in devices:
        return devices[spec]
    return parse_target(spec)
