"""Where a cell's wall time goes (scaling.cell_time): rank 0's marks and the launcher's moments
become consecutive phases that add up to the wall time; the fixed cost is what is left after the
protocol's training and evaluation time."""
import pytest

from scaling import cell_time
from scaling.cell_time import MARKS, PHASES, Marks


def _marks(start: float = 100.0, gaps=(0.1, 0.05, 0.2, 2.0, 1.0, 0.01, 3.0, 0.05, 0.3)) -> dict:
    out, t = {}, start
    for name, gap in zip(MARKS, gaps):
        t += gap
        out[name] = t
    return out


def test_phases_add_up_to_the_wall_time_and_fixed_is_what_training_leaves():
    marks = _marks()
    launched, exited, closed = 100.0, marks["finished"] + 0.4, marks["finished"] + 0.9
    metrics = {"train_time_s": 2.5, "eval_time_s": [0.25, 0.1]}
    t = cell_time.phases(marks, launched, exited, metrics, closed=closed)
    assert list(PHASES) == [p for p in t if p not in ("wall", "fixed")]
    assert t["wall"] == pytest.approx(closed - launched)
    assert sum(t[p] for p in PHASES) == pytest.approx(t["wall"])
    assert t["launcher"] == pytest.approx(0.1) and t["build"] == pytest.approx(2.0)
    assert t["training"] == pytest.approx(3.0) and t["exit"] == pytest.approx(0.4) and t["closing"] == pytest.approx(0.5)
    assert t["fixed"] == pytest.approx(t["wall"] - 2.85)
    assert cell_time.line(t) == f"{t['wall']:.1f} s, {t['fixed']:.1f} s fixed"


def test_a_run_that_stopped_early_charges_the_gap_to_the_phase_it_was_in():
    marks = {k: v for k, v in _marks().items() if k in ("python", "entry", "data", "recorded", "finished")}
    t = cell_time.phases(marks, 100.0, marks["finished"] + 0.1, None)
    assert t["build"] == pytest.approx(marks["recorded"] - marks["data"])  # it failed while building
    assert t["tracker_start"] is None and t["training"] is None and t["fixed"] is None
    assert sum(v for k, v in t.items() if k in PHASES and v is not None) == pytest.approx(t["wall"])


def test_no_marks_no_phases_and_a_mark_is_taken_once():
    assert cell_time.phases({}, 1.0, 2.0, None) is None and cell_time.line(None) == ""
    m = Marks()
    m.mark("data", 5.0)
    m.mark("data")  # already taken: kept
    assert m["data"] == 5.0
    m.mark("data", 6.0)  # an explicit moment replaces it
    assert m["data"] == 6.0
