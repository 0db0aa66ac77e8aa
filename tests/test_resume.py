"""Survival for real: `nanollm pretrain` and `dvc repro` killed mid-training, then run again.

Each run is a separate `nanollm pretrain` process on tiny memmaps (one thread, so CPU
arithmetic is bitwise repeatable). A run killed with SIGKILL or stopped with SIGTERM, then
re-run, must end with the very tensors of a run never interrupted: weights, optimizer state, RNG
streams and history, every entry of the saved state but the wall clock's.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import assert_same_training, tiny_tokens, tool_env

ROOT = Path(__file__).resolve().parents[1]
NANOLLM = str(Path(sys.executable).parent / "nanollm")
VOCAB, EOT = 64, 63
STEPS = 40
PARAMS = {
    "seed": 11,
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32},
    "train": {
        "batch_size": 8,
        "max_steps": STEPS,
        "warmup_steps": 5,
        "lr": 1e-2,
        "min_lr": 1e-3,
        "log_interval": 6,  # not a divisor of checkpoint_interval: a resume must carry the log window over
        "eval_interval": 15,
        "eval_batches": 2,
        "checkpoint_interval": 4,
        "device": "cpu",
        "dtype": "float32",
    },
    "tracking": {"enabled": False},
}


def _env() -> dict[str, str]:
    return tool_env(OMP_NUM_THREADS="1")  # bitwise repeatable CPU arithmetic, and fair on a 2-core machine


def _project(path: Path) -> Path:
    """A folder with params.yaml and the data/tokens pretrain reads."""
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, EOT, 300)  # a repeated "document": learnable, so the weights move for real
    docs = [pattern[i : i + 60].tolist() for i in range(0, 240, 20)] * 8
    tiny_tokens(path, docs, docs[:10], VOCAB, EOT, train_tokens=10_000)
    (path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    return path


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        args, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _finish(proc: subprocess.Popen, expect: int = 0) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == expect, f"exit {proc.returncode}:\n{out[-4000:]}"
    return out


def _checkpoint_step(folder: Path) -> int:
    try:
        return json.loads((folder / "config.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


def _wait_for_checkpoint(proc: subprocess.Popen, folder: Path, timeout: float = 120.0) -> int:
    """Poll until the run has written a checkpoint short of the end; the step it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step = _checkpoint_step(folder)
        if 0 < step < STEPS:
            return step
        assert proc.poll() is None, f"the run ended before it could be interrupted:\n{proc.communicate()[0][-3000:]}"
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


def _dvc_project(path: Path) -> Path:
    """The shipped pretrain stage (persist: true) alone in a tiny git + DVC repo."""
    project = _project(path)
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["pretrain"]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"pretrain": stage}}))
    for name in ("nanollm", "stages"):  # code deps of the stage; the installed package is what runs
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    for args in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(args, cwd=project, env=_env(), check=True, capture_output=True)
    return project


PRETRAIN = [NANOLLM, "pretrain"]
REPRO = [sys.executable, "-m", "dvc", "repro"]
# how each interrupted run is started, stopped and started again
CASES = {"kill": (PRETRAIN, signal.SIGKILL), "term": (PRETRAIN, signal.SIGTERM), "dvc": (REPRO, signal.SIGKILL)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Every run of this module at once, 2 cores being shared: a reference left alone, and one run per CASES
    entry stopped by its signal once it has a checkpoint short of the end, then started again.

    Per case: project, the step seen before the signal, the exit status and output of the stopped
    run, the output of the second run.
    """
    reference = _project(tmp_path_factory.mktemp("reference"))
    procs = {"reference": _start(PRETRAIN, reference)}
    found: dict[str, dict] = {}
    for name, (args, _) in CASES.items():
        project = (_dvc_project if args is REPRO else _project)(tmp_path_factory.mktemp(name))
        found[name] = {"project": project}
        procs[name] = _start(args, project)
    for name, (_, sig) in CASES.items():
        case, proc = found[name], procs[name]
        case["seen"] = _wait_for_checkpoint(proc, case["project"] / "models" / "checkpoint")
        os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
        case["output"] = proc.communicate(timeout=300)[0]
        case["returncode"] = proc.returncode
        case["after"] = _checkpoint_step(case["project"] / "models" / "checkpoint")
        case["metrics_written"] = (case["project"] / "metrics" / "pretrain.json").exists()
        procs[name] = _start(CASES[name][0], case["project"])
    found["reference"] = {"project": reference, "output": _finish(procs.pop("reference"))}
    for name, proc in procs.items():
        found[name]["rerun"] = _finish(proc)
    return found


def _resumed_step(output: str) -> int:
    return int(re.search(r"resuming after step (\d+) of", output).group(1))


def _final(case: dict) -> Path:
    return case["project"] / "models" / "checkpoint"


def test_kill_9_then_rerun_ends_bitwise_identical(runs):
    case, reference = runs["kill"], runs["reference"]["project"]
    assert case["returncode"] == -signal.SIGKILL and not case["metrics_written"]
    assert case["seen"] <= case["after"] < STEPS
    assert _resumed_step(case["rerun"]) == case["after"]
    assert _checkpoint_step(_final(case)) == STEPS
    assert_same_training(_final(case), reference / "models" / "checkpoint")
    # the curves cover the whole run, as if never interrupted
    for name in ("train_curve.csv", "val_curve.csv"):
        assert (case["project"] / "reports" / name).read_text() == (reference / "reports" / name).read_text()


def test_sigterm_saves_a_checkpoint_and_exits_nonzero(runs):
    case, reference = runs["term"], runs["reference"]["project"]
    assert case["returncode"] == 128 + signal.SIGTERM, case["output"][-3000:]
    line = next(x for x in case["output"].splitlines() if x.startswith("Error:"))
    stopped_at = int(line.split("after step ")[1].split(";")[0])
    assert "stopped by SIGTERM" in line and "Traceback" not in case["output"]
    assert case["after"] == stopped_at < STEPS  # saved at the step it stopped at, not only at an interval
    assert not case["metrics_written"]  # nothing DVC could take for a finished stage
    assert "resuming from models/checkpoint (step" in case["rerun"] and _resumed_step(case["rerun"]) == stopped_at
    assert_same_training(_final(case), reference / "models" / "checkpoint")


@pytest.mark.slow
def test_dvc_repro_resumes_after_kill_9(runs):
    case, reference = runs["dvc"], runs["reference"]["project"]
    assert case["returncode"] == -signal.SIGKILL and case["after"] < STEPS
    assert _resumed_step(case["rerun"]) == case["after"] > 0, case["rerun"][-3000:]
    assert _checkpoint_step(_final(case)) == STEPS
    assert_same_training(_final(case), reference / "models" / "checkpoint")
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status"], cwd=case["project"], env=_env(), capture_output=True, text=True
    )
    assert "up to date" in status.stdout, status.stdout
