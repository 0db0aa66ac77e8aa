"""Attention: the sdpa backend equals the naive reference, with and without a cache, MHA and GQA."""

import pytest
import torch

from nanollm.config import ModelConfig
from nanollm.model.attention import Attention, KVCache, causal_mask, naive_attention, repeat_kv, sdpa_attention
from nanollm.model.rope import RotaryEmbedding


@pytest.mark.parametrize("start_pos,T", [(0, 7), (5, 1), (5, 3)])
def test_sdpa_equals_naive(start_pos, T):
    torch.manual_seed(0)
    S = start_pos + T
    q = torch.randn(2, 4, T, 8)
    k, v = torch.randn(2, 4, S, 8), torch.randn(2, 4, S, 8)
    torch.testing.assert_close(sdpa_attention(q, k, v, start_pos), naive_attention(q, k, v, start_pos))


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


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
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


def test_cache_refuses_to_overflow():
    cache = KVCache(1, 2, 4, 8)
    with pytest.raises(ValueError, match="holds 4 positions"):
        cache.update(3, torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8))


def test_cache_buffers_are_not_in_state_dict():
    cfg = ModelConfig(n_head=4, n_embd=32)
    attn = Attention(cfg)
    attn.cache = KVCache(1, 4, 16, 8)
    assert set(attn.state_dict()) == {"wq.weight", "wk.weight", "wv.weight", "wo.weight"}
