"""Quantization-aware fine-tuning (QAT) with tensorflow-model-optimization, in its own process.

tfmot 0.8.1 rejects Keras 3 models and needs legacy Keras (`tf_keras`), which TensorFlow only uses
when TF_USE_LEGACY_KERAS=1 is set before it is first imported: hence a child process
(`python -m pipeline.guard.qat WORKDIR`). Loading the Keras 3 `.keras` file into tf_keras fails, so the
parent sends the graph (each layer's class, config and the layers it is called on) and each layer's
weights; the child rebuilds the same model in tf_keras, Sequential or functional (ResNet-8's skip
connections), copies the weights layer by layer, fine-tunes with fake quantization and converts to
int8 with the int8 preset's settings.

Both fine-tune on the training images as the model was trained: shuffled batches with the build's
augmentation where it has one, kept uint8 and scaled per batch (a float copy of CIFAR-10's 45,000
training images would take 553 MB in each process). For a fair comparison the parent also fine-tunes
the float model with the same budget (epochs, images, batch size, learning rate, augmentation) and
quantizes it post-training: QAT must beat that, not only the original int8.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

EPOCHS = 1
LEARNING_RATE = 1e-4  # fine-tuning: small steps from the trained weights
TIMEOUT_S = 900


def available() -> str | None:
    """None if QAT can run here, else what to install."""
    missing = [m for m in ("tensorflow_model_optimization", "tf_keras") if importlib.util.find_spec(m) is None]
    return None if not missing else "pip install tensorflow-model-optimization==0.8.1 'tf_keras~=2.21'"


def fine_tune(model, cfg, data, calibration: np.ndarray, judge, workdir: Path, log=print):
    """Returns (record, int8 flatbuffer or None); `judge` measures validation accuracy.

    The caller times the whole remedy; `qat_seconds` is the child process alone (start-up included).
    """
    import keras

    from pipeline.convert import convert

    budget = {"epochs": EPOCHS, "images": len(data.x_train), "batch_size": cfg.batch_size,
              "learning_rate": LEARNING_RATE, "augment": bool(cfg.augment)}
    record = {"budget": budget}
    missing = available()
    graph = None if missing else graph_of(model)
    if missing or isinstance(graph, str):
        record.update(status="unavailable" if missing else "not_applicable",
                      reason=f"needs {missing}" if missing else graph)
        return record, None
    t0 = time.perf_counter()
    pre = data.spec.to_dict()
    spec = {**graph, "scale": pre["scale"], "offset": pre["offset"], "classes": len(data.spec.labels),
            "int8_io": cfg.int8_io, "seed": cfg.seed, **budget}
    weights = model.get_weights()
    (workdir / "qat.json").write_text(json.dumps(spec))
    np.savez(workdir / "qat.npz", x=data.x_train, y=data.y_train, calibration=calibration,
             **{f"{i}_{j}": w for i, entry in enumerate(graph["layers"])
                for j, w in enumerate(model.get_layer(entry["config"]["name"]).get_weights())})
    log(f"guard: quantization-aware fine-tuning, {EPOCHS} epoch(s) on {len(data.x_train)} images (tf_keras process)")
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline.guard.qat", str(workdir)], capture_output=True,
                              text=True, env={**os.environ, "TF_USE_LEGACY_KERAS": "1"}, timeout=TIMEOUT_S,
                              cwd=Path(__file__).resolve().parent.parent.parent)
    except subprocess.TimeoutExpired:
        record.update(status="failed", reason=f"QAT process stopped after {TIMEOUT_S} s; the other remedies "
                                              "stand (a smaller model or fewer images fine-tune faster)")
        return record, None
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        record.update(status="failed", reason=f"QAT process exited {proc.returncode}: {tail[0]}")
        return record, None
    flatbuffer = (workdir / "qat.tflite").read_bytes()
    record["qat_seconds"] = time.perf_counter() - t0

    # The same extra training without fake quantization, then post-training int8: the fair baseline.
    t0 = time.perf_counter()
    keras.utils.set_random_seed(cfg.seed)
    tuned = keras.models.clone_model(model)
    tuned.set_weights(weights)
    tuned.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss="categorical_crossentropy")
    stream, steps = _stream(data.x_train, data.y_train, spec)
    tuned.fit(stream, epochs=EPOCHS, steps_per_epoch=steps, shuffle=False, verbose=0)  # shuffled by _stream
    record["ptq_same_budget"] = {"accuracy": judge(convert(tuned, "int8", cfg, calibration)),
                                 "seconds": time.perf_counter() - t0}
    return record, flatbuffer


def _stream(x: np.ndarray, y: np.ndarray, spec: dict) -> tuple:
    """(dataset, steps_per_epoch): the same batches, in the same order, for QAT and its baseline."""
    from pipeline.data.augment import batches

    dataset, steps = batches(x, y, batch_size=spec["batch_size"], classes=spec["classes"], scale=spec["scale"],
                             offset=spec["offset"], epochs=spec["epochs"], shuffle=True, augment=spec["augment"],
                             seed=spec["seed"])
    return dataset, steps


def graph_of(model) -> dict | str:
    """The model as data the child can rebuild: {"input", "input_shape", "layers": [{"class_name", "config",
    "inbound", "as_list"}], "output"}, each layer called on the outputs of the layers (or the input) `inbound`
    names, as a list where `as_list` (Add, Concatenate), in an order where those come first; or why this model
    cannot be rebuilt."""
    import keras

    if isinstance(model, keras.Sequential):
        names = ["input"] + [layer.name for layer in model.layers]
        layers = [{"class_name": type(layer).__name__, "config": layer.get_config(), "inbound": [before],
                   "as_list": False} for layer, before in zip(model.layers, names)]
        return {"input_shape": list(model.inputs[0].shape[1:]), "input": "input", "layers": layers,
                "output": names[-1]}
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        return "QAT rebuilds models with one input and one output"
    config = model.get_config()

    def history(node) -> list[str]:  # the layers whose outputs a call's arguments hold
        if isinstance(node, dict):
            if node.get("class_name") == "__keras_tensor__":
                return [node["config"]["keras_history"][0]]
            return [n for v in node.values() for n in history(v)]
        return [n for v in node for n in history(v)] if isinstance(node, (list, tuple)) else []

    layers, source = [], None
    for entry, layer in zip(config["layers"], model.layers):
        if entry["class_name"] == "InputLayer":
            source = entry["name"]
            continue
        if len(entry["inbound_nodes"]) != 1:
            return f"QAT rebuilds layers called once; {entry['name']} is called {len(entry['inbound_nodes'])} times"
        args = entry["inbound_nodes"][0]["args"]
        layers.append({"class_name": type(layer).__name__, "config": layer.get_config(), "inbound": history(args),
                       "as_list": bool(args) and isinstance(args[0], (list, tuple))})
    output = config["output_layers"]  # [name, node, index], or a list of those
    return {"input_shape": list(model.inputs[0].shape[1:]), "input": source, "layers": layers,
            "output": output[0] if isinstance(output[0], str) else output[0][0]}


def _child(workdir: Path) -> None:
    """Runs with TF_USE_LEGACY_KERAS=1: rebuild in tf_keras, fine-tune with fake quantization, convert."""
    import inspect
    from types import SimpleNamespace

    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras

    spec = json.loads((workdir / "qat.json").read_text())
    arrays = np.load(workdir / "qat.npz")

    def rebuild(entry):
        # Keras 3 configs nest dtype policies and initializers as dicts that tf_keras does not read;
        # they do not matter here because every weight is copied afterwards.
        cls = getattr(tf_keras.layers, entry["class_name"])
        accepted = inspect.signature(cls.__init__).parameters
        # `name` travels in **kwargs, not the signature; the graph refers to layers by it.
        return cls(name=entry["config"]["name"],
                   **{k: v for k, v in entry["config"].items() if k in accepted and not isinstance(v, dict)})

    tf_keras.utils.set_random_seed(spec["seed"])
    outputs = {spec["input"]: tf_keras.Input(spec["input_shape"])}
    inputs = outputs[spec["input"]]
    for i, entry in enumerate(spec["layers"]):
        layer = rebuild(entry)
        given = [outputs[name] for name in entry["inbound"]]
        outputs[layer.name] = layer(given if entry["as_list"] else given[0])
        layer.set_weights([arrays[f"{i}_{j}"] for j in range(len(layer.get_weights()))])
    model = tf_keras.Model(inputs, outputs[spec["output"]])
    qat = tfmot.quantization.keras.quantize_model(model)
    qat.compile(optimizer=tf_keras.optimizers.Adam(spec["learning_rate"]), loss="categorical_crossentropy")
    stream, steps = _stream(arrays["x"], arrays["y"], spec)
    qat.fit(stream, epochs=spec["epochs"], steps_per_epoch=steps, verbose=0)

    from pipeline.convert import PRESETS

    calibration = arrays["calibration"]
    converter = tf.lite.TFLiteConverter.from_keras_model(qat)
    PRESETS["int8"](converter, tf, lambda: ([calibration[i:i + 1]] for i in range(len(calibration))),
                    SimpleNamespace(int8_io=spec["int8_io"]))
    (workdir / "qat.tflite").write_bytes(converter.convert())


if __name__ == "__main__":
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        sys.exit("run through pipeline.guard.qat.fine_tune: TF_USE_LEGACY_KERAS=1 must be set before TensorFlow loads")
    _child(Path(sys.argv[1]))
