"""TFLite model metadata in every `.tflite`, so standard apps (MediaPipe Tasks, the TFLite Task
Library, Android Studio's model binding) run a model without our metadata.json.

What goes in: the model's name, version and description; the input as an image (RGB or grayscale)
with the normalization mean/std that turns pixels into what the model was trained on; the output
as per-label probabilities with labels.txt packed in as an associated file. It is written with the
official writer of the TFLite metadata schema, `tflite-support`'s `metadata_writers`.

Why a side folder: tflite-support 0.4.4 (the last release) pins protobuf<4, and TensorFlow 2.21
needs protobuf>=6.31, so pip cannot resolve both as dependencies. The writer itself (the schema's
generated flatbuffers bindings, the populator and two small pybind modules) never imports
protobuf: only `import tflite_support` (its task protos) does. So the wheel is installed with
`--no-deps` into a folder of its own, outside site-packages where `pip check` and the resolver
never see the pin, and imported from there as `tensorflow_lite_support.metadata...`.

The first build that needs the writer installs it there (one line says so), so the README's two
set-up commands are the whole set-up; `python -m pipeline.metadata --install` does it ahead of time,
e.g. before taking a machine offline. Without network the install fails and the build still
succeeds: metadata.json and the report say the models carry no metadata and why.

MediaPipe Tasks' ImageClassifier takes float32 or uint8 input with 3 channels: the fp32 model and the
int8 model built with `--int8-io uint8` of an RGB run.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WRITER = "tflite-support==0.4.4"
SIDE = Path(os.environ.get("EDGEPIPE_TFLITE_SUPPORT") or Path(sys.prefix) / "share" / "edgepipe" / "tflite-support")
INSTALL = "python -m pipeline.metadata --install"
LIBUSB = "libusb-1.0-0"  # the Debian/Ubuntu package of the library its compiled modules link
_failed: list[str] = []  # why this process's install failed: one attempt per process, not one per model


class MetadataError(Exception):
    """Metadata could not be written for this model; the message says why (the build goes on)."""


def _writer(log=print):
    """The writer modules, from the environment or from the side folder (installed there on first use)."""
    try:
        from tensorflow_lite_support.metadata import metadata_schema_py_generated as schema
        from tensorflow_lite_support.metadata.python.metadata_writers import (
            image_classifier,
            metadata_info,
            writer_utils,
        )
    except ImportError as e:
        if str(SIDE) in sys.path:
            # Its compiled modules link the system's libusb, which a minimal machine may lack: installing the
            # writer again would not help.
            fix = (f"install the system library libusb-1.0 (Debian/Ubuntu: `apt-get install {LIBUSB}`)"
                   if "libusb" in str(e) else f"delete that folder and run `{INSTALL}`")
            raise MetadataError(f"the TFLite metadata writer ({WRITER}) in {SIDE} does not import ({e}); {fix}")
        if not SIDE.is_dir():
            if _failed:
                raise MetadataError(_failed[0])
            log(f"metadata: installing the TFLite metadata writer {WRITER} (without its pins) into {SIDE}, once")
            try:
                install()
            except MetadataError as e:
                _failed.append(str(e))
                raise
        sys.path.append(str(SIDE))  # appended: nothing in it may shadow the environment's own packages
        return _writer(log)
    return schema, image_classifier, metadata_info, writer_utils


def has_metadata(flatbuffer: bytes) -> bool:
    from tensorflow.lite.python import schema_py_generated as tfl  # TensorFlow's own copy of the schema

    model = tfl.Model.GetRootAsModel(flatbuffer, 0)
    return any(model.Metadata(i).Name() == b"TFLITE_METADATA" for i in range(model.MetadataLength()))


def embed(flatbuffer: bytes, *, name: str, description: str, version: str, preprocess: dict, log=print) -> bytes:
    """The model with image-classifier metadata and labels.txt inside; MetadataError if not possible."""
    schema, image_classifier, metadata_info, writer_utils = _writer(log)
    inputs, outputs = writer_utils.get_input_tensor_types(flatbuffer), writer_utils.get_output_tensor_types(flatbuffer)
    shape = _input_shape(flatbuffer)
    labels = preprocess["labels"]
    if len(inputs) != 1 or len(outputs) != 1:
        raise MetadataError(f"{len(inputs)} input(s) and {len(outputs)} output(s); the image-classifier metadata "
                            "describes one image in and one score vector out")
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise MetadataError(f"input shape {shape}; the image-classifier metadata needs [1, height, width, 1 or 3]")
    channels = shape[-1]
    # Training fed pixel * scale + offset; the metadata's convention is (pixel - mean) / std.
    mean, std = -preprocess["offset"] / preprocess["scale"], 1.0 / preprocess["scale"]
    color = schema.ColorSpaceType.RGB if channels == 3 else schema.ColorSpaceType.GRAYSCALE
    with tempfile.TemporaryDirectory() as tmp:
        label_file = Path(tmp) / "labels.txt"  # the associated file takes the name of the file on disk
        label_file.write_text("\n".join(labels) + "\n")
        general = metadata_info.GeneralMd(name=name, version=version, description=description, author="edgepipe")
        image = metadata_info.InputImageTensorMd(
            name="image", description=(f"{shape[1]}x{shape[2]} {'RGB' if channels == 3 else 'grayscale'} image; "
                                       f"model input = (pixel - {mean:g}) / {std:g}"),
            norm_mean=[mean] * channels, norm_std=[std] * channels, color_space_type=color, tensor_type=inputs[0])
        scores = metadata_info.ClassificationTensorMd(
            name="probability", description=f"softmax probability of each of the {len(labels)} labels in labels.txt",
            label_files=[metadata_info.LabelFileMd(str(label_file))], tensor_type=outputs[0])
        try:
            writer = image_classifier.MetadataWriter.create_from_metadata_info(flatbuffer, general, image, scores)
            return _fixed_timestamps(bytes(writer.populate()))
        except (ValueError, TypeError, RuntimeError) as e:
            raise MetadataError(f"the metadata writer refused the model ({e})") from e


def _fixed_timestamps(model: bytes) -> bytes:
    """The writer zips labels.txt behind the flatbuffer stamped with the current time; a fixed stamp
    keeps conversion deterministic (the same Keras model gives the same file, and --resume can tell)."""
    with zipfile.ZipFile(io.BytesIO(model)) as packed:
        members = [(info.filename, packed.read(info)) for info in packed.infolist()]
        start = min(info.header_offset for info in packed.infolist())  # where the flatbuffer ends
    out = io.BytesIO(model[:start])
    with zipfile.ZipFile(out, "a") as zf:  # appended behind the flatbuffer, as the writer does
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return out.getvalue()


def _input_shape(flatbuffer: bytes) -> list[int]:
    from tensorflow.lite.python import schema_py_generated as tfl

    graph = tfl.Model.GetRootAsModel(flatbuffer, 0).Subgraphs(0)
    return [int(d) for d in graph.Tensors(graph.Inputs(0)).ShapeAsNumpy()]


def embed_files(folder: Path, variants, model: str, dataset: str, preprocess: dict, version: str,
                log=print) -> dict[str, str | None]:
    """Add metadata to each folder/model_<variant>.tflite that lacks it: {file: None or why not}."""
    from pipeline.artifacts import atomic_write

    result = {}
    for v in variants:
        path = Path(folder) / f"model_{v}.tflite"
        flatbuffer = path.read_bytes()
        if has_metadata(flatbuffer):
            result[path.name] = None
            continue
        try:
            atomic_write(path, embed(flatbuffer, name=f"{model} {v} ({dataset})", version=version,
                                     description=(f"{model} trained on {dataset} by edgepipe, {v} variant; "
                                                  f"{len(preprocess['labels'])} classes"),
                                     preprocess=preprocess, log=log))
            result[path.name] = None
        except MetadataError as e:
            result[path.name] = str(e)
            log(f"metadata: {path.name} has no TFLite metadata: {e}")
    return result


def status(path: Path, preprocess: dict) -> dict:
    """For metadata.json and the report: does the model carry metadata, and if not, why not."""
    flatbuffer = Path(path).read_bytes()
    if has_metadata(flatbuffer):
        return {"present": True}
    try:  # ask the writer again, in memory, for its reason
        embed(flatbuffer, name="probe", description="probe", version="0", preprocess=preprocess)
        reason = "not written by this build"
    except MetadataError as e:
        reason = str(e)
    return {"present": False, "reason": reason}


def install(target: Path = SIDE, replace: bool = False) -> None:
    """pip-install the writer without its dependency pins into the side folder; MetadataError if pip fails.

    pip fills a fresh folder beside the target that is renamed into place only when complete, so an
    interrupted install never leaves a half-filled side folder that would pass for installed. Two
    builds installing at once: the first rename wins and the other's copy is dropped (unless `replace`).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-")
    try:
        # One quick retry: offline, pip's defaults (5 retries, 15 s each) would hold the build for minutes.
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
                               "--retries", "1", "--timeout", "10", "--target", tmp, WRITER],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            last = next((line.strip() for line in reversed(proc.stderr.splitlines()) if line.strip()), "no output")
            raise MetadataError(f"could not install the TFLite metadata writer {WRITER} into {target} (pip: "
                                f"{last[:200]}); with network, run `{INSTALL}` or build again")
        if replace:
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)  # atomic while target is absent (or empty)
        except OSError:
            if not (target / "tensorflow_lite_support").is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


if __name__ == "__main__":
    if sys.argv[1:] != ["--install"]:
        sys.exit(f"usage: python -m pipeline.metadata --install   (installs {WRITER} into {SIDE})")
    try:
        install(replace=True)
    except MetadataError as e:
        sys.exit(str(e))
    print(f"installed {WRITER} into {SIDE}")
