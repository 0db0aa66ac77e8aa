"""modded-nanogpt's architecture options (model.qk_norm, mlp: relu2, zero_init_proj, logit_softcap,
value_residual, value_embeddings, unet_skips): each does what it names and changes nothing else, and all
of them together survive every path a model takes: the decode layout, generation, torch.compile,
activation checkpointing, a checkpoint folder and a short training run. (Cached decoding with each
option: test_transformer.py; QK-norm and the value mix inside attention: test_attention.py; the Llama
export's refusals: test_hf.py.)"""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanollm.checkpoint import CONFIG_FILE, load_model, model_config, save_checkpoint
from nanollm.config import Config, ConfigError, ModelConfig, TrainConfig
from nanollm.inference.generate import generate
from nanollm.model import Transformer
from nanollm.training.loop import train
from nanollm.training.optim import muon_param_groups

VOCAB = 97
OPTIONS = {
    "qk_norm": True, "zero_init_proj": True, "logit_softcap": 3.0, "value_residual": True, "value_embeddings": 1,
    "unet_skips": True,
}  # fmt: skip
ALL_OPTIONS = {**OPTIONS, "mlp": "relu2", "tie_embeddings": False}  # softcap is meant with an untied head
# a learnable stream: one fixed random "document" of 200 tokens, repeated
DATA = np.tile(np.random.default_rng(0).integers(0, VOCAB, 200).astype(np.uint16), 60)


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise repeatability, and the test machine's cores are shared
    yield
    torch.set_num_threads(previous)


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "block_size": 16, **overrides}
    return Transformer(ModelConfig(**cfg), VOCAB).eval()


def perturbed(**overrides) -> Transformer:
    """tiny(), moved off its initial point: no block the identity, no mix at 0.5, logits large enough to cap."""
    model = tiny(**overrides)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def test_every_option_is_off_by_default_and_in_the_schema():
    cfg = ModelConfig()
    assert (cfg.qk_norm, cfg.zero_init_proj, cfg.logit_softcap, cfg.value_residual) == (False, False, None, False)
    assert (cfg.value_embeddings, cfg.unet_skips) == (0, False)
    assert cfg.mlp == "swiglu"
    parsed = Config.from_dict({"model": {**ALL_OPTIONS}}).model
    assert (parsed.qk_norm, parsed.mlp, parsed.logit_softcap) == (True, "relu2", 3.0)
    with pytest.raises(ConfigError, match=r"^model.logit_softcap: got 0.0; must be > 0.0$"):
        Config.from_dict({"model": {"logit_softcap": 0}})
    with pytest.raises(ConfigError, match=r"^model.mlp: got 'relu'; must be one of swiglu, gelu, relu2$"):
        Config.from_dict({"model": {"mlp": "relu"}})
    with pytest.raises(ConfigError, match=r"^model.value_embeddings: got 3; must be at most n_layer/2 rounded up"):
        Config.from_dict({"model": {"n_layer": 4, "value_embeddings": 3}})


def test_a_checkpoint_written_before_the_options_loads_with_them_off():
    before = {k: v for k, v in dataclasses.asdict(ModelConfig()).items() if k not in OPTIONS}
    assert model_config({"model": before}) == ModelConfig()


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_each_option_changes_only_what_it_names(option):
    """The same seed gives the same weights with or without an option, but for the ones it adds or zeroes."""
    base, model = tiny().state_dict(), tiny(**{option: OPTIONS[option]}).state_dict()
    added = {
        "qk_norm": {"q_norm.weight", "k_norm.weight"},
        "value_residual": {"value_mix"},
        "value_embeddings": {"value_embed_mix", "value_embeds.0.weight"},
        "unet_skips": {"skip_weights"},
    }.get(option, set())
    assert {k.rsplit("attention.", 1)[-1] for k in model.keys() - base.keys()} == added
    assert base.keys() <= model.keys()
    for key, value in base.items():
        if option == "zero_init_proj" and key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            assert not model[key].any(), key
        else:
            assert torch.equal(model[key], value), key


def test_relu2_mlp_computes_the_formula():
    ffn = tiny(mlp="relu2").layers[0].feed_forward
    x = torch.randn(2, 5, 32)
    w1, w2 = ffn.w1.weight, ffn.w2.weight  # (H, C), (C, H)
    expected = torch.clamp(x @ w1.T, min=0.0) ** 2 @ w2.T  # w2(relu(w1 x)^2)
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), expected, atol=1e-6, rtol=1e-5)
    assert w1.shape == (4 * 32, 32) and ffn.w3 is None  # gelu's shapes: two matrices, 4C wide


def test_zero_init_proj_starts_every_block_as_the_identity_at_loss_ln_vocab():
    model = tiny(zero_init_proj=True, tie_embeddings=False).train()
    for layer in model.layers:
        assert not layer.attention.wo.weight.any() and not layer.feed_forward.w2.weight.any()
    idx = torch.randint(0, VOCAB, (4, 16))
    x = model.tok_embeddings(idx)
    for layer in model.layers:
        out, _ = layer(x, *model.rope(0, 16), None)
        assert torch.equal(out, x), "a block with zero projections adds nothing to the residual stream"
    logits = model(idx)
    # the head sees the normed embedding: logits of std init_std * sqrt(C) ~ 0.11, costing ~0.006 nats
    loss = F.cross_entropy(logits.view(-1, VOCAB), idx.view(-1))
    assert loss.item() == pytest.approx(math.log(VOCAB), abs=0.03)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name, grad in grads.items():
        reaches = name.endswith(("wo.weight", "w2.weight")) or not name.startswith("layers.")
        assert bool(grad.any()) == reaches, f"{name}: the first gradient reaches only wo, w2, embedding and head"


def test_logit_softcap_bounds_every_logit_and_keeps_small_ones():
    cap = 5.0
    capped, plain = tiny(logit_softcap=cap, tie_embeddings=False), tiny(tie_embeddings=False)  # same weights
    idx = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        small, raw = capped(idx), plain(idx)
        assert raw.abs().max() < 0.1 * cap
        assert ((small - raw).abs() <= raw.abs() ** 3 / (3 * cap**2) + 1e-6).all()  # the identity near zero ...
        torch.testing.assert_close(small, cap * torch.tanh(raw / cap))  # ... because it is cap * tanh(x / cap)
        for model in (capped, plain):
            model.output.weight.mul_(1e3)  # a head that has run away
        big, raw = capped(idx), plain(idx)
    assert raw.abs().max() > 20 * cap
    assert big.abs().max() <= cap  # fp32 tanh rounds to exactly 1 far out, so <= rather than <
    assert (big.abs() < cap)[raw.abs() < 3 * cap].all()
    torch.testing.assert_close(big, cap * torch.tanh(raw / cap))


def test_value_residual_leaves_the_first_layer_and_mixes_the_later_ones():
    on, off = perturbed(n_layer=3, value_residual=True), perturbed(n_layer=3)
    with torch.no_grad():  # the same weights (same seeds), except that `on` has the mixes
        for name, p in on.named_parameters():
            if not name.endswith("value_mix"):
                p.copy_(off.get_parameter(name))
    assert on.layers[0].attention.value_mix is None
    mixes = [layer.attention.value_mix for layer in on.layers[1:]]
    with torch.no_grad():
        mixes[0].copy_(torch.tensor([0.8, 0.3]))
        mixes[1].copy_(torch.tensor([-0.2, 1.1]))
    seen: dict[str, list[torch.Tensor]] = {"on_out": [], "off_out": [], "values": [], "raw": []}
    for model, key in ((on, "on_out"), (off, "off_out")):
        model.layers[0].attention.register_forward_hook(lambda m, i, out, key=key: seen[key].append(out[0]))
    for layer in on.layers:
        layer.attention.register_forward_hook(lambda m, i, out: seen["values"].append(out[1]))
        layer.attention.wv.register_forward_hook(lambda m, i, out: seen["raw"].append(out))
    idx = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        on(idx), off(idx)
    assert torch.equal(seen["on_out"][0], seen["off_out"][0]), "layer 0 is unchanged"
    raw = [v.view(2, 10, 2, 8).transpose(1, 2) for v in seen["raw"]]  # (B, nkv, T, hs) per layer
    v_first = seen["values"][0]
    assert torch.equal(v_first, raw[0])
    for i, (a, b) in enumerate([(0.8, 0.3), (-0.2, 1.1)], start=1):
        torch.testing.assert_close(seen["values"][i], a * raw[i] + b * v_first)


def test_value_embeddings_add_their_tables_rows_to_the_mirrored_layers_values():
    """Table j feeds layers j and n_layer-1-j as v + c ve; other layers' values are their projections'."""
    model = perturbed(n_layer=5, value_embeddings=2)
    assert [layer.attention.value_embed_mix is not None for layer in model.layers] == [True, True, False, True, True]
    seen: dict[str, list[torch.Tensor]] = {"values": [], "raw": []}
    for layer in model.layers:
        layer.attention.register_forward_hook(lambda m, i, out: seen["values"].append(out[1]))
        layer.attention.wv.register_forward_hook(lambda m, i, out: seen["raw"].append(out))
    idx = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        model(idx)
        for i, table in enumerate([0, 1, None, 1, 0]):
            raw = seen["raw"][i].view(2, 10, 2, 8).transpose(1, 2)  # (B, nkv, T, hs)
            if table is None:
                assert torch.equal(seen["values"][i], raw)
                continue
            ve = model.value_embeds[table].weight[idx].view(2, 10, 2, 8).transpose(1, 2)
            c = model.layers[i].attention.value_embed_mix[0]
            torch.testing.assert_close(seen["values"][i], raw + c * ve)


def test_unet_skips_add_the_early_layers_outputs_to_the_late_layers_inputs():
    model = perturbed(n_layer=5, unet_skips=True)
    inputs, outputs = [], []

    def keep(module, args, out) -> None:
        inputs.append(args[0])
        outputs.append(out[0])

    for layer in model.layers:
        layer.register_forward_hook(keep)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (2, 10)))
        w = model.skip_weights  # (2,): layer 0 -> 4, layer 1 -> 3
        assert torch.equal(inputs[1], outputs[0]) and torch.equal(inputs[2], outputs[1])
        assert torch.equal(inputs[3], outputs[2] + w[1] * outputs[1])
        assert torch.equal(inputs[4], outputs[3] + w[0] * outputs[0])


def test_all_options_in_the_decode_layout_and_generation():
    model = perturbed(**ALL_OPTIONS)
    idx = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        plain = model(idx)
        model.pack_for_decode()  # no grad: the packed q/k/v matmul
        torch.testing.assert_close(model(idx), plain, atol=1e-5, rtol=1e-5)
    prompt = [5, 17, 3, 60]
    cached = list(generate(model, prompt, 12, temperature=0.0))
    uncached = list(generate(model, prompt, 12, temperature=0.0, use_cache=False))
    assert cached == uncached and len(cached) == 12
    with torch.no_grad():
        first = model(torch.tensor([prompt]))[0, -1].argmax().item()
    assert cached[0] == first


def test_all_options_compile_like_eager():
    """Dynamo and AOTAutograd (the eager backend skips inductor's C++ build), as test_train's compile test."""
    eager, compiled = perturbed(**ALL_OPTIONS).train(), perturbed(**ALL_OPTIONS).train()
    run = torch.compile(compiled, backend="aot_eager")
    idx = torch.randint(0, VOCAB, (2, 16))
    losses = []
    for model in (eager, run):
        logits = model(idx)
        loss = F.cross_entropy(logits.view(-1, VOCAB), idx.view(-1))
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "flash", "naive"])
def test_all_options_under_bf16_autocast(attention):
    """Autocast hands attention bf16 q, k, v; QK-norm's fp32 gain and the value mix must keep them bf16 alike."""
    model = perturbed(**ALL_OPTIONS, attention=attention).train()
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
        loss = F.cross_entropy(logits.view(-1, VOCAB), idx.view(-1))
    loss.backward()
    assert logits.dtype == torch.float32 and logits.abs().max() <= 3.0  # capped in fp32
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all(), name
    with torch.no_grad():
        reference = perturbed(**ALL_OPTIONS, attention=attention)(idx)
    torch.testing.assert_close(logits.detach(), reference, atol=0.05, rtol=0.05)  # bf16's rounding, no more


def _train_cfg(**overrides) -> TrainConfig:
    base = dict(batch_size=4, max_steps=3, lr=1e-2, min_lr=1e-3, warmup_steps=1, eval_interval=10, eval_batches=1)
    return TrainConfig(**{**base, "log_interval": 1, "device": "cpu", "dtype": "float32", **overrides})


def test_all_options_train_bitwise_alike_with_activation_checkpointing():
    """Recomputing each block in backward must thread the first layer's values exactly as the plain pass."""
    plain, recomputed = tiny(**ALL_OPTIONS), tiny(**ALL_OPTIONS)
    train(plain, DATA, DATA, _train_cfg(), seed=3)
    train(recomputed, DATA, DATA, _train_cfg(activation_checkpointing=True), seed=3)
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_the_checkpoint_folder_carries_the_options(tmp_path):
    model = perturbed(**ALL_OPTIONS)
    save_checkpoint(
        tmp_path / "ckpt",
        model,
        train_state={"step": 1, "tokens_seen": 0},
        info={"tokenizer_sha256": None, "corpus_sha256": None},
    )
    stored = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())["model"]
    assert {k: stored[k] for k in ALL_OPTIONS} == ALL_OPTIONS
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.cfg == model.cfg
    idx = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_a_short_training_run_with_every_option_lowers_the_loss():
    model = tiny(**ALL_OPTIONS)
    cfg = _train_cfg(max_steps=30, warmup_steps=3, optimizer="muon", schedule="wsd", min_lr=0.0)
    groups = muon_param_groups(model, cfg)
    muon = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        if name.endswith(("value_mix", "_norm.weight", "skip_weights", "value_embeds.0.weight")):  # AdamW, undecayed
            assert id(p) not in muon and any(id(p) in map(id, g["params"]) and g["weight_decay"] == 0 for g in groups)
    batch = torch.from_numpy(DATA[: 17 * 8].astype(np.int64)).view(8, 17)  # (B, T + 1)

    def loss() -> float:
        with torch.no_grad():
            logits = model.eval()(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1)).item()

    before = loss()
    result = train(model, DATA, DATA, cfg, seed=0)
    after = loss()
    assert before == pytest.approx(math.log(VOCAB), abs=0.05)
    assert after < before - 1.0, (before, after)
    assert math.isfinite(result.val_loss) and result.val_loss < before - 1.0
