"""Experiment tracking: the only module of the library that talks to MLflow.

A `Tracker` wraps one MLflow run (created or re-opened by id); a `NullTracker` has the
same methods and does nothing, so call sites never branch on whether tracking is on.
This module also owns how the runs look in MLflow's UI: the metric names (`sectioned`),
the two experiments (models, tokenizers) with the runs-table view each opens with, and the
`mlflow server` command line behind `nanollm ui`. And the model's life in MLflow: logging a
checkpoint as a pyfunc model (`Tracker.log_model`; nanollm.inference.pyfunc, which imports no
mlflow, is what loads it), registering a run's model under an alias (`register_run`, `best_run`)
and downloading one by URI for a server (`fetch_model`). mlflow is imported lazily: constructing a
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

from nanollm.config import EvalConfig, TrackingConfig
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

    def log_model(self, checkpoint_dir: Path, tokenizer_file: Path, *, sampling: EvalConfig, seed: int) -> None:
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


def _first_line(err: Exception) -> str:
    """An error's message for a one-line report: its first line, or its type when it has none."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


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
            reason = _first_line(err)[:200]
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
    return NanollmError(
        f"MLflow store {uri} is unusable ({_first_line(err)}); "
        "fix MLFLOW_TRACKING_URI/tracking.uri or set tracking.enabled: false"
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

    @_best_effort
    def log_model(self, checkpoint_dir: Path, tokenizer_file: Path, *, sampling: EvalConfig, seed: int) -> None:
        """Log the checkpoint (weights and architecture) and its tokenizer.json as the run's MLflow model `model`.

        A pyfunc that nanollm.inference.pyfunc loads: `mlflow.pyfunc.load_model("runs:/<run id>/model")`
        and `mlflow models serve` complete a `prompt` column; its params (max_tokens, temperature,
        top_k, top_p, seed) default to `sampling` and `seed`, the settings that wrote the eval samples.
        `nanollm register` then adds it to the Model Registry.
        """
        defaults = serving_defaults(sampling, seed)
        _log_pyfunc(self.run_id, self.uri, Path(checkpoint_dir), Path(tokenizer_file), defaults)

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


# ---------------------------------------------------------------------------- the model in MLflow

MODEL_NAME = "model"  # the LoggedModel's name under its run: runs:/<run id>/model
REGISTERED_NAME = "nanollm"  # the Model Registry entry `nanollm register` adds versions to
# The module MLflow imports to load a logged model (it calls its _load_pyfunc(data folder)). Named, not
# imported: what it loads (model, tokenizer, sampling) is no code of the stages that import this module.
# The folder it reads: checkpoint/, tokenizer/ and sampling.json, the names it gives them.
_LOADER_MODULE = "nanollm.inference.pyfunc"
# The checkpoint files a served model needs: the architecture and the weights. train_state.pt (the
# optimizer's moments, twice the weights again) and run.json (this store's bookkeeping) stay behind.
_SERVED_CHECKPOINT_FILES = ("config.json", "architecture.json", "model.pt")
_NO_MODEL_FIX = "set tracking.log_model: true in params.yaml and re-run evaluate (dvc repro -f evaluate)"


def serving_defaults(sampling: EvalConfig, seed: int) -> dict[str, Any]:
    """The served model's default params: the eval section's sampling, which wrote reports/samples.txt."""
    return {
        "max_tokens": sampling.sample_tokens,
        "temperature": float(sampling.temperature),
        "top_k": sampling.top_k or 0,
        "top_p": float(sampling.top_p or 1.0),
        "seed": seed,
    }


def _signature(defaults: Mapping[str, Any]) -> Any:
    """A `prompt` string column in, one completion string per row out; the sampling knobs as params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    kinds = {"max_tokens": DataType.long, "temperature": DataType.double, "top_k": DataType.long}
    kinds |= {"top_p": DataType.double, "seed": DataType.long}
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "prompt")]),
        outputs=Schema([ColSpec(DataType.string)]),
        params=ParamSchema([ParamSpec(name, kinds[name], value) for name, value in defaults.items()]),
    )


def _pip_requirements() -> list[str]:
    """What a fresh environment would install to serve the model; given, so mlflow infers nothing (no network).

    nanollm itself is not on PyPI: an environment built from these needs it installed from the
    repository first (`mlflow models serve --env-manager local` uses the current one as is).
    """
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("nanollm", "torch", "tiktoken", "mlflow", "pandas"):
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")  # torch 2.x+cpu is torch 2.x on PyPI
        except PackageNotFoundError:
            pins.append(package)
    return pins


@contextlib.contextmanager
def _fluent_store(uri: str) -> Iterator[None]:
    """Point MLflow's module-level API (log_model, register_model) at `uri` meanwhile.

    Those functions take no store argument. nanollm never sets the global otherwise, so it is
    reset afterwards to resolving from the environment, which `set_tracking_uri` also edits.
    """
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _log_pyfunc(run_id: str, uri: str, checkpoint_dir: Path, tokenizer_file: Path, defaults: Mapping[str, Any]) -> str:
    """Log the checkpoint and tokenizer as the pyfunc model `model` of run `run_id`; returns its model id."""
    import tempfile

    import mlflow
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="nanollm-model-") as staging:
        folder = Path(staging) / MODEL_NAME  # becomes the model's data/model
        (folder / "checkpoint").mkdir(parents=True)
        (folder / "tokenizer").mkdir()
        for name in _SERVED_CHECKPOINT_FILES:
            _link_or_copy(checkpoint_dir / name, folder / "checkpoint" / name)
        _link_or_copy(tokenizer_file, folder / "tokenizer" / tokenizer_file.name)
        (folder / "sampling.json").write_text(json.dumps(dict(defaults), indent=2) + "\n", encoding="utf-8")
        # logging runs the example once through the loaded model: a check that costs a model load and 8 tokens
        example = (pd.DataFrame({"prompt": ["def "]}), {"max_tokens": 8})
        with _fluent_store(uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                loader_module=_LOADER_MODULE,
                data_path=str(folder),
                signature=_signature(defaults),
                input_example=example,
                pip_requirements=_pip_requirements(),
            )
    log.info("logged model %s (%s) under run %s", info.model_id, info.model_uri, run_id)
    return info.model_id


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows one (the weights are the bulk), else a copy."""
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# ---------------------------------------------------------------------------- the Model Registry


@dataclass(frozen=True)
class Registered:
    """A model version `nanollm register` made: which run's model, under which name, version and alias."""

    name: str
    version: str
    alias: str
    run_id: str
    model_id: str

    @property
    def uri(self) -> str:
        """What `mlflow models serve -m` and `fetch_model` take: models:/nanollm@champion."""
        return f"models:/{self.name}@{self.alias}"


def _store_client(uri: str) -> Any:
    """An MlflowClient on `uri` (tracking store and Model Registry), failing fast on an unreachable server."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if uri.startswith(("http://", "https://")):
        _probe_server(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _run_models(client: Any, experiment_id: str, run_id: str | None = None) -> dict[str, Any]:
    """run id -> the newest complete LoggedModel named `model` it logged, for the runs of an experiment (or one)."""
    from mlflow.entities import LoggedModelStatus

    query = f"name = '{MODEL_NAME}'" + (f" AND source_run_id = '{run_id}'" if run_id else "")
    found: dict[str, Any] = {}
    token = None
    while True:
        page = client.search_logged_models([experiment_id], filter_string=query, page_token=token)
        for model in page:
            run_id, newest = model.source_run_id, found.get(model.source_run_id)
            if run_id and model.status == LoggedModelStatus.READY:
                if newest is None or model.creation_timestamp > newest.creation_timestamp:
                    found[run_id] = model
        token = page.token
        if not token:
            return found


def best_run(uri: str, experiment: str, metric: str, *, maximize: bool = False) -> str:
    """The id of the run of `experiment` with a logged model and the lowest (maximize: highest) `metric`."""
    import difflib

    client = _store_client(uri)
    try:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise NanollmError(f"MLflow experiment {experiment!r} is not in {uri}; check tracking.experiment")
        with_model = _run_models(client, found.experiment_id)
        if not with_model:
            raise NanollmError(f"no run in MLflow experiment {experiment!r} has a logged model; {_NO_MODEL_FIX}")
        runs = [client.get_run(run_id) for run_id in with_model]
    except Exception as err:
        raise _unusable_store(uri, err) from None
    values = [(run.data.metrics.get(metric, math.nan), run.info.start_time, run.info.run_id) for run in runs]
    scored = [item for item in values if math.isfinite(item[0])]
    if not scored:
        names = sorted({name for run in runs for name in run.data.metrics})
        close = difflib.get_close_matches(metric, names, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"they have {', '.join(names[:8]) or 'no metrics'}"
        raise NanollmError(
            f"--best {metric}: none of the {len(runs)} run(s) with a model in experiment {experiment!r} "
            f"has that metric; {hint}"
        )
    # the best value; among equals, the newest run
    value, _, run_id = max(scored, key=lambda s: (s[0] if maximize else -s[0], s[1]))
    log.info("best run by %s (%s): %s with %s", metric, "highest" if maximize else "lowest", run_id, value)
    return run_id


def register_run(uri: str, run_id: str, *, name: str = REGISTERED_NAME, alias: str = "champion") -> Registered:
    """Register run `run_id`'s model as a new version of `name` in the Model Registry and point `alias` at it.

    Refused, with the fix, for a run that logged no model (tracking.log_model was false when
    evaluate ran). Registering the same model again makes another version of it.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = _store_client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise NanollmError(
            f"MLflow run {run_id} is not in {uri}; check the id (nanollm ui lists the runs) "
            "or point MLFLOW_TRACKING_URI at its store"
        ) from None
    except Exception as err:
        raise _unusable_store(uri, err) from None
    model = _run_models(client, run.info.experiment_id, run_id).get(run_id)
    if model is None:
        raise NanollmError(f"MLflow run {run_id} has no logged model; {_NO_MODEL_FIX}")
    try:
        with _fluent_store(uri):
            version = mlflow.register_model(f"models:/{model.model_id}", name).version
    except MlflowException as err:  # an invalid name, a registry that refuses
        raise NanollmError(f"registering run {run_id} as {name} failed: {_first_line(err)}") from None
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as err:  # an invalid alias (MLflow reserves `latest` and v<number>)
        client.delete_model_version(name, version)  # no version that nothing points at
        reason = _first_line(err)
        raise NanollmError(f"alias {alias!r} for {name} was refused ({reason}); pick another --alias") from None
    return Registered(name, str(version), alias, run_id, model.model_id)


def fetch_model(model_uri: str, tracking_uri: str, dst: Path) -> tuple[Path, Path]:
    """Download a model `evaluate` logged into `dst`; returns its (checkpoint folder, tokenizer folder).

    model_uri is any MLflow model URI: models:/nanollm@champion, models:/nanollm/3,
    runs:/<run id>/model or models:/<model id>. dst becomes the MLflow model folder (MLmodel,
    data/model/{checkpoint,tokenizer,sampling.json}), replaced whole once the download is complete;
    sampling.json holds the default params (max_tokens, temperature, top_k, top_p, seed). A URI
    that names nothing, or a model that is not a nanollm one, is a one-line NanollmError.
    """
    import shutil

    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from nanollm.atomic import atomic_path

    _store_client(tracking_uri)  # the same fast failure on an unreachable server as every other call
    try:
        with atomic_path(dst, directory=True) as tmp:
            download = tmp / ".download"  # runs:/ URIs land in a subfolder, models:/ ones do not: dst is the model
            local = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(download), tracking_uri=tracking_uri)
            for item in Path(local).iterdir():
                os.replace(item, tmp / item.name)
            shutil.rmtree(download)
            flavor = Model.load(tmp).flavors.get("python_function", {})
            if flavor.get("loader_module") != _LOADER_MODULE or "data" not in flavor:
                raise NanollmError(
                    f"{model_uri} is not a nanollm model (its pyfunc loader is not {_LOADER_MODULE}); "
                    "log one with tracking.log_model: true"
                )
            data = Path(dst) / flavor["data"]
    except MlflowException as err:
        raise NanollmError(
            f"{model_uri} cannot be fetched from {tracking_uri} ({_first_line(err)}); check the name and alias "
            f"(register one with `nanollm register --run-id ID --alias champion`)"
        ) from None
    return data / "checkpoint", data / "tokenizer"
