"""The command line through click's CliRunner: exit codes and messages for bad input."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return lines[0]


def test_version_names_the_runtimes():
    result = invoke("--version")
    assert result.exit_code == 0
    assert "edgepipe 0.1.0" in result.output and "tensorflow 2.21" in result.output
    assert "ai-edge-litert" in result.output


def test_every_build_option_has_help():
    result = invoke("build", "--help")
    assert result.exit_code == 0
    for option in ("--dataset", "--model", "--data-dir", "--quantize", "--epochs", "--batch-size",
                   "--calibration-samples", "--seed", "--out", "--name", "--overwrite", "--keras-model",
                   "--int8-io", "--tensorboard", "--max-accuracy-drop"):
        assert option in result.output, option


@pytest.mark.parametrize("args, names", [
    (["--dataset", "imagenet"], ["mnist", "cifar10", "digits"]),
    (["--model", "resnet50"], ["mnist-mlp", "mnist-cnn", "cifar-cnn", "cifar-dscnn"]),
    (["--quantize", "int4"], ["fp32", "dynamic", "float16", "int8", "int16x8", "all"]),
    (["--quantize", "int8,bf16"], ["int16x8"]),
    (["--int8-io", "int16"], ["int8", "uint8", "float"]),
])
def test_unknown_choices_list_the_valid_ones(args, names):
    result = invoke("build", *args)
    assert result.exit_code == 2
    error = one_line_error(result)
    for name in names:
        assert name in error


@pytest.mark.parametrize("args", [["--epochs", "0"], ["--epochs", "-3"], ["--epochs", "many"],
                                  ["--calibration-samples", "0"], ["--batch-size", "0"],
                                  # numpy's generator takes seeds from 0 to 2**32 - 1: others were a traceback
                                  ["--seed", "-1"], ["--seed", str(2**32)]])
def test_bad_numbers_are_usage_errors(args):
    result = invoke("build", "--dataset", "digits", *args)
    assert result.exit_code == 2
    assert args[0] in one_line_error(result)


@pytest.mark.parametrize("command", ["build", "convert"])
def test_int8_io_without_an_int8_model_is_refused(command, tmp_path):
    # It was accepted and ignored: asked for a uint8 model, the user got float16 alone and no word.
    model = tmp_path / "m.keras"
    model.write_bytes(b"")
    args = [command, *([model] if command == "convert" else []), "--dataset", "digits", "--quantize", "float16",
            "--int8-io", "uint8", "--out", tmp_path / "run"]
    result = invoke(*args)
    assert result.exit_code == 2
    assert "--int8-io uint8" in one_line_error(result) and "add int8 to --quantize" in one_line_error(result)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["build", "convert"])
def test_calibration_samples_without_a_calibrated_model_are_refused(command, tmp_path):
    # They were accepted and ignored, and recorded in the run's config as if they had calibrated something.
    model = tmp_path / "m.keras"
    model.write_bytes(b"")
    args = [command, *([model] if command == "convert" else []), "--dataset", "digits", "--quantize",
            "dynamic,float16", "--calibration-samples", "50", "--out", tmp_path / "run"]
    result = invoke(*args)
    assert result.exit_code == 2
    assert "--calibration-samples 50" in one_line_error(result)
    assert "int8 and int16x8" in one_line_error(result) and "builds neither" in one_line_error(result)
    assert not (tmp_path / "run").exists()


def test_model_that_does_not_fit_the_dataset():
    result = invoke("build", "--dataset", "mnist", "--model", "cifar-cnn")
    assert result.exit_code == 2
    error = one_line_error(result)
    assert "cifar-cnn" in error and "mnist-mlp" in error and "mnist-cnn" in error


def test_user_keras_model_with_wrong_input(tmp_path):
    import keras

    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10)])
    model.save(tmp_path / "rgb.keras")
    result = invoke("build", "--dataset", "digits", "--keras-model", tmp_path / "rgb.keras", "--out", tmp_path / "run")
    assert result.exit_code == 1
    error = one_line_error(result)
    assert "rgb.keras" in error and "(32, 32, 3)" in error and "(28, 28, 1)" in error
    assert not (tmp_path / "run").exists()


def test_training_options_with_a_keras_model_are_refused(tmp_path):
    # Converted as it is, the model never saw them; they were ignored and recorded in the run's config.
    import keras

    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    model.save(tmp_path / "mine.keras")
    result = invoke("build", "--dataset", "digits", "--keras-model", tmp_path / "mine.keras", "--epochs", "7",
                    "--no-augment", "--sam", "0.05", "--out", tmp_path / "run")
    assert result.exit_code == 2
    error = one_line_error(result)
    assert "--epochs" in error and "--augment/--no-augment" in error and "--sam" in error and "--seed" not in error
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run*"))
    # Quantization-aware fine-tuning trains the model with the build's batch size and augmentation (docs/results.md
    # fine-tunes a --keras-model with --batch-size 64 --qat): those stay allowed with it.
    for repair in (["--qat"], ["--fallback", "auto", "--max-accuracy-drop", "1"]):
        result = invoke("build", "--dataset", "digits", "--keras-model", tmp_path / "mine.keras", "--epochs", "7",
                        "--batch-size", "64", "--no-augment", *repair, "--out", tmp_path / "run")
        error = one_line_error(result)
        assert result.exit_code == 2 and "--epochs" in error, error
        assert "--batch-size" not in error and "--augment" not in error, error


def test_not_a_keras_file(tmp_path):
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    result = invoke("build", "--dataset", "digits", "--keras-model", tmp_path / "junk.keras", "--out", tmp_path / "r")
    assert result.exit_code == 1 and "junk.keras" in one_line_error(result)


def test_offline_without_data_dir_names_the_ways_out(monkeypatch, tmp_path):
    import keras

    def offline(*a, **k):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    # CIFAR-10 has no offline stand-in (MNIST falls back to the digits: tests/test_data.py).
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    result = invoke("build", "--dataset", "cifar10", "--out", tmp_path / "run")
    assert result.exit_code == 1
    error = one_line_error(result)
    assert "--data-dir" in error and "--dataset digits" in error and "cifar-10-python.tar.gz" in error
    assert not (tmp_path / "run").exists()


def test_missing_data_files(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke("build", "--data-dir", tmp_path / "empty", "--out", tmp_path / "run")
    assert result.exit_code == 1 and str(tmp_path / "empty") in one_line_error(result)


def test_corrupt_data_file_is_named(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "mnist.npz").write_bytes(b"PK\x03\x04 truncated")
    result = invoke("build", "--data-dir", tmp_path / "bad", "--out", tmp_path / "run")
    assert result.exit_code == 1 and "mnist.npz" in one_line_error(result)


def test_out_and_name_are_exclusive(tmp_path):
    result = invoke("build", "--dataset", "digits", "--out", tmp_path / "a", "--name", "b")
    assert result.exit_code == 2 and "--name" in one_line_error(result)


@pytest.mark.parametrize("command", ["build", "train", "compare", "export"])
def test_out_under_a_file_is_a_usage_error(tmp_path, command):
    (tmp_path / "notes.txt").write_text("mine")
    runs = [tmp_path, tmp_path] if command == "compare" else [tmp_path] if command == "export" else []
    options = ["--dataset", "digits"] if command in ("build", "train") else []
    result = invoke(command, *runs, *options, "--out", tmp_path / "notes.txt" / "run")
    assert result.exit_code == 2 and "notes.txt is a file, not a folder" in one_line_error(result), result.output
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_existing_run_needs_overwrite(tmp_path):
    (tmp_path / "run").mkdir()
    result = invoke("build", "--dataset", "digits", "--out", tmp_path / "run")
    assert result.exit_code == 1 and "--overwrite" in one_line_error(result)


def test_digits_demo_build_and_bundle(tmp_path):
    """The README's offline demo, end to end through the CLI, then the bundle command."""
    import json

    result = invoke("build", "--dataset", "digits", "--quantize", "int8", "--out", tmp_path / "run",
                    "--runs", "20", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert "int8" in result.output and "fp32" in result.output
    evaluation = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert evaluation["variants"]["int8"]["accuracy"] > 0.8
    result = invoke("bundle", tmp_path / "run", "--out", tmp_path / "b.tar.gz")
    assert result.exit_code == 0 and (tmp_path / "b.tar.gz").stat().st_size > 1000
    result = invoke("bundle", tmp_path / "run", "--variants", "int16x8")
    assert result.exit_code == 1 and "int16x8" in one_line_error(result)


def test_max_accuracy_drop_names_each_offending_variant(tmp_path):
    import json

    from pipeline.build import AccuracyDropError, check_accuracy_drop

    (tmp_path / "evaluation.json").write_text(json.dumps({"variants": {
        "fp32": {"change_pp_vs_fp32": 0.0}, "dynamic": {"change_pp_vs_fp32": -0.1},
        "int8": {"change_pp_vs_fp32": -3.0}, "int16x8": {"change_pp_vs_fp32": -1.5}}}))
    with pytest.raises(AccuracyDropError) as e:
        check_accuracy_drop(tmp_path, 1.0)
    assert "int8 (3.00 pp)" in str(e.value) and "int16x8 (1.50 pp)" in str(e.value)
    assert "dynamic" not in str(e.value)
    check_accuracy_drop(tmp_path, 3.0)  # within budget: no error


def test_a_drop_of_exactly_the_budget_is_within_it(tmp_path):
    """One image of MNIST's 1,000 is 0.1 pp, but the build records 100 * (0.978 - 0.979) = -0.10000000000000009
    (as a real run did): `--max-accuracy-drop 0.1` failed the build for a drop of 0.10 pp."""
    import json

    from pipeline.build import AccuracyDropError, check_accuracy_drop

    (tmp_path / "evaluation.json").write_text(json.dumps({"variants": {
        "fp32": {"change_pp_vs_fp32": 0.0}, "int8": {"change_pp_vs_fp32": 100.0 * (978 / 1000 - 979 / 1000)}}}))
    check_accuracy_drop(tmp_path, 0.1)
    with pytest.raises(AccuracyDropError):
        check_accuracy_drop(tmp_path, 0.09)


def test_an_accuracy_of_exactly_the_floor_is_not_below_it(tmp_path):
    """979 of MNIST's 1,000 images: `--min-accuracy 97.9` refused a real build that delivered 97.90%, since
    100 * 0.979 is 97.89999999999999."""
    import json

    from pipeline.build import AccuracyDropError, check_min_accuracy

    (tmp_path / "report.json").write_text(json.dumps({"delivered": {"variant": "float16"}, "variants": [
        {"variant": "fp32", "accuracy": 979 / 1000}, {"variant": "float16", "accuracy": 979 / 1000}]}))
    check_min_accuracy(tmp_path, 97.9)
    with pytest.raises(AccuracyDropError, match="float16 test accuracy 97.90% is below --min-accuracy 97.91%"):
        check_min_accuracy(tmp_path, 97.91)


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_deploy_timeout_must_be_a_finite_number(tmp_path, value):
    """click's FloatRange let them through; every board then failed on an OverflowError before connecting."""
    result = invoke("deploy", str(tmp_path), "--device", "pi@127.0.0.1", "--timeout", value)
    assert result.exit_code == 2 and "is not a finite number" in result.output, result.output
