"""Checkpoint folders: write them atomically, read them back without unpickling code.

A checkpoint is a folder: config.json (architecture, vocab size, step, tokens seen, data
and tokenizer hashes), model.pt (state_dict), train_state.pt (optimizer state, step, RNG
states) and run.json (the MLflow run id and store). What goes into train_state is the
training loop's business; this module only stores and loads it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from nanollm.atomic import atomic_path
from nanollm.config import Config, ConfigError, ModelConfig
from nanollm.errors import NanollmError
from nanollm.model import Transformer

log = logging.getLogger(__name__)

CONFIG_FILE, MODEL_FILE, TRAIN_STATE_FILE, RUN_FILE = "config.json", "model.pt", "train_state.pt", "run.json"
_REDO = "re-run `dvc repro pretrain`"


def save_checkpoint(
    out_dir: str | Path,
    model: Transformer,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    train_state: dict[str, Any],
    info: dict[str, Any],
    run: dict[str, Any],
) -> Path:
    """Write the checkpoint folder at out_dir, replacing any previous one only once complete.

    train_state must hold "step" and "tokens_seen" (both also copied into config.json) and
    may hold anything torch.load(weights_only=True) can read back: tensors, numbers,
    strings, lists, dicts. info adds keys to config.json (tokenizer_sha256,
    corpus_sha256); run is {"run_id", "tracking_uri"}, either None when tracking is off.
    """
    config = {
        "model": dataclasses.asdict(model.cfg),
        "vocab_size": model.vocab_size,
        "step": int(train_state["step"]),
        "tokens_seen": int(train_state["tokens_seen"]),
        **info,
    }
    state = dict(train_state)
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    with atomic_path(out_dir, directory=True) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        torch.save(model.state_dict(), tmp / MODEL_FILE)
        torch.save(state, tmp / TRAIN_STATE_FILE)
        run_record = {"run_id": run.get("run_id"), "tracking_uri": run.get("tracking_uri")}
        (tmp / RUN_FILE).write_text(json.dumps(run_record, indent=2) + "\n", encoding="utf-8")
    log.info("saved checkpoint to %s (step %d)", out_dir, config["step"])
    return Path(out_dir)


def read_checkpoint_info(ckpt_dir: str | Path) -> dict[str, Any]:
    """The parsed config.json of a checkpoint folder."""
    info = _read_json(Path(ckpt_dir) / CONFIG_FILE)
    for key in ("model", "vocab_size"):
        if key not in info:
            raise NanollmError(f"{Path(ckpt_dir) / CONFIG_FILE} has no {key!r} key; {_REDO}")
    return info


def read_run(ckpt_dir: str | Path) -> dict[str, Any]:
    """run.json: {"run_id": str | None, "tracking_uri": str | None}."""
    run = _read_json(Path(ckpt_dir) / RUN_FILE)
    return {"run_id": run.get("run_id"), "tracking_uri": run.get("tracking_uri")}


def read_run_id(ckpt_dir: str | Path) -> str | None:
    """The MLflow run id recorded by pretrain, or None when tracking was off."""
    return read_run(ckpt_dir)["run_id"]


def model_config(info: dict[str, Any], source: str | Path = CONFIG_FILE) -> ModelConfig:
    """The validated ModelConfig stored in a checkpoint's config.json (it wins over params.yaml)."""
    try:
        return Config.from_dict({"model": info["model"]}).model
    except ConfigError as err:
        raise NanollmError(f"{source}: invalid architecture ({err}); {_REDO}") from None


def load_model(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """Rebuild the Transformer described by config.json, load model.pt, return it in eval mode."""
    ckpt_dir = Path(ckpt_dir)
    info = read_checkpoint_info(ckpt_dir)
    model = Transformer(model_config(info, ckpt_dir / CONFIG_FILE), int(info["vocab_size"]))
    state = _load_tensors(ckpt_dir / MODEL_FILE, map_location="cpu")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0]
        raise NanollmError(f"{ckpt_dir / MODEL_FILE} does not match {CONFIG_FILE} ({first}); {_REDO}") from None
    return model.to(device).eval()


def architecture_differences(model: Transformer, wanted: ModelConfig, source: str | Path) -> list[str]:
    """Keys where params.yaml's model section differs from a loaded checkpoint's; logs one warning.

    The checkpoint's architecture always wins (it is what the weights fit); a difference means
    the checkpoint is stale for the current params, which `dvc repro` would fix by retraining.
    """
    have = dataclasses.asdict(model.cfg)
    diff = [
        f"model.{k}: {have[k]!r} in checkpoint, {v!r} in params"
        for k, v in dataclasses.asdict(wanted).items()
        if have[k] != v
    ]
    if diff:
        log.warning("%s was trained with another architecture (%s); using the checkpoint's", source, "; ".join(diff))
    return diff


def load_train_state(ckpt_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """train_state.pt: step, tokens_seen, RNG states and (if saved) "optimizer"."""
    return _load_tensors(Path(ckpt_dir) / TRAIN_STATE_FILE, map_location=map_location)


def _load_tensors(path: Path, map_location: str | torch.device) -> Any:
    """torch.load with weights_only=True: a file that carries pickled code is refused, not run."""
    if not path.is_file():
        raise NanollmError(f"{path} is missing; {_REDO}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError here
        raise NanollmError(
            f"{path} is corrupt or holds more than tensors ({_load_error(err)}); it was not loaded; {_REDO}"
        ) from None


def _load_error(err: Exception) -> str:
    """The useful part of torch.load's multi-paragraph error: what the weights-only unpickler refused."""
    text = str(err)
    found = re.search(r"WeightsUnpickler error: ([^.\n]*)", text)
    reason = found.group(1).strip() if found else ""
    if not reason:
        reason = (text.strip().splitlines() or [type(err).__name__])[0].split(". ")[0]
    return reason[:160]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NanollmError(f"{path} is missing; {_REDO}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NanollmError(f"{path} is unreadable ({err}); {_REDO}") from None
    if not isinstance(data, dict):
        raise NanollmError(f"{path} must hold a JSON object; {_REDO}")
    return data
