"""The trained model as an MLflow model: logged with nanollm's own code, registered under an alias, fetched back.

Owns the pyfunc model evaluate logs (`log_model`: weights, architecture, tokenizer, default
sampling, and a copy of the nanollm package as the model's code, so it loads where nanollm is
not installed and its requirements name no package an index could answer with a stranger's
code), the Model Registry (`best_run`, `register_run`) and the download a server starts from
(`fetch_model`). nanollm.inference.pyfunc, which imports no mlflow, is what loads the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanollm.config import EvalConfig
from nanollm.errors import NanollmError, first_line
from nanollm.tracking.runs import NullTracker
from nanollm.tracking.store import store_client, unusable_store, without_password

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- the model in MLflow

MODEL_NAME = "model"  # the LoggedModel's name under its run: runs:/<run id>/model
REGISTERED_NAME = "nanollm"  # the Model Registry entry `nanollm register` adds versions to
# The module MLflow imports to load a logged model (it calls its _load_pyfunc(data folder)). Named, not
# imported: what it loads (model, tokenizer, sampling) is no code of the stages that import this module.
# The folder it reads: checkpoint/, tokenizer/ and sampling.json, the names it gives them.
_LOADER_MODULE = "nanollm.inference.pyfunc"
# The checkpoint files a served model needs: the architecture and the weights. train_state.pt (the
# optimizer's moments, twice the weights again) stays behind.
_SERVED_CHECKPOINT_FILES = ("config.json", "architecture.json", "model.pt")
_NO_MODEL_FIX = "set tracking.log_model: true in params.yaml and re-run evaluate (dvc repro -f evaluate)"
# What the logged model installs: the third-party packages the loader's code imports (torch, numpy,
# tiktoken, regex, tqdm: nanollm.inference.pyfunc and what it imports) and those MLflow's pyfunc needs
# to call it (mlflow, pandas), each pinned to the version that logged it. Never nanollm: an unrelated
# project of that name is on the public index, and `nanollm==0.1.0` would install its code. Ours
# travels inside the model (`code/nanollm`). tests/test_model_logging.py checks the list against
# the modules a load and a prediction really import.
SERVING_PACKAGES = ("torch", "numpy", "tiktoken", "regex", "tqdm", "mlflow", "pandas")


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


def pip_requirements() -> list[str]:
    """SERVING_PACKAGES pinned to the installed versions; given, so that mlflow infers nothing (no network)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in SERVING_PACKAGES:
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")  # torch 2.x+cpu is torch 2.x on PyPI
        except PackageNotFoundError:
            raise NanollmError(
                f"{package} is not installed, and a logged model needs it; pip install {package}"
            ) from None
    return pins


def _stage_package(dst: Path) -> Path:
    """A clean copy of the nanollm package (sources and package data, no caches) at dst/nanollm: the model's code."""
    import shutil

    import nanollm

    source = Path(nanollm.__file__).resolve().parent
    target = dst / "nanollm"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    return target


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


def log_model(
    tracker: NullTracker, checkpoint_dir: Path, tokenizer_file: Path, *, sampling: EvalConfig, seed: int
) -> str | None:
    """Log the checkpoint (weights, architecture) and its tokenizer.json as the model `model` of the tracker's run.

    A pyfunc that nanollm.inference.pyfunc loads: `mlflow.pyfunc.load_model("runs:/<run id>/model")`
    and `mlflow models serve` complete a `prompt` column; its params (max_tokens, temperature,
    top_k, top_p, seed) default to `sampling` and `seed`, the settings that wrote the eval samples.
    `nanollm register` then adds it to the Model Registry. Returns the model id; None when tracking
    is off or the store failed (a warning says so, as for every other thing a run logs).
    """
    if tracker.run_id is None or getattr(tracker, "lost", False):
        return None
    defaults = serving_defaults(sampling, seed)
    try:
        return _log_pyfunc(tracker.run_id, tracker.uri, Path(checkpoint_dir), Path(tokenizer_file), defaults)
    except NanollmError:
        raise
    except Exception as err:
        log.warning("logging the model to MLflow run %s failed (%s); the metrics files are still written",
                    tracker.run_id, first_line(err, 200))  # fmt: skip
        return None


def _log_pyfunc(run_id: str, uri: str, checkpoint_dir: Path, tokenizer_file: Path, defaults: Mapping[str, Any]) -> str:
    """Log the checkpoint and tokenizer as the pyfunc model `model` of run `run_id`; returns its model id."""
    import tempfile
    import time

    import mlflow
    import pandas as pd

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nanollm-model-") as staging:
        folder = Path(staging) / MODEL_NAME  # becomes the model's data/model
        (folder / "checkpoint").mkdir(parents=True)
        (folder / "tokenizer").mkdir()
        for name in _SERVED_CHECKPOINT_FILES:
            _link_or_copy(checkpoint_dir / name, folder / "checkpoint" / name)
        _link_or_copy(tokenizer_file, folder / "tokenizer" / tokenizer_file.name)
        (folder / "sampling.json").write_text(json.dumps(dict(defaults), indent=2) + "\n", encoding="utf-8")
        code = _stage_package(Path(staging) / "code")  # becomes the model's code/nanollm, first on sys.path at load
        size = sum(f.stat().st_size for f in Path(staging).rglob("*") if f.is_file())
        # logging runs the example once through the loaded model: a check that costs a model load and 8 tokens
        example = (pd.DataFrame({"prompt": ["def "]}), {"max_tokens": 8})
        with _fluent_store(uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                loader_module=_LOADER_MODULE,
                data_path=str(folder),
                signature=_signature(defaults),
                input_example=example,
                pip_requirements=pip_requirements(),
                code_paths=[str(code)],
            )
    log.info(
        "logged model %s (%s) under run %s: %.1f MB of weights, tokenizer and code in %.1f s",
        info.model_id, info.model_uri, run_id, size / 1e6, time.perf_counter() - start,
    )  # fmt: skip
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

    client = store_client(uri)
    try:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise NanollmError(f"MLflow experiment {experiment!r} is not in {uri}; check tracking.experiment")
        with_model = _run_models(client, found.experiment_id)
        if not with_model:
            raise NanollmError(f"no run in MLflow experiment {experiment!r} has a logged model; {_NO_MODEL_FIX}")
        runs = [client.get_run(run_id) for run_id in with_model]
    except Exception as err:
        raise unusable_store(uri, err) from None
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

    client = store_client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise NanollmError(
            f"MLflow run {run_id} is not in {uri}; check the id (nanollm ui lists the runs) "
            "or point MLFLOW_TRACKING_URI at its store"
        ) from None
    except Exception as err:
        raise unusable_store(uri, err) from None
    model = _run_models(client, run.info.experiment_id, run_id).get(run_id)
    if model is None:
        raise NanollmError(f"MLflow run {run_id} has no logged model; {_NO_MODEL_FIX}")
    try:
        with _fluent_store(uri):
            version = mlflow.register_model(f"models:/{model.model_id}", name).version
    except MlflowException as err:  # an invalid name, a registry that refuses
        raise NanollmError(f"registering run {run_id} as {name} failed: {first_line(err)}") from None
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as err:  # an invalid alias (MLflow reserves `latest` and v<number>)
        client.delete_model_version(name, version)  # no version that nothing points at
        reason = first_line(err)
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

    store_client(tracking_uri)  # the same fast failure on an unreachable server as every other call
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
            f"{model_uri} cannot be fetched from {without_password(tracking_uri)} ({first_line(err)}); "
            "check the name and alias "
            f"(register one with `nanollm register --run-id ID --alias champion`)"
        ) from None
    return data / "checkpoint", data / "tokenizer"
