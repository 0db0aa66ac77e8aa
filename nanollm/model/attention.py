"""Causal self-attention with RoPE, grouped-query heads, a KV cache and three backends.

This module owns the attention maths (projections, the optional QK-norm and value residual,
rotation, masking, the `sdpa`, `flash` and `naive` backends) and the KV cache buffers. The
rotary tables come from rope.py, the from-scratch FlashAttention from flash.py; the decode
loop that drives prefill/decode lives in nanollm/inference/generate.py. docs/kv_cache.md measures the cache.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nanollm.config import ModelConfig
from nanollm.model.flash import flash_attention
from nanollm.model.norm import RMSNorm
from nanollm.model.packing import PackedLinears, column_major, pack
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

        Returns views (B, nkv, start_pos+T, hs) of the buffers: the valid prefix only, so
        attention never reads (or masks) the unwritten tail. B may be smaller than the batch
        the cache was set up for (the first B rows are used).
        """
        B, _, T, _ = k.shape
        end = start_pos + T
        if end > self.k.size(2):
            raise ValueError(f"KV cache holds {self.k.size(2)} positions, asked to write up to {end}")
        k_buf, v_buf = self.k, self.v
        if B != k_buf.size(0):
            if B > k_buf.size(0):
                raise ValueError(f"KV cache was set up for batch {k_buf.size(0)}, got batch {B}")
            k_buf, v_buf = k_buf[:B], v_buf[:B]
        k_buf[:, :, start_pos:end] = k
        v_buf[:, :, start_pos:end] = v
        return k_buf[:, :, :end], v_buf[:, :, :end]  # (B, nkv, S, hs), S = start_pos + T

    def update_ragged(self, step: RaggedStep, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one token per row, k, v (B, nkv, 1, hs), row b at position step.positions[b]; return rows [0, B).

        The returned views span the longest row, (B, nkv, step.span, hs); a shorter row's
        tail holds stale or zero entries that step.mask hides from attention.
        """
        B = k.size(0)
        if step.span > self.k.size(2):
            raise ValueError(f"KV cache holds {self.k.size(2)} positions, asked to write up to {step.span}")
        rows = torch.arange(B, device=k.device)  # (B,)
        self.k[rows, :, step.positions] = k[:, :, 0]  # (B, nkv, hs) scattered to (row b, position p_b)
        self.v[rows, :, step.positions] = v[:, :, 0]
        return self.k[:B, :, : step.span], self.v[:B, :, : step.span]  # (B, nkv, S, hs)

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows [start, stop) of this one, sharing its memory: what one row's prefill writes into."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[start:stop], persistent=False)
        view.register_buffer("v", self.v[start:stop], persistent=False)
        return view

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row src's first `length` positions into row dst (the engine compacts its rows when one leaves)."""
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]


class RaggedStep(NamedTuple):
    """A batched decode step where row b's single token sits at its own position, positions[b].

    positions (B,) int64; span = max(positions) + 1, the keys the longest row reads; mask
    (B, 1, 1, span), True where row b may attend key j, i.e. j <= positions[b]. Built once
    per step by Transformer.forward and shared by every layer.
    """

    positions: torch.Tensor
    span: int
    mask: torch.Tensor

    @classmethod
    def at(cls, positions: list[int], device: torch.device) -> RaggedStep:
        """The step for rows at these positions (host ints, so span needs no device sync)."""
        span = max(positions) + 1
        pos = torch.tensor(positions, dtype=torch.long, device=device)  # (B,)
        mask = torch.arange(span, device=device)[None, :] <= pos[:, None]  # (B, S)
        return cls(pos, span, mask[:, None, None, :])  # mask (B, 1, 1, S)

    @classmethod
    def over_cache(cls, positions: torch.Tensor, span: int) -> RaggedStep:
        """The step over a whole static cache of `span` positions, built from device tensors only.

        What a compiled decode step uses (nanollm.inference.compiled): every shape is fixed by the
        cache, whatever the rows' positions, so one compiled graph serves every step; the mask hides
        the positions not yet written. positions (B,) int64.
        """
        mask = torch.arange(span, device=positions.device)[None, :] <= positions[:, None]  # (B, S)
        return cls(positions, span, mask[:, None, None, :])  # mask (B, 1, 1, S)


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


# Every backend maps q (B, nh, T, hs) at positions [start_pos, start_pos+T) and k, v
# (B, nkv, S, hs) at [0, S), S = start_pos + T, nh a multiple of nkv, to (B, nh, T, hs).


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
    """The reference: softmax(q k^T / sqrt(hs) + mask) v, materialising the (T, S) score matrix.

    The softmax runs in fp32 whatever the input dtype. Memory is O(B * nh * T * S), which
    is the reason the fused backends exist.
    """
    T, rep = q.size(2), q.size(1) // k.size(1)
    k, v = repeat_kv(k, rep), repeat_kv(v, rep)  # (B, nh, S, hs)
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.size(-1))  # (B, nh, T, S)
    scores = scores.masked_fill(~causal_mask(start_pos, T, q.device), float("-inf"))
    return (scores.softmax(dim=-1).to(v.dtype)) @ v  # (B, nh, T, hs)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
    """F.scaled_dot_product_attention: fused kernels (FlashAttention-2 on CUDA, a tiled one on CPU).

    Grouped-query heads go in as they are (enable_gqa), so the cache is never copied to
    repeat them. The no-cache square case uses is_causal (the fast path). A single decoded
    token may see every cached position, so it needs no mask: the decode hot path allocates
    nothing here. A chunk of T > 1 queries after a cached prefix needs an explicit mask,
    because is_causal aligns its triangle to the top-left corner (query i sees keys <= i),
    not to the end of the keys.
    """
    T, S = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, nh, T, hs)
    if T == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    mask = causal_mask(start_pos, T, q.device)  # (T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def flash_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
    """nanollm.model.flash: the from-scratch tiled FlashAttention (K/V heads repeated for GQA)."""
    rep = q.size(1) // k.size(1)
    return flash_attention(q, repeat_kv(k, rep), repeat_kv(v, rep), start_pos)


BACKENDS = {"sdpa": sdpa_attention, "flash": flash_backend, "naive": naive_attention}

VALUE_MIX_INIT = 0.5  # value residual: v = 0.5 v + 0.5 v_first at the start, modded-nanogpt's starting mix


class Attention(nn.Module):
    """Multi-head (or grouped-query, when n_kv_head < n_head) causal self-attention with RoPE.

    Two options of ModelConfig act between the projections and the backend (modded-nanogpt's):

    - qk_norm: RMSNorm over each head's query and key vectors, before RoPE, with a learned
      gain of head_dim entries shared by the heads (q_norm, k_norm). Unit-RMS q and k bound
      every attention logit by the gains' product times sqrt(head_dim), so no logit can grow
      with the weights and destabilise training. The gain is learned, not fixed at one (as
      modded-nanogpt has it), because at our head_dim of 32 a fixed bound of sqrt(32) ~ 5.7
      caps how sharply a head can attend: over 256 keys orthogonal to the query, the one key
      aligned with it gets at most e^5.7 / (e^5.7 + 255) ~ 53% of the weight. 2 * head_dim
      parameters per layer lift that cap. Before RoPE, not after: RoPE rotates pairs of
      entries, so the RMS is the same on either side, but a per-dimension gain applied after
      the rotation would make q.k depend on absolute positions, while applied before it the
      score still depends only on their distance.
    - value residual (mixes_values, set for every layer but the first under value_residual):
      v = a v + b v_first, v_first being the first layer's values at the same positions and
      a, b learned scalars (value_mix) starting at 0.5 each, a convex mix at first (ResFormer,
      Zhou et al. 2024; modded-nanogpt). It mixes per position before the cache, so the cache
      holds mixed values and decoding needs no extra state.
    - value embeddings (takes_value_embed, set by the Transformer for the layers its tables
      feed under value_embeddings): v = v + c ve, ve a token-embedding table's rows for the
      same positions' tokens and c a learned scalar (value_embed_mix) starting at
      VALUE_MIX_INIT. Per position too, so the cache again holds the mixed values.
    """

    def __init__(self, cfg: ModelConfig, *, mixes_values: bool = False, takes_value_embed: bool = False):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        # (a, b) of v = a v + b v_first; Transformer.reset_parameters sets both to VALUE_MIX_INIT
        self.value_mix = nn.Parameter(torch.full((2,), VALUE_MIX_INIT)) if mixes_values else None
        # c of v = v + c ve; Transformer.reset_parameters sets it to VALUE_MIX_INIT
        self.value_embed_mix = nn.Parameter(torch.full((1,), VALUE_MIX_INIT)) if takes_value_embed else None
        self.backend = BACKENDS[cfg.attention]
        self.cache: KVCache | None = None  # set by Transformer.setup_cache
        self.packed_qkv: PackedLinears | None = None  # set by pack_for_decode

    def pack_for_decode(self) -> None:
        """Move the weights to the decode layout (packing.py): q, k, v as one matmul, wo column-major."""
        self.packed_qkv = pack(self.wq, self.wk, self.wv, current=self.packed_qkv)
        column_major(self.wo)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, T, nh * hs), k and v (B, T, nkv * hs): one fused matmul when packed."""
        if self.packed_qkv is not None and self.packed_qkv.usable():
            return self.packed_qkv(x)
        return self.wq(x), self.wk(x), self.wv(x)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start_pos: int | RaggedStep | None = None,
        v_first: torch.Tensor | None = None,
        value_embed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> (output (B, T, C), the values this layer attended with at these positions (B, nkv, T, hs)).

        start_pos None: no cache; an int: read and write the cache; a RaggedStep (T = 1): read
        and write the cache with every row at its own position. v_first (B, nkv, T, hs), the
        first layer's values at these positions, is required when this layer mixes values and
        ignored otherwise; value_embed (B, T, nkv * hs), its value-embedding table's rows for
        these tokens, likewise when this layer takes one.
        """
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None and self.k_norm is not None:
            # cast back: a low-precision q, k times the fp32 gain would come out fp32
            q, k = self.q_norm(q).to(q.dtype), self.k_norm(k).to(k.dtype)  # unit RMS per head, times the gain
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.value_mix is not None:
            if v_first is None:
                raise ValueError("this layer mixes in the first layer's values (value_residual): pass v_first")
            v = self.value_mix[0] * v + self.value_mix[1] * v_first  # (B, nkv, T, hs); 0-dim factors keep v's dtype
        if self.value_embed_mix is not None:
            if value_embed is None:
                raise ValueError("this layer adds a value embedding (value_embeddings): pass value_embed")
            ve = value_embed.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
            v = v + (self.value_embed_mix[0] * ve).to(v.dtype)  # the table is fp32 under autocast: keep v's dtype
        values = v
        if isinstance(start_pos, RaggedStep):
            if self.cache is None:
                raise RuntimeError("a ragged decode step needs setup_cache() first")
            k, v = self.cache.update_ragged(start_pos, k, v)  # (B, nkv, S, hs)
            # Whatever the backend: the fused kernel with a per-row mask is the one that takes ragged rows.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=start_pos.mask, enable_gqa=q.size(1) != k.size(1))
            y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, 1, nh * hs)
            return self.wo(y), values
        if start_pos is None:
            start_pos = 0
        else:
            if self.cache is None:
                raise RuntimeError("forward(..., start_pos=int) needs setup_cache() first")
            k, v = self.cache.update(start_pos, k, v)  # (B, nkv, S, hs), S = start_pos + T
        y = self.backend(q, k, v, start_pos)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh * hs)
        return self.wo(y), values  # (B, T, C), (B, nkv, T, hs)
