"""Checkpoint folders: write them atomically, read them back without unpickling code, decide on resuming.

A checkpoint is a folder: config.json (architecture, vocab size, step, tokens seen, data
and tokenizer hashes, the run's fingerprint), architecture.json (the architecture and vocab
size alone), model.pt (state_dict) and train_state.pt (optimizer state, step, RNG states,
progress). Which MLflow run a checkpoint belongs to is nanollm.tracking's record, not this folder's.
What goes into train_state is the training loop's business; this module only stores and
loads it, and says whether a folder was written by the same run (`fingerprint`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from nanollm.config import Config, ConfigError, ModelConfig, TrainConfig, flatten
from nanollm.errors import NanollmError, first_line, read_json_object
from nanollm.model import Transformer

log = logging.getLogger(__name__)

CONFIG_FILE, MODEL_FILE, TRAIN_STATE_FILE = "config.json", "model.pt", "train_state.pt"
# The architecture alone (model config and vocab size): it changes only when the network's shape
# does, so a stage that measures the architecture (bench_kvcache) depends on it, not on the weights.
ARCHITECTURE_FILE = "architecture.json"
_REDO = "re-run `dvc repro pretrain`"
# train keys that change no weight: how often to log, evaluate and save, where to compute (the
# resolved dtype is fingerprinted instead), whether to recompute activations (bitwise the same).
# A checkpoint stays resumable across an edit of these, e.g. to fit a run into less memory.
NEUTRAL_KEYS = ("log_interval", "eval_interval", "checkpoint_interval", "device", "activation_checkpointing")
# The modules whose code decides the weights a run ends with: the model, the loop and everything
# they import (config.py decides hidden sizes, hardware.py the dtype); their source is part of
# the fingerprint. tests/test_code_deps.py derives the list from the imports and fails on a gap.
TRAINING_CODE = ("__init__.py", "config.py", "errors.py", "hardware.py", "model", "private.py", "training")


def save_checkpoint(
    out_dir: str | Path,
    model: Transformer,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    train_state: dict[str, Any],
    info: dict[str, Any],
) -> Path:
    """Write the checkpoint folder at out_dir, replacing any previous one only once complete.

    train_state must hold "step" and "tokens_seen" (both also copied into config.json) and
    may hold anything torch.load(weights_only=True) can read back: tensors, numbers,
    strings, lists, dicts. info adds keys to config.json (tokenizer_sha256,
    corpus_sha256).
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
    architecture = {"model": config["model"], "vocab_size": config["vocab_size"]}
    with _FolderSwap(Path(out_dir)) as tmp:
        _write(tmp / CONFIG_FILE, lambda f: f.write(json.dumps(config, indent=2).encode() + b"\n"))
        _write(tmp / ARCHITECTURE_FILE, lambda f: f.write(json.dumps(architecture, indent=2).encode() + b"\n"))
        _write(tmp / MODEL_FILE, lambda f: torch.save(model.state_dict(), f))
        _write(tmp / TRAIN_STATE_FILE, lambda f: torch.save(state, f))
    log.info("saved checkpoint to %s (step %d)", out_dir, config["step"])
    return Path(out_dir)


def _write(path: Path, fill: Callable[[BinaryIO], object]) -> None:
    """Write a file through `fill(f)` and fsync it, so a power cut cannot leave a renamed but empty file."""
    with open(path, "wb") as f:
        fill(f)
        f.flush()
        os.fsync(f.fileno())


def backup_path(out_dir: Path) -> Path:
    """Where the previous checkpoint sits for the instant between two renames of a save."""
    return out_dir.with_name(f".{out_dir.name}.previous")


class _FolderSwap:
    """Build a folder next to `target`, then swap it in; a previous checkpoint is readable at every instant.

    A folder cannot be renamed over a non-empty one, so the swap is two renames: target ->
    backup, new -> target, then the backup is deleted. A kill between the renames leaves the
    complete previous checkpoint in the backup, which `find_resumable` falls back to. Temporary
    folders of saves killed earlier are deleted first (they may hold GBs).
    """

    def __init__(self, target: Path):
        self.target, self.backup = target, backup_path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.target.parent.glob(f".{self.target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes 0700; outputs get what mkdir would give
        return self.tmp

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.target.exists():
            if self.backup.exists():
                shutil.rmtree(self.backup)
            os.replace(self.target, self.backup)
        os.replace(self.tmp, self.target)
        shutil.rmtree(self.backup, ignore_errors=True)
        _fsync_dir(self.target.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every OS (Windows); the renames are still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- resuming


def fingerprint(
    seed: int, model: ModelConfig, train: TrainConfig, tokens_meta: dict[str, Any], dtype: str
) -> dict[str, Any]:
    """What decides the weights a run ends with: params, token files, compute dtype and training code.

    A checkpoint is resumed only if its fingerprint equals the current one, so a resumed run
    ends bitwise where an uninterrupted one would (on the same machine and torch build). Not in
    it: NEUTRAL_KEYS and the number of processes (a resume after changing the device or the
    number of processes continues the same run up to float rounding).
    """
    train_keys = {k: v for k, v in dataclasses.asdict(train).items() if k not in NEUTRAL_KEYS}
    return {
        "seed": seed,
        "model": dataclasses.asdict(model),
        "train": train_keys,
        "dtype": dtype,
        "tokens": {k: v for k, v in tokens_meta.items() if k != "path"},
        "code": code_digest(),
    }


def code_digest() -> str:
    """sha256 over the source of TRAINING_CODE, so a changed model or loop never resumes an old run."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in TRAINING_CODE:
        path = root / name
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            if file.is_file():
                digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def find_resumable(out_dir: str | Path, wanted: dict[str, Any]) -> Path | None:
    """The checkpoint folder to resume from (out_dir, or its backup after a killed save), or None.

    None when there is nothing to resume or it was written under another fingerprint; either
    way one log line says why training starts from step 0.
    """
    out_dir = Path(out_dir)
    folder = next((d for d in (out_dir, backup_path(out_dir)) if (d / CONFIG_FILE).is_file()), None)
    if folder is None:
        log.info("no checkpoint in %s: training from step 0", out_dir)
        return None
    try:
        info = read_checkpoint_info(folder)
    except NanollmError as err:
        log.warning("cannot resume (%s): training from step 0; the checkpoint will be replaced", err)
        return None
    if not info.get("fingerprint"):
        log.warning("%s has no run fingerprint (an older nanollm wrote it): training from step 0", folder)
        return None
    diff = _differences(info["fingerprint"], wanted)
    if diff:
        log.warning(
            "%s (step %s) was written under other settings (%s): training from step 0; it will be replaced",
            folder, info.get("step"), diff,
        )  # fmt: skip
        return None
    log.info("resuming from %s (step %d)", folder, info["step"])
    return folder


def _differences(have: dict[str, Any], wanted: dict[str, Any], limit: int = 3) -> str:
    """The first `limit` differing keys of two fingerprints, as "key: old -> new"; "" if equal."""
    old, new = flatten(json.loads(json.dumps(have))), flatten(json.loads(json.dumps(wanted)))
    keys = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    shown = []
    for key in keys[:limit]:
        before, after = old.get(key, "absent"), new.get(key, "absent")
        if key == "code":
            before, after = str(before)[:12], str(after)[:12]
        shown.append(f"{key}: {before} -> {after}")
    return "; ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_for_resume(folder: str | Path) -> dict[str, Any]:
    """{"model": state_dict, "state": train_state} of a checkpoint folder, on the CPU."""
    folder = Path(folder)
    return {"model": _load_tensors(folder / MODEL_FILE, map_location="cpu"), "state": load_train_state(folder)}


def resumable_state(out_dir: str | Path, wanted: dict[str, Any]) -> dict[str, Any] | None:
    """load_for_resume of the folder find_resumable picks; None (and one log line) if none or unreadable.

    An unreadable checkpoint is not an error here: the folder persists across `dvc repro`, so
    failing would fail every later run too; training starts afresh and replaces it instead.
    """
    folder = find_resumable(out_dir, wanted)
    if folder is None:
        return None
    try:
        return load_for_resume(folder)
    except NanollmError as err:
        log.warning("cannot resume (%s): training from step 0; the checkpoint will be replaced", err)
        return None


def read_checkpoint_info(ckpt_dir: str | Path) -> dict[str, Any]:
    """The parsed config.json of a checkpoint folder."""
    info = read_json_object(Path(ckpt_dir) / CONFIG_FILE, _REDO)
    for key in ("model", "vocab_size"):
        if key not in info:
            raise NanollmError(f"{Path(ckpt_dir) / CONFIG_FILE} has no {key!r} key; {_REDO}")
    return info


def check_tokenizer(
    ckpt_dir: str | Path, info: dict[str, Any], tok: Any, *, fix: str = "pass the matching tokenizer"
) -> None:
    """Refuse, in one line ending in `fix`, a tokenizer the checkpoint was not trained with.

    info is the checkpoint's config.json; tok anything with `sha256`, `vocab_size` and `path`
    (a nanollm Tokenizer). A checkpoint that recorded no tokenizer (an imported one) accepts any
    tokenizer whose ids fit its embedding.
    """
    trained_with = info.get("tokenizer_sha256")
    if trained_with is not None and trained_with != tok.sha256:
        raise NanollmError(
            f"{ckpt_dir} was trained with tokenizer sha256 {str(trained_with)[:12]}, but {tok.path} is "
            f"{tok.sha256[:12]}; {fix}"
        )
    if tok.vocab_size > int(info["vocab_size"]):
        raise NanollmError(f"{tok.path} has {tok.vocab_size} tokens but {ckpt_dir} only {info['vocab_size']}; {fix}")


def model_config(info: dict[str, Any], source: str | Path = CONFIG_FILE) -> ModelConfig:
    """The validated ModelConfig stored in a checkpoint's config.json (it wins over params.yaml)."""
    try:
        return Config.from_dict({"model": info["model"]}).model
    except ConfigError as err:
        raise NanollmError(f"{source}: invalid architecture ({err}); {_REDO}") from None


def load_architecture(path: str | Path) -> tuple[ModelConfig, int]:
    """(ModelConfig, vocab size) from a checkpoint's architecture.json: the network's shape, no weights."""
    info = read_json_object(path, _REDO)
    if "model" not in info or not isinstance(info.get("vocab_size"), int):
        raise NanollmError(f"{path} lacks 'model' or an integer 'vocab_size'; {_REDO}")
    return model_config(info, path), info["vocab_size"]


def architecture_model(path: str | Path, *, seed: int, device: str | torch.device = "cpu") -> Transformer:
    """The network architecture.json describes, with seeded random weights, in eval mode: to measure the shape.

    zero_init_proj is dropped: it only decides where training starts, and zero projections
    would leave every block an identity, so checks on this model would see none of them.
    """
    cfg, vocab_size = load_architecture(path)
    return seeded_model(dataclasses.replace(cfg, zero_init_proj=False), vocab_size, seed=seed, device=device)


def seeded_model(cfg: ModelConfig, vocab_size: int, *, seed: int, device: str | torch.device = "cpu") -> Transformer:
    """A Transformer of this shape with the weights `seed` draws, in eval mode: the same seed, the same weights."""
    torch.manual_seed(seed)
    return Transformer(cfg, vocab_size).to(device).eval()


def load_model(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """Rebuild the Transformer described by config.json, load model.pt, return it in eval mode."""
    ckpt_dir = Path(ckpt_dir)
    info = read_checkpoint_info(ckpt_dir)
    model = Transformer(model_config(info, ckpt_dir / CONFIG_FILE), int(info["vocab_size"]))
    state = _load_tensors(ckpt_dir / MODEL_FILE, map_location="cpu")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise NanollmError(
            f"{ckpt_dir / MODEL_FILE} does not match {CONFIG_FILE} ({first_line(err)}); {_REDO}"
        ) from None
    return model.to(device).eval()


def architecture_differences(trained: ModelConfig, wanted: ModelConfig, source: str | Path) -> list[str]:
    """Keys where params.yaml's model section differs from the one a checkpoint records; logs one warning.

    The checkpoint's architecture always wins (it is what the weights fit); a difference means
    the checkpoint is stale for the current params, which `dvc repro` would fix by retraining.
    """
    have = dataclasses.asdict(trained)
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
        reason = first_line(err).split(". ")[0]
    return reason[:160]
