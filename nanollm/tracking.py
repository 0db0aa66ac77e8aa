"""Experiment tracking: the only module of the library that talks to MLflow.

A `Tracker` wraps one MLflow run (created or re-opened by id); a `NullTracker` has the
same methods and does nothing, so call sites never branch on whether tracking is on.
mlflow is imported lazily: constructing a tracker is the first moment it is needed.
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
from nanollm.errors import NanollmError

log = logging.getLogger(__name__)

# MLflow caps a param value at 6000 characters (mlflow.utils.validation).
_MAX_PARAM_CHARS = 6000


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


class Tracker(NullTracker):
    """One MLflow run in one experiment of one tracking store."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = None
        self.lost = False  # set once the store failed mid-run; later calls then do nothing
        try:
            self.experiment_id = self._experiment_id(experiment, artifact_root)
        except Exception as err:  # MlflowException, or sqlalchemy errors from a bad database
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise NanollmError(
                f"MLflow store {uri} is unusable ({first}); fix MLFLOW_TRACKING_URI/tracking.uri "
                "or set tracking.enabled: false"
            ) from None

    def _experiment_id(self, name: str, artifact_root: Path | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = artifact_root.resolve().as_uri() if artifact_root else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:
            # another stage (a parallel queued experiment) created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

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


def make_tracker(cfg: TrackingConfig, root: Path) -> NullTracker:
    """A Tracker on the configured store, or a NullTracker when tracking is disabled."""
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
    artifact_root = Path(root) / "mlartifacts" if uri.startswith("sqlite:") else None
    return Tracker(uri, cfg.experiment, artifact_root=artifact_root)


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
    if uri.startswith("sqlite:"):
        command += ["--artifacts-destination", (Path(root) / "mlartifacts").resolve().as_uri()]
    return command


def ui_environment() -> dict[str, str]:
    """The environment for `ui_command`: telemetry and the server's background job runner off."""
    return {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
