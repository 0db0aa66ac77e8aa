"""MLflow tracking on a real sqlite store: URI resolution, runs, params, metrics, resume, how the UI shows them."""

import json

import pytest
from mlflow.tracking import MlflowClient

from nanollm.config import Config, TrackingConfig, flatten
from nanollm.errors import NanollmError
from nanollm.tracking.runs import NullTracker, Tracker, make_tracker, run_tags, sectioned
from nanollm.tracking.store import MODEL_RUNS, TOKENIZER_RUNS, VIEW_KEY, tracking_uri
from nanollm.tracking.ui import runs_url, ui_experiment


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


def _section(name: str) -> str:
    """The section MLflow 3.17's run page files a metric under (getBaseChartAndSectionConfigs)."""
    return name.rsplit("/", 1)[0] if "/" in name else "Model metrics"


def test_metric_sections_put_bits_per_byte_and_the_loss_curves_first():
    # every name the stages log, in the dicts they log
    logged = {
        **sectioned("train", {"train_loss": 3.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 9.0, "mfu": 0.1}),
        **sectioned("train", {"val_loss": 3.1}),
        **sectioned("train", {"tokens": 10, "seconds": 2.0, "params": 5}),
        **sectioned("data", {"vocab_size": 512, "train_tokens": 9, "val_tokens": 1, "train_documents": 3}),
        **sectioned("eval", {"bits_per_byte": 1.5, "val_loss": 3.2, "perplexity": 24.5, "lzma_bits_per_byte": 1.7}),
        **sectioned("bench", {"max_speedup": 3.0, "p16_n256_cached_tok_s": 90.0, "weight_read_gb_s": 1.0}),
    }
    assert logged["loss/train"] == 3.0 and logged["loss/val"] == 3.1 and logged["train/lr"] == 1e-3
    assert logged["eval/bits_per_byte"] == 1.5 and logged["speed/max_speedup"] == 3.0
    assert logged["tokens/train"] == 9 and logged["tokens/vocab_size"] == 512
    # the run page orders sections alphabetically: what a user compares first comes first
    sections = sorted({_section(name) for name in logged})
    assert sections == ["eval", "loss", "speed", "tokens", "train"]
    # the models' runs table opens with columns that the stages really log
    assert set(MODEL_RUNS.metrics) <= set(logged)


def _saved_view(experiment) -> dict:
    """The runs-table view nanollm keeps in an experiment, parsed as MLflow's UI parses it."""
    envelope = json.loads(experiment.tags[f"mlflow.sharedViewState.{VIEW_KEY}"])
    assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
    return json.loads(envelope["state"])


def test_models_and_tokenizers_get_experiments_of_their_own_tagged_for_model_training(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingConfig(experiment="proj")
    for runs, name in ((MODEL_RUNS, "a-model"), (TOKENIZER_RUNS, "a-tokenizer")):
        with make_tracker(cfg, root=tmp_path, runs=runs) as tracker:
            tracker.start(name)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    models, tokenizers = client.get_experiment_by_name("proj"), client.get_experiment_by_name("proj-tokenizers")
    assert [r.info.run_name for r in client.search_runs([models.experiment_id])] == ["a-model"]
    assert [r.info.run_name for r in client.search_runs([tokenizers.experiment_id])] == ["a-tokenizer"]
    for experiment in (models, tokenizers):
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    columns = _saved_view(models)["selectedColumns"]
    assert columns[0] == "metrics.`eval/bits_per_byte`" and "params.`train.lr`" in columns
    assert "metrics.`val_bytes_per_token`" in _saved_view(tokenizers)["selectedColumns"]
    assert ui_experiment(cfg, tmp_path) == models.experiment_id
    assert runs_url("http://localhost:5000", models.experiment_id) == (
        f"http://localhost:5000/#/experiments/{models.experiment_id}/runs"
        f"?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
    )


def test_ui_experiment_creates_the_experiment_so_the_printed_link_always_works(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    experiment_id = ui_experiment(TrackingConfig(), tmp_path)
    experiment = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment(experiment_id)
    assert experiment.name == "nanollm" and experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location == (tmp_path / "mlartifacts").resolve().as_uri()


def test_a_store_from_an_older_nanollm_keeps_working(tmp_path, monkeypatch):
    """Before sections: one experiment, no tags, tokenizer runs beside model runs, flat metric names."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    old_id = client.create_experiment("nanollm")
    old_model = client.create_run(old_id, run_name="4L256d-4096v-650s", tags={"stage": "pretrain"}).info.run_id
    for step, loss in ((10, 5.0), (20, 4.0)):
        client.log_metric(old_model, "train_loss", loss, step=step)
    client.log_metric(old_model, "eval_bits_per_byte", 2.1)
    client.log_metric(old_model, "data.vocab_size", 4096)
    client.set_terminated(old_model)
    old_tokenizer = client.create_run(old_id, run_name="tokenizer-bpe-4096", tags={"stage": "train_tokenizer"})

    with make_tracker(TrackingConfig(), root=tmp_path) as tracker:  # evaluate re-opens it after an upgrade
        tracker.resume(old_model)
        tracker.log_metrics(sectioned("eval", {"bits_per_byte": 2.0}))
    with make_tracker(TrackingConfig(), root=tmp_path) as tracker:  # the next model
        tracker.start("2L64d-512v-60s")
        tracker.log_metrics(sectioned("train", {"train_loss": 3.0}), step=10)
    with make_tracker(TrackingConfig(), root=tmp_path, runs=TOKENIZER_RUNS) as tokenizer:  # the next tokenizer
        tokenizer.start("tokenizer-bpe-512")

    assert tracker.experiment_id == old_id and tokenizer.experiment_id != old_id
    experiment = client.get_experiment(old_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # tagged on first use
    assert _saved_view(experiment)["selectedColumns"][0] == "metrics.`eval/bits_per_byte`"
    run = client.get_run(old_model)
    assert run.data.metrics == {"train_loss": 4.0, "eval_bits_per_byte": 2.1, "data.vocab_size": 4096,
                                "eval/bits_per_byte": 2.0}  # fmt: skip
    assert [m.value for m in client.get_metric_history(old_model, "train_loss")] == [5.0, 4.0]
    assert client.get_run(old_tokenizer.info.run_id).info.experiment_id == old_id  # left where it was
    assert ui_experiment(TrackingConfig(), tmp_path) == old_id


def test_a_stale_view_is_rewritten(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    experiment_id = Tracker(uri, "unit").experiment_id
    key = f"mlflow.sharedViewState.{VIEW_KEY}"
    client.set_experiment_tag(experiment_id, key, '{"name": "edited by hand"}')
    Tracker(uri, "unit")
    assert client.get_experiment(experiment_id).tags[key] == MODEL_RUNS.tags()[key]


def test_a_deleted_experiment_is_a_one_line_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("unit"))
    with pytest.raises(NanollmError) as info:
        Tracker(uri, "unit")
    assert "is deleted" in str(info.value) and "mlflow experiments restore" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_copied_project_says_its_store_keeps_artifacts_in_the_original(tmp_path, monkeypatch, caplog):
    """mlflow.db records the experiment's artifact folder as an absolute path: a `cp -a` of the project
    would log its models into the original's mlartifacts/. Said in one warning; the original is quiet."""
    import shutil

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    with caplog.at_level("WARNING", logger="nanollm.tracking.store"):
        make_tracker(TrackingConfig(), original)
        shutil.copytree(original, copy)
        make_tracker(TrackingConfig(), original)
        assert not caplog.records
        make_tracker(TrackingConfig(), copy)
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message and f"keeps its artifacts in {original.resolve() / 'mlartifacts'}" in message
    assert f"outside this project's {copy.resolve() / 'mlartifacts'}" in message and "set tracking.uri" in message


def test_the_run_record_names_the_run_and_its_store(tmp_path):
    from nanollm.tracking.runs import read_run_record, write_run_record

    tracker = make_tracker(TrackingConfig(), tmp_path)
    tracker.start("r")
    write_run_record(tmp_path / "models" / "run.json", tracker)
    assert read_run_record(tmp_path / "models" / "run.json") == {"run_id": tracker.run_id, "tracking_uri": tracker.uri}
    write_run_record(tmp_path / "off.json", make_tracker(TrackingConfig(enabled=False), tmp_path))
    assert read_run_record(tmp_path / "off.json") == {"run_id": None, "tracking_uri": None}
    with pytest.raises(NanollmError, match=r"missing.json is missing; re-run pretrain \(dvc repro -f pretrain\)"):
        read_run_record(tmp_path / "missing.json")
