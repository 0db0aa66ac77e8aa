"""The Transformer: cached decoding equals the full forward for every backend and every architecture option,
the cache stays out of checkpoints, tied weights share storage and the FLOP count adds up. (HF Llama parity:
test_hf.py; each option's own behaviour: test_model_options.py.)"""

import math

import pytest
import torch
import torch.nn.functional as F

from nanollm.config import ModelConfig
from nanollm.model import Transformer

VOCAB = 97
# modded-nanogpt's architecture options, every one on (a cap of 3 squashes these logits visibly)
ALL_OPTIONS = dict(
    qk_norm=True,
    mlp="relu2",
    zero_init_proj=True,
    logit_softcap=3.0,
    value_residual=True,
    value_embeddings=1,
    unet_skips=True,
)


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=4, n_embd=32, block_size=16)
    return Transformer(ModelConfig(**{**cfg, **overrides}), VOCAB).eval()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"n_kv_head": 2},
        {"n_kv_head": 1, "attention": "naive"},
        {"n_kv_head": 2, "attention": "flash"},
        {"mlp": "gelu", "tie_embeddings": False},
        {"qk_norm": True, "n_kv_head": 2},
        {"mlp": "relu2"},
        {"zero_init_proj": True},
        {"logit_softcap": 3.0, "tie_embeddings": False},
        {"value_residual": True, "n_kv_head": 2},
        {"value_embeddings": 2, "n_kv_head": 2, "n_layer": 4},
        {"unet_skips": True, "n_layer": 5},
        {**ALL_OPTIONS, "tie_embeddings": False, "n_kv_head": 2},
        {**ALL_OPTIONS, "n_kv_head": 1, "attention": "naive", "n_layer": 3},
        {**ALL_OPTIONS, "n_kv_head": 2, "attention": "flash"},
    ],
    ids=[
        "mha",
        "gqa",
        "mqa-naive",
        "gqa-flash",
        "gelu-untied",
        "qk_norm",
        "relu2",
        "zero_init_proj",
        "softcap",
        "value_residual",
        "value_embeddings",
        "unet_skips",
        "all-options",
        "all-options-naive",
        "all-options-flash",
    ],
)
def test_prefill_then_decode_equals_full_forward(overrides):
    model = tiny(**overrides)
    if set(overrides) & set(ALL_OPTIONS):
        # off the initial point: zero projections would make every block the identity (hiding any
        # decode mistake), tiny logits would leave the soft cap untouched, and the mixes sit at 0.5
        perturb(model)
    idx = torch.randint(0, VOCAB, (3, 30))  # 30 > block_size 16: decoding runs past the trained context
    with torch.no_grad():
        full = model(idx)  # (3, 30, vocab)
        model.setup_cache(batch_size=3, max_seq_len=32)
        steps = [model(idx[:, :7], start_pos=0)]  # prefill
        steps += [model(idx[:, t : t + 1], start_pos=t) for t in range(7, 30)]  # decode one token at a time
    assert full.dtype == torch.float32 and full.shape == (3, 30, VOCAB)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def perturb(model: Transformer) -> None:
    """Give every parameter a random offset, so that no block is the identity and no mix sits at 0.5."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def test_backends_agree_in_logits_and_gradients():
    idx = torch.randint(0, VOCAB, (2, 16))
    results = {}
    for backend in ("sdpa", "flash", "naive"):
        model = tiny(n_kv_head=2, attention=backend).train()
        logits = model(idx)
        F.cross_entropy(logits.view(-1, VOCAB), idx.view(-1)).backward()
        results[backend] = (logits.detach(), model.layers[0].attention.wk.weight.grad)
    for backend in ("flash", "naive"):
        torch.testing.assert_close(results[backend][0], results["sdpa"][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(results[backend][1], results["sdpa"][1], atol=1e-5, rtol=1e-4)


def test_last_only_returns_the_last_row_of_the_full_logits():
    model = tiny()
    idx = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        full = model(idx)
        torch.testing.assert_close(model(idx, last_only=True), full[:, -1:], atol=1e-6, rtol=1e-6)
        model.setup_cache(2, 12)
        prefill = model(idx, start_pos=0, last_only=True)
    torch.testing.assert_close(prefill, full[:, -1:], atol=1e-5, rtol=1e-5)


def test_cache_lifecycle_and_state_dict():
    model = tiny(n_kv_head=2)
    keys = set(model.state_dict())
    assert model.cache_bytes() == 0
    model.setup_cache(batch_size=2, max_seq_len=40)
    # 2 layers x (k, v) x B=2 x 2 kv heads x 40 positions x head_dim 8 x 4 bytes
    assert model.cache_bytes() == 2 * 2 * 2 * 2 * 40 * 8 * 4
    assert set(model.state_dict()) == keys  # neither caches nor rope tables enter a checkpoint
    assert not any("cache" in k or "rope" in k for k in keys)
    model.clear_cache()
    assert model.cache_bytes() == 0
    with pytest.raises(RuntimeError, match="setup_cache"):
        model(torch.zeros(1, 1, dtype=torch.long), start_pos=0)


def test_cache_follows_model_dtype():
    model = tiny().to(torch.bfloat16)
    model.setup_cache(1, 8)
    assert model.layers[0].attention.cache.k.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(torch.zeros(1, 4, dtype=torch.long), start_pos=0).dtype == torch.float32


def test_tied_embeddings_share_storage():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.output.weight.data_ptr() == tied.tok_embeddings.weight.data_ptr()
    assert untied.output.weight.data_ptr() != untied.tok_embeddings.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == VOCAB * 32


def test_parameter_names_and_count():
    model = tiny()
    names = set(dict(model.named_parameters()))
    assert {"tok_embeddings.weight", "norm.weight", "layers.1.attention.wq.weight", "layers.1.ffn_norm.weight"} <= names
    assert {
        "layers.0.feed_forward.w1.weight",
        "layers.0.feed_forward.w2.weight",
        "layers.0.feed_forward.w3.weight",
    } <= names
    assert not any(n.endswith("bias") for n in names)
    hidden = model.cfg.hidden_dim  # 8/3 * 32 rounded up to 64
    per_layer = 4 * 32 * 32 + 3 * 32 * hidden + 2 * 32
    assert model.num_params() == VOCAB * 32 + 2 * per_layer + 32
    assert model.num_params(exclude_embeddings=True) == 2 * per_layer + 32


def test_flops_per_token_counts_head_and_attention():
    model = tiny()
    n = model.num_params()  # tied: the embedding table is the LM head, a matmul
    assert model.flops_per_token(16) == 6 * n + 12 * 2 * 32 * 16
    untied = tiny(tie_embeddings=False)  # the input lookup is no matmul
    assert untied.flops_per_token(16) == 6 * (untied.num_params() - VOCAB * 32) + 12 * 2 * 32 * 16


def test_relu2_has_gelus_width_parameters_and_flops():
    relu2, gelu = tiny(mlp="relu2"), tiny(mlp="gelu")
    assert relu2.cfg.hidden_dim == gelu.cfg.hidden_dim == 4 * 32
    assert relu2.layers[0].feed_forward.w3 is None
    assert relu2.num_params() == gelu.num_params()
    assert relu2.flops_per_token(16) == gelu.flops_per_token(16)
    assert tiny(mlp="relu2", mlp_hidden=48).layers[0].feed_forward.w1.weight.shape == (48, 32)


def test_options_add_only_tiny_vectors_to_the_parameter_count():
    """qk_norm: two gains of head_dim per layer; value_residual: two scalars per layer but the first."""
    base = tiny(n_layer=3)
    assert tiny(n_layer=3, qk_norm=True).num_params() == base.num_params() + 3 * 2 * 8
    assert tiny(n_layer=3, value_residual=True).num_params() == base.num_params() + 2 * 2
    assert tiny(n_layer=3, zero_init_proj=True, logit_softcap=15.0).num_params() == base.num_params()
    # 6N counts these vectors as it counts the RMSNorm weights: an overcount of well under 0.1%
    with_all = tiny(n_layer=3, qk_norm=True, value_residual=True)
    assert with_all.flops_per_token(16) - base.flops_per_token(16) == 6 * (3 * 2 * 8 + 2 * 2)
    # unet_skips: one weight per skip; value_embeddings: a table of vocab x kv width, looked up, so no FLOPs,
    # and a factor per layer it feeds (table 0: layers 0 and 2 of 3; table 1: layer 1)
    assert tiny(n_layer=3, unet_skips=True).num_params() == base.num_params() + 1
    embedded = tiny(n_layer=3, value_embeddings=2)
    assert embedded.num_params() == base.num_params() + 2 * VOCAB * 32 + 3
    assert embedded.flops_per_token(16) - base.flops_per_token(16) == 6 * 3


def test_residual_projections_are_scaled_at_init():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=8, n_head=4, n_embd=128), 512)
    std = model.cfg.init_std
    assert abs(model.layers[0].attention.wq.weight.std().item() - std) < 0.1 * std
    scaled = std / math.sqrt(2 * 8)
    assert abs(model.layers[3].attention.wo.weight.std().item() - scaled) < 0.1 * scaled
    assert abs(model.layers[3].feed_forward.w2.weight.std().item() - scaled) < 0.1 * scaled
    assert torch.equal(model.norm.weight, torch.ones(128))


@pytest.mark.parametrize("cap", [None, 15.0])
def test_the_loss_made_a_chunk_at_a_time_is_cross_entropy_over_all_the_logits(monkeypatch, cap):
    """forward(targets=...) equals F.cross_entropy over the whole logits, in value and in every gradient, also
    when the rows do not fill the last chunk and with soft-capped logits."""
    import nanollm.model.transformer as transformer

    monkeypatch.setattr(transformer, "LOSS_CHUNK", 7)  # 2 x 12 = 24 rows: chunks of 7, 7, 7 and 3
    whole, chunked = tiny(logit_softcap=cap), tiny(logit_softcap=cap)
    chunked.load_state_dict(whole.state_dict())
    x, y = torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (2, 12))
    reference = F.cross_entropy(whole(x).flatten(0, 1), y.flatten())
    loss = chunked(x, targets=y)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, reference)
    reference.backward()
    loss.backward()
    for (name, a), b in zip(whole.named_parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
