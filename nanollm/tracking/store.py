"""Where the runs live: the tracking URI, the project's store and its artifacts, and the experiments' views.

Owns the choice of store (MLFLOW_TRACKING_URI, tracking.uri, else `mlflow.db` at the project
root), its artifact folder, the fast failure on an unreachable server or database, the one-line error
(password hidden) for an unusable store, and the two experiments (models, tokenizers) with the
runs-table view each opens with. What is logged into a run is runs.py's; models and the registry are models.py's.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanollm.config import TrackingConfig
from nanollm.errors import NanollmError, first_line

log = logging.getLogger(__name__)


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
    if artifact_root is not None:
        _check_artifact_location(found, artifact_root, client.tracking_uri)
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


def _check_artifact_location(experiment: Any, artifact_root: Path, uri: str) -> None:
    """Warn, in one line, when the experiment keeps its artifacts outside this project's artifact folder.

    A sqlite store records each experiment's artifact folder as an absolute path. A copied or
    moved project carries that mlflow.db along, and its models and charts would go on landing in
    the ORIGINAL folder's mlartifacts/ (or in a folder that no longer exists).
    """
    import urllib.parse

    location = urllib.parse.urlparse(experiment.artifact_location or "")
    if location.scheme not in ("", "file"):
        return  # an object store or a server's proxied artifacts: the project folder plays no part
    where = Path(urllib.parse.unquote(location.path)).resolve()
    ours = Path(artifact_root).resolve()
    if where != ours and ours not in where.parents:
        log.warning(
            "MLflow experiment %s in %s keeps its artifacts in %s, outside this project's %s (was the project "
            "copied or moved?): models and charts go there; move mlflow.db and mlartifacts/ aside for a fresh "
            "store, or set tracking.uri",
            experiment.name, uri, where, ours,
        )  # fmt: skip


def without_password(uri: str, text: str | None = None) -> str:
    """`text` (default: `uri` itself) with the password of `uri`, if it has one, shown as ***.

    A database URI (postgresql+psycopg2://user:PASSWORD@host/db) carries its password; messages and
    logs name the store, and a terminal, a CI log or an issue is no place for that password.
    """
    import urllib.parse

    text = uri if text is None else text
    password = urllib.parse.urlsplit(uri).password
    if not password:
        return text
    for shown in {password, urllib.parse.unquote(password)}:
        text = text.replace(f":{shown}@", ":***@")
        if len(shown) >= 6:  # quoted in another library's message; a shorter one would mask ordinary words
            text = text.replace(shown, "***")
    return text


def unusable_store(uri: str, err: Exception) -> NanollmError:
    """A one-line NanollmError for a store that failed (a bad URI, a database MLflow cannot use), password hidden."""
    if isinstance(err, NanollmError):
        return NanollmError(without_password(uri, str(err)))
    return NanollmError(
        without_password(
            uri,
            f"MLflow store {uri} is unusable ({first_line(err)}); "
            "fix MLFLOW_TRACKING_URI/tracking.uri or set tracking.enabled: false",
        )
    )


def probe_server(uri: str, timeout_s: float = 5.0) -> None:
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


def probe_database(uri: str) -> None:
    """Fail fast on a database that refuses the connection (MLflow's own store retries it for ~100 s)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri)
    try:
        engine.connect().close()
    except Exception as err:  # sqlalchemy's OperationalError (bad password, no server), a missing driver
        raise NanollmError(
            without_password(
                uri,
                f"MLflow database {uri} refuses the connection ({first_line(err)}); fix the user, password, host "
                "or database in MLFLOW_TRACKING_URI/tracking.uri, or set tracking.enabled: false",
            )
        ) from None
    finally:
        engine.dispose()


def probe_store(uri: str) -> None:
    """Fail fast on a tracking server or database that cannot be used; a sqlite file or folder needs no probe."""
    if uri.startswith(("http://", "https://")):
        probe_server(uri)
    elif uri.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "mysql", "mssql"):
        probe_database(uri)


def artifact_folder(uri: str, root: Path) -> Path | None:
    """The project's mlartifacts/ for a sqlite store; a server or database keeps its own."""
    return Path(root) / "mlartifacts" if uri.startswith("sqlite:") else None


def store_client(uri: str) -> Any:
    """An MlflowClient on `uri` (tracking store and Model Registry), failing fast on an unreachable server."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    probe_store(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)
