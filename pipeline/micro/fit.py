"""Which microcontroller boards a model fits: their flash and RAM, the allowance the rest of the firmware
takes, and the budget an export is checked against (`--board`, or `--flash`/`--ram`)."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.micro.runtime import KIB, MIB, ExportError


@dataclass(frozen=True)
class Board:
    title: str
    flash: int  # bytes
    ram: int  # bytes
    core: str


# Common TinyML boards and their on-chip memory (datasheet totals).
BOARDS: dict[str, Board] = {
    "nano33ble": Board("Arduino Nano 33 BLE Sense", 1 * MIB, 256 * KIB, "nRF52840, Cortex-M4F 64 MHz"),
    "nucleo-l4r5zi": Board("STM32 Nucleo-L4R5ZI", 2 * MIB, 640 * KIB, "STM32L4R5, Cortex-M4F 120 MHz"),
    "pico": Board("Raspberry Pi Pico", 2 * MIB, 264 * KIB, "RP2040, Cortex-M0+ 133 MHz"),
    "pico2": Board("Raspberry Pi Pico 2", 4 * MIB, 520 * KIB, "RP2350, Cortex-M33 150 MHz"),
    "disco-f746ng": Board("STM32F746G-DISCO", 1 * MIB, 320 * KIB, "STM32F746, Cortex-M7 216 MHz"),
    "esp32-s3": Board("ESP32-S3-DevKitC-1 (N8)", 8 * MIB, 512 * KIB, "ESP32-S3, Xtensa LX7 240 MHz"),
}
# A board's memory is not all the model's: the interpreter, the used kernels, the board support and the
# application take flash; the stack, the board support's buffers and globals take RAM. These are rough
# allowances, not measurements (the board's own build reports the exact figures); --flash/--ram instead
# give the budget left for the model and the arena, with no allowance taken off.
FLASH_ALLOWANCE = 128 * KIB
RAM_ALLOWANCE = 32 * KIB


@dataclass(frozen=True)
class Budget:
    """Flash and RAM a model and its arena may use; None is unchecked."""
    name: str
    flash: int | None
    ram: int | None

    def problems(self, flash: int, arena: int) -> list[str]:
        out = []
        if self.flash is not None and flash > self.flash:
            out.append(f"the model needs {flash:,} bytes of flash, {self.flash:,} are free")
        if self.ram is not None and arena > self.ram:
            out.append(f"the arena needs {arena:,} bytes of RAM, {self.ram:,} are free")
        return out


def board_budget(name: str) -> Budget:
    b = BOARDS[name]
    return Budget(name, b.flash - FLASH_ALLOWANCE, b.ram - RAM_ALLOWANCE)


def choose_budget(board: str | None, flash: int | None, ram: int | None) -> Budget | None:
    if board and (flash is not None or ram is not None):
        raise ExportError("--board and --flash/--ram both set the budget; pass a board or your own figures")
    if board:
        return board_budget(board)
    if flash is not None or ram is not None:
        return Budget("--flash/--ram", flash, ram)
    return None


def fits(flash: int, arena: int) -> dict[str, bool]:
    return {name: not board_budget(name).problems(flash, arena) for name in BOARDS}
