"""Two machines as two torchrun launches: `--nnodes 2` over a c10d rendezvous on 127.0.0.1 (gloo).

Each "node" is a folder of its own (its own clone on a real machine: params.yaml and
data/tokens), started with its own `torchrun --nnodes 2 --nproc-per-node 1`. torchrun's c10d
rendezvous orders the nodes by address (then by process id), so the launch with the smaller
--local-addr (127.0.0.1 against 127.0.0.2, both loopback) is node 0 every time, as the machine
with the smaller address would be: its folder holds the checkpoint a relaunch resumes from.

Against one launch of `--nproc-per-node 2` at the same threads per process (1): the weights and
every entry of the saved training state but the wall clock's are bitwise equal, uninterrupted
and after node 1 is killed mid-run and both nodes are started again. The default
`train.grad_accum: 1` is what runs: each process takes half of a step's sequences.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import assert_same_training, free_port, tiny_tokens, tool_env
from test_resume import _checkpoint_step, _finish

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds a node's workers through /proc")

NANOLLM = str(Path(sys.executable).parent / "nanollm")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
VOCAB, EOT = 64, 63
STEPS = 300
PARAMS = {
    "seed": 4,
    "threads": 1,  # per process, in every launch: the same arithmetic whatever the topology
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16},
    "train": {
        "batch_size": 8,  # grad_accum 1 (the default): 4 sequences per process per step
        "max_steps": STEPS,
        "warmup_steps": 5,
        "lr": 1e-2,
        "min_lr": 1e-3,
        "optimizer": "muon",
        "log_interval": 10,
        "eval_interval": 100,
        "eval_batches": 3,
        "checkpoint_interval": 20,
        "device": "cpu",
        "dtype": "float32",
    },
    "tracking": {"enabled": False},
}
OUTPUTS = ("models", "metrics", "reports")  # what rank 0 alone writes


def _node(path: Path) -> Path:
    """A machine's clone, as far as pretrain reads it: params.yaml and data/tokens."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, EOT, rng.integers(20, 60)).tolist() for _ in range(80)]
    tiny_tokens(path, docs[:70], docs[70:], VOCAB, EOT)
    (path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    return path


def _launch(folder: Path, launcher: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [*TORCHRUN, *launcher, "--no-python", NANOLLM, "pretrain"],
        cwd=folder, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def _two_nodes(nodes: list[Path]) -> list[subprocess.Popen]:
    """`torchrun --nnodes 2` on each node, meeting at a c10d rendezvous on a fresh port."""
    port, run_id = free_port(), f"nanollm-{time.monotonic_ns()}"
    return [
        _launch(node, ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                       "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id, "--local-addr", f"127.0.0.{i + 1}"])
        for i, node in enumerate(nodes)
    ]  # fmt: skip


def _kill_node(launch: subprocess.Popen) -> None:
    """SIGKILL a node: its torchrun agent and the workers it started (each in a session of its own)."""
    children = Path(f"/proc/{launch.pid}/task/{launch.pid}/children").read_text().split()
    for pid in map(int, children):
        os.killpg(os.getpgid(pid), signal.SIGKILL)
    os.killpg(launch.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One launch of 2 processes (the reference), two launches uninterrupted, and two launches with node 1
    killed once node 0 has a checkpoint short of the end, then both started again."""
    base = tmp_path_factory.mktemp("multinode")
    one = _node(base / "one")
    together = [_node(base / "together" / n) for n in ("node0", "node1")]
    broken = [_node(base / "broken" / n) for n in ("node0", "node1")]
    found: dict = {"one": one, "together": together, "broken": broken}

    reference = _launch(one, ["--standalone", "--nproc-per-node", "2"])
    found["one_output"] = _finish(reference)
    found["together_outputs"] = [_finish(p) for p in _two_nodes(together)]

    launches = _two_nodes(broken)
    deadline = time.monotonic() + 120
    while not 0 < _checkpoint_step(broken[0] / "models" / "checkpoint") < STEPS - 40:
        assert time.monotonic() < deadline and launches[0].poll() is None, launches[0].communicate()[0][-3000:]
        time.sleep(0.005)
    _kill_node(launches[1])
    killed_at = time.monotonic()
    found["survivor_output"] = launches[0].communicate(timeout=120)[0]
    found["survivor_seconds"] = time.monotonic() - killed_at
    found["survivor_code"] = launches[0].returncode
    found["kept_step"] = _checkpoint_step(broken[0] / "models" / "checkpoint")
    launches[1].communicate()
    found["resumed_outputs"] = [_finish(p) for p in _two_nodes(broken)]
    return found


def test_two_launches_end_bitwise_equal_to_one_launch_of_two_processes(runs):
    node0, node1 = runs["together"]
    assert "2 process(es) on cpu, 8 sequences of 16 tokens per step" in runs["together_outputs"][0]
    assert_same_training(runs["one"] / "models" / "checkpoint", node0 / "models" / "checkpoint")
    # rank 0 alone writes checkpoints, metrics and curves; the other node's clone is left as it was
    assert all((node0 / name).is_dir() for name in OUTPUTS)
    assert not any((node1 / name).exists() for name in OUTPUTS)
    assert runs["together_outputs"][0].count("pretrain: {") == 1 and "pretrain: {" not in runs["together_outputs"][1]


def test_a_killed_node_fails_the_other_in_one_line_and_the_relaunch_resumes_exactly(runs):
    node0, node1 = runs["broken"]
    out = runs["survivor_output"]
    assert runs["survivor_code"] != 0
    assert runs["survivor_seconds"] < 60, f"the surviving node took {runs['survivor_seconds']:.0f} s to notice"
    ours = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(ours) == 1, out[-3000:]
    kept = runs["kept_step"]
    assert ours == [
        f"Error: process 0 of 2 lost the rest of the job ({ours[0].split('(', 1)[1].split(')')[0]}); "
        f"models/checkpoint keeps step {kept}: start torchrun again on every node to resume from it"
    ], out[-3000:]
    assert "[rank0]:" not in out, "the worker printed a traceback (torch prefixes an uncaught error's lines so)"
    assert 0 < kept < STEPS

    resumed = runs["resumed_outputs"][0]
    assert f"resuming after step {kept} of {STEPS}" in resumed
    assert_same_training(runs["one"] / "models" / "checkpoint", node0 / "models" / "checkpoint")
    assert not any((node1 / name).exists() for name in OUTPUTS)
