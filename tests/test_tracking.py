"""MLflow tracking on a real sqlite store: URI resolution, runs, params, metrics, resume."""

import pytest
from mlflow.tracking import MlflowClient

from nanollm.config import Config, TrackingConfig, flatten
from nanollm.errors import NanollmError
from nanollm.tracking import NullTracker, Tracker, make_tracker, run_tags, tracking_uri


def test_uri_default_is_absolute_sqlite_in_project_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(TrackingConfig(), root=tmp_path / "proj") == f"sqlite:///{tmp_path / 'proj' / 'mlflow.db'}"
    assert tracking_uri(TrackingConfig(uri="http://example:5000"), root=tmp_path) == "http://example:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")
    assert tracking_uri(TrackingConfig(uri="http://example:5000"), root=tmp_path) == "sqlite:////elsewhere.db"


def test_disabled_tracking_is_a_no_op(tmp_path):
    tracker = make_tracker(TrackingConfig(enabled=False), root=tmp_path)
    assert isinstance(tracker, NullTracker) and not isinstance(tracker, Tracker)
    with tracker:
        tracker.start("x")
        tracker.log_params({"a": 1})
        tracker.log_metrics({"m": 1.0}, step=1)
    assert tracker.run_id is None
    assert list(tmp_path.iterdir()) == []


def test_run_carries_flattened_params_metrics_tags_and_resumes(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-abc")
    params = flatten(Config().to_dict())
    assert len(params) > 50
    tracker = make_tracker(TrackingConfig(experiment="unit"), root=tmp_path)
    with tracker:
        tracker.start("first", tags=run_tags(tmp_path, stage="pretrain"))
        tracker.log_params(params)
        for step in (10, 20):
            tracker.log_metrics({"train_loss": 5.0 / step, "skipped": float("nan")}, step=step)
        (tmp_path / "note.txt").write_text("hi")
        tracker.log_artifact(tmp_path / "note.txt")
    run_id = tracker.run_id

    again = make_tracker(TrackingConfig(experiment="unit"), root=tmp_path)
    with again:
        again.resume(run_id)
        again.log_metrics({"eval_bits_per_byte": 1.5})

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.n_layer"] == "4"
    assert run.data.params["tokenizer.special_tokens"] == "['<|endoftext|>']"
    assert run.data.tags["stage"] == "pretrain" and run.data.tags["dvc.experiment"] == "exp-abc"
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [10, 20]
    assert "skipped" not in run.data.metrics
    assert run.data.metrics["eval_bits_per_byte"] == 1.5
    artifacts = client.list_artifacts(run_id)
    assert [a.path for a in artifacts] == ["note.txt"]
    # artifacts land in the project root, not in whatever the current directory was
    assert (tmp_path / "mlartifacts").is_dir()


def test_failed_block_marks_run_failed(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "unit")
    with pytest.raises(RuntimeError), tracker:
        tracker.start("doomed")
        raise RuntimeError("boom")
    assert MlflowClient(tracker.uri).get_run(tracker.run_id).info.status == "FAILED"


def test_resume_of_unknown_run_is_a_clear_error(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "unit")
    with pytest.raises(NanollmError, match="re-run pretrain"):
        tracker.resume("0" * 32)


def test_unreachable_server_fails_fast_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(NanollmError) as info:
        make_tracker(TrackingConfig(), root=tmp_path)
    assert "unreachable" in str(info.value) and "\n" not in str(info.value)


def test_dataset_lineage_and_system_metrics(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "unit")
    with tracker:
        tracker.start("lineage")
        tracker.log_dataset("corpus-train", "ab" * 32, "data/corpus", context="train")
        with tracker.system_metrics(interval_s=0.2):
            import time

            time.sleep(1.0)
    run = MlflowClient(tracker.uri).get_run(tracker.run_id)
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "corpus-train" and dataset.dataset.digest.startswith("abab")
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "train"
    assert any(key.startswith("system/cpu") for key in run.data.metrics)
    assert any(key.startswith("system/system_memory") for key in run.data.metrics)


def test_null_tracker_has_every_method_of_the_real_one():
    public = {name for name in dir(Tracker) if not name.startswith("_")}
    assert public <= set(dir(NullTracker)) | {"client", "experiment_id"}


def test_store_lost_mid_run_warns_once_and_carries_on(tmp_path, caplog):
    db = tmp_path / "m.db"
    tracker = Tracker(f"sqlite:///{db}", "unit")
    tracker.start("doomed-store")
    tracker.log_metrics({"train_loss": 1.0}, step=1)
    db.write_bytes(b"this is not a database any more")  # the store is gone mid-run
    with caplog.at_level("WARNING"):
        for step in range(2, 6):
            tracker.log_metrics({"train_loss": 1.0 / step}, step=step)
        tracker.log_params({"a": 1})
        tracker.end()
    warnings = [r for r in caplog.records if "continuing without tracking" in r.getMessage()]
    assert len(warnings) == 1 and tracker.lost
