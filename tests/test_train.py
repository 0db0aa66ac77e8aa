"""The training loop: schedule, parameter groups, accumulation, determinism, NaN handling."""

import math

import numpy as np
import pytest
import torch

from nanollm.config import ModelConfig, TrainConfig
from nanollm.errors import NanollmError
from nanollm.model import Transformer
from nanollm.train import cpu_matmul_peak, lr_at, param_groups, pick_device, resolve_dtype, sample_batch, train

VOCAB = 64
# a learnable stream: a fixed random "document" of 200 tokens repeated, ~20k tokens
DATA = np.tile(np.random.default_rng(0).integers(0, VOCAB, 200).astype(np.uint16), 100)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, **overrides}), VOCAB)


def tiny_cfg(**overrides) -> TrainConfig:
    base = dict(batch_size=4, max_steps=20, lr=1e-2, min_lr=1e-3, warmup_steps=4, eval_interval=10, eval_batches=2)
    # fp32: the exactness checks below compare against fp32 arithmetic
    return TrainConfig(**{**base, "log_interval": 5, "device": "cpu", "dtype": "float32", **overrides})


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise repeatability and fair sharing of a 2-core machine
    yield
    torch.set_num_threads(previous)


def test_lr_schedule_endpoints():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == 0.0
    assert lr_at(5, cfg) == pytest.approx(0.5)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway through the cosine: the mean of lr and min_lr
    assert lr_at(110, cfg) == pytest.approx(0.1)
    decay = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert lr_at(0, TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=10)) == pytest.approx(1.0)


@pytest.mark.parametrize("tied", [True, False])
def test_param_groups_decay_only_matrices_that_are_not_embeddings(tied):
    model = tiny_model(tie_embeddings=tied)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "tok_embeddings.weight" in kept and all("norm" in n or n == "tok_embeddings.weight" for n in kept)
    assert "layers.0.attention.wq.weight" in decayed and "layers.1.feed_forward.w2.weight" in decayed
    assert ("output.weight" in decayed) == (not tied)  # a tied head is the embedding
    assert len(decayed) + len(kept) == len(list(model.parameters()))


def test_sample_batch_windows_are_contiguous():
    data = np.arange(100, dtype=np.uint16)
    batch = sample_batch(data, 8, 10, torch.Generator().manual_seed(0))
    assert batch.shape == (8, 11) and batch.dtype == torch.int64
    assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(8, 10, dtype=torch.int64))
    assert int(batch.max()) <= 99


def test_gradient_accumulation_equals_one_large_batch():
    one = tiny_model()
    initial = [p.detach().clone() for p in one.parameters()]
    train(one, DATA, DATA, tiny_cfg(batch_size=8, grad_accum=1, max_steps=1, warmup_steps=0), seed=3)
    accumulated = tiny_model()
    train(accumulated, DATA, DATA, tiny_cfg(batch_size=2, grad_accum=4, max_steps=1, warmup_steps=0), seed=3)
    for p0, p1, p2 in zip(initial, one.parameters(), accumulated.parameters(), strict=True):
        assert not torch.equal(p0, p1)  # the step did something
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5)


def test_training_decreases_loss_and_is_bitwise_repeatable():
    calls = []
    first = train(tiny_model(), DATA, DATA, tiny_cfg(), seed=7, callback=lambda step, m: calls.append((step, m)))
    second = train(tiny_model(), DATA, DATA, tiny_cfg(), seed=7)
    other = train(tiny_model(), DATA, DATA, tiny_cfg(), seed=8)
    losses = [row["train_loss"] for row in first.history]
    assert losses[-1] < losses[0] - 0.5 and first.val_loss < math.log(VOCAB) - 0.5
    assert [r["train_loss"] for r in second.history] == losses
    assert second.val_loss == first.val_loss
    assert [r["train_loss"] for r in other.history] != losses
    assert first.tokens == 20 * 4 * 16 and first.state["step"] == 20 and first.state["tokens_seen"] == first.tokens
    steps = [s for s, m in calls if "train_loss" in m]
    assert steps == [5, 10, 15, 20] and [s for s, m in calls if "val_loss" in m] == [10, 20]
    row = next(m for _, m in calls if "train_loss" in m)
    assert set(row) == {"train_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens"}
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] and row["grad_norm"] > 0


def test_nan_loss_names_the_step():
    model = tiny_model()
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    model.norm.register_forward_hook(poison)
    with pytest.raises(NanollmError, match="at step 3"):
        train(model, DATA, DATA, tiny_cfg(), seed=0)


def test_too_little_data_is_a_user_error():
    with pytest.raises(NanollmError, match="val split has 10 tokens"):
        train(tiny_model(), DATA, DATA[:10], tiny_cfg(), seed=0)


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        with pytest.raises(NanollmError, match="train.device is 'cuda'"):
            pick_device("cuda")


def test_cpu_peak_is_measured_once():
    peak = cpu_matmul_peak(1)
    assert peak > 1e8 and cpu_matmul_peak(1) == peak  # > 0.1 GFLOP/s on anything; cached


def test_auto_dtype_is_bf16_only_where_native():
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)


def test_bf16_autocast_trains_on_cpu():
    model = tiny_model()
    result = train(model, DATA, DATA, tiny_cfg(dtype="bfloat16", max_steps=10), seed=0)
    assert math.isfinite(result.train_loss) and math.isfinite(result.val_loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
