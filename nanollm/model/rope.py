"""Rotary position embeddings (RoPE) in the Llama / Hugging Face convention.

This module owns the cos/sin tables and the rotation. Which positions to rotate (and the
KV cache that remembers rotated keys) is attention's business. docs/rope.md derives it.

Convention: the head dimension is split into two halves that are rotated together
("rotate_half", as in HF `LlamaRotaryEmbedding`), not interleaved pairs (Meta's original
complex-number form). Weights trained this way export to `transformers` with no
permutation of wq/wk.
"""

from __future__ import annotations

import torch
from torch import nn


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) for i in [0, d/2), in float32. Shape (hs/2,)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # (hs/2,)
    return 1.0 / (theta**exponents)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys x (B, nh, T, hs) by the angles of their positions; cos/sin are (T, hs).

    `sin` is the signed table of RotaryEmbedding ([-sin, +sin] over the two halves), so HF's
    `x * cos + rotate_half(x) * sin` becomes `x * cos + swap_halves(x) * signed_sin`: a roll
    and one fused multiply-add, 3 kernels instead of 6 (chunk, neg, cat, mul, mul, add). That
    is ~30% off the rotation, which runs twice per layer on every decoded token.
    """
    if cos.dtype != x.dtype:  # autocast hands us bf16 q/k while the tables stay fp32
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    swapped = x.roll(x.size(-1) // 2, dims=-1)  # (x1, x2) -> (x2, x1), (B, nh, T, hs)
    return torch.addcmul(x * cos, swapped, sin)  # (B, nh, T, hs)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for positions [0, max_seq_len), grown on demand.

    `cos[p]` is cos(p * inv_freq) repeated over both halves; `sin[p]` is sin(p * inv_freq)
    with rotate_half's sign folded in: negative over the first half, positive over the
    second (see apply_rotary). The tables are non-persistent buffers: they follow the model
    across devices and dtypes but never enter a checkpoint (they are a pure function of
    head_dim and theta). A request past the table length rebuilds it at the next power of
    two, so generating past the training context costs one rebuild per doubling, not one
    per token. RoPE itself extrapolates poorly past the trained length; it works, but
    quality degrades.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("cos", torch.empty(0, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(0, head_dim), persistent=False)
        self._build(max_seq_len)

    @property
    def max_seq_len(self) -> int:
        return self.cos.size(0)

    def _build(self, seq_len: int) -> None:
        device, dtype = self.cos.device, self.cos.dtype
        # Angles are computed in fp32 on the tables' device whatever the model dtype, so a
        # regrown bf16 table holds the same values as one built in fp32 and then cast (as HF).
        inv_freq = rope_frequencies(self.head_dim, self.theta).to(device)  # (hs/2,)
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)  # (S,)
        freqs = torch.outer(positions, inv_freq)  # (S, hs/2)
        sin = freqs.sin()
        self.cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1).to(dtype)  # (S, hs): one angle per half pair
        self.sin = torch.cat((-sin, sin), dim=-1).to(dtype)  # (S, hs), signed for swap_halves

    def forward(self, start_pos: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin for positions [start_pos, start_pos + seq_len), each (T, hs)."""
        end = start_pos + seq_len
        if end > self.cos.size(0):
            self._build(1 << (end - 1).bit_length())  # next power of two >= end
        return self.cos[start_pos:end], self.sin[start_pos:end]

    def at(self, positions: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin for one position per batch row: positions (B,) int64 -> (B, 1, 1, hs) each.

        The batched decode step of nanollm.inference.engine, where every sequence sits at its
        own position; the (B, 1, 1, hs) tables broadcast over the heads of q, k (B, nh, 1, hs).
        `end` is max(positions) + 1, which the caller knows without reading the tensor back.
        """
        if end > self.cos.size(0):
            self._build(1 << (end - 1).bit_length())
        return self.cos[positions][:, None, None], self.sin[positions][:, None, None]  # (B, 1, 1, hs) each
