"""Faults a long pipeline meets: a full disk, a killed stage. Each leaves no partial output."""

import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _nanollm(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    return subprocess.Popen(
        [sys.executable, "-c", "from stages.cli import main; main()", *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )  # fmt: skip


def _complete_run(stage: str, cwd: Path) -> float:
    """Run `nanollm <stage>` to success; the seconds it took."""
    started = time.monotonic()
    done = _nanollm([stage], cwd)
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-2000:]
    return time.monotonic() - started


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """A project folder with a downloaded stdlib slice and a trained tokenizer; how long each stage took."""
    project = tmp_path_factory.mktemp("faults")
    params = {"data": {"max_bytes": 1_500_000, "val_fraction": 0.1}, "tokenizer": {"vocab_size": 400}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    return project, {stage: _complete_run(stage, project) for stage in ("download", "train_tokenizer")}


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_disk_full_while_tokenizing_is_one_line_and_leaves_no_memmap(corpus_and_tokenizer):
    project, _ = corpus_and_tokenizer
    stage = _nanollm(["tokenize"], project, preexec_fn=_limit_file_size(256 * 1024))
    out, err = stage.communicate(timeout=300)
    assert stage.returncode == 1, err[-2000:]
    lines = [line for line in err.strip().splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "File too large" in lines[0] and "free some space" in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert not (project / "data" / "tokens").exists()
    assert not list((project / "data").glob(".tokens.tmp-*"))


def _snapshot(folder: Path) -> dict[str, bytes] | None:
    """Every file under `folder` by relative name, or None when there is no folder."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stage", ["download", "train_tokenizer", "tokenize"])
def test_sigkill_at_a_random_point_leaves_no_partial_output_and_a_rerun_completes(corpus_and_tokenizer, stage):
    project, run_times = corpus_and_tokenizer
    target = project / "data" / {"download": "corpus", "train_tokenizer": "tokenizer", "tokenize": "tokens"}[stage]
    # tokenize has not run yet: once, for a complete output to keep (as the others have) and its run time
    run_time = run_times.get(stage) or _complete_run(stage, project)
    before = _snapshot(target)
    rng = random.Random(f"sigkill-{stage}")
    kills = 0
    for _ in range(3):
        victim = _nanollm([stage], project)
        try:
            victim.wait(timeout=rng.uniform(0.05, 0.95) * run_time)  # a seeded point of the stage's run
        except subprocess.TimeoutExpired:
            victim.send_signal(signal.SIGKILL)
        victim.communicate()
        kills += victim.returncode == -signal.SIGKILL
        # the old complete output, or the new one (the same bytes: the stage is deterministic); never a fragment
        assert _snapshot(target) == before, f"{target} changed after a kill"
    assert kills, f"`nanollm {stage}` finished before every kill (it runs {run_time:.2f} s)"
    _complete_run(stage, project)
    assert not list((project / "data").glob(".*.tmp-*")), "a killed writer's temporary survived the rerun"


def test_one_huge_document_goes_through_download_tokenizer_and_tokenize(tmp_path):
    # 6 MB in one document (no newline-separated records): read whole, trained on, encoded whole
    line = "def f(x):\n    return x * 2  # ünïcode ✓\n"
    (tmp_path / "big.txt").write_text(line * (6_000_000 // len(line.encode())), encoding="utf-8")
    (tmp_path / "small.txt").write_text("print('val')\n" * 50)
    params = {
        "data": {"source": "files", "paths": ["*.txt"], "val_fraction": 0.5},
        "tokenizer": {"vocab_size": 300},
        "seed": 3,  # a seed whose split puts one file on each side
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in (["download"], ["train_tokenizer"], ["tokenize"]):
        done = _nanollm(stage, tmp_path)
        _, err = done.communicate(timeout=300)
        assert done.returncode == 0, err[-2000:]
    meta = yaml.safe_load((tmp_path / "data/tokens/meta.json").read_text())
    total = meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"]
    assert total > 6_000_000 - len(line.encode())
