"""Causal self-attention with RoPE, grouped-query heads, a KV cache and two backends.

This module owns the attention maths (projections, rotation, masking, the `sdpa` and
`naive` backends) and the KV cache buffers. The rotary tables come from rope.py; the
decode loop that drives prefill/decode lives in nanollm/generate.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nanollm.config import ModelConfig
from nanollm.model.rope import apply_rotary


class KVCache(nn.Module):
    """Fixed-size key/value buffers (B, n_kv_head, max_seq_len, head_dim), written by index.

    Preallocating once (as gpt-fast does) keeps decode free of allocations and of the
    O(T^2) copying that growing a tensor with torch.cat would cost. The buffers are
    non-persistent: they follow .to(device) but never enter a state_dict or checkpoint.
    Memory: 2 * n_layer * B * n_kv_head * max_seq_len * head_dim * itemsize bytes.
    """

    def __init__(
        self,
        batch_size: int,
        n_kv_head: int,
        max_seq_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k.size(2)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) at positions [start_pos, start_pos+T); return all keys/values so far.

        Returns views (B, nkv, start_pos+T, hs) of the buffers. B may be smaller than the
        batch the cache was set up for (the first B rows are used).
        """
        B, _, T, _ = k.shape
        end = start_pos + T
        if end > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} positions, asked to write up to {end}")
        if B > self.k.size(0):
            raise ValueError(f"KV cache was set up for batch {self.k.size(0)}, got batch {B}")
        self.k[:B, :, start_pos:end] = k
        self.v[:B, :, start_pos:end] = v
        return self.k[:B, :, :end], self.v[:B, :, :end]  # (B, nkv, S, hs), S = start_pos + T


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, nkv, S, hs) -> (B, nkv * n_rep, S, hs): query head h reads kv head h // n_rep (as HF)."""
    if n_rep == 1:
        return x
    B, nkv, S, hs = x.shape
    return x[:, :, None].expand(B, nkv, n_rep, S, hs).reshape(B, nkv * n_rep, S, hs)


def causal_mask(start_pos: int, T: int, device: torch.device) -> torch.Tensor:
    """Boolean (T, S) mask, True where query start_pos+i may attend key j, i.e. j <= start_pos + i."""
    S = start_pos + T
    q_pos = torch.arange(start_pos, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    return k_pos <= q_pos  # (T, S)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
    """The reference: softmax(q k^T / sqrt(hs) + mask) v, materialising the (T, S) score matrix.

    q (B, nh, T, hs) sits at positions [start_pos, start_pos+T); k, v (B, nh, S, hs) at [0, S).
    The softmax runs in fp32 whatever the input dtype. Memory is O(B * nh * T * S), which
    is the reason the fused backends exist.
    """
    T = q.size(2)
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.size(-1))  # (B, nh, T, S)
    scores = scores.masked_fill(~causal_mask(start_pos, T, q.device), float("-inf"))
    return (scores.softmax(dim=-1).to(v.dtype)) @ v  # (B, nh, T, hs)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
    """F.scaled_dot_product_attention: FlashAttention / memory-efficient kernels on CUDA.

    The no-cache square case uses is_causal (the fast path). A single decoded token may see
    every cached position, so it needs no mask. A chunk of T > 1 queries after a cached
    prefix needs an explicit mask, because is_causal aligns its triangle to the top-left
    corner (query i sees keys <= i), not to the end of the keys.
    """
    T, S = q.size(2), k.size(2)
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
    if T == 1:
        return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(start_pos, T, q.device))


BACKENDS = {"sdpa": sdpa_attention, "naive": naive_attention}


class Attention(nn.Module):
    """Multi-head (or grouped-query, when n_kv_head < n_head) causal self-attention with RoPE."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.backend = BACKENDS[cfg.attention]
        self.cache: KVCache | None = None  # set by Transformer.setup_cache

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int | None = None
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). start_pos None: no cache; an int: read and write the cache."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if start_pos is None:
            start_pos = 0
        else:
            if self.cache is None:
                raise RuntimeError("forward(..., start_pos=int) needs setup_cache() first")
            k, v = self.cache.update(start_pos, k, v)  # (B, nkv, S, hs), S = start_pos + T
        rep = self.n_head // self.n_kv_head
        y = self.backend(q, repeat_kv(k, rep), repeat_kv(v, rep), start_pos)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh * hs)
        return self.wo(y)  # (B, T, C)
