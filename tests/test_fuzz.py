"""Fuzzing the device side: mutated and truncated images and `.tflite` files, each in a fresh runner process.

Every input runs as `python device/runner.py classify|info ...` in its own process (a process pool
keeps two to four of them busy). An outcome is one of:

    ok         exit 0
    error      exit 1 with exactly one `error: ...` line on stderr and no traceback
    signal     killed by a signal (SIGSEGV, SIGABRT, SIGBUS, SIGKILL by the OOM killer, ...)
    traceback  a Python traceback on stderr
    hang       no answer within HANG_SECONDS
    other      any other exit (wrong code, no error line, several error lines)

Only `ok` and `error` are acceptable. The inputs:

    images  150 seeded mutations (bit flips, truncation, inserted/deleted bytes, spliced regions, and
            format-aware edits of PNG chunk lengths and IHDR, JPEG segment lengths, SOF and DHT, GIF
            screen and image descriptors, BMP header fields, TIFF IFD entries) of 17 real files that
            Pillow wrote from a digit (PNG, JPEG, GIF, BMP, TIFF in several modes), plus 45 TIFFs
            whose IFD entries were retyped;
    models  100 seeded mutations of a real int8 model (the same generic ones, plus edits of the fields
            a small flatbuffer reader finds: vtables, offsets, vector lengths, tensor shapes, types,
            buffer indices and sizes, quantization, operator codes, operator and graph tensor
            indices), plus 98 crafted models that are structurally valid but lie (an operator's
            tensor marked optional, an operator pointed at another op code). They lie beside no
            metadata.json, so the runner cannot verify them: the case its child process is for.

The mutations are seeded, so a failure is reproducible: failing inputs are copied to
`fuzz-failures/` under the test's temporary folder and named in the assertion message.
`python -m pytest tests/test_fuzz.py -s` prints the counts; EDGEPIPE_FUZZ_IMAGES, _MODELS and _SEED
change the budget (a process per input costs about a second on CI's two cores: the default budget reaches
every kind of mutation, and a release run can afford EDGEPIPE_FUZZ_IMAGES=500 EDGEPIPE_FUZZ_MODELS=300).
The two quick tests (not `slow`) push more mutations through `core.load_image` in this process.
"""
from __future__ import annotations

import io
import os
import random
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
# EDGEPIPE_FUZZ_RUNNER points the fuzz at another copy of the runner (say, the previous release's).
RUNNER = Path(os.environ.get("EDGEPIPE_FUZZ_RUNNER", REPO / "device" / "runner.py"))

N_IMAGES = int(os.environ.get("EDGEPIPE_FUZZ_IMAGES", 150))
N_MODELS = int(os.environ.get("EDGEPIPE_FUZZ_MODELS", 100))
SEED = int(os.environ.get("EDGEPIPE_FUZZ_SEED", 20240611))
WORKERS = max(2, min(4, os.cpu_count() or 2))
HANG_SECONDS = 60
ACCEPTABLE = {"ok", "error"}


# ---------------------------------------------------------------- running and judging one input

def outcome(returncode: int | None, stderr: str) -> str:
    if returncode is None:
        return "hang"
    if returncode < 0:
        return "signal"
    if "Traceback (most recent call last)" in stderr:
        return "traceback"
    if returncode == 0:
        return "ok"
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    return "error" if returncode == 1 and len(errors) == 1 else "other"


def run_one(args: list[str], cwd: Path) -> tuple[str, int | None, str]:
    try:
        proc = subprocess.run([sys.executable, str(RUNNER), *args], cwd=cwd, capture_output=True, text=True,
                              errors="replace", timeout=HANG_SECONDS)
    except subprocess.TimeoutExpired:
        return "hang", None, ""
    return outcome(proc.returncode, proc.stderr), proc.returncode, proc.stderr


def run_all(jobs: list[tuple[str, list[str]]], cwd: Path) -> list[tuple[str, str, int | None, str]]:
    """jobs: (label, runner args); returns (label, outcome, returncode, stderr) in order."""
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(lambda job: run_one(job[1], cwd), jobs))
    return [(label, *res) for (label, _), res in zip(jobs, results)]


def summarize(kind: str, results, seconds: float, work: Path, failures_dir: Path) -> tuple[Counter, list[str]]:
    counts = Counter(r[1] for r in results)
    by_mutation: dict[str, Counter] = {}
    for label, out, *_ in results:
        by_mutation.setdefault(label.split(":")[0], Counter())[out] += 1
    # Errors that are a crash of the interpreter, contained by the runner's child process.
    contained = sum(out == "error" and "the interpreter crashed (SIG" in stderr for _, out, _, stderr in results)
    print(f"\nfuzz {kind}: {len(results)} inputs in {seconds:.0f} s with {WORKERS} workers -> "
          + ", ".join(f"{k} {counts[k]}" for k in ("ok", "error", "signal", "traceback", "hang", "other"))
          + f" ({contained} of the errors: an interpreter crash contained in the runner's child process)")
    for mutation, c in sorted(by_mutation.items()):
        print(f"  {mutation:<14} " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    bad = []
    failures_dir.mkdir(parents=True, exist_ok=True)
    for label, out, rc, stderr in results:
        if out not in ACCEPTABLE:
            tail = " | ".join(stderr.strip().splitlines()[-2:])[:300]
            bad.append(f"{label}: {out} (exit {rc}) {tail}")
            shutil.copy(work / label.split(":", 1)[1], failures_dir)
    return counts, bad


# ---------------------------------------------------------------- generic mutations

INTERESTING_32 = (0, 1, 2, 3, 4, 7, 8, 16, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
                  0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, 1_000_000, 65_521)


def flip(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4, 8, 16))):
        i = rng.randrange(len(b))
        b[i] = b[i] ^ (1 << rng.randrange(8)) if rng.random() < 0.6 else rng.randrange(256)
    return bytes(b)


def truncate(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.3:
        return data[:rng.randrange(0, min(64, len(data)))]  # inside the header
    return data[:rng.randrange(1, len(data))]


def shift(data: bytes, rng: random.Random) -> bytes:
    """Insert or delete a few bytes somewhere: every offset after that point is now wrong."""
    i = rng.randrange(len(data))
    n = rng.choice((1, 2, 3, 4, 8, 64))
    if rng.random() < 0.5:
        return data[:i] + bytes(rng.randrange(256) for _ in range(n)) + data[i:]
    return data[:i] + data[i + n:]


def splice(data: bytes, rng: random.Random) -> bytes:
    """Copy one region over another (duplicated headers, chunks in the wrong place)."""
    n = rng.randrange(4, max(5, min(256, len(data) // 4)))
    src, dst = rng.randrange(len(data) - n), rng.randrange(len(data) - n)
    return data[:dst] + data[src:src + n] + data[dst + n:]


def new_value(old: int, width: int, rng: random.Random) -> int:
    mask = (1 << (8 * width)) - 1
    choices = [v & mask for v in INTERESTING_32] + [(old + d) & mask for d in (-1, 1, 4, -4)]
    choices += [(old * 2) & mask, (old ^ (1 << rng.randrange(8 * width))) & mask, rng.randrange(mask + 1)]
    return rng.choice(choices)


def set_field(data: bytes, pos: int, width: int, endian: str, rng: random.Random) -> bytes:
    if pos + width > len(data):
        return flip(data, rng)
    old = int.from_bytes(data[pos:pos + width], endian)
    value = new_value(old, width, rng)
    return data[:pos] + value.to_bytes(width, endian) + data[pos + width:]


# ---------------------------------------------------------------- image seeds and format-aware fields

def image_seeds(digit: np.ndarray) -> dict[str, bytes]:
    """Real files written by Pillow from an MNIST-style digit, in every format and mode worth reading."""
    from PIL import Image

    gray = Image.fromarray(digit)
    rgb = Image.merge("RGB", (gray, gray.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gray))
    big = gray.resize((56, 56))
    seeds = {}

    def save(name, img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        seeds[name] = buf.getvalue()

    save("png-L", gray, "PNG")
    save("png-RGBA", rgb.convert("RGBA"), "PNG")
    save("png-P", rgb.convert("P"), "PNG")
    save("png-I16", Image.fromarray(digit.astype(np.uint16) * 257), "PNG")
    save("png-big", big, "PNG")
    save("jpeg-L", gray, "JPEG", quality=90)
    save("jpeg-RGB", rgb, "JPEG", quality=75)
    save("jpeg-progressive", big.convert("RGB"), "JPEG", progressive=True)
    save("gif", gray, "GIF")
    save("gif-anim", gray, "GIF", save_all=True, append_images=[rgb.convert("P")], duration=10, loop=0)
    save("bmp-L", gray, "BMP")
    save("bmp-RGB", rgb, "BMP")
    save("bmp-1bit", gray.convert("1"), "BMP")
    save("tiff-raw", gray, "TIFF")
    save("tiff-lzw", rgb, "TIFF", compression="tiff_lzw")
    save("tiff-packbits", gray, "TIFF", compression="packbits")
    save("tiff-deflate", big, "TIFF", compression="tiff_adobe_deflate")
    return seeds


def png_fields(data: bytes) -> list[tuple[int, int, str]]:
    fields, pos = [], 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        ctype = data[pos + 4:pos + 8]
        fields.append((pos, 4, "big"))  # chunk length
        if ctype == b"IHDR":
            fields += [(pos + 8, 4, "big"), (pos + 12, 4, "big"), (pos + 16, 1, "big"), (pos + 17, 1, "big"),
                       (pos + 18, 1, "big"), (pos + 19, 1, "big"), (pos + 20, 1, "big")]
        elif ctype in (b"IDAT", b"PLTE", b"tRNS") and length:
            fields.append((pos + 8, 2, "big"))  # zlib header / first entries
        pos += 12 + length
    return fields


def jpeg_fields(data: bytes) -> list[tuple[int, int, str]]:
    fields, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xDA:  # start of scan: the entropy-coded data follows
            fields += [(pos + 2, 2, "big"), (pos + 4, 1, "big"), (pos + 6, 1, "big")]
            break
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        fields.append((pos + 2, 2, "big"))
        if marker in (0xC0, 0xC1, 0xC2):  # SOF: precision, height, width, components, sampling
            fields += [(pos + 4, 1, "big"), (pos + 5, 2, "big"), (pos + 7, 2, "big"), (pos + 9, 1, "big"),
                       (pos + 11, 1, "big"), (pos + 12, 1, "big")]
        elif marker == 0xC4:  # DHT: class/id and the 16 code counts
            fields += [(pos + 4, 1, "big")] + [(pos + 5 + i, 1, "big") for i in range(16)]
        elif marker == 0xDB:
            fields.append((pos + 4, 1, "big"))
        pos += 2 + length
    return fields


def gif_fields(data: bytes) -> list[tuple[int, int, str]]:
    fields = [(6, 2, "little"), (8, 2, "little"), (10, 1, "little"), (11, 1, "little")]
    i = data.find(b"\x2c", 13)  # first image descriptor (approximately: good enough to aim at)
    if i > 0:
        fields += [(i + 1, 2, "little"), (i + 3, 2, "little"), (i + 5, 2, "little"), (i + 7, 2, "little"),
                   (i + 9, 1, "little"), (i + 10, 1, "little"), (i + 11, 1, "little")]
    return fields


def bmp_fields(data: bytes) -> list[tuple[int, int, str]]:
    # file size, pixel offset, header size, width, height, planes, bit count, compression, image size,
    # colours used
    return [(2, 4, "little"), (10, 4, "little"), (14, 4, "little"), (18, 4, "little"), (22, 4, "little"),
            (26, 2, "little"), (28, 2, "little"), (30, 4, "little"), (34, 4, "little"), (46, 4, "little")]


def tiff_fields(data: bytes) -> list[tuple[int, int, str]]:
    endian = "little" if data[:2] == b"II" else "big"
    fields = [(4, 4, endian)]
    ifd = int.from_bytes(data[4:8], endian)
    if ifd + 2 > len(data):
        return fields
    count = int.from_bytes(data[ifd:ifd + 2], endian)
    fields.append((ifd, 2, endian))
    for k in range(min(count, 64)):
        e = ifd + 2 + 12 * k
        fields += [(e, 2, endian), (e + 2, 2, endian), (e + 4, 4, endian), (e + 8, 4, endian)]
    fields.append((ifd + 2 + 12 * count, 4, endian))  # next IFD
    return fields


def crafted_images(seeds: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """Every IFD entry of an uncompressed TIFF retyped (ASCII, RATIONAL, UNDEFINED, SRATIONAL, FLOAT):
    a tag whose value is suddenly text or a fraction is where Pillow's decoders are weakest."""
    data = seeds["tiff-raw"]
    out = []
    ifd = int.from_bytes(data[4:8], "little")
    for k in range(int.from_bytes(data[ifd:ifd + 2], "little")):
        entry = ifd + 2 + 12 * k
        for tag_type in (2, 5, 7, 10, 11):
            retyped = data[:entry + 2] + tag_type.to_bytes(2, "little") + data[entry + 4:]
            out.append((f"tifftype{k}-{tag_type}", retyped))
    return out


FIELD_FINDERS = {"png": png_fields, "jpeg": jpeg_fields, "gif": gif_fields, "bmp": bmp_fields, "tiff": tiff_fields}


def mutate_image(name: str, data: bytes, rng: random.Random) -> tuple[str, bytes]:
    if len(data) < 16:  # an earlier mutation left almost nothing: grow it instead
        return "grow", data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    kind = rng.choices(["field", "fields", "flip", "truncate", "shift", "splice"], [30, 15, 20, 20, 8, 7])[0]
    if kind in ("field", "fields"):
        fields = FIELD_FINDERS[name.split("-")[0]](data) or [(0, 4, "little")]
        for _ in range(1 if kind == "field" else rng.randint(2, 4)):
            pos, width, endian = rng.choice(fields)
            data = set_field(data, pos, width, endian, rng)
        if rng.random() < 0.2:
            data = truncate(data, rng)
        return kind, data
    return kind, {"flip": flip, "truncate": truncate, "shift": shift, "splice": splice}[kind](data, rng)


# ---------------------------------------------------------------- a tiny flatbuffer reader for .tflite files

class FlatModel:
    """Positions of the fields worth corrupting in a TFLite flatbuffer (schema.fbs, Model table).

    Collects, as (position, width, signed, kind): vtable entries, table and vector offsets, vector
    lengths, tensor shapes, types, buffer indices and quantization parameters, operator opcode
    indices and tensor indices, operator codes, subgraph inputs/outputs and buffer sizes.
    """

    def __init__(self, data: bytes):
        self.b = data
        self.fields: list[tuple[int, int, bool, str]] = []
        self.floats: list[int] = []
        self.counts = {"tensors": 0, "opcodes": 0, "buffers": 0}
        root = self.u32(0)
        self.add(0, 4, "offset")
        self.model(root)

    def u32(self, pos):
        return struct.unpack_from("<I", self.b, pos)[0]

    def add(self, pos, width, kind, signed=False):
        if 0 <= pos and pos + width <= len(self.b):
            self.fields.append((pos, width, signed, kind))

    def field(self, table: int, index: int) -> int | None:
        vt = table - struct.unpack_from("<i", self.b, table)[0]
        vsize = struct.unpack_from("<H", self.b, vt)[0]
        if 4 + 2 * index >= vsize:
            return None
        off = struct.unpack_from("<H", self.b, vt + 4 + 2 * index)[0]
        return table + off if off else None

    def vtable(self, table: int) -> None:
        vt = table - struct.unpack_from("<i", self.b, table)[0]
        self.add(table, 4, "vtable", signed=True)
        vsize = struct.unpack_from("<H", self.b, vt)[0]
        for p in range(vt, vt + vsize, 2):
            self.add(p, 2, "vtable")

    def ref(self, table: int, index: int) -> int | None:
        pos = self.field(table, index)
        if pos is None:
            return None
        self.add(pos, 4, "offset")
        return pos + self.u32(pos)

    def vector(self, table: int, index: int, elem: int = 4, kind: str = "index", signed=True) -> tuple[int, int]:
        vec = self.ref(table, index)
        if vec is None:
            return 0, 0
        n = self.u32(vec)
        self.add(vec, 4, "length")
        for i in range(min(n, 64)):
            self.add(vec + 4 + elem * i, elem, kind, signed)
        return vec + 4, n

    def tables(self, table: int, index: int) -> list[int]:
        vec = self.ref(table, index)
        if vec is None:
            return []
        n = self.u32(vec)
        self.add(vec, 4, "length")
        out = []
        for i in range(n):
            p = vec + 4 + 4 * i
            self.add(p, 4, "offset")
            out.append(p + self.u32(p))
        return out

    def scalar(self, table, index, width, kind, signed=False):
        pos = self.field(table, index)
        if pos is not None:
            self.add(pos, width, kind, signed)

    def model(self, m: int) -> None:
        self.vtable(m)
        codes = self.tables(m, 1)
        self.counts["opcodes"] = len(codes)
        for code in codes:  # operator_codes
            self.vtable(code)
            self.scalar(code, 0, 1, "opcode", True)
            self.scalar(code, 2, 4, "opcode_version", True)
            self.scalar(code, 3, 4, "opcode", True)
        for sg in self.tables(m, 2):  # subgraphs
            self.vtable(sg)
            tensors = self.tables(sg, 0)
            self.counts["tensors"] = max(self.counts["tensors"], len(tensors))
            for t in tensors:
                self.vtable(t)
                self.vector(t, 0, kind="shape")
                self.scalar(t, 1, 1, "type")
                self.scalar(t, 2, 4, "buffer")
                q = self.ref(t, 4)
                if q is not None:
                    self.vtable(q)
                    start, n = self.vector(q, 2, kind="scale", signed=False)
                    self.floats += [start + 4 * i for i in range(min(n, 16))]
                    self.vector(q, 3, elem=8, kind="zero_point")
                    self.scalar(q, 6, 4, "quantized_dim", True)
                self.vector(t, 7, kind="shape")  # shape_signature
            self.vector(sg, 1, kind="graph_io")  # inputs
            self.vector(sg, 2, kind="graph_io")  # outputs
            for op in self.tables(sg, 3):  # operators
                self.vtable(op)
                self.scalar(op, 0, 4, "opcode_index")
                self.vector(op, 1, kind="op_tensor")
                self.vector(op, 2, kind="op_tensor")
                self.scalar(op, 3, 1, "options_type")
                opts = self.ref(op, 4)
                if opts is not None:
                    self.vtable(opts)
                    vt = opts - struct.unpack_from("<i", self.b, opts)[0]
                    for i in range((struct.unpack_from("<H", self.b, vt)[0] - 4) // 2):
                        self.scalar(opts, i, 1, "option")
        buffers = self.tables(m, 4)
        self.counts["buffers"] = len(buffers)
        for buf in buffers:
            self.vtable(buf)
            vec = self.ref(buf, 0)
            if vec is not None:
                self.add(vec, 4, "buffer_size")
            self.scalar(buf, 1, 8, "buffer_size")
            self.scalar(buf, 2, 8, "buffer_size")


def crafted_models(seed: bytes, fm: FlatModel) -> list[tuple[str, bytes]]:
    """Structurally valid models that lie: every operator tensor made 'optional' (-1), every operator
    pointed at each other operator code. The flatbuffer verifier accepts all of them."""
    out = []
    for pos, width, signed, kind in fm.fields:
        old = int.from_bytes(seed[pos:pos + width], "little", signed=signed)
        if kind == "op_tensor" and old != -1:
            optional = seed[:pos] + (-1).to_bytes(width, "little", signed=True) + seed[pos + width:]
            out.append((f"optional@{pos}", optional))
        if kind == "opcode_index":
            out += [(f"opswap@{pos}-{v}", seed[:pos] + v.to_bytes(width, "little") + seed[pos + width:])
                    for v in range(fm.counts["opcodes"]) if v != old]
    return out


FLOATS = (0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e38, 1e-38, -1.0, 1e-45)


def plausible(kind: str, fm: FlatModel, rng: random.Random) -> int:
    """A value the flatbuffer verifier accepts but the model did not have: another tensor, op or type."""
    if kind in ("op_tensor", "graph_io"):
        return rng.randrange(-1, fm.counts["tensors"])  # -1 marks an optional input
    if kind == "opcode_index":
        return rng.randrange(fm.counts["opcodes"])
    if kind == "opcode":
        return rng.randrange(0, 128)  # builtin operator codes
    if kind == "buffer":
        return rng.randrange(fm.counts["buffers"])
    if kind == "type":
        return rng.randrange(0, 18)  # TensorType
    return rng.choice((-1, 0, 1, 2, 3, rng.randrange(1, 65)))  # shape


def mutate_model(data: bytes, fm: FlatModel, rng: random.Random) -> tuple[str, bytes]:
    """One mutation of the seed model; the label names what kind."""
    kind = rng.choices(["semantic", "field", "fields", "scale", "flip", "truncate", "shift", "splice"],
                       [35, 25, 10, 5, 8, 8, 5, 4])[0]
    if kind == "semantic":
        # Structurally valid: only indices, op codes, types and shapes change, to values that exist.
        target = rng.choice(("op_tensor", "graph_io", "opcode_index", "opcode", "buffer", "type", "shape"))
        pos, width, signed, _ = rng.choice([f for f in fm.fields if f[3] == target])
        value = plausible(target, fm, rng)
        if not signed:
            value &= (1 << (8 * width)) - 1
        return f"semantic-{target}", data[:pos] + value.to_bytes(width, "little", signed=signed) + data[pos + width:]
    if kind in ("field", "fields"):
        kinds = sorted({f[3] for f in fm.fields})
        for _ in range(1 if kind == "field" else rng.randint(2, 4)):
            target = rng.choice(kinds)  # every kind of field equally often, however many there are
            pos, width, _, _ = rng.choice([f for f in fm.fields if f[3] == target])
            data = set_field(data, pos, width, "little", rng)
        return f"{kind}-{target}" if kind == "field" else kind, data
    if kind == "scale":
        pos = rng.choice(fm.floats)
        return kind, data[:pos] + struct.pack("<f", rng.choice(FLOATS)) + data[pos + 4:]
    if kind == "truncate":
        # mostly past the header, so the cut reaches the interpreter instead of the size check
        return kind, data[:rng.randrange(24, len(data))] if rng.random() < 0.8 else truncate(data, rng)
    return kind, {"flip": flip, "shift": shift, "splice": splice}[kind](data, rng)


# ---------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    from pipeline.build import build
    from pipeline.config import BuildConfig

    out = tmp_path_factory.mktemp("fuzz") / "digits"
    cfg = BuildConfig(dataset="digits", epochs=1, bench_runs=5, bench_warmup=1, threads=(1,), benchmark=False,
                      out=str(out))
    return build(cfg, log=lambda *a: None)


def _digit(run: Path) -> np.ndarray:
    from PIL import Image

    png = sorted((run / "samples").glob("*.png"))[0]
    return np.asarray(Image.open(png).convert("L"))


PREPROCESS = {"height": 28, "width": 28, "channels": 1, "scale": 1 / 255, "offset": 0.0}


def _decode(path: Path):
    """core.load_image, in this process: an array or a DeviceError, nothing else."""
    import warnings

    from device import core

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about some truncated files; not the point here
        try:
            return core.load_image(path, PREPROCESS)
        except core.DeviceError as e:
            return e


def test_retyped_tiff_tags_are_bad_images_not_crashes(tmp_path):
    """Pillow raises TypeError on a TIFF whose StripOffsets became text or a fraction (found by the fuzz)."""
    from device import core

    seeds = image_seeds(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28))
    outcomes = Counter()
    for label, data in crafted_images(seeds):
        (tmp_path / label).write_bytes(data)
        result = _decode(tmp_path / label)
        outcomes["error" if isinstance(result, core.DeviceError) else "ok"] += 1
        if not isinstance(result, core.DeviceError):
            assert result.shape == (28, 28, 1) and result.dtype == np.uint8
    assert outcomes["error"] >= 5, outcomes


def test_decoder_in_process_hypothesis(tmp_path):
    """Many more mutations than the process-per-input fuzz can afford, straight into core.load_image."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    seeds = image_seeds(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28))
    names = sorted(seeds)

    @settings(max_examples=int(os.environ.get("EDGEPIPE_HYPOTHESIS_EXAMPLES", 400)), deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True)
    @given(st.sampled_from(names), st.randoms(use_true_random=False), st.integers(1, 3))
    def check(name, rng, rounds):
        data = seeds[name]
        for _ in range(rounds):
            _, data = mutate_image(name, data, rng)
        path = tmp_path / "img"
        path.write_bytes(data)
        _decode(path)  # raises only if load_image lets something other than DeviceError escape

    check()


@pytest.mark.slow
def test_fuzz_images(digits_run, tmp_path):
    rng = random.Random(SEED)
    seeds = image_seeds(_digit(digits_run))
    work = tmp_path / "images"
    work.mkdir()
    # The unmutated seeds must classify: otherwise the fuzz measures nothing.
    jobs = []
    for name, data in seeds.items():
        (work / f"seed-{name}").write_bytes(data)
        jobs.append((f"seed:{name}", ["classify", "--model", str(digits_run / "model_int8.tflite"), f"seed-{name}"]))
    for label, data in crafted_images(seeds):
        (work / label).write_bytes(data)
        jobs.append((f"crafted:{label}", ["classify", "--model", str(digits_run / "model_int8.tflite"), label]))
    names = sorted(seeds)
    for i in range(N_IMAGES):
        name = names[i % len(names)]
        mutation, data = mutate_image(name, seeds[name], rng)
        path = work / f"{i:04d}-{name}-{mutation}"
        path.write_bytes(data)
        jobs.append((f"{mutation}:{path.name}", ["classify", "--model", str(digits_run / "model_int8.tflite"),
                                                  path.name]))
    t0 = time.perf_counter()
    results = run_all(jobs, work)
    seed_results, results = results[:len(seeds)], results[len(seeds):]
    assert all(r[1] == "ok" for r in seed_results), seed_results
    counts, bad = summarize("images", results, time.perf_counter() - t0, work, tmp_path / "fuzz-failures")
    assert len(results) >= N_IMAGES
    # A smaller budget still reaches every kind of mutation.
    assert {r[0].split(":")[0] for r in results} >= {"field", "fields", "flip", "truncate", "shift", "splice"}
    assert counts["error"] > 0  # the mutations do reach the decoder and are refused
    assert not bad, f"{len(bad)} of {len(results)} mutated images crashed the runner:\n" + "\n".join(bad[:30])


@pytest.mark.slow
def test_fuzz_models(digits_run, tmp_path):
    rng = random.Random(SEED + 1)
    seed = (digits_run / "model_int8.tflite").read_bytes()
    fm = FlatModel(seed)
    assert len(fm.fields) > 200 and {"shape", "opcode_index", "buffer_size", "vtable"} <= {f[3] for f in fm.fields}
    work = tmp_path / "models"
    work.mkdir()
    # No metadata.json here: these models cannot be verified against a hash, which is exactly the
    # case the runner has to survive.
    sample = sorted((digits_run / "samples").glob("*.png"))[0]
    shutil.copy(sample, work / "digit.png")
    (work / "seed.tflite").write_bytes(seed)
    jobs = [("seed:seed.tflite", ["classify", "--model", "seed.tflite", "digit.png"]),
            ("seed:seed.tflite", ["info", "--model", "seed.tflite"])]
    for i, (label, data) in enumerate(crafted_models(seed, fm)):
        path = work / f"{label}.tflite"
        path.write_bytes(data)
        args = ["info", "--model", path.name] if i % 3 == 2 else ["classify", "--model", path.name, "digit.png"]
        jobs.append((f"crafted:{path.name}", args))
    for i in range(N_MODELS):
        mutation, data = mutate_model(seed, fm, rng)
        path = work / f"{i:04d}-{mutation}.tflite"
        path.write_bytes(data)
        args = ["info", "--model", path.name] if i % 3 == 2 else ["classify", "--model", path.name, "digit.png"]
        jobs.append((f"{mutation}:{path.name}", args))
    t0 = time.perf_counter()
    results = run_all(jobs, work)
    seed_results, results = results[:2], results[2:]
    assert all(r[1] == "ok" for r in seed_results), seed_results
    counts, bad = summarize("models", results, time.perf_counter() - t0, work, tmp_path / "fuzz-failures")
    assert len(results) >= N_MODELS
    kinds = {r[0].split(":")[0].split("-")[0] for r in results}
    assert kinds >= {"semantic", "field", "fields", "scale", "flip", "truncate", "shift", "splice"}, kinds
    assert counts["error"] > 0 and counts["ok"] > 0  # some mutations are harmless, many are refused
    assert not bad, f"{len(bad)} of {len(results)} mutated models crashed the runner:\n" + "\n".join(bad[:30])
