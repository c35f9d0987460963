"""`scaling report`: the HTML dashboard and PNG figures, over full, empty, partial and mixed folders.

The ``browser`` tests need Debian's ``chromium`` and ``chromium-driver`` and selenium from PyPI; they
open the report in headless Chromium (offline) and check for console errors, the plots and a
screenshot that is not blank.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from scaling import report
from scaling.report import report_command

DATA = Path(__file__).parent / "data"
LOCAL_CPU = DATA / "local_cpu_sweep"
MODEL_FIT = DATA / "model_fit_sweep"
FIGURES = ("throughput", "efficiency", "step-time", "accuracy", "model")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run")


@pytest.fixture(scope="module")
def local_report(tmp_path_factory) -> report.Report:
    return report.build(LOCAL_CPU, tmp_path_factory.mktemp("report"), png=False, bootstrap=50)


def test_report_html_is_self_contained(local_report):
    text = local_report.html_path.read_text()
    assert local_report.html_path.name == "index.html"
    # plotly.js inline, nothing fetched from a network
    assert "Plotly" in text and len(text) > 3_000_000
    assert not re.search(r"<script[^>]+src=", text) and not re.search(r"<link[^>]+href=", text)
    for fig in FIGURES:
        assert f"id=\"local_cpu-mlp-mnist-weak-{fig}\"" in text or f"id='local_cpu-mlp-mnist-weak-{fig}'" in text


def test_report_content(local_report):
    text = local_report.html_path.read_text()
    assert "TensorFlow typically outperforms in large-scale distributed systems" in text
    assert "they are not a multi-GPU verdict" in text and "No GPU in these records" in text
    assert "The rule." in text and "Mann-Whitney" in text and "Holm" in text
    # 3 repeats a side cannot reach alpha = 0.05 over 9 TF x PyTorch pairs at N = 2
    assert "faster" in text and "scales better" in text and "inconclusive: needs &gt;= 6 repeats" in text
    assert "layout" in text and "2x1" in text and "Gustafson serial" in text
    assert "not identifiable" in text  # N = 1, 2 only
    assert "validation needs a backend measured at three or more device counts" in text
    assert "AMD EPYC" in text and "tensorflow 2.21.0" in text  # the environment
    # a complete sweep, but its N = 1 runs were not pinned while the N = 2 ranks were: flagged per cell
    assert "failed run" not in text and "no ok N=1 run" not in text
    assert "torch_ddp N=2 (2x1, mlp, sweep local_cpu): the N=1 base ran under other conditions: " \
           "pinned=false there, true here" in text


def test_report_on_the_model_fit_sweep_shows_the_validation(tmp_path):
    rep = report.build(MODEL_FIT, tmp_path, png=False, bootstrap=50)
    text = rep.html_path.read_text()
    assert "fit on N = 1, 2, 3, predict N = 4" in text and "error" in text
    assert "not comparable: only PyTorch measured" in text
    assert "Runs with more workers than CPU cores" in text


def test_report_command_default_out_dir(tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(MODEL_FIT, results)
    assert report_command([str(results), "--no-png", "--bootstrap", "20"]) == 0
    assert (results / "report" / "index.html").is_file()
    assert str(results / "report" / "index.html") in capsys.readouterr().out


@pytest.mark.parametrize("case", ["empty", "missing", "partial", "mixed", "failed_only"])
def test_report_says_what_is_missing(tmp_path, case, capsys):
    results = tmp_path / "results"
    expect = []
    if case == "empty":
        results.mkdir()
        expect = ["no records in"]
    elif case == "missing":
        expect = ["does not exist"]
    elif case == "partial":  # a backend without its N = 1 runs, another only at N = 1
        (results / "s").mkdir(parents=True)
        for p in (LOCAL_CPU / "local_cpu").glob("torch_ddp-*n2x1*.json"):
            shutil.copy(p, results / "s" / p.name)
        shutil.copy(LOCAL_CPU / "local_cpu" / "tf-mlp-mnist-weak-n1x1-r0.json", results / "s")
        expect = ["no ok N=1 run", "not comparable: only TF measured at N=1",
                  "not comparable: only PyTorch measured at N=2"]
    elif case == "mixed":
        shutil.copytree(LOCAL_CPU, results)
        for i, p in enumerate(sorted((results / "local_cpu").glob("horovod_tf-*.json"))):
            rec = json.loads(p.read_text())
            rec["schema_version"] = 2 if i % 2 else None
            p.write_text(json.dumps(rec))
        expect = ["record(s) with schema_version 2 skipped", "record(s) with no schema_version skipped"]
    elif case == "failed_only":
        (results / "s").mkdir(parents=True)
        rec = json.loads((LOCAL_CPU / "local_cpu" / "tf-mlp-mnist-weak-n1x1-r0.json").read_text())
        rec.update(status="failed", metrics=None, error="RuntimeError: out of memory")
        (results / "s" / "tf.json").write_text(json.dumps(rec))
        expect = ["failed run local_cpu/tf-mlp-mnist-weak-n1x1-r0: RuntimeError: out of memory", "no successful runs"]
    out = tmp_path / "out"
    code = report_command([str(results), "--out", str(out), "--no-png", "--bootstrap", "20"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if case in ("empty", "missing"):  # nothing to report: said, non-zero, no empty dashboard written
        assert code == 2 and expect[0] in captured.err and not out.exists()
        return
    assert code == 0
    text = (out / "index.html").read_text()
    if case != "failed_only":
        assert "What is missing or was skipped" in text
    for phrase in expect:
        assert phrase in text, phrase


def test_without_a_browser_the_report_says_so_and_still_writes_the_page(tmp_path, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chromium"))
    rep = report.build(LOCAL_CPU, tmp_path / "out", png=True, bootstrap=0)
    assert rep.pngs == [] and rep.html_path.is_file()
    assert any(p.startswith("PNG figures not written (ChromeNotFoundError") for p in rep.problems), rep.problems


# -- needs Chromium -------------------------------------------------------------------------------

needs_chromium = pytest.mark.skipif(not CHROMIUM, reason="needs Chromium (apt-get install chromium)")


@pytest.mark.browser
@needs_chromium
def test_png_figures(tmp_path):
    rep = report.build(LOCAL_CPU, tmp_path, png=True, bootstrap=50)
    names = sorted(p.name for p in rep.pngs)
    expected = [f"local_cpu-mlp-mnist-weak-{f}.png" for f in (*FIGURES, "decomposition")]
    assert names == sorted(expected), rep.problems
    for p in rep.pngs:
        head = p.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        assert width >= 1800 and height >= 800  # scale 2
        assert p.stat().st_size > 50_000  # a drawn figure, not an empty canvas


@pytest.mark.browser
@needs_chromium
def test_a_png_writer_that_is_given_nothing_lets_its_browser_go():
    from scaling.report_figures import PngWriter

    writer = PngWriter()  # Chromium starts in the background
    writer.close()  # as a report that failed before its figures does
    assert not writer._thread.is_alive()


@pytest.fixture
def chrome():
    pytest.importorskip("selenium")
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for flag in CHROME_FLAGS + ("--window-size=1300,1100", "--hide-scrollbars"):
        opts.add_argument(flag)
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


_COUNT_COLOURS = """
const [b64, done] = arguments;
const img = new Image();
img.onload = () => {
  const c = document.createElement('canvas'); c.width = img.width; c.height = img.height;
  const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
  const px = ctx.getImageData(0, 0, c.width, c.height).data;
  const seen = new Set(); let nonWhite = 0;
  for (let i = 0; i < px.length; i += 16) {
    const key = (px[i] << 16) | (px[i + 1] << 8) | px[i + 2];
    seen.add(key); if (px[i] < 235 || px[i + 1] < 235 || px[i + 2] < 235) nonWhite++;
  }
  done({colours: seen.size, nonWhite: nonWhite / (px.length / 16), width: c.width, height: c.height});
};
img.onerror = () => done({error: 'not an image'});
img.src = 'data:image/png;base64,' + b64;
"""


@pytest.mark.browser
def test_dashboard_in_headless_chromium(chrome, local_report, tmp_path):
    chrome.get(local_report.html_path.as_uri())
    chrome.execute_async_script("const done = arguments[0]; setTimeout(done, 500);")
    plots = chrome.execute_script("return document.querySelectorAll('.js-plotly-plot').length")
    assert plots == len(FIGURES) + 1  # and the decomposition ("where the time goes")
    drawn = chrome.execute_script(
        "return [...document.querySelectorAll('.js-plotly-plot')].map(d => [d.id, d.querySelectorAll('.main-svg').length,"
        " d.querySelectorAll('.scatterlayer .trace, .barlayer .trace').length, d.getBoundingClientRect().height])")
    for div_id, svgs, traces, height in drawn:
        assert svgs >= 1 and traces >= 1 and height > 300, (div_id, svgs, traces, height)
    errors = [e for e in chrome.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []

    shot = tmp_path / "dashboard.png"
    png = chrome.get_screenshot_as_png()
    shot.write_bytes(png)
    stats = chrome.execute_async_script(_COUNT_COLOURS, base64.b64encode(png).decode())
    assert stats.get("width") == 1300, stats
    assert stats["colours"] > 50 and stats["nonWhite"] > 0.05, stats  # text, tables, a banner: not blank

    # scrolled to the first figure, the screenshot shows a drawn plot
    chrome.execute_script("document.getElementById('local_cpu-mlp-mnist-weak-throughput').scrollIntoView()")
    png = chrome.get_screenshot_as_png()
    (tmp_path / "throughput.png").write_bytes(png)
    stats = chrome.execute_async_script(_COUNT_COLOURS, base64.b64encode(png).decode())
    assert stats["colours"] > 50, stats
    if os.environ.get("SCALING_SCREENSHOTS"):
        dest = Path(os.environ["SCALING_SCREENSHOTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest / "dashboard.png")
        shutil.copy(tmp_path / "throughput.png", dest / "throughput.png")


@pytest.mark.browser
def test_no_table_is_cut_off_at_900_px(chrome, local_report):
    chrome.set_window_size(900, 1000)
    chrome.get(local_report.html_path.as_uri())
    page = chrome.execute_script("return document.documentElement.clientWidth")
    boxes = chrome.execute_script(
        "return [...document.querySelectorAll('table')].map(t => { const b = t.parentElement; return ["
        " b.className, b.getBoundingClientRect().right, t.scrollWidth, b.clientWidth, getComputedStyle(b).overflowX]; })")
    assert boxes
    for cls, right, table_width, box_width, overflow in boxes:
        # every table sits in a box inside the page; a wider table scrolls in it instead of being cut off
        assert cls == "tw" and right <= page + 1, (cls, right, page)
        assert table_width <= box_width or overflow == "auto", (table_width, box_width, overflow)
    assert chrome.execute_script("return document.documentElement.scrollWidth") <= page + 1
