"""Faults a long pipeline meets: a full disk, a killed stage. Each leaves no partial output."""

import os
import resource
import signal
import subprocess
import sys
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


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory) -> Path:
    """A project folder with a downloaded stdlib slice and a trained tokenizer."""
    project = tmp_path_factory.mktemp("faults")
    params = {"data": {"max_bytes": 1_500_000, "val_fraction": 0.1}, "tokenizer": {"vocab_size": 400}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in (["download"], ["train_tokenizer"]):
        done = _nanollm(stage, project)
        out, err = done.communicate(timeout=300)
        assert done.returncode == 0, err[-2000:]
    return project


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_disk_full_while_tokenizing_is_one_line_and_leaves_no_memmap(corpus_and_tokenizer):
    project = corpus_and_tokenizer
    stage = _nanollm(["tokenize"], project, preexec_fn=_limit_file_size(256 * 1024))
    out, err = stage.communicate(timeout=300)
    assert stage.returncode == 1, err[-2000:]
    lines = [line for line in err.strip().splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "File too large" in lines[0] and "free some space" in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert not (project / "data" / "tokens").exists()
    assert not list((project / "data").glob(".tokens.tmp-*"))


@pytest.mark.parametrize("stage", ["download", "train_tokenizer", "tokenize"])
def test_sigkill_at_a_random_point_leaves_no_partial_output_and_a_rerun_completes(corpus_and_tokenizer, stage):
    project = corpus_and_tokenizer
    out_dir = {"download": "corpus", "train_tokenizer": "tokenizer", "tokenize": "tokens"}[stage]
    target = project / "data" / out_dir
    before = sorted(p.name for p in target.iterdir()) if target.exists() else None
    for delay in (0.3, 0.8, 1.5):
        victim = _nanollm([stage], project)
        try:
            victim.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            victim.send_signal(signal.SIGKILL)
            victim.wait()
        # either the old complete output, or the new complete output: never a mix or a fragment
        if target.exists():
            names = sorted(p.name for p in target.iterdir())
            assert names == before or before is None or set(names) >= set(before), names
    done = _nanollm([stage], project)
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-2000:]
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
