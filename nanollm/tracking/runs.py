"""One MLflow run per trained model: a `Tracker` wraps it, a `NullTracker` stands in when tracking is off.

pretrain creates the run and leaves its id in a run record (a small JSON file, one of its DVC
outputs); evaluate and bench_kvcache read the record and add to the same run. A `NullTracker` has
the same methods and does nothing, so call sites never branch on whether tracking is on. Also
owns the metric names MLflow's UI shows (`sectioned`) and the tags every run carries. Where the
store is and which experiment a run lands in are store.py's; the model in MLflow is models.py's.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from nanollm.config import TrackingConfig
from nanollm.errors import NanollmError, first_line, read_json_object
from nanollm.tracking.store import (
    MODEL_RUNS,
    RunsView,
    artifact_folder,
    open_experiment,
    probe_store,
    tracking_uri,
    unusable_store,
    without_password,
)

log = logging.getLogger(__name__)

# MLflow caps a param value at 6000 characters (mlflow.utils.validation).
_MAX_PARAM_CHARS = 6000

# MLflow's run page draws one section per metric prefix (the text before the last "/"), the
# sections in alphabetical order, then the un-prefixed metrics under "Model metrics"; charts
# within a section are alphabetical too, and `system/*` metrics get a tab of their own
# (getBaseChartAndSectionConfigs in MLflow 3.17's UI). So the section names carry the reading
# order: eval (bits per byte, val loss), then loss (the train and val curves side by side), then
# speed (the KV-cache decoding bench), tokens (the data the model trained on) and train (lr, grad
# norm, throughput). With `bench/` and `data/` instead, 30 bar charts came before bits per byte.
# source -> (section, names that get a name of their own instead of `section/name`)
_SECTIONS: dict[str, tuple[str, dict[str, str]]] = {
    "eval": ("eval", {}),
    "train": ("train", {"train_loss": "loss/train", "val_loss": "loss/val"}),
    "bench": ("speed", {}),
    "data": ("tokens", {"train_tokens": "tokens/train", "val_tokens": "tokens/val"}),
}


def sectioned(source: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """MLflow names for a stage's metrics: `sectioned("eval", {"bits_per_byte": 1.2})` -> `eval/bits_per_byte`.

    source is eval (evaluate), train (the training loop and its totals), bench (bench_kvcache)
    or data (pretrain's token counts). Only MLflow sees these names: the metrics files that
    DVC reads keep the stages' own flat keys.
    """
    section, own_names = _SECTIONS[source]
    return {own_names.get(key, f"{section}/{key}"): value for key, value in metrics.items()}


def git_commit(root: Path) -> str | None:
    """The HEAD commit of the repo holding `root`, or None outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_tags(root: Path, **extra: Any) -> dict[str, str]:
    """Tags every run carries: git commit and DVC experiment name (when DVC runs one)."""
    tags = {
        "mlflow.source.git.commit": git_commit(root),
        "dvc.experiment": os.environ.get("DVC_EXP_NAME"),
        **extra,
    }
    return {k: str(v) for k, v in tags.items() if v is not None}


class NullTracker:
    """Tracking switched off: every method accepts its arguments and does nothing."""

    run_id: str | None = None
    uri: str | None = None

    def start(self, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> None:
        pass

    def resume(self, run_id: str | None) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        pass

    def log_dataset(self, name: str, digest: str, source: str, context: str = "train") -> None:
        pass

    @contextlib.contextmanager
    def system_metrics(self, interval_s: float = 10.0) -> Iterator[None]:
        yield

    def end(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.end("FAILED" if exc_type else "FINISHED")


def _best_effort(method: Any) -> Any:
    """Once a run exists, losing the store must not lose the training: warn once, then log nothing."""

    @functools.wraps(method)
    def wrapper(self: Tracker, *args: Any, **kwargs: Any) -> Any:
        if self.lost:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as err:
            self.lost = True
            reason = first_line(err, 200)
            log.warning(
                "MLflow store %s failed (%s); continuing without tracking, the metrics files are still written",
                self.uri,
                reason,
            )
            return None

    return wrapper


class Tracker(NullTracker):
    """One MLflow run in one experiment of one tracking store."""

    def __init__(
        self, uri: str, experiment: str, artifact_root: Path | None = None, view: RunsView = MODEL_RUNS
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.run_id = None
        self.lost = False  # set once the store failed mid-run; later calls then do nothing
        try:
            self.client = MlflowClient(tracking_uri=uri)  # a database store connects here
            self.experiment_id = open_experiment(self.client, experiment, view, artifact_root)
        except Exception as err:  # MlflowException, or sqlalchemy errors from a bad database
            raise unusable_store(uri, err) from None

    def start(self, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> None:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags or {}))
        self.run_id = run.info.run_id
        log.info("MLflow run %s (%s) in %s", run.info.run_name, self.run_id, without_password(self.uri))

    def resume(self, run_id: str | None) -> None:
        if run_id is None:
            log.warning("no MLflow run id recorded upstream; starting a new run")
            self.start()
            return
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            raise NanollmError(
                f"MLflow run {run_id} (recorded by pretrain) is not in {self.uri}; "
                "re-run pretrain (dvc repro -f pretrain) or point MLFLOW_TRACKING_URI at its store"
            ) from None
        self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    @_best_effort
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    @_best_effort
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
        for i in range(0, len(items), 1000):  # log_batch takes at most 1000 metrics per call
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    @_best_effort
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    @_best_effort
    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    @_best_effort
    def log_dataset(self, name: str, digest: str, source: str, context: str = "train") -> None:
        """Dataset lineage (the run's Datasets panel): a name, a content digest and where it came from."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:36], source_type="local", source=json.dumps({"uri": source}))
        self.client.log_inputs(self.run_id, [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])

    @contextlib.contextmanager
    def system_metrics(self, interval_s: float = 10.0) -> Iterator[None]:
        """Sample CPU, memory, disk, network (and GPU when present) into `system/*` metrics meanwhile."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=self.uri
            )
        except Exception as err:  # psutil missing, or a store that cannot answer: train anyway
            log.warning("system metrics are off (%s)", err)
            yield
            return
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    @_best_effort
    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)


def _param_value(value: Any) -> str:
    text = str(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."


def make_tracker(cfg: TrackingConfig, root: Path, *, runs: RunsView = MODEL_RUNS) -> NullTracker:
    """A Tracker on the configured store, in the experiment of `runs`; a NullTracker when tracking is disabled."""
    if not cfg.enabled:
        return NullTracker()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri(cfg, root)
    probe_store(uri)
    if uri.startswith(("http://", "https://")):
        # MLflow's client retries a failed request 7 times with exponential backoff (minutes);
        # a server that goes away mid-training should cost seconds before we carry on without it.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    return Tracker(uri, runs.experiment(cfg), artifact_root=artifact_folder(uri, root), view=runs)


# ---------------------------------------------------------------------------- the run record

_NO_RECORD_FIX = "re-run pretrain (dvc repro -f pretrain), which records the MLflow run of the model it trains"


def write_run_record(path: str | Path, tracker: NullTracker) -> None:
    """Record the tracker's run (id and store; both null when tracking is off) for the stages after pretrain."""
    from nanollm.atomic import write_json

    write_json(path, {"run_id": tracker.run_id, "tracking_uri": tracker.uri})


def read_run_record(path: str | Path) -> dict[str, str | None]:
    """{"run_id", "tracking_uri"} that pretrain recorded in `path` (each None when tracking was off)."""
    record = read_json_object(path, _NO_RECORD_FIX)
    return {"run_id": record.get("run_id"), "tracking_uri": record.get("tracking_uri")}
