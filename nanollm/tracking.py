"""Experiment tracking: the only module of the library that talks to MLflow.

A `Tracker` wraps one MLflow run (created or re-opened by id); a `NullTracker` has the
same methods and does nothing, so call sites never branch on whether tracking is on.
This module also owns how the runs look in MLflow's UI: the metric names (`sectioned`),
the two experiments (models, tokenizers) with the runs-table view each opens with, and the
`mlflow server` command line behind `nanollm ui`. mlflow is imported lazily: constructing a
tracker is the first moment it is needed.
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
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanollm.config import TrackingConfig
from nanollm.errors import NanollmError

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


@dataclass(frozen=True)
class RunsView:
    """One of the project's MLflow experiments and the columns its runs table opens with.

    The columns live in the experiment as a saved view: tag `mlflow.sharedViewState.nanollm`
    holding the JSON MLflow 3.17's UI itself writes ("Views" menu), opened by `runs_url`.
    MLflow offers no other way, by URL or tag, to choose the visible columns: without the view
    a new user's table shows run name, date and source, and no metric.
    """

    suffix: str  # appended to tracking.experiment: "" for the models, "-tokenizers"
    title: str  # the view's name in the "Views" menu
    metrics: tuple[str, ...]
    params: tuple[str, ...]

    def experiment(self, cfg: TrackingConfig) -> str:
        return cfg.experiment + self.suffix

    def tags(self) -> dict[str, str]:
        """The experiment's tags: MLflow's model-training kind and the saved view."""
        columns = [f"metrics.`{m}`" for m in self.metrics] + [f"params.`{p}`" for p in self.params]
        # createdAt is fixed (the view is part of the code, not of a moment), so an unchanged view is never rewritten
        view = {"name": self.title, "createdAt": _VIEW_CREATED_MS, "state": json.dumps({"selectedColumns": columns})}
        return {
            # MLflow's record of what the experiment is for: model training, not GenAI (traces, judges)
            "mlflow.experimentKind": "custom_model_development",
            f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(view),
        }


VIEW_KEY = "nanollm"  # the saved view's id: ?viewStateShareKey=nanollm
_VIEW_CREATED_MS = 1_795_910_400_000  # 2026-11-29, when nanollm first wrote these views; shown in the "Views" menu

# One run per trained model (pretrain creates it, evaluate and bench_kvcache add to it).
MODEL_RUNS = RunsView(
    "",
    "nanollm: bits per byte, losses",
    metrics=("eval/bits_per_byte", "eval/val_loss", "loss/val", "loss/train", "speed/max_speedup"),
    params=("model.n_layer", "model.n_embd", "train.lr", "train.max_steps", "tokenizer.vocab_size"),
)
# One run per tokenizer trained, kept apart so that the models' table lists models only.
TOKENIZER_RUNS = RunsView(
    "-tokenizers",
    "nanollm: tokenizers",
    metrics=("val_bytes_per_token", "gpt2_val_bytes_per_token", "vocab_size", "train_seconds"),
    params=("tokenizer.kind", "tokenizer.vocab_size", "tokenizer.split_pattern"),
)


def tracking_uri(cfg: TrackingConfig, root: Path) -> str:
    """MLFLOW_TRACKING_URI, else tracking.uri, else an absolute sqlite store in the project root.

    The default is absolute so that a stage run by `dvc exp run --queue` in a temporary copy
    of the repo (under .dvc/tmp) still logs to the store the user looks at.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg.uri:
        return cfg.uri
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


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
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            log.warning(
                "MLflow store %s failed (%s); continuing without tracking, the metrics files are still written",
                self.uri,
                reason,
            )
            return None

    return wrapper


def open_experiment(client: Any, name: str, view: RunsView, artifact_root: Path | None = None) -> str:
    """The id of experiment `name`, created if absent; its tags (kind, saved view) set when missing or stale.

    Experiments made by older nanollm versions get their tags on first use; their runs, with
    metrics named the old way (`train_loss`, `eval_bits_per_byte`), stay as they are and show
    under "Model metrics" on their run page.
    """
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        location = artifact_root.resolve().as_uri() if artifact_root else None
        try:
            client.create_experiment(name, artifact_location=location)
        except MlflowException:
            pass  # another stage (a parallel queued experiment) created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise MlflowException(f"experiment {name} could not be created")
    if found.lifecycle_stage == "deleted":
        raise NanollmError(
            f"MLflow experiment {name} (id {found.experiment_id}) is deleted in {client.tracking_uri}; restore it "
            f"(mlflow experiments restore --experiment-id {found.experiment_id}) or set tracking.experiment"
        )
    stale = {key: value for key, value in view.tags().items() if found.tags.get(key) != value}
    try:
        for key, value in stale.items():
            client.set_experiment_tag(found.experiment_id, key, value)
    except MlflowException as err:  # a shared server may let this user log runs but not edit the experiment
        log.warning("could not tag MLflow experiment %s (%s); runs are logged all the same", name, err.message)
    return found.experiment_id


def _unusable_store(uri: str, err: Exception) -> NanollmError:
    if isinstance(err, NanollmError):
        return err
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return NanollmError(
        f"MLflow store {uri} is unusable ({first}); fix MLFLOW_TRACKING_URI/tracking.uri or set tracking.enabled: false"
    )


class Tracker(NullTracker):
    """One MLflow run in one experiment of one tracking store."""

    def __init__(
        self, uri: str, experiment: str, artifact_root: Path | None = None, view: RunsView = MODEL_RUNS
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = None
        self.lost = False  # set once the store failed mid-run; later calls then do nothing
        try:
            self.experiment_id = open_experiment(self.client, experiment, view, artifact_root)
        except Exception as err:  # MlflowException, or sqlalchemy errors from a bad database
            raise _unusable_store(uri, err) from None

    def start(self, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> None:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags or {}))
        self.run_id = run.info.run_id
        log.info("MLflow run %s (%s) in %s", run.info.run_name, self.run_id, self.uri)

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


def _probe_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast on an unreachable tracking server (MLflow's own client retries for minutes)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise NanollmError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it, fix MLFLOW_TRACKING_URI/"
            "tracking.uri, or set tracking.enabled: false"
        ) from None


def _artifact_root(uri: str, root: Path) -> Path | None:
    """The project's mlartifacts/ for a sqlite store; a server or database keeps its own."""
    return Path(root) / "mlartifacts" if uri.startswith("sqlite:") else None


def make_tracker(cfg: TrackingConfig, root: Path, *, runs: RunsView = MODEL_RUNS) -> NullTracker:
    """A Tracker on the configured store, in the experiment of `runs`; a NullTracker when tracking is disabled."""
    if not cfg.enabled:
        return NullTracker()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri(cfg, root)
    if uri.startswith(("http://", "https://")):
        _probe_server(uri)
        # MLflow's client retries a failed request 7 times with exponential backoff (minutes);
        # a server that goes away mid-training should cost seconds before we carry on without it.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    return Tracker(uri, runs.experiment(cfg), artifact_root=_artifact_root(uri, root), view=runs)


def ui_experiment(cfg: TrackingConfig, root: Path) -> str:
    """The id of the models' experiment in the store `nanollm ui` serves, created and tagged if needed."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri(cfg, root)
    try:
        return open_experiment(
            MlflowClient(tracking_uri=uri), MODEL_RUNS.experiment(cfg), MODEL_RUNS, _artifact_root(uri, root)
        )
    except Exception as err:  # MlflowException, or sqlalchemy errors from a bad database
        raise _unusable_store(uri, err) from None


def runs_url(base: str, experiment_id: str) -> str:
    """The page of MLflow's UI (3.17) that lists an experiment's runs as model training, with the view's columns.

    MLflow 3.17's UI picks GenAI or model training per browser (localStorage, GenAI unless the
    user switched) and, with that switch built in, does not read `mlflow.experimentKind`. So the
    URL says `workflowType=machine_learning` itself: a fresh browser would otherwise land on the
    GenAI overview (traces, latency, "Detect issues"). `viewStateShareKey` opens the saved view.
    """
    query = urllib.parse.urlencode({"workflowType": "machine_learning", "viewStateShareKey": VIEW_KEY})
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def ui_command(cfg: TrackingConfig, root: Path, *, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The `mlflow server` command line that serves this project's store, light enough for a laptop.

    One worker (the default four take ~2.6 GB and ~15 s to start; one takes ~0.5 GB and ~6 s)
    and, through the environment from `ui_environment`, no job runner. Artifacts are read from
    where each experiment put them (the project's mlartifacts/ for the default sqlite store).
    """
    import sys

    uri = tracking_uri(cfg, root)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    command += ["--host", host, "--port", str(port), "--workers", "1"]
    artifact_root = _artifact_root(uri, root)
    if artifact_root is not None:
        command += ["--artifacts-destination", artifact_root.resolve().as_uri()]
    return command


def ui_environment() -> dict[str, str]:
    """The environment for `ui_command`: telemetry and the server's background job runner off."""
    return {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
