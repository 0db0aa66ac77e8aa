"""Attention: the sdpa and flash backends equal the naive reference, with and without a cache, MHA and GQA;
QK-norm normalises each head before RoPE; the value residual mixes values as specified, also when cached."""

import pytest
import torch

from nanollm.config import ModelConfig
from nanollm.model.attention import (
    BACKENDS,
    Attention,
    KVCache,
    causal_mask,
    flash_backend,
    naive_attention,
    repeat_kv,
    sdpa_attention,
)
from nanollm.model.rope import RotaryEmbedding, apply_rotary


@pytest.mark.parametrize("backend", [sdpa_attention, flash_backend], ids=["sdpa", "flash"])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("start_pos,T", [(0, 7), (5, 1), (5, 3)])
def test_backends_equal_naive(backend, n_kv_head, start_pos, T):
    torch.manual_seed(0)
    S = start_pos + T
    q = torch.randn(2, 4, T, 8)
    k, v = torch.randn(2, n_kv_head, S, 8), torch.randn(2, n_kv_head, S, 8)  # GQA: fewer K/V heads, not repeated
    torch.testing.assert_close(backend(q, k, v, start_pos), naive_attention(q, k, v, start_pos))


def test_every_config_choice_has_a_backend():
    import dataclasses

    from nanollm.config import ModelConfig

    (field,) = [f for f in dataclasses.fields(ModelConfig) if f.name == "attention"]
    assert set(field.metadata["choices"]) == set(BACKENDS)


def test_causal_mask_aligns_queries_to_the_end_of_the_keys():
    mask = causal_mask(start_pos=2, T=2, device=torch.device("cpu"))
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_naive_attention_is_causal():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    out = naive_attention(q, k, v, 0)
    v2 = v.clone()
    v2[..., 3:, :] += 100.0  # the future must not leak into positions 0..2
    out2 = naive_attention(q, k, v2, 0)
    assert torch.equal(out[..., :3, :], out2[..., :3, :])
    assert not torch.allclose(out[..., 3:, :], out2[..., 3:, :])


def test_repeat_kv_maps_query_head_to_kv_head_like_hf():
    x = torch.arange(2).view(1, 2, 1, 1).float()  # kv heads 0 and 1
    assert repeat_kv(x, 3).view(-1).tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("backend", ["sdpa", "flash", "naive"])
@pytest.mark.parametrize("n_kv_head", [None, 2])
@pytest.mark.parametrize("options", [{}, {"qk_norm": True}], ids=["plain", "qk_norm"])
def test_cached_chunks_equal_uncached_attention(backend, n_kv_head, options):
    torch.manual_seed(0)
    cfg = ModelConfig(n_head=4, n_kv_head=n_kv_head, n_embd=32, block_size=8, attention=backend, **options)
    attn, rope = Attention(cfg), RotaryEmbedding(cfg.head_dim, 8)
    x = torch.randn(2, 12, 32)  # 12 > block_size: the rope tables and the cache go past it
    full, _ = attn(x, *rope(0, 12))
    attn.cache = KVCache(2, cfg.kv_heads, 16, cfg.head_dim)
    chunks = [(0, 5), (5, 6), (6, 9), (9, 10), (10, 12)]
    out = torch.cat([attn(x[:, a:b], *rope(a, b - a), start_pos=a)[0] for a, b in chunks], dim=1)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)


def test_cache_returns_the_valid_prefix_of_its_own_buffers():
    cache = KVCache(2, 2, 8, 4)
    k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    k_all, v_all = cache.update(0, k, v)
    assert k_all.shape == (2, 2, 3, 4) and torch.equal(k_all, k) and torch.equal(v_all, v)
    assert k_all.data_ptr() == cache.k.data_ptr()  # a view: decode copies nothing but the new position
    k_all, _ = cache.update(3, k[:1, :, :1], v[:1, :, :1])  # a smaller batch uses the first rows
    assert k_all.shape == (1, 2, 4, 4) and torch.equal(k_all[0, :, 3], k[0, :, 0])


def test_cache_refuses_to_overflow():
    cache = KVCache(1, 2, 4, 8)
    with pytest.raises(ValueError, match="holds 4 positions"):
        cache.update(3, torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8))
    with pytest.raises(ValueError, match="batch 1"):
        cache.update(0, torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8))


def test_cache_buffers_are_not_in_state_dict():
    cfg = ModelConfig(n_head=4, n_embd=32)
    attn = Attention(cfg)
    attn.cache = KVCache(1, 4, 16, 8)
    assert set(attn.state_dict()) == {"wq.weight", "wk.weight", "wv.weight", "wo.weight"}


def test_options_add_only_their_own_parameters():
    cfg = ModelConfig(n_head=4, n_kv_head=2, n_embd=32, qk_norm=True, value_residual=True)
    shapes = {k: tuple(v.shape) for k, v in Attention(cfg, mixes_values=True).state_dict().items()}
    assert shapes == {
        "wq.weight": (32, 32),
        "wk.weight": (16, 32),
        "wv.weight": (16, 32),
        "wo.weight": (32, 32),
        "q_norm.weight": (8,),  # one gain per head dimension, shared by the heads
        "k_norm.weight": (8,),
        "value_mix": (2,),  # (a, b) of v = a v + b v_first
    }


def _record_rotary_inputs(monkeypatch) -> list[torch.Tensor]:
    """Every tensor attention hands to apply_rotary from now on: q and k as they are just before RoPE."""
    import nanollm.model.attention as attention

    seen = []

    def recording(x, cos, sin):
        seen.append(x.detach().clone())
        return apply_rotary(x, cos, sin)

    monkeypatch.setattr(attention, "apply_rotary", recording)
    return seen


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(dim=-1).sqrt()  # over each head's vector: (B, nh, T)


def test_qk_norm_gives_each_head_unit_rms_before_rope(monkeypatch):
    torch.manual_seed(0)
    cfg = ModelConfig(n_head=4, n_kv_head=2, n_embd=32, qk_norm=True)
    attn, rope = Attention(cfg), RotaryEmbedding(cfg.head_dim, 8)
    seen = _record_rotary_inputs(monkeypatch)
    x = 5.0 * torch.randn(2, 6, 32)  # far from unit scale going in
    with torch.no_grad():
        attn(x, *rope(0, 6))
    q, k = seen
    assert q.shape == (2, 4, 6, 8) and k.shape == (2, 2, 6, 8)
    for t in (q, k):
        torch.testing.assert_close(_rms(t), torch.ones_like(_rms(t)), atol=1e-4, rtol=0)
    with torch.no_grad():
        attn.q_norm.weight.fill_(3.0)  # the learned gain scales the normalised vectors
        attn(x, *rope(0, 6))
    torch.testing.assert_close(_rms(seen[2]), torch.full_like(_rms(seen[2]), 3.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(_rms(seen[3]), torch.ones_like(_rms(seen[3])), atol=1e-4, rtol=0)


def test_qk_norm_off_hands_rope_the_raw_projections(monkeypatch):
    torch.manual_seed(0)
    cfg = ModelConfig(n_head=4, n_embd=32)
    attn, rope = Attention(cfg), RotaryEmbedding(cfg.head_dim, 8)
    seen = _record_rotary_inputs(monkeypatch)
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        attn(x, *rope(0, 3))
    assert attn.q_norm is None and attn.k_norm is None
    torch.testing.assert_close(seen[0], attn.wq(x).view(1, 3, 4, 8).transpose(1, 2))


def test_value_residual_mixes_values_as_specified():
    torch.manual_seed(0)
    cfg = ModelConfig(n_head=4, n_kv_head=2, n_embd=32, value_residual=True)
    first, later, rope = Attention(cfg), Attention(cfg, mixes_values=True), RotaryEmbedding(cfg.head_dim, 8)
    assert first.value_mix is None and later.value_mix.tolist() == [0.5, 0.5]
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        later.value_mix.copy_(torch.tensor([0.3, -1.7]))
        _, v_first = first(x, *rope(0, 6))
        own = first.wv(x).view(2, 6, 2, 8).transpose(1, 2)  # (B, nkv, T, hs)
        assert torch.equal(v_first, own), "the first layer attends with its own values, unmixed"
        out, mixed = later(x, *rope(0, 6), None, v_first)
        raw = later.wv(x).view(2, 6, 2, 8).transpose(1, 2)  # (B, nkv, T, hs)
        torch.testing.assert_close(mixed, 0.3 * raw - 1.7 * v_first)
        # the output is plain causal attention over the mixed values; queries and keys untouched
        cos, sin = rope(0, 6)
        q = apply_rotary(later.wq(x).view(2, 6, 4, 8).transpose(1, 2), cos, sin)  # (B, nh, T, hs)
        k = apply_rotary(later.wk(x).view(2, 6, 2, 8).transpose(1, 2), cos, sin)  # (B, nkv, T, hs)
        y = naive_attention(q, k, 0.3 * raw - 1.7 * v_first, 0).transpose(1, 2).reshape(2, 6, 32)
        torch.testing.assert_close(out, later.wo(y), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pass v_first"):
        later(x, *rope(0, 6))


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
def test_value_residual_cached_chunks_equal_uncached(backend):
    torch.manual_seed(0)
    cfg = ModelConfig(n_head=4, n_kv_head=2, n_embd=32, block_size=8, attention=backend, value_residual=True)
    attn, rope = Attention(cfg, mixes_values=True), RotaryEmbedding(cfg.head_dim, 8)
    x, v_first = torch.randn(2, 10, 32), torch.randn(2, 2, 10, 8)
    with torch.no_grad():
        full, _ = attn(x, *rope(0, 10), None, v_first)
        attn.cache = KVCache(2, cfg.kv_heads, 10, cfg.head_dim)
        out = [attn(x[:, a:b], *rope(a, b - a), a, v_first[:, :, a:b])[0] for a, b in [(0, 4), (4, 5), (5, 10)]]
    torch.testing.assert_close(torch.cat(out, dim=1), full, atol=1e-5, rtol=1e-5)


def test_sdpa_plain_forward_prefill_and_decode_build_no_mask(monkeypatch):
    import nanollm.model.attention as attention

    def no_mask(*args):
        raise AssertionError("the hot paths must not build a mask")

    monkeypatch.setattr(attention, "causal_mask", no_mask)
    cfg = ModelConfig(n_head=4, n_kv_head=2, n_embd=32, block_size=8)
    attn, rope = Attention(cfg), RotaryEmbedding(cfg.head_dim, 8)
    x = torch.randn(1, 6, 32)
    attn(x, *rope(0, 6))  # training: is_causal
    attn.cache = KVCache(1, cfg.kv_heads, 8, cfg.head_dim)
    attn(x[:, :5], *rope(0, 5), start_pos=0)  # prefill: is_causal
    attn(x[:, 5:], *rope(5, 1), start_pos=5)  # decode: one query sees the whole valid prefix
