"""Data parallelism: `torchrun --nproc_per_node 2 nanollm pretrain` (gloo on CPU) against one process."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import tiny_tokens

from nanollm.errors import NanollmError
from nanollm.training.distributed import Distributed, split_evenly
from nanollm.training.loop import micro_batches_per_rank
from stages.cli import cli

VOCAB, EOT = 64, 63
STEPS = 20
PARAMS = {
    "seed": 4,
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16},
    "train": {
        "batch_size": 4,
        "grad_accum": 2,  # the global batch: 8 sequences per step for 1 process (2 x 4) or 2 (1 x 4 each)
        "max_steps": STEPS,
        "warmup_steps": 2,
        "lr": 1e-2,
        "min_lr": 1e-3,
        "log_interval": 1,  # a curve row per step: the losses compared
        "eval_interval": 10,
        "eval_batches": 3,  # not a multiple of 2: ranks evaluate 2 and 1 batches
        "checkpoint_interval": 10,
        "device": "cpu",
        "dtype": "float32",
    },
    "tracking": {"experiment": "ddp-test"},
}


def test_from_env_reads_torchrun_variables():
    assert Distributed.from_env({}) == Distributed(0, 1, 0) and not Distributed().enabled
    dist = Distributed.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (dist.rank, dist.world_size, dist.local_rank, dist.is_main, dist.enabled) == (3, 4, 1, False, True)
    with pytest.raises(NanollmError, match="RANK 4 is outside WORLD_SIZE 4"):
        Distributed.from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(NanollmError, match="must be integers"):
        Distributed.from_env({"RANK": "x"})


def test_single_process_collectives_are_identities():
    import torch

    dist = Distributed()
    values = torch.tensor([1.0, 2.0])
    assert dist.sum(values) is values and dist.broadcast({"a": 1}) == {"a": 1}
    dist.barrier()


def test_rows_and_micro_batches_per_rank():
    assert [split_evenly(8, 2, r) for r in (0, 1)] == [range(0, 4), range(4, 8)]
    assert micro_batches_per_rank(4, 2, 16) == 2 and micro_batches_per_rank(3, 1, 16) == 3
    # fewer micro-batches than processes (the default grad_accum 1 under torchrun): one smaller micro-batch each
    assert micro_batches_per_rank(1, 2, 16) == 1 and micro_batches_per_rank(3, 2, 16) == 2  # 48 rows: 2 x 12 each
    with pytest.raises(
        NanollmError,
        match=r"train.batch_size \* train.grad_accum \(5 \* 1 = 5 sequences a step\) does not split "
        r"evenly over 2 processes.*set train.grad_accum to 2",
    ):
        micro_batches_per_rank(1, 2, 5)
    with pytest.raises(NanollmError, match=r"3 \* 3 = 9 sequences .* multiple of 4"):
        micro_batches_per_rank(3, 2, 3)


RECIPES = {  # the optimizers: Muon's update is a function of the all-reduced gradient alone, as AdamW's
    "adamw-cosine": {},
    "muon-wsd": {"optimizer": "muon", "schedule": "wsd", "min_lr": 0.0},
    # the default grad_accum 1 under 2 processes: one micro-batch of 4 each, the same 8 sequences a step
    "one-micro-batch-split": {"batch_size": 8, "grad_accum": 1},
    # ...and its first steps on half of it: 4 sequences, 2 on each process
    "small-batches-first": {"batch_size": 8, "grad_accum": 1, "small_batch_steps": 8},
}


@pytest.fixture(params=list(RECIPES))
def project(request, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, EOT, rng.integers(20, 60)).tolist() for _ in range(80)]
    tiny_tokens(tmp_path, docs[:70], docs[70:], VOCAB, EOT)
    params = {**PARAMS, "train": {**PARAMS["train"], **RECIPES[request.param]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def _curve(path: Path, column: str) -> list[float]:
    with open(path) as f:
        return [float(row[column]) for row in csv.DictReader(f)]


def test_two_processes_match_one_with_the_same_global_batch(project):
    import torch
    from mlflow.tracking import MlflowClient

    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp = subprocess.Popen(
        [*torchrun, str(Path(sys.executable).parent / "nanollm"), "pretrain", "--out", "models/ddp",
         "--train-curve", "reports/ddp_train.csv", "--val-curve", "reports/ddp_val.csv", "--metrics", "ddp.json"],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    params = yaml.safe_load((project / "params.yaml").read_text())
    (project / "untracked.yaml").write_text(yaml.safe_dump({**params, "tracking": {"enabled": False}}))
    single = CliRunner().invoke(cli, ["--params", "untracked.yaml", "pretrain", "--out", "models/one"])  # meanwhile
    assert single.exit_code == 0, single.output
    output = ddp.communicate(timeout=300)[0]
    assert ddp.returncode == 0, output[-5000:]

    one, two = (_curve(project / "reports" / f, "train_loss") for f in ("train_curve.csv", "ddp_train.csv"))
    assert len(one) == len(two) == STEPS and one[-1] < one[0]
    np.testing.assert_allclose(two, one, atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        _curve(project / "reports" / "ddp_val.csv", "val_loss"),
        _curve(project / "reports" / "val_curve.csv", "val_loss"),
        atol=1e-4,
        rtol=0,
    )
    w1, w2 = (torch.load(project / "models" / d / "model.pt", weights_only=True) for d in ("one", "ddp"))
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-5, rtol=1e-4)

    # rank 0 alone narrates, writes and tracks: one summary, one save per interval, one MLflow run
    assert output.count("pretrain: {") == 1 and output.count("saved checkpoint to models/ddp") == 2
    assert "2 process(es) on cpu, 8 sequences of 16 tokens per step" in output
    halved = params["train"].get("small_batch_steps", 0)  # steps of 4 sequences, not 8
    assert json.loads((project / "ddp.json").read_text())["tokens"] == (STEPS * 8 - halved * 4) * 16
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("ddp-test").experiment_id])
    assert run.info.status == "FINISHED" and len(client.get_metric_history(run.info.run_id, "loss/train")) == STEPS
