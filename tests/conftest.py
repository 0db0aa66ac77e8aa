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
