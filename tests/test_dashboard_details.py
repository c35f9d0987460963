"""Details a reader of the dashboard relies on: which code measured a figure, flagged slow-downs,
accuracy drawn without a misleading baseline, tables that scroll instead of being cut off."""
import subprocess
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_records_name_the_code_that_measured_them():
    from scaling import analysis, records

    code = records.capture_environment()["code"]
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert code["git_commit"] == head and isinstance(code["git_dirty"], bool)
    env = analysis.environments([{"environment": {"host": "h", "code": code}}])
    assert env["code"][0].startswith("scaling ")


def test_a_serial_fraction_above_one_is_flagged_as_a_slow_down():
    from scaling.report import _serial

    assert _serial(0.25) == "0.25"
    assert _serial(1.57) == "1.57 (slower than N=1)"
    assert _serial(float("nan")) == "-"


def test_tables_scroll_inside_their_box():
    from scaling.report import CSS, _table

    html = _table(pd.DataFrame([{"a": "x"}]), [("a", "a", "s")])
    assert html.startswith("<div class='tw'><table") and ".tw { overflow-x: auto" in CSS


def test_accuracy_is_drawn_as_points_with_repeat_whiskers():
    pytest.importorskip("plotly")
    from scaling import analysis, report, report_figures

    loaded = analysis.load(ROOT / "tests" / "data" / "local_cpu_sweep")
    cells = analysis.tidy(loaded.records, loaded.paths)
    study = report.studies(cells, bootstrap=20)[0]
    fig = next(f.fig for f in report_figures.figures(study, report_figures.colours(study.agg)) if f.name.endswith("-accuracy"))
    accuracy = fig.data[0]
    assert accuracy.type == "scatter" and accuracy.mode == "markers" and accuracy.error_y.array is not None


def _model_reach(results: Path) -> float:
    from scaling import analysis, report, report_figures

    loaded = analysis.load(results)
    study = report.studies(analysis.tidy(loaded.records, loaded.paths), bootstrap=20)[0]
    fig = next(f.fig for f in report_figures.figures(study, report_figures.colours(study.agg)) if f.name.endswith("-model"))
    return max(x for trace in fig.data if trace.x is not None for x in trace.x if x is not None)


def test_the_model_is_drawn_beyond_the_measured_devices_only_where_alpha_and_beta_are_identifiable():
    pytest.importorskip("plotly")
    assert _model_reach(ROOT / "tests" / "data" / "local_cpu_sweep") == 2  # N = 1, 2: bracket only there
    assert _model_reach(ROOT / "tests" / "data" / "model_fit_sweep") == 1024  # N = 1..4: identifiable


def test_each_cell_links_its_records_logs_and_wandb_runs_relative_to_the_dashboard(tmp_path):
    pytest.importorskip("plotly")
    import re
    import shutil
    from urllib.parse import unquote

    from scaling import report, tracking

    results = tmp_path / "results"
    (results / "local_cpu").mkdir(parents=True)
    for path in sorted((ROOT / "tests" / "data" / "local_cpu_sweep" / "local_cpu").glob("torch_ddp-*.json")):
        shutil.copy(path, results / "local_cpu" / path.name)
    offline = results / "wandb" / "offline-run-20261127_010203-abc123"
    offline.mkdir(parents=True)
    log = results / "local_cpu" / "torch_ddp-mlp-mnist-weak-n2x1-r1.log"
    log.write_text(f"[worker] starting\n{tracking.WHERE_NOTE}offline run {offline.resolve()} "
                   f"(upload: wandb sync {offline.resolve()})\n")
    report.build(results, png=False, bootstrap=0)
    moved = shutil.move(str(results), str(tmp_path / "elsewhere"))  # the dashboard travels with its results
    page = Path(moved) / "report" / "index.html"
    hrefs = re.findall(r"<a href='([^'#]+)'>(record|log|W&amp;B)</a>", page.read_text())
    assert len([h for h, kind in hrefs if kind == "record"]) == 6  # every repeat of N = 1 and 2
    assert {kind for _, kind in hrefs} == {"record", "log", "W&amp;B"}
    for href, kind in hrefs:
        assert not href.startswith("/") and (page.parent / unquote(href)).exists(), (kind, href)
    assert any(unquote(h).endswith("offline-run-20261127_010203-abc123") for h, kind in hrefs if kind == "W&amp;B")
