"""Result files under benchmarks/results read the same on any machine (no absolute paths in them); the helpers the
benchmark scripts share."""
from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ABSOLUTE = re.compile(r"(^|[\s=:\"'])/[A-Za-z]")


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


@pytest.mark.parametrize("path", sorted((REPO / "benchmarks" / "results").rglob("*.json")),
                         ids=lambda p: str(p.relative_to(REPO / "benchmarks" / "results")))
def test_a_result_file_records_no_absolute_path(path):
    found = [s for s in _strings(json.loads(path.read_text())) if ABSOLUTE.search(s)]
    assert not found, f"{path.name} records machine paths: {found[:3]}"


def test_the_scripts_record_paths_relative_to_the_repository_or_tmpdir(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    sys.modules.pop("portable", None)
    from portable import portable, portable_command

    tmp = Path(tempfile.gettempdir())
    assert portable(REPO / "benchmarks" / "results") == "benchmarks/results"
    assert portable(REPO.parent / "shared" / "datasets" / "mnist") == "../shared/datasets/mnist"
    assert portable(tmp / "tmpab12cd" / "mnist") == "$TMPDIR/tmpab12cd/mnist"
    assert portable("/srv/somewhere/else/cifar10-jpg") == "cifar10-jpg"
    command = portable_command(["pipeline", "build", "--data-dir", str(REPO.parent / "shared" / "mnist"),
                                "--epochs", "5", "--out", str(tmp / "t" / "mnist")])
    assert command == "pipeline build --data-dir ../shared/mnist --epochs 5 --out $TMPDIR/t/mnist"


def test_a_series_runs_every_name_for_none_refuses_an_unknown_one_and_keeps_earlier_results(monkeypatch, tmp_path,
                                                                                          capsys):
    import argparse

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    sys.modules.pop("series", None)
    from series import chosen, kept

    ap = argparse.ArgumentParser(prog="series")
    ap.add_argument("names", nargs="*")
    table = {"default": [], "batch64": ["--batch-size", "64"]}
    assert chosen(ap, ap.parse_args([]).names, table, "recipe") == ["default", "batch64"]
    assert chosen(ap, ap.parse_args(["batch64"]).names, table, "recipe") == ["batch64"]
    with pytest.raises(SystemExit) as stopped:
        chosen(ap, ap.parse_args(["default", "nosuch"]).names, table, "recipe")
    assert stopped.value.code == 2
    assert "unknown recipe nosuch; choose from default, batch64" in capsys.readouterr().err

    assert kept(None) == {} and kept(tmp_path / "none.json") == {}
    (tmp_path / "r.json").write_text(json.dumps({"results": {"default": {"accuracy": 0.8}}}))
    assert kept(tmp_path / "r.json") == {"default": {"accuracy": 0.8, "kept_from_result_file": True}}


@pytest.mark.parametrize("trained, here, data, reused", [
    (128, 140, "same", True), (128, 141, "same", False), (150, 136, "same", True), (150, 135, "same", True),
    (150, 134, "same", False), (128, 128, "other", False), (128, 128, None, False)])
def test_a_zoo_run_stands_in_within_a_tenth_of_the_epochs_it_was_trained_for_on_the_same_images(
        monkeypatch, tmp_path, trained, here, data, reused):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    sys.modules.pop("search", None)
    import search

    from pipeline.config import BuildConfig
    from pipeline.train import recipe_of

    builds = []

    def cli(*args):  # a build that records an epoch of the length that fits `here` epochs in the hour
        out = Path(args[args.index("--out") + 1])
        out.mkdir(parents=True)
        builds.append(int(args[args.index("--epochs") + 1]))
        (out / "manifest.json").write_text(json.dumps({"training": {"epoch_seconds": [3600 / (here + 0.5)],
                                                                    "recipe": {}}, "data": {"sha256": "same"}}))
        (out / "evaluation.json").write_text(json.dumps({"variants": {"int8": {"accuracy": 0.8,
                                                                               "interval_95": {}}}}))

    monkeypatch.setattr(search, "cli", cli)
    recipe = recipe_of(BuildConfig(dataset="cifar10", data_dir="d", model="cifar-resnet8", epochs=trained,
                                   out="unused"))
    kept = {"epochs": trained, "recipe": recipe, "int8_accuracy": 0.84, "interval_95": {}}
    if data is not None:
        kept["data_sha256"] = data
    earlier = {"file": "earlier.json", "zoo": {"cifar-resnet8": kept}}
    result = search.train_zoo("cifar-resnet8", Path("d"), 60, tmp_path, earlier)
    assert builds[0] == 1 and (result.get("reused_from") == "earlier.json") == reused
    assert builds[1:] == ([] if reused else [here])


def test_the_pick_and_the_zoo_run_are_compared_on_the_images_only_one_of_them_classifies_right(monkeypatch,
                                                                                                tmp_path):
    import numpy as np

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    sys.modules.pop("search", None)
    import search

    y = np.arange(20) % 10

    def run(name, right_int8, right_fp32, labels=y):
        def probs(right):  # class y where right, the next class elsewhere
            return np.eye(10)[np.where(right, labels, (labels + 1) % 10)]

        (tmp_path / name).mkdir()
        np.savez(tmp_path / name / "predictions.npz", y=labels, probs_int8=probs(right_int8),
                 probs_fp32=probs(right_fp32))
        return tmp_path / name

    index = np.arange(20)
    # int8: the pick alone right on 0-9, the zoo run alone on 18-19; fp32: both right on the same images.
    pick, zoo = run("pick", index < 18, index < 15), run("cifar-resnet8", index >= 10, index < 15)
    result = search.paired(pick, zoo)
    assert (result["int8"]["variant_only_correct"], result["int8"]["baseline_only_correct"]) == (10, 2)
    assert result["int8"]["p_value"] == pytest.approx(2 * (1 + 12 + 66) / 4096)  # two-sided binomial, n=12, k<=2
    assert (result["fp32"]["variant_only_correct"], result["fp32"]["baseline_only_correct"], result["fp32"]["p_value"]
            ) == (0, 0, 1.0)
    assert result["int8"]["baseline"] == "cifar-resnet8"
    other = run("other", index < 18, index < 15, labels=(y + 3) % 10)
    with pytest.raises(SystemExit, match="different test images"):
        search.paired(pick, other)


def _finished_recipe_run(folder: Path, epochs: int, options: list[str], **recipe):
    """A finished run of resnet8_recipes.py's in `folder`: its recipe today's for `options`, changed by `recipe`."""
    from resnet8_recipes import options_of

    from pipeline.config import BuildConfig
    from pipeline.train import recipe_of

    config = {"epochs": epochs, **options_of(options)}
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({
        "config": config, "stage_seconds": {"train": 10.0},
        "training": {"recipe": {**recipe_of(BuildConfig(dataset="cifar10", data_dir="d", model="cifar-resnet8",
                                                        out="unused", **config)), **recipe},
                     "images_per_second": [1000.0, 3000.0, 2000.0, 4000.0][:max(2, epochs)],
                     "accuracy": [0.5] * epochs, "val_accuracy": [0.5] * epochs}}))
    variant = {"accuracy": 0.5, "interval_95": {"low": 0.4, "high": 0.6}}
    (folder / "evaluation.json").write_text(json.dumps({"n": 100, "variants": {"fp32": variant, "int8": variant}}))


def test_the_medians_of_an_even_count_are_the_mean_of_the_middle_two(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    for name in ("accuracy", "resnet8_recipes"):
        sys.modules.pop(name, None)
    from accuracy import LoadSampler
    from resnet8_recipes import run

    sampler = LoadSampler()
    sampler.samples = [4.0, 1.0, 3.0, 2.0]
    assert sampler.summary()["median"] == 2.5

    _finished_recipe_run(tmp_path / "default", 4, [])  # a finished run is read, not trained again
    assert run("default", 4, tmp_path)["images_per_second_median"] == 2500.0


def test_the_plain_end_screen_refuses_a_recipe_that_already_ends_plain(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    sys.modules.pop("resnet8_screens", None)
    import resnet8_screens

    monkeypatch.setattr(sys, "argv", ["resnet8_screens.py", "cutout", "plain-end", "--recipe", "best-plain8"])
    with pytest.raises(SystemExit) as stopped:
        resnet8_screens.main()
    assert stopped.value.code == 2
    assert "recipe best-plain8 already does (--plain-epochs)" in capsys.readouterr().err


def test_a_recipe_series_keeps_the_results_of_recipes_no_longer_in_its_table(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    sys.modules.pop("resnet8_recipes", None)
    import resnet8_recipes

    runs = tmp_path / "runs"
    _finished_recipe_run(runs / "batch64", 2, ["--batch-size", "64"])  # read, not trained again
    result = tmp_path / "r.json"
    result.write_text(json.dumps({"results": {"retired": {"accuracy": {"int8": 0.8}}, "default": {"accuracy": {}}}}))
    monkeypatch.setattr(resnet8_recipes, "DATA", tmp_path)
    monkeypatch.setattr(sys, "argv", ["resnet8_recipes.py", "batch64", "--epochs", "2", "--runs", str(runs),
                                      "--json", str(result)])
    resnet8_recipes.main()
    written = json.loads(result.read_text())["results"]
    assert list(written) == ["default", "batch64", "retired"]
    assert written["retired"] == {"accuracy": {"int8": 0.8}, "kept_from_result_file": True}


@pytest.mark.parametrize("name, options", [("default", []), ("batch64", ["--batch-size", "64"])])
def test_a_recipe_series_reads_a_finished_run_only_if_it_trained_todays_recipe(monkeypatch, tmp_path, name,
                                                                              options):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    sys.modules.pop("resnet8_recipes", None)
    from resnet8_recipes import run

    _finished_recipe_run(tmp_path / "today" / name, 60, options)
    assert run(name, 60, tmp_path / "today")["reused_finished_run"]
    # Finished before cifar-resnet8's default recipe ended plain: the same options, another recipe.
    _finished_recipe_run(tmp_path / "before" / name, 60, options, plain_epochs=0)
    with pytest.raises(SystemExit, match="not today's recipe"):
        run(name, 60, tmp_path / "before")


def test_a_url_in_a_result_is_no_machine_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    sys.modules.pop("portable", None)
    from portable import portable_tree

    assert portable_tree({"see": "github.com/mlcommons/tiny, https://github.com/mlcommons/tiny/benchmark"}) == {
        "see": "github.com/mlcommons/tiny, https://github.com/mlcommons/tiny/benchmark"}
    assert portable_tree(["--data-dir /srv/somewhere/cifar10-jpg"]) == ["--data-dir cifar10-jpg"]


def test_the_tflm_figures_cut_a_cifar_slice_for_each_pair_of_counts_from_the_real_images(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    sys.modules.pop("tflm_figures", None)
    from tflm_figures import cifar_slice

    from tests import test_tflm

    cut = []

    def cifar_data(folder, per_class, test_per_class):
        cut.append((per_class, test_per_class))
        (folder / "cifar").mkdir()
        (folder / "cifar" / "cifar-10-python.tar.gz").write_bytes(b"")
        return folder / "cifar"

    monkeypatch.setattr(test_tflm, "cifar_data", cifar_data)
    monkeypatch.setattr(test_tflm, "CIFAR_JPG", tmp_path)
    first = cifar_slice(tmp_path / "work", 500, 100)
    assert cifar_slice(tmp_path / "work", 500, 100) == first
    assert cifar_slice(tmp_path / "work", 500, 200) != first
    assert cut == [(500, 100), (500, 200)]
    monkeypatch.setattr(test_tflm, "CIFAR_JPG", tmp_path / "none")
    with pytest.raises(SystemExit, match="not found"):
        cifar_slice(tmp_path / "other", 500, 100)


@pytest.mark.parametrize("script", ["accuracy", "build_time"])
def test_a_timed_build_runs_this_checkouts_pipeline_from_any_folder(monkeypatch, tmp_path, script):
    import subprocess
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    sys.modules.pop(script, None)
    module = __import__(script)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    started = []

    def child(cmd, **kwargs):  # where the build would import `pipeline` from; then a finished build
        started.append(subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"],
                                      capture_output=True, text=True, env=kwargs.get("env"),
                                      cwd=kwargs.get("cwd")).stdout.strip())
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "manifest.json").write_text(json.dumps({"stage_seconds": {}, "training": {}}))
        (out / "evaluation.json").write_text(json.dumps({"n": 1, "variants": {}}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    class Popen:
        pid = 0

        def __init__(self, cmd, **kwargs):
            child(cmd, **kwargs)

    class Usage:
        ru_maxrss, ru_utime, ru_stime = 1024, 0.0, 0.0

    monkeypatch.setattr(module, "subprocess", SimpleNamespace(run=child, Popen=Popen, STDOUT=subprocess.STDOUT))
    if script == "build_time":
        module.one_build(tmp_path / "data", tmp_path / "run")
    else:
        monkeypatch.setattr(module.os, "wait4", lambda pid, options: (pid, 0, Usage))
        module.run("mnist", tmp_path / "run", [])
    assert started == [str(REPO / "pipeline" / "__init__.py")]


@pytest.mark.parametrize("script", ["update_swap", "small_folder"])
def test_a_script_imports_this_checkouts_pipeline_from_any_folder(tmp_path, script):
    import os
    import subprocess

    # As `python benchmarks/SCRIPT.py` starts it: its own folder first on the path, no PYTHONPATH.
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import {script}, device, pipeline; "
            "print(device.__file__, pipeline.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert found.stdout.split() == [str(REPO / "device" / "__init__.py"), str(REPO / "pipeline" / "__init__.py")]


def test_a_benchmark_median_of_widely_spread_samples_comes_with_a_warning(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    sys.modules.pop("spread", None)
    from spread import median

    warnings: list[str] = []
    assert median([1.0, 1.02, 0.99, 1.01, 1.0], "steady", warnings) == 1.0 and warnings == []
    assert median([1.0, 1.6, 0.7, 1.3, 1.0], "noisy", warnings) == 1.0
    assert len(warnings) == 1 and warnings[0].startswith("noisy: wide spread, the interquartile range is 30%")
    assert capsys.readouterr().err == f"warning: {warnings[0]}\n"
