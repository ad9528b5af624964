"""MLPerf Tiny's image-classification reference (ResNet-8, CIFAR-10) against edgepipe, on the same images.

    python benchmarks/mlperf_compare.py --h5 pretrainedResnet.h5 --tflite pretrainedResnet.tflite \\
        --tflite-quant pretrainedResnet_quant.tflite [--data-dir DIR] [--dataset cifar10] [--out RUN] [--json FILE]

The three files are MLPerf Tiny's (github.com/mlcommons/tiny, benchmark/training/image_classification/
trained_models/); they are not part of edgepipe, so without them this script says which one is missing
and exits 2. With them it runs `pipeline build --keras-model H5 --quantize int8` (the input range is
detected: ResNet-8 was trained on raw 0..255 pixels), then MLPerf's own fp32 and int8 `.tflite` through
the same inference core (device/core.py) on the run's test split: the same images, decoded the same way.
Their fp32 model is fed the range the run recorded; their int8 model what the runner infers for a model
without metadata (TFLite's convention: an int8 input takes the pixel - 128). One table: accuracy of each
of the four and how often each agrees with their fp32.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FILES = {"h5": "pretrainedResnet.h5", "tflite": "pretrainedResnet.tflite",
         "tflite_quant": "pretrainedResnet_quant.tflite"}


def missing(args) -> list[str]:
    return [f"--{name.replace('_', '-')} {getattr(args, name) or '(not given)'}: no such file (MLPerf's {default})"
            for name, default in FILES.items() if not (getattr(args, name) and Path(getattr(args, name)).is_file())]


def build(args) -> Path:
    cmd = [sys.executable, "-m", "pipeline.cli", "build", "--keras-model", str(args.h5), "--dataset", args.dataset,
           "--quantize", "int8", "--no-benchmark", "--out", str(args.out), "--overwrite"]
    if args.data_dir:
        cmd += ["--data-dir", str(args.data_dir)]
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return Path(args.out)


def compare(run: Path, args) -> dict:
    from device.core import Model, evaluate
    from pipeline.config import BuildConfig
    from pipeline.data import load_dataset

    manifest = json.loads((run / "manifest.json").read_text())
    cfg = BuildConfig.from_dict(manifest["config"])
    data = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, validation_fraction=cfg.validation_fraction,
                        input_shape=cfg.input_shape)
    if data.source["sha256"] != manifest["data"]["sha256"]:
        raise SystemExit(f"error: the {cfg.dataset} data now differs from what {run} was built from; build again")
    chosen = manifest["input_range"]["range"]
    models = {
        "MLPerf fp32": Model(args.tflite, verify=False, input_range=chosen),
        "MLPerf int8": Model(args.tflite_quant, verify=False),
        "edgepipe fp32": Model(run / "model_fp32.tflite"),
        "edgepipe int8": Model(run / "model_int8.tflite"),
    }
    results = {name: evaluate(m, data.x_test, data.y_test) for name, m in models.items()}
    reference = results["MLPerf fp32"]["predictions"]
    rows = {name: {"accuracy": r["accuracy"],
                   "agreement_with_mlperf_fp32": float((r["predictions"] == reference).mean()),
                   "file": str(models[name].path), "sha256": models[name].sha256,
                   "input": (models[name].preprocess.get("source") or "metadata.json of the run").split(";")[0]}
            for name, r in results.items()}
    return {"images": len(data.y_test), "data_sha256": manifest["data"]["sha256"], "dataset": cfg.dataset,
            "input_range": manifest["input_range"], "run": str(run), "models": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--h5", type=Path, help=f"MLPerf's Keras model ({FILES['h5']})")
    p.add_argument("--tflite", type=Path, help=f"MLPerf's fp32 model ({FILES['tflite']})")
    p.add_argument("--tflite-quant", type=Path, help=f"MLPerf's int8 model ({FILES['tflite_quant']})")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir", type=Path, default=None, help="CIFAR-10 as JPEG class folders or the python batches")
    p.add_argument("--out", type=Path, default=REPO / "artifacts" / "mlperf-resnet8")
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    problems = missing(args)
    if problems:
        print("error: " + "; ".join(problems) + "; this comparison needs MLPerf Tiny's ResNet-8 files "
              "(github.com/mlcommons/tiny, benchmark/training/image_classification/trained_models)", file=sys.stderr)
        return 2
    try:
        run = build(args)
    except subprocess.CalledProcessError as e:
        print(f"error: `pipeline build` failed (exit {e.returncode}); its message is above", file=sys.stderr)
        return 1
    result = compare(run, args)
    print(f"\n{result['images']:,} {result['dataset']} test images (data {result['data_sha256'][:12]}), input range "
          f"{result['input_range']['range']} ({result['input_range']['source']})")
    print(f"{'model':<15} {'accuracy':>9} {'agrees with MLPerf fp32':>24}  input")
    for name, r in result["models"].items():
        print(f"{name:<15} {100 * r['accuracy']:>8.2f}% {100 * r['agreement_with_mlperf_fp32']:>23.2f}%  {r['input']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
