"""Records: schema validation and atomic writes."""
import json
import os

import pytest

from scaling import records
from scaling.protocol import Measurement, ProtocolConfig


def _metrics():
    m = Measurement(ProtocolConfig(warmup_steps=0), global_batch=64, devices=1)
    m.epoch_begin(0)
    m.step_begin()
    m.step_end()
    m.epoch_end(0)
    m.evaluated(0, 0.3, 0.9, 0.01)
    return m.result(process_start=None)


def _record(**kw):
    args = dict(run_id="r1", group="runs", config={"backend": {"name": "torch"}},
                environment=records.capture_environment({"torch": "x"}), metrics=_metrics(), error=None)
    args.update(kw)
    return records.make_record(**args)


def test_valid_ok_and_failed_records(tmp_path):
    ok = _record()
    records.validate(ok)
    failed = _record(run_id="r2", metrics=None, error="rank 0: boom")
    assert failed["status"] == "failed"
    records.validate(failed)
    path = records.write_record(ok, tmp_path)
    assert path == tmp_path / "runs" / "r1.json"
    assert json.loads(path.read_text())["metrics"]["global_batch"] == 64
    assert [p.name for p, _ in records.read_records(tmp_path)] == ["r1.json"]


@pytest.mark.parametrize("mutate", [
    lambda r: r.update(schema_version=99),
    lambda r: r.update(status="maybe"),
    lambda r: r["metrics"].update(global_batch=0),
    lambda r: r["metrics"].pop("samples_per_s"),
    lambda r: r["environment"].pop("cpu_model"),
    lambda r: r.update(status="ok", metrics=None),
])
def test_invalid_records_rejected_and_not_written(tmp_path, mutate):
    rec = _record()
    mutate(rec)
    with pytest.raises(records.RecordError):
        records.write_record(rec, tmp_path)
    assert not list(tmp_path.rglob("*.json"))


def test_failed_write_leaves_no_partial_file(tmp_path):
    rec = _record()
    rec["config"]["bad"] = object()  # not serialisable: json.dump fails half-way
    with pytest.raises(TypeError):
        records.write_record(rec, tmp_path)
    assert os.listdir(tmp_path / "runs") == []


def test_rewrite_replaces_whole_record(tmp_path):
    records.write_record(_record(), tmp_path)
    records.write_record(_record(metrics=None, error="later failure"), tmp_path)
    assert json.loads((tmp_path / "runs" / "r1.json").read_text())["status"] == "failed"
