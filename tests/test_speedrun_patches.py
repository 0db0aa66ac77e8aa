"""The speedrun's dropped levers kept as patches (docs/speedrun/*.patch): each still applies to this tree and trains.

docs/speedrun.md's rows for them read `git apply docs/speedrun/<lever>.patch && dvc exp run ...`; a
patch that no longer applies, or whose key no longer trains, would leave a figure no command
reproduces. Each test applies one patch to a copy of the code and runs the real `nanollm pretrain`
from that copy, with the row's key set, on tiny token memmaps.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_tokens

ROOT = Path(__file__).resolve().parents[1]
PATCHES = ROOT / "docs" / "speedrun"
VOCAB, EOT = 64, 63

# patch -> the overrides its rows in docs/speedrun.md set (small enough for a tiny run)
KEYS = {
    "smear.patch": {"model": {"smear": True}},
    "doc_mask.patch": {"model": {"doc_mask": True}},
    "schedules.patch": {"train": {"short_context_steps": 3}},
}


def test_every_patch_is_named_in_the_doc_and_has_a_test():
    doc = (ROOT / "docs" / "speedrun.md").read_text()
    named = set(re.findall(r"git apply docs/speedrun/([\w.-]+\.patch)", doc))
    kept = {p.name for p in PATCHES.glob("*.patch")}
    assert named == kept == set(KEYS)


@pytest.mark.parametrize("patch", sorted(KEYS))
def test_the_patch_applies_and_its_key_trains(patch, tmp_path):
    src = tmp_path / "src"
    for package in ("nanollm", "stages"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    applied = subprocess.run(["git", "apply", str(PATCHES / patch)], cwd=src, capture_output=True, text=True)
    assert applied.returncode == 0, applied.stderr

    project = tmp_path / "project"
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, EOT, rng.integers(20, 60)).tolist() for _ in range(70)]
    tiny_tokens(project, docs[:60], docs[60:], VOCAB, EOT, train_tokens=6000)
    params = {
        "seed": 5,
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16},
        "train": dict(
            batch_size=4,
            max_steps=6,
            warmup_steps=1,
            eval_interval=3,
            eval_batches=1,
            log_interval=2,
            device="cpu",
            dtype="float32",
        ),
        "tracking": {"enabled": False},
    }
    for section, keys in KEYS[patch].items():
        params[section].update(keys)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(src)}
    run = subprocess.run(
        [sys.executable, "-c", "from stages.cli import cli; cli()", "--params", "params.yaml", "pretrain"],
        cwd=project, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((project / "metrics" / "pretrain.json").read_text())
    assert np.isfinite(metrics["val_loss"]) and metrics["val_loss"] < np.log(VOCAB) + 0.5
    saved = json.loads((project / "models" / "checkpoint" / "config.json").read_text())
    for section, keys in KEYS[patch].items():  # the run trained with the patch's key: the code was the copy's
        assert all(saved["fingerprint"][section][k] == v for k, v in keys.items()), saved["fingerprint"][section]
