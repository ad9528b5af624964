"""What board this is and the state it is in: model, OS, memory, CPU governor, temperature, throttling.

Standard library only and safe on Python 3.9: the runner's `bench` records the state before and
after measuring, and `pipeline deploy` sends this file with its board-side helper to probe a board
before anything is installed on it. Every field is None where the board does not expose it (a
container, an emulated userland without /proc and /sys).
"""
from __future__ import annotations

import os
import platform
import shutil
import struct
import subprocess

# `vcgencmd get_throttled` bits (Raspberry Pi firmware): what is happening now, and what has happened since boot.
THROTTLED_BITS = {0: "under-voltage now", 1: "ARM frequency capped now", 2: "throttled now",
                  3: "soft temperature limit now", 16: "under-voltage has occurred",
                  17: "ARM frequency capping has occurred", 18: "throttling has occurred",
                  19: "soft temperature limit has occurred"}


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").replace("\x00", "").strip()
    except OSError:
        return None


def _cpuinfo() -> dict:
    info = {}
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip().lower(), value.strip())
    return info


def _os_release() -> dict:
    out = {}
    for line in (_read("/etc/os-release") or _read("/usr/lib/os-release") or "").splitlines():
        key, _, value = line.partition("=")
        if key and value:
            out[key.strip()] = value.strip().strip('"')
    return out


def model() -> str | None:
    """The board's name as its firmware gives it ("Raspberry Pi 4 Model B Rev 1.4"), else the CPU's."""
    named = _read("/proc/device-tree/model")
    if named:
        return named
    info = _cpuinfo()
    for key in ("model", "hardware", "model name"):
        if info.get(key) and not info[key].isdigit():  # x86 puts a number in "model"
            return info[key]
    return None


def emulated(machine: str, board_model: str | None) -> bool:
    """True under qemu: the userlands edgepipe emulates say so in their cpuinfo, and qemu-user left
    alone shows an ARM program the host's x86 cpuinfo."""
    if board_model and "qemu" in board_model.lower():
        return True
    vendor = _cpuinfo().get("vendor_id", "")
    return machine.startswith(("arm", "aarch")) and vendor in ("GenuineIntel", "AuthenticAMD")


def describe() -> dict:
    """What does not change while measuring: model, OS, kernel, machine, bitness, cores, memory."""
    machine = platform.machine()
    board_model = model()
    mem = None
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem = round(int(line.split()[1]) / 1024)
    release = _os_release()
    return {"model": board_model, "os": release.get("PRETTY_NAME") or platform.platform(),
            "os_id": release.get("ID"), "os_codename": release.get("VERSION_CODENAME"),
            "kernel": platform.release(), "machine": machine,
            # A 32-bit Raspberry Pi OS on a 64-bit kernel says aarch64 above: the userland's width decides.
            "bits": struct.calcsize("P") * 8, "cores": os.cpu_count(), "memory_mb": mem,
            "python": platform.python_version(), "emulated": emulated(machine, board_model)}


def _vcgencmd(*args: str) -> str | None:
    if shutil.which("vcgencmd") is None:
        return None
    try:
        out = subprocess.run(["vcgencmd", *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def state() -> dict:
    """What changes under load: governor, clock, temperature and the firmware's throttling flags."""
    cpu = "/sys/devices/system/cpu/cpu0/cpufreq"
    freq = _read(f"{cpu}/scaling_cur_freq")
    temp = _read("/sys/class/thermal/thermal_zone0/temp")
    out = {"governor": _read(f"{cpu}/scaling_governor"),
           "freq_mhz": int(freq) / 1000 if freq and freq.isdigit() else None,
           "temperature_c": int(temp) / 1000 if temp and temp.lstrip("-").isdigit() else None,
           "throttled": None, "throttled_flags": None}
    throttled = _vcgencmd("get_throttled")  # "throttled=0x50000"
    if throttled and "=" in throttled:
        try:
            bits = int(throttled.split("=", 1)[1], 16)
        except ValueError:
            bits = None
        if bits is not None:
            out["throttled"] = hex(bits)
            out["throttled_flags"] = [text for bit, text in THROTTLED_BITS.items() if bits >> bit & 1]
    if out["temperature_c"] is None:
        temp = _vcgencmd("measure_temp")  # "temp=48.3'C"
        if temp and "=" in temp:
            try:
                out["temperature_c"] = float(temp.split("=", 1)[1].split("'")[0])
            except ValueError:
                pass
    return out
