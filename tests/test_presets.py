"""The documented presets (docs/presets/*.yaml): valid params, in step with docs/training.md, and they train."""

import math
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from dvc.utils.hydra import apply_overrides

from nanollm.config import Config, flatten
from nanollm.model import Transformer
from nanollm.training.loop import train
from nanollm.training.memory import estimate_memory
from stages.cli import read_params

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "docs" / "presets").glob("*.yaml"))
GPT2_VOCAB = 50257


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(base.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def _config(preset: Path) -> Config:
    """params.yaml with the preset applied, as `dvc exp run -S ...` would leave it."""
    return Config.from_dict(_merge(read_params(ROOT / "params.yaml"), read_params(preset)))


def _documented_command(name: str) -> list[str]:
    """The `-S key=value` overrides of the `dvc exp run -n <name>` command in docs/training.md."""
    text = (ROOT / "docs" / "training.md").read_text()
    found = re.search(rf"^dvc exp run -n {re.escape(name)} \\\n((?:.*\\\n)*.*)$", text, re.M)
    assert found, f"docs/training.md has no `dvc exp run -n {name}` command"
    args = shlex.split(found.group(1).replace("\\\n", " "))
    assert args[::2] == ["-S"] * (len(args) // 2) and len(args) % 2 == 0, args
    return args[1::2]


def test_there_are_presets():
    assert {p.stem for p in PRESETS} >= {"gpt2-124m-owt", "gpt2-124m-owt-subset"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_validates_and_matches_its_documented_command(preset, tmp_path):
    config = _config(preset)
    assert (config.model.n_layer, config.model.n_head, config.model.n_embd, config.model.block_size) == (
        12,
        12,
        768,
        1024,
    )
    assert config.tokenizer.kind == "gpt2" or config.tokenizer.vocab_size == GPT2_VOCAB
    assert config.data.source == "hf" and "openwebtext" in config.data.hf_name

    # the documented command, applied by DVC's own -S machinery to params.yaml, gives exactly the preset
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    overrides = _documented_command(preset.stem)
    apply_overrides(str(params), overrides)
    assert flatten(Config.from_dict(read_params(params)).to_dict()) == flatten(config.to_dict())
    assert {o.split("=", 1)[0] for o in overrides} == set(flatten(read_params(preset)))
    assert config.train.grad_accum % 8 == 0  # the same effective batch on 1, 2, 4 or 8 GPUs


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_fits_its_target_memory(preset):
    config = _config(preset)
    big_gpu = "subset" not in preset.stem
    dtype = torch.bfloat16 if big_gpu else torch.float32  # auto on an H100; MPS runs fp32
    estimate = estimate_memory(
        config.model, GPT2_VOCAB, config.train.batch_size, dtype, config.train.activation_checkpointing
    )
    assert estimate.total < (40 if big_gpu else 8) * 2**30, estimate.describe()  # an A100-40GB; a 16 GB laptop


def test_one_training_step_of_gpt2_small():
    """The presets' very architecture (124M parameters, GPT-2 vocab), one step on a tiny slice, context cut to 32."""
    config = _config(ROOT / "docs" / "presets" / "gpt2-124m-owt.yaml")
    model_cfg = Config.from_dict({"model": {**config.to_dict()["model"], "block_size": 32}}).model
    torch.manual_seed(0)
    model = Transformer(model_cfg, GPT2_VOCAB)
    assert 123e6 < model.num_params() < 125e6
    data = np.random.default_rng(0).integers(0, GPT2_VOCAB, 400).astype(np.uint16)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train_cfg = {**config.to_dict()["train"], "batch_size": 1, "grad_accum": 1, "max_steps": 1, "warmup_steps": 0}
        train_cfg.update(eval_batches=1, device="cpu", dtype="float32", compile=False)  # CPU bf16 is 2x slower here
        result = train(model, data, data, Config.from_dict({"train": train_cfg}).train, seed=0)
    finally:
        torch.set_num_threads(previous)
    assert abs(result.train_loss - math.log(GPT2_VOCAB)) < 0.5  # an untrained model: ~uniform over the vocab
    assert math.isfinite(result.val_loss) and result.state["step"] == 1
