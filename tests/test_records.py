"""Records: schema validation, atomic writes, and the config saved beside each record."""
import json
import os

import pytest
import yaml

from scaling import analysis, invalid_cells, records, sweep
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
    import jsonschema

    rec = _record()
    mutate(rec)
    with pytest.raises(records.RecordError) as caught:
        records.write_record(rec, tmp_path)
    assert not list(tmp_path.rglob("*.json"))
    try:  # the schema violation named is the one jsonschema.validate raises
        jsonschema.validate(rec, records.RECORD_SCHEMA)
    except jsonschema.ValidationError as exc:
        assert str(caught.value).endswith(f": {exc.message}")


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


# ---- the config saved beside a record -------------------------------------------------------

def _config(overrides):
    return {"backend": {"name": "torch"}, "devices": 1, "logger": {"name": "wandb", "api_key": "plantedkey0123456789"},
            "overrides": overrides}


def test_the_saved_config_round_trips_and_is_no_record_to_any_reader(tmp_path):
    ok = _record(run_id="c1", group="s", config=_config(["backend=torch", "devices=1", "sweep_id=s"]))
    failed = _record(run_id="c2", group="s", config=_config([]), metrics=None, error="rank 0: boom")
    for rec in (ok, failed):
        records.write_record(rec, tmp_path)
        records.write_run_config(rec, tmp_path)
    invalid_cells.note_invalid(tmp_path, "s", "c3", "backend=torch trains on 1 device(s), not 2")
    folder = records.config_folder(tmp_path, "s", "c1")
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "overrides.yaml"]
    assert yaml.safe_load((folder / "overrides.yaml").read_text()) == ["backend=torch", "devices=1", "sweep_id=s"]
    expected = {k: v for k, v in ok["config"].items() if k != "overrides"}
    expected["logger"] = {**expected["logger"], "api_key": "***"}
    assert yaml.safe_load((folder / "config.yaml").read_text()) == expected
    assert yaml.safe_load((records.config_folder(tmp_path, "s", "c2") / "overrides.yaml").read_text()) == []

    # every reader of records sees the two records and nothing else
    assert [p.name for p, _ in records.read_records(tmp_path)] == ["c1.json", "c2.json"]
    for root in (tmp_path, tmp_path / "s"):  # `scaling results show|export`, `scaling report`: a results or sweep folder
        loaded = analysis.load(root)
        assert loaded.problems == [] and loaded.files_seen == 2 and len(loaded.records) == 2
    assert sweep.finished(tmp_path, "s", "c1")["run_id"] == "c1" and sweep.failed_cells(tmp_path, "s") == ["c2"]
    assert invalid_cells.invalid_cells(tmp_path) == {"s/c3": "backend=torch trains on 1 device(s), not 2"}


def test_the_config_is_never_written_outside_the_results_folder(tmp_path):
    rec = _record(run_id="../../escaped", group="s", config=_config([]))
    with pytest.raises(records.RecordError, match="outside the results folder"):
        records.write_run_config(rec, tmp_path / "results")
    assert not list(tmp_path.rglob("*.yaml"))
