"""One role per room (issue 21): the CLI parses and calls; run-layout knowledge lives in pipeline/rundir.py."""
from __future__ import annotations

import ast
import json
from pathlib import Path

from click.testing import CliRunner

from pipeline import rundir
from pipeline.cli import main

REPO = Path(__file__).resolve().parent.parent


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _strings(path: Path) -> set[str]:
    return {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)}


def test_the_cli_names_no_file_of_a_run():
    """Which files make a run, and where a name lives, are said once, in rundir/artifacts, not in the CLI."""
    strings = _strings(REPO / "pipeline" / "cli.py")
    assert not {"manifest.json", "config.json", "model_fp32.tflite"} & strings
    defined = {n.name for n in ast.walk(ast.parse((REPO / "pipeline" / "cli.py").read_text()))
               if isinstance(n, ast.FunctionDef)}
    assert not {"_resume_config", "_converted_run", "_run_config", "_next_free"} & defined


def test_next_free_skips_every_taken_number(tmp_path):
    for taken in ("run", "run-2", "run-3"):
        (tmp_path / taken).mkdir()
    assert rundir.next_free(tmp_path / "run") == tmp_path / "run-4"


def test_a_name_is_under_artifacts_and_a_path_is_itself(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert rundir.locate("mine") == Path("artifacts/mine")
    assert rundir.locate("runs/mine") == Path("runs/mine")
    (tmp_path / "here").mkdir()
    assert rundir.locate("here") == Path("here")
    assert rundir.resume_target(Path("artifacts/mine")) == "mine"
    assert rundir.resume_target(Path("here")) == "./here"


def test_commands_refuse_a_folder_that_is_not_a_converted_run(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"config": {}, "files": {"model.keras": {}}}))
    for command in ("benchmark", "analyze", "report"):
        result = invoke(command, tmp_path)
        assert result.exit_code == 1, result.output
        assert f"a `pipeline train` run (model.keras, no .tflite models); `pipeline {command}`" in result.output
    result = invoke("report", tmp_path / "nowhere")
    assert result.exit_code == 2


def test_resume_of_nothing_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("build", "--resume", "gone")
    assert result.exit_code == 1, result.output
    assert "--resume gone: no interrupted build found at artifacts/.gone.partial" in result.output
    assert "Traceback" not in result.output


def test_a_class_folder_is_read_with_the_runners_list_of_image_files(tmp_path):
    """.jpe and .dib images (the runner reads them) count as training images too: one list of extensions."""
    from PIL import Image

    from device.images import IMAGE_EXTENSIONS
    from pipeline.data.folders import discover

    for label, suffix, fmt in (("cat", ".jpe", "JPEG"), ("dog", ".dib", "BMP")):
        (tmp_path / label).mkdir()
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / label / f"a{suffix}", format=fmt)
    classes, files = discover(tmp_path)
    assert classes == ("cat", "dog")
    assert [(rel, label) for rel, label, _ in files["train"]] == [("cat/a.jpe", 0), ("dog/a.dib", 1)]
    assert {".jpe", ".dib"} <= IMAGE_EXTENSIONS


def test_render_only_renders():
    """Device-result checks, back-filled statistics and file copying live where they belong, not in render."""
    source = (REPO / "pipeline" / "report" / "render.py").read_text()
    defined = {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
    assert not {"_merge_devices", "_device_figures", "_device_files", "_fill_statistics"} & defined
    for act in (".unlink(", "hashlib", ".mkdir(", "DEVICE_DIR"):
        assert act not in source, act
    assert "_tflm_md(report" not in source.split("def _html")[1]  # the page is not cut from the Markdown


def test_statistics_of_an_old_run_are_filled_from_its_predictions(tmp_path):
    """A run evaluated before intervals were recorded gets the ones its predictions give."""
    import numpy as np

    from pipeline.measure import stats

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    probs = {v: np.eye(3)[np.where(rng.random(200) < p, y, (y + 1) % 3)] for v, p in (("fp32", 0.9), ("int8", 0.8))}
    np.savez(tmp_path / "predictions.npz", y=y, **{f"probs_{v}": p for v, p in probs.items()})
    variants = {"fp32": {"accuracy": 0.9}, "int8": {"accuracy": 0.8}}
    stats.fill_missing(variants, tmp_path / "predictions.npz")
    for v, p in probs.items():
        assert variants[v]["interval_95"] == stats.accuracy_with_interval(y, p.argmax(1))
    base, int8 = probs["fp32"].argmax(1), probs["int8"].argmax(1)
    assert variants["int8"]["mcnemar_vs_fp32"] == stats.paired_change(y, base, int8)
    assert "mcnemar_vs_fp32" not in variants["fp32"]


def test_the_config_is_frozen_from_birth():
    """Defaults are derived before the instance exists; nothing writes to a BuildConfig after __init__."""
    import dataclasses

    import pytest

    from pipeline.config import BuildConfig

    assert "object.__setattr__" not in (REPO / "pipeline" / "config.py").read_text()
    cfg = BuildConfig(dataset="digits")
    assert (cfg.model, cfg.quantize, cfg.out) == ("mnist-cnn", ("fp32", "int8"), "artifacts/mnist-cnn-digits")
    assert cfg.epochs is not None and cfg.augment is False and cfg.threads
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3
    saved = json.loads(json.dumps(cfg.to_dict()))  # as config.json and the manifest keep it
    assert BuildConfig.from_dict(saved) == cfg
    assert dataclasses.replace(cfg, out="elsewhere") == BuildConfig.from_dict({**saved, "out": "elsewhere"})


def test_the_long_functions_read_as_named_steps():
    """make_bundle, load_folder_dataset and export_tflm hand their steps to named functions."""
    for module, name in (("ship/bundle.py", "make_bundle"), ("data/folders.py", "load_folder_dataset"),
                         ("micro/export.py", "export_tflm")):
        tree = ast.parse((REPO / "pipeline" / module).read_text())
        fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
        assert fn.end_lineno - fn.lineno < 50, (name, fn.end_lineno - fn.lineno)


def test_commands_leave_errors_and_ctrl_c_to_one_mapping():
    """No command catches Ctrl-C or turns a domain error into an exit code itself: cli_run.exit_error maps
    every error, interrupts.py says what an interruption leaves."""
    for path in sorted((REPO / "pipeline").glob("cli*.py")):
        if path.name == "cli_run.py":  # the mapping itself
            continue
        tree = ast.parse(path.read_text())
        caught = {ast.unparse(h.type) for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler) and h.type}
        assert not {"KeyboardInterrupt", "SearchError", "BaseException"} & caught, (path.name, caught)
    defined = {n.name for p in (REPO / "pipeline").glob("cli*.py") for n in ast.walk(ast.parse(p.read_text()))
               if isinstance(n, ast.FunctionDef)}
    assert "exit_error" in defined and not {"ctrl_c", "on_sigint"} & defined


def test_the_split_modules_stay_readable():
    """Issue 21: a module much bigger than its neighbours does two jobs (the guide: 100-400 lines)."""
    for rel in ("cli.py", "micro/export.py", "report/render.py"):
        assert len((REPO / "pipeline" / rel).read_text().splitlines()) <= 400, rel


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at the top or inside a function (a lazy import is still a
    dependency: it only moves the cost to the first call)."""
    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for folder in ("pipeline", "device") for p in (REPO / folder).rglob("*.py")}

    def owner(name: str) -> str | None:  # `from pipeline.data import Dataset` depends on pipeline.data
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {owner(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base
                                                                                                    else []))
                found |= {owner(f"{base}.{a.name}") or owner(base) for a in node.names}
        graph[name] = found - {None, name}
    return graph


def test_no_module_imports_its_way_back_to_itself():
    """No import cycle among pipeline/ and device/ modules, lazy imports included: a stage reaches only what
    sits below it (failures.py used to import every stage's error type, and every stage reaches failures)."""
    graph = _import_graph()
    assert {"pipeline.failures", "pipeline.console", "pipeline.build"} <= set(graph)
    assert "pipeline.failures" in graph["pipeline.console"]  # the graph sees lazy imports

    def cycle_from(start: str) -> list[str] | None:
        path, seen = [start], set()

        def visit(node: str) -> list[str] | None:
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    path.append(nxt)
                    found = visit(nxt)
                    if found:
                        return found
                    path.pop()
            return None
        return visit(start)

    cycles = [c for c in map(cycle_from, sorted(graph)) if c]
    assert not cycles, " -> ".join(cycles[0])
    assert not any(m.startswith("pipeline") for m in set().union(*(graph[m] for m in graph if m.startswith("device"))))
