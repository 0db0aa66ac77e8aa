"""The training loop: schedule, parameter groups, accumulation, determinism, NaN handling."""

import copy
import math
import os
import signal

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import free_port

from nanollm.config import ModelConfig, TrainConfig
from nanollm.errors import NanollmError
from nanollm.model import Transformer
from nanollm.training.distributed import Distributed, split_evenly
from nanollm.training.interrupt import GracefulStop, TrainingInterrupted
from nanollm.training.loop import _wrap, first_halves, micro_batches_per_rank, sample_batch, train, train_step
from nanollm.training.memory import activation_bytes, estimate_memory
from nanollm.training.optim import lr_at, make_optimizer, param_groups

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


GRAD_ACCUM, MICRO_BATCH = 4, 2  # 8 sequences per step; 2 processes train 2 micro-batches of 2 each


def _full_batch_gradients(model: torch.nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference: one forward and one backward of the mean loss over every row of `batch` (N, T+1) at once.

    Written out here rather than through nanollm.training.loop, so that the code under test is not its own reference.
    """
    model = copy.deepcopy(model)
    x, y = batch[:, :-1], batch[:, 1:]  # (N, T) each
    logits = model(x)  # (N, T, vocab)
    F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def _accumulate(
    model: torch.nn.Module, batch: torch.Tensor, dist: Distributed
) -> tuple[dict[str, torch.Tensor], float, float]:
    """This rank's share of `batch` through train_step, as the loop runs it: (gradients, loss, grad norm).

    max_norm inf: clip_grad_norm_ measures the norm and rescales nothing, so the gradients
    compared are the accumulated ones as they are.
    """
    cpu = torch.device("cpu")
    cfg = tiny_cfg(batch_size=MICRO_BATCH, grad_accum=GRAD_ACCUM)
    runner, ddp = _wrap(model, cfg, cpu, dist)  # DDP under 2 processes, the model itself under 1
    rows = split_evenly(len(batch), dist.world_size, dist.rank)
    optimizer = make_optimizer(model, cfg, cpu)  # only the (disabled) scaler's unscale_ reads it
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    micro_batches = micro_batches_per_rank(GRAD_ACCUM, dist.world_size, MICRO_BATCH)
    loss, grad_norm = train_step(
        runner, batch[rows.start : rows.stop], optimizer, scaler, micro_batches, torch.float32, cpu, math.inf, ddp
    )
    return {name: p.grad.clone() for name, p in model.named_parameters()}, loss.item(), grad_norm


def _accumulate_on_rank(rank: int, world_size: int, port: int, batch: torch.Tensor, out: str) -> None:
    """One of 2 processes (torch.multiprocessing.spawn): join a gloo group as torchrun would, accumulate, save."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    dist = Distributed.from_env()
    dist.init(torch.device("cpu"))
    try:
        grads, loss, grad_norm = _accumulate(tiny_model(), batch, dist)
        torch.save({"grads": grads, "loss": loss, "grad_norm": grad_norm}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.close()


@pytest.mark.parametrize("world_size", [1, 2], ids=["1-process", "2-processes"])
def test_accumulated_gradients_equal_the_full_batch_gradient(world_size, tmp_path):
    """GRAD_ACCUM micro-batches (split over the processes) leave in .grad the gradient of one full-batch backward.

    Compares gradients, not weights after an AdamW step: Adam's first step moves each weight
    by about lr * sign(g), which a gradient 4x too large (a missing 1/micro_batches) leaves unchanged.
    """
    block_size = tiny_model().cfg.block_size
    batch = sample_batch(DATA, GRAD_ACCUM * MICRO_BATCH, block_size, torch.Generator().manual_seed(3))  # (8, T+1)
    full = _full_batch_gradients(tiny_model(), batch)
    with torch.no_grad():
        full_loss = F.cross_entropy(tiny_model()(batch[:, :-1]).reshape(-1, VOCAB), batch[:, 1:].reshape(-1)).item()
    full_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in full.values()])).item()

    if world_size == 1:
        grads, loss, grad_norm = _accumulate(tiny_model(), batch, Distributed())
        ranks = [(grads, loss, grad_norm)]
    else:
        mp.spawn(_accumulate_on_rank, args=(world_size, free_port(), batch, str(tmp_path)), nprocs=world_size)
        saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
        ranks = [(s["grads"], s["loss"], s["grad_norm"]) for s in saved]

    scale = max(g.abs().max().item() for g in full.values())
    assert scale > 1e-3  # a real gradient, so the tolerance below is tight against it
    for grads, _, grad_norm in ranks:  # after DDP's all-reduce every rank holds the same gradient
        assert grads.keys() == full.keys()
        for name, g in full.items():
            # fp32, the same sums in another order: 3e-8 apart at most here, a quarter of this tolerance
            torch.testing.assert_close(grads[name], g, atol=1e-6 * scale, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        assert grad_norm == pytest.approx(full_norm, rel=1e-5)
    # each rank's loss is the mean over its own rows; the mean over ranks is the full batch's
    assert sum(loss for _, loss, _ in ranks) / world_size == pytest.approx(full_loss, rel=1e-6)


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


def test_small_batch_steps_train_the_first_half_of_each_micro_batch():
    model, rows = tiny_model(), []
    model.register_forward_pre_hook(lambda m, args: rows.append(len(args[0])) if torch.is_grad_enabled() else None)
    calls = []
    cfg = tiny_cfg(grad_accum=2, small_batch_steps=5, log_interval=4)
    result = train(model, DATA, DATA, cfg, seed=7, callback=lambda step, m: calls.append((step, m)))
    assert rows == [2] * 2 * 5 + [4] * 2 * 15  # two micro-batches a step, of 2 then of 4 sequences
    assert result.tokens == (20 * 8 - 5 * 4) * 16 and result.state["tokens_seen"] == result.tokens
    tokens = {step: m["tokens"] for step, m in calls if "tokens" in m}
    sequences = {4: 4 * 4, 8: 5 * 4 + 3 * 8, 12: 5 * 4 + 7 * 8, 16: 5 * 4 + 11 * 8, 20: 5 * 4 + 15 * 8}
    assert tokens == {step: n * 16 for step, n in sequences.items()}
    assert [v["tokens"] for v in result.val_history] == [(5 * 4 + 5 * 8) * 16, result.tokens]
    # the windows drawn do not depend on the key: with it off, the same draws train whole
    whole = train(tiny_model(), DATA, DATA, tiny_cfg(grad_accum=2), seed=7)
    assert result.state["batch_rng"].equal(whole.state["batch_rng"])


def test_first_halves_keeps_the_first_half_of_each_micro_batch():
    batch = torch.arange(8).repeat_interleave(3).view(8, 3)  # row i holds i
    assert first_halves(batch, 2)[:, 0].tolist() == [0, 1, 4, 5]
    assert first_halves(batch, 1)[:, 0].tolist() == [0, 1, 2, 3]


def test_small_batch_steps_need_micro_batches_that_halve():
    with pytest.raises(NanollmError, match="train.small_batch_steps halves each micro-batch.*batch_size is 3"):
        train(tiny_model(), DATA, DATA, tiny_cfg(batch_size=3, small_batch_steps=2), seed=0)


def test_muon_with_wsd_learns_as_well_as_adamw():
    adamw = train(tiny_model(), DATA, DATA, tiny_cfg(), seed=7)
    muon = train(tiny_model(), DATA, DATA, tiny_cfg(optimizer="muon", schedule="wsd", min_lr=0.0), seed=7)
    assert muon.val_loss < math.log(VOCAB) - 0.5
    assert muon.val_loss < adamw.val_loss + 0.1  # same steps: no worse than AdamW (in fact better here)


def test_nan_loss_names_the_step():
    model = tiny_model()
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    model.norm.register_forward_hook(poison)
    saved = []
    with pytest.raises(NanollmError, match="diverged at step 3 .*the checkpoint of step 2 is kept"):
        train(model, DATA, DATA, tiny_cfg(checkpoint_interval=2), seed=0, checkpoint=lambda m, o, s: saved.append(s))
    assert [s["step"] for s in saved] == [2]  # the bad step wrote nothing


def test_too_little_data_is_a_user_error():
    with pytest.raises(NanollmError, match="val split has 10 tokens"):
        train(tiny_model(), DATA, DATA[:10], tiny_cfg(), seed=0)


def test_bf16_autocast_trains_on_cpu():
    model = tiny_model()
    result = train(model, DATA, DATA, tiny_cfg(dtype="bfloat16", max_steps=10), seed=0)
    assert math.isfinite(result.train_loss) and math.isfinite(result.val_loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def _snapshots(store: dict):
    """A checkpoint callback keeping deep copies of what a checkpoint folder would hold, by step."""

    def save(model, optimizer, state):
        store[state["step"]] = {"model": copy.deepcopy(model.state_dict()), "state": copy.deepcopy(state)}

    return save


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    "recipe",
    [
        {},
        {"optimizer": "muon", "schedule": "wsd", "min_lr": 0.0},
        {"optimizer": "muon", "schedule": "wsd", "muon_momentum_warmup": 15, "ema_decay": 0.9},
        {"optimizer": "muon", "schedule": "wsd", "small_batch_steps": 14},
    ],
    ids=["adamw-cosine", "muon-wsd", "muon-momentum-warmup-ema", "small-batches-first"],
)
def test_resume_from_a_checkpoint_is_bitwise_the_uninterrupted_run(recipe):
    cfg = tiny_cfg(checkpoint_interval=6, log_interval=4, **recipe)  # windows straddle the checkpoint
    whole = tiny_model()
    snapshots = {}
    full = train(whole, DATA, DATA, cfg, seed=5, checkpoint=_snapshots(snapshots))
    assert sorted(snapshots) == [6, 12, 18, 20]  # every interval and the last step

    resumed = tiny_model(seed=99)  # other initial weights: all must come from the checkpoint
    resumed.load_state_dict(snapshots[12]["model"])
    calls = []
    rest = train(resumed, DATA, DATA, cfg, seed=5, resume=snapshots[12]["state"], callback=lambda s, m: calls.append(s))
    _assert_same_weights(resumed, whole)
    exact = ("step", "train_loss", "lr", "grad_norm", "tokens")  # all but the timings
    assert [[r[k] for k in exact] for r in rest.history] == [[r[k] for k in exact] for r in full.history]
    assert rest.val_history == full.val_history and rest.resumed_from == 12 and min(calls) == 16
    assert rest.state["step"] == 20 and rest.tokens == full.tokens


def test_ema_replaces_the_final_weights_with_the_average_of_every_step():
    """With train.ema_decay the saved weights are the moving average of the weights after each step (decay
    ramped as (1 + n) / (10 + n) at first), and the last val estimate is the average's."""
    decay, steps = 0.8, 6
    cfg = tiny_cfg(max_steps=steps, warmup_steps=0, eval_interval=steps, log_interval=1)
    raw, snapshots = tiny_model(), {}
    train(raw, DATA, DATA, cfg, seed=3, checkpoint=_snapshots(snapshots), callback=None)
    # the same run with a checkpoint every step: the raw weights after each step, to average by hand
    every, per_step = tiny_model(), {}
    train(every, DATA, DATA, tiny_cfg(max_steps=steps, warmup_steps=0, eval_interval=steps, checkpoint_interval=1),
          seed=3, checkpoint=_snapshots(per_step))  # fmt: skip
    start = tiny_model().state_dict()
    expected = {k: v.clone() for k, v in start.items()}
    for n in range(steps):
        d = min(decay, (1 + n) / (10 + n))
        for k in expected:
            expected[k] = d * expected[k] + (1 - d) * per_step[n + 1]["model"][k]

    averaged = tiny_model()
    result = train(averaged, DATA, DATA, tiny_cfg(max_steps=steps, warmup_steps=0, eval_interval=steps,
                                                  ema_decay=decay), seed=3)  # fmt: skip
    for name, p in averaged.state_dict().items():
        assert torch.allclose(p, expected[name], atol=1e-6), name
        if p.dim() == 2:
            assert not torch.allclose(p, raw.state_dict()[name], atol=1e-4), name  # not the last step's
    assert result.val_loss != snapshots[steps]["state"]["progress"]["val_history"][-1]["val_loss"]
    assert result.state["weight_average"]["updates"] == steps


def test_resuming_without_the_average_is_a_clear_error():
    snapshots = {}
    cfg = tiny_cfg(max_steps=4, checkpoint_interval=2)
    train(tiny_model(), DATA, DATA, cfg, seed=1, checkpoint=_snapshots(snapshots))
    with pytest.raises(NanollmError, match="holds no weight average .*train.ema_decay: null"):
        train(tiny_model(), DATA, DATA, tiny_cfg(max_steps=4, ema_decay=0.9), seed=1, resume=snapshots[2]["state"])


def test_resume_at_the_last_step_only_reports():
    cfg = tiny_cfg(max_steps=4, warmup_steps=0, log_interval=2, eval_interval=2)
    snapshots = {}
    done = train(tiny_model(), DATA, DATA, cfg, seed=1, checkpoint=_snapshots(snapshots))
    model = tiny_model()
    model.load_state_dict(snapshots[4]["model"])
    again = train(model, DATA, DATA, cfg, seed=1, resume=snapshots[4]["state"])
    assert again.val_loss == done.val_loss and again.history == done.history and again.resumed_from == 4
    assert again.tokens_per_s == done.tokens_per_s  # the timings of the session that ran the steps

    older = copy.deepcopy(snapshots[4]["state"])  # saved before progress counted tokens (every step trained alike)
    del older["progress"]["timed_tokens"]
    model.load_state_dict(snapshots[4]["model"])
    assert train(model, DATA, DATA, cfg, seed=1, resume=older).tokens_per_s == done.tokens_per_s
    between = copy.deepcopy(snapshots[4]["state"])  # saved while progress also kept the window's tokens
    between["progress"]["window_tokens"] = 0
    model.load_state_dict(snapshots[4]["model"])
    assert train(model, DATA, DATA, cfg, seed=1, resume=between).history == done.history


def test_a_signal_stops_after_the_step_with_a_checkpoint():
    snapshots = {}

    def interrupt(step, metrics):
        if step == 7 and "train_loss" in metrics:
            os.kill(os.getpid(), signal.SIGINT)  # a real signal, caught by GracefulStop

    # the ranks vote on stopping with the step's loss, so a signal during step 7's logging ends step 8
    with GracefulStop() as stop, pytest.raises(TrainingInterrupted, match="stopped by SIGINT after step 8") as err:
        cfg = tiny_cfg(log_interval=7, checkpoint_interval=5)
        train(tiny_model(), DATA, DATA, cfg, seed=2, callback=interrupt, checkpoint=_snapshots(snapshots), stop=stop)
    assert err.value.step == 8 and err.value.signum == signal.SIGINT
    assert sorted(snapshots) == [5, 8]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is gone again


def test_activation_checkpointing_is_bitwise_neutral_and_undone():
    plain, recomputed = tiny_model(), tiny_model()
    a = train(plain, DATA, DATA, tiny_cfg(max_steps=4), seed=3)
    b = train(recomputed, DATA, DATA, tiny_cfg(max_steps=4, activation_checkpointing=True), seed=3)
    _assert_same_weights(plain, recomputed)
    assert a.history[-1]["train_loss"] == b.history[-1]["train_loss"]
    assert all("forward" not in vars(block) for block in recomputed.layers)  # patched forwards removed


def test_compile_trains_like_eager(monkeypatch):
    """train.compile through Dynamo and AOTAutograd; the eager backend skips inductor's C++ build (~40 s here)."""
    import functools

    if os.environ.get("NANOLLM_TEST_INDUCTOR") != "1":
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    eager, compiled = tiny_model(n_layer=1), tiny_model(n_layer=1)
    a = train(eager, DATA, DATA, tiny_cfg(max_steps=3, warmup_steps=1), seed=4)
    b = train(compiled, DATA, DATA, tiny_cfg(max_steps=3, warmup_steps=1, compile=True), seed=4)
    assert [r["train_loss"] for r in b.history] == pytest.approx([r["train_loss"] for r in a.history], abs=1e-5)


def test_compile_keeps_its_cache_in_a_private_folder(tmp_path, monkeypatch):
    """The compiled step's code is loaded from inductor's cache: train.compile checks the folder, as decoding does."""
    import functools
    import stat

    from nanollm.private import NotPrivate

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # and put back as it was after the test
    monkeypatch.setenv("NANOLLM_CACHE_DIR", str(tmp_path / "nanollm"))
    train(tiny_model(n_layer=1), DATA, DATA, tiny_cfg(max_steps=1, warmup_steps=1, compile=True), seed=4)
    folder = tmp_path / "nanollm" / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder.resolve())
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700

    planted = tmp_path / "planted"
    planted.mkdir()
    planted.chmod(0o777)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(planted))
    with pytest.raises(NotPrivate) as err:
        train(tiny_model(n_layer=1), DATA, DATA, tiny_cfg(max_steps=1, warmup_steps=1, compile=True), seed=4)
    message = str(err.value)
    assert message.startswith("refused to compile the training step: ") and "\n" not in message
    assert "planted is writable by group or others" in message and message.endswith("train.compile: false")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"mlp": "gelu", "tie_embeddings": False},
        {"n_kv_head": 1, "n_layer": 3},
        {"qk_norm": True, "value_residual": True, "n_layer": 3},
        {"qk_norm": True, "n_kv_head": 1},
        {"value_embeddings": 2, "unet_skips": True, "value_residual": True, "n_layer": 4},
    ],
)
def test_activation_estimate_matches_what_autograd_saves(dtype, overrides):
    """The estimate against a count of the tensors autograd keeps for backward (parameters excluded)."""
    model = tiny_model(**{"n_embd": 64, "block_size": 32, **overrides})
    batch = torch.randint(0, VOCAB, (3, 33))
    storages = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(batch[:, :-1])
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    saved = sum(n for ptr, n in storages.items() if ptr not in params)
    estimate, _ = activation_bytes(model.cfg, VOCAB, 3, dtype, activation_checkpointing=False)
    assert estimate == pytest.approx(saved, rel=0.15)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"mlp": "gelu", "tie_embeddings": False},
        {"n_kv_head": 1},
        {"mlp": "relu2", "qk_norm": True, "value_residual": True, "logit_softcap": 15.0, "zero_init_proj": True},
        {"value_embeddings": 2, "unet_skips": True, "n_layer": 3, "n_kv_head": 1},
    ],
)
def test_memory_estimate_counts_the_parameters_and_adamw_state(overrides):
    model = tiny_model(**overrides)
    estimate = estimate_memory(model.cfg, VOCAB, 4)
    assert estimate.params == estimate.grads == 4 * model.num_params() and estimate.optimizer == 2 * estimate.params


def test_activation_checkpointing_halves_the_gpt2_small_estimate():
    cfg = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024)
    plain, lean = estimate_memory(cfg, 50257, 8), estimate_memory(cfg, 50257, 8, activation_checkpointing=True)
    # the blocks shrink ~8x; the LM head's (B, T, 50257) log-softmax and its gradients stay
    assert lean.activations < 0.55 * plain.activations and lean.params == plain.params
    assert plain.describe().startswith("12.3 GiB (params 471 MiB, grads 471 MiB, optimizer 943 MiB")
