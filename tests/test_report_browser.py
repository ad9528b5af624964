"""The HTML report in a real browser (Debian's chromium, driven by Playwright): a page, not a dump.

The run has every section: the variant table with a device column (the runner's own eval JSON),
the guard's decisions and the per-layer table (a model whose last layers were rescaled so int8
breaks, repaired by the guard), and the plots.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_analyze import PP, rescaled

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")]

CHECK = """() => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; };
  return {
    text: document.body.innerText,
    pre: document.querySelectorAll('pre').length,
    tables: [...document.querySelectorAll('table')].map(t => ({id: t.id, size: box(t),
             rows: t.querySelectorAll('tbody tr').length})),
    images: [...document.querySelectorAll('img')].map(i => ({complete: i.complete, natural: i.naturalWidth,
             size: box(i), src: i.src.slice(0, 21)})),
    overflow: document.documentElement.scrollWidth - window.innerWidth,
  };
}"""


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    import keras

    from pipeline.build import build
    from pipeline.config import BuildConfig
    from pipeline.data import load_dataset
    from pipeline.report.render import render
    from tests.conftest import real_digits

    dataset, data_dir = real_digits()
    tmp = tmp_path_factory.mktemp("browser")
    data = load_dataset(dataset, data_dir, seed=0)
    keras.utils.set_random_seed(0)
    from keras import layers

    model = keras.Sequential([keras.Input((28, 28, 1)), layers.Conv2D(8, 3, activation="relu"), layers.MaxPooling2D(),
                              layers.Flatten(), layers.Dense(32, activation="relu"),
                              layers.Dense(10, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    from device.core import normalize

    model.fit(normalize(data.x_train, data.spec.to_dict()), data.y_train, epochs=2, batch_size=64, verbose=0)
    rescaled(model).save(tmp / "breaker.keras")
    cfg = BuildConfig(dataset=dataset, data_dir=data_dir, model="mnist-cnn", keras_model=str(tmp / "breaker.keras"),
                      analyze=True, fallback="auto", max_accuracy_drop=PP, bench_runs=20, bench_warmup=2,
                      threads=(1,), out=str(tmp / "run"))
    run = build(cfg, log=lambda *a: None)
    runner = [sys.executable, str(REPO / "device" / "runner.py")]
    proc = subprocess.run([*runner, "eval", str(run / "samples" / "eval.npz"), "--model",
                           str(run / "model_int8.tflite"), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (tmp / "eval.json").write_text(proc.stdout)
    render(run, device_results=[tmp / "eval.json"], log=lambda *a: None)
    return run


def _open(page_url: str, width: int, height: int, shot: Path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": height})
        errors, requests = [], []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(page_url, wait_until="load")
        found = page.evaluate(CHECK)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    return found, errors, requests


@pytest.mark.parametrize("device, width, height", [("laptop", 1280, 800), ("phone", 390, 844)])
def test_report_reads_as_a_page_in_chromium(full_run, tmp_path, device, width, height):
    report = json.loads((full_run / "report.json").read_text())
    assert report["analysis"]["guard"] and report["analysis"]["layers"] and report["devices"]
    shot = tmp_path / f"report-{device}.png"
    found, errors, requests = _open((full_run / "report.html").as_uri(), width, height, shot)

    assert errors == []
    # Self-contained: nothing but the page itself and its inline images was requested.
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    text = found["text"]
    assert "|---" not in text and "## " not in text and "**" not in text and found["pre"] == 0
    tables = {t["id"]: t for t in found["tables"]}
    assert set(tables) == {"variant-table", "guard-table", "layer-table", "device-table"}
    for t in tables.values():
        assert t["rows"] > 0 and min(t["size"]) > 0, t
    assert tables["variant-table"]["rows"] == len(report["variants"])
    assert tables["layer-table"]["rows"] == len(report["analysis"]["layers"])
    assert tables["guard-table"]["rows"] == len(report["analysis"]["guard"]["remedies"])
    assert len(found["images"]) == len(report["plots"]) >= 4
    for img in found["images"]:
        assert img["complete"] and img["natural"] > 0 and min(img["size"]) > 0 and img["src"] == "data:image/png;base64"
        assert img["size"][0] <= width  # plots shrink to the screen
    assert found["overflow"] <= 1  # wide tables scroll inside their box, the page itself does not
    images = report["analysis"]["validation"]["images"]
    assert f"decided on {images:,} validation images" in text
    assert "95% interval" in text and "McNemar" in text
    assert shot.stat().st_size > 10_000
