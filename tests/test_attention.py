"""Attention: the sdpa and flash backends equal the naive reference, with and without a cache, MHA and GQA."""

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
from nanollm.model.rope import RotaryEmbedding


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
def test_cached_chunks_equal_uncached_attention(backend, n_kv_head):
    torch.manual_seed(0)
    cfg = ModelConfig(n_head=4, n_kv_head=n_kv_head, n_embd=32, block_size=8, attention=backend)
    attn, rope = Attention(cfg), RotaryEmbedding(cfg.head_dim, 8)
    x = torch.randn(2, 12, 32)  # 12 > block_size: the rope tables and the cache go past it
    full = attn(x, *rope(0, 12))
    attn.cache = KVCache(2, cfg.kv_heads, 16, cfg.head_dim)
    chunks = [(0, 5), (5, 6), (6, 9), (9, 10), (10, 12)]
    out = torch.cat([attn(x[:, a:b], *rope(a, b - a), start_pos=a) for a, b in chunks], dim=1)
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
