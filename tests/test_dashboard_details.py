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
    from scaling import analysis, report

    loaded = analysis.load(ROOT / "tests" / "data" / "local_cpu_sweep")
    cells = analysis.tidy(loaded.records, loaded.paths)
    study = report.studies(cells, bootstrap=20)[0]
    fig = next(f.fig for f in report._figures(study, report.colours(study.agg)) if f.name.endswith("-accuracy"))
    accuracy = fig.data[0]
    assert accuracy.type == "scatter" and accuracy.mode == "markers" and accuracy.error_y.array is not None
