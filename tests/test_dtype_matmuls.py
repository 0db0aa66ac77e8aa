"""The compute dtype a run reports is the dtype its matmuls ran in: train(), the pretrain stage, and auto.

A TorchDispatchMode sees every aten op below autograd and autocast: the forward matmuls with
their inputs already cast by autocast (the weights are fp32 parameters, so a bf16 operand
there is autocast's copy), and the backward matmuls that the autograd engine runs for them.
The loss's fp32 upcast (Transformer.forward returns `logits.float()`) comes after the LM
head's matmul, and cross-entropy has no matmul, so it adds no fp32 matmul: in backward the
upcast's gradient is cast back to bf16 before the LM head's two gradient matmuls.
"""

import json
from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from test_stage_pretrain import project  # noqa: F401  (token memmaps and an empty MLflow store)
from torch.utils._python_dispatch import TorchDispatchMode

import nanollm.hardware
from nanollm.config import ModelConfig, TrainConfig
from nanollm.model import Transformer
from nanollm.training.loop import train
from stages.cli import cli

VOCAB, EOT = 64, 63
DATA = np.tile(np.random.default_rng(0).integers(0, VOCAB, 200).astype(np.uint16), 20)  # 4k tokens
MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16}
TRAIN = {"batch_size": 2, "grad_accum": 2, "max_steps": 2, "warmup_steps": 0, "eval_interval": 2, "eval_batches": 1}
aten = torch.ops.aten

# The matrix operands of each matmul-like op the model runs on the CPU, by position. The
# SDPA backward's sixth operand, logsumexp, is left out: it holds the softmax's row statistics,
# kept in fp32 under any autocast dtype, and is no matmul operand.
MATMUL_OPERANDS = {
    aten.mm.default: (0, 1),
    aten.addmm.default: (1, 2),
    aten.bmm.default: (0, 1),
    aten.baddbmm.default: (1, 2),
    aten._scaled_dot_product_flash_attention_for_cpu.default: (0, 1, 2),  # q, k, v
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: (0, 1, 2, 3, 4),  # grad_out, q, k, v, out
}
SDPA_BACKWARD = "_scaled_dot_product_flash_attention_for_cpu_backward"


def _looks_like_a_matmul(name: str) -> bool:
    return name.endswith("mm") or "attention" in name or name in {"matmul", "linear", "mv", "addmv", "dot", "vdot"}


class MatmulDtypes(TorchDispatchMode):
    """Records (phase, op, operand dtype) of every matmul that runs while active; phase is forward or backward.

    Backward is told apart by the autograd node being executed (None outside backward).
    A matmul-like op missing from MATMUL_OPERANDS lands in `unknown`, so a new kernel (another
    attention backend, a fused linear) makes the tests below fail rather than go unseen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[tuple[str, str, torch.dtype]] = Counter()
        self.unknown: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func in MATMUL_OPERANDS:
            phase = "forward" if torch._C._current_autograd_node() is None else "backward"
            for i in MATMUL_OPERANDS[func]:
                self.seen[(phase, name, args[i].dtype)] += 1
        elif _looks_like_a_matmul(name):
            self.unknown.add(name)
        return func(*args, **(kwargs or {}))

    def dtypes(self, phase: str) -> set[torch.dtype]:
        return {dtype for (p, _, dtype) in self.seen if p == phase}

    def ops(self, phase: str) -> set[str]:
        return {op for (p, op, _) in self.seen if p == phase}

    def count(self, phase: str, op: str) -> int:
        """How many times `op` ran in `phase` (each call records one entry per operand)."""
        func = getattr(aten, op).default
        return sum(n for (p, o, _), n in self.seen.items() if (p, o) == (phase, op)) // len(MATMUL_OPERANDS[func])


@pytest.fixture(autouse=True)
def _quiet_machine(monkeypatch):
    """One thread; and a stand-in for the CPU's measured matmul peak, which only MFU uses.

    The real one times eleven 1024x1024 matmuls in the run's dtype: ~0.3 s in fp32, but ~47 s
    in bf16 on a CPU without native bf16 (AVX2 only: 0.76 GFLOP/s), and its matmuls would
    land among the model's.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(nanollm.hardware, "cpu_matmul_peak", lambda threads, dtype=torch.float32: 1e11)
    yield
    torch.set_num_threads(previous)


def _tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**MODEL), VOCAB)


def _assert_matmuls_ran_in(seen: MatmulDtypes, dtype: torch.dtype, linears: int) -> None:
    assert not seen.unknown, f"matmul-like ops this test does not know the operands of: {seen.unknown}"
    assert seen.dtypes("forward") == {dtype} and seen.dtypes("backward") == {dtype}, seen.seen
    assert seen.ops("backward") == {"mm", SDPA_BACKWARD}
    # Every Linear's backward is two matmuls (input and weight gradients), per micro-batch:
    # all of them were seen, so none ran in another dtype unrecorded.
    assert seen.count("backward", "mm") == 2 * linears * TRAIN["max_steps"] * TRAIN["grad_accum"]


@pytest.mark.parametrize("name", ["float32", "bfloat16"])
def test_train_reports_the_dtype_its_matmuls_ran_in(name):
    model = _tiny_model()
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    cfg = TrainConfig(**TRAIN, device="cpu", dtype=name)
    with MatmulDtypes() as seen:
        result = train(model, DATA, DATA, cfg, seed=0)
    assert (result.device, result.dtype, result.dtype_reason) == ("cpu", name, f"train.dtype: {name}")
    _assert_matmuls_ran_in(seen, nanollm.hardware.DTYPES[name], linears)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast casts copies: fp32 master weights


@pytest.mark.parametrize(
    ("flags", "name", "reason"),
    [
        ({"avx512_bf16"}, "bfloat16", "auto: the CPU runs bf16 natively (avx512_bf16)"),
        ({"avx2"}, "float32", "auto: the CPU has no native bf16"),
    ],
    ids=["native-bf16", "no-bf16"],
)
def test_auto_dtype_follows_the_cpu_flags_and_runs_what_it_reports(monkeypatch, flags, name, reason):
    monkeypatch.setattr(nanollm.hardware, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(nanollm.hardware.platform, "system", lambda: "Linux")  # macOS has its own rule: fp32
    model = _tiny_model()
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    with MatmulDtypes() as seen:
        result = train(model, DATA, DATA, TrainConfig(**TRAIN, device="cpu", dtype="auto"), seed=0)
    assert result.dtype == name and result.dtype_reason.startswith(reason)
    _assert_matmuls_ran_in(seen, nanollm.hardware.DTYPES[name], linears)


# ---------------------------------------------------------------------------- the pretrain stage


@pytest.mark.parametrize("name", ["float32", "bfloat16"])
def test_pretrain_stage_records_the_dtype_its_matmuls_ran_in(project, name):  # noqa: F811
    from mlflow.tracking import MlflowClient

    params = {
        "seed": 0,
        "model": MODEL,
        "train": {**TRAIN, "device": "cpu", "dtype": name, "checkpoint_interval": 0},
        "tracking": {"experiment": "dtype-test", "system_metrics": False},
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    linears = sum(isinstance(m, torch.nn.Linear) for m in _tiny_model().modules())
    with MatmulDtypes() as seen:
        result = CliRunner().invoke(cli, ["--params", "params.yaml", "pretrain"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    _assert_matmuls_ran_in(seen, nanollm.hardware.DTYPES[name], linears)

    metrics = json.loads((project / "metrics" / "pretrain.json").read_text())
    recorded = {"device": "cpu", "dtype": name, "dtype_reason": f"train.dtype: {name}"}
    assert {key: metrics[key] for key in recorded} == recorded
    run_id = json.loads((project / "models" / "run.json").read_text())["run_id"]
    tags = MlflowClient(f"sqlite:///{project}/mlflow.db").get_run(run_id).data.tags
    assert {key: tags[key] for key in recorded} == recorded
