"""Test-wide settings: everything offline, no telemetry, no hub access."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# transformers copies a trust_remote_code model's code (export-hf's custom form) into this folder:
# a temporary one per session, not the user's ~/.cache/huggingface/modules
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="nanollm-tests-hf-modules-"))


def tool_env(**overrides: str) -> dict[str, str]:
    """Environment for the real tools a test runs as subprocesses (dvc, git, nanollm, torchrun).

    This interpreter's bin first on PATH (so `nanollm` and `dvc` are the tested ones), no
    MLflow or DVC variables leaking in from an outer run (a `dvc exp run` worker sets
    DVC_ROOT), offline and telemetry-free, and a git identity for the commits of temp repos.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "DVC_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        HF_HUB_OFFLINE="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    env.update(overrides)
    return env


# Entries of train_state.pt that are the wall clock's, not training's: the only ones a resumed run may differ in
# (each session's first step is an untimed warm-up, so a resumed run also times one step, and its tokens, fewer).
WALL_CLOCK = {"train_seconds", "window_seconds", "seconds", "timed_steps", "timed_tokens", "tokens_per_s", "mfu"}


def training_state_differences(a, b, path: str = "") -> list[str]:
    """Where two checkpoints' train_state.pt (or any nested state) differ, wall-clock entries aside; [] when equal."""
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a if k not in WALL_CLOCK for d in training_state_differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: {len(a)} != {len(b)} entries"]
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in training_state_differences(x, y, f"{path}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [path]
    return [] if type(a) is type(b) and a == b else [f"{path}: {a!r} != {b!r}"]


def assert_same_training(a: Path, b: Path) -> None:
    """Two checkpoint folders hold the same run: weights bitwise, and every entry of the training state but the
    wall clock's (optimizer, RNG streams, step, history) equal."""
    import torch

    wa, wb = (torch.load(folder / "model.pt", weights_only=True) for folder in (a, b))
    assert wa.keys() == wb.keys()
    assert not (different := [k for k in wa if not torch.equal(wa[k], wb[k])]), f"weights differ: {different}"
    sa, sb = (torch.load(folder / "train_state.pt", weights_only=True) for folder in (a, b))
    assert not (different := training_state_differences(sa, sb)), f"training state differs: {different[:10]}"


def tiny_tokens(folder: Path, train: list[list[int]], val: list[list[int]], vocab: int, eot: int,
                train_tokens: int = 7000, val_tokens: int = 1000) -> Path:  # fmt: skip
    """folder/data/tokens as the tokenize stage writes it, from documents of token ids (made-up digests)."""
    from nanollm.data.tokens import write_tokens

    write_tokens(
        folder / "data" / "tokens",
        {"train": [(train, train_tokens)], "val": [(val, val_tokens)]},
        vocab_size=vocab,
        eot_id=eot,
        tokenizer_sha256="a" * 64,
        corpus_sha256="c" * 64,
        progress=False,
    )
    return folder / "data" / "tokens"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    """Poll `url` until it answers; fail with the end of `log` if `process` exits or `seconds` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:  # URLError included
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)


def stop_process_group(process: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM to the session `process` leads (started with start_new_session=True), SIGKILL after `grace_s`."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables made (~3 s of migrations, paid once per module); copy it per test."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path
