"""FlashAttention from scratch: tiled, online-softmax causal attention with its own backward, in plain PyTorch.

This module owns the algorithm only (FlashAttention-2's loop orders, Dao 2023); attention.py
wires it in as the `flash` backend. docs/flash_attention.md derives it and measures it.

Neither pass ever holds the (T, S) score matrix: the forward keeps one (block_q, block_k)
tile of scores at a time plus a running max and sum per query row, and saves only the
output and each row's log-sum-exp; the backward recomputes every tile's probabilities
from them. Extra memory is O(T * hs + block_q * block_k) per (batch, head) instead of
O(T * S). On CPU this is a memory optimisation, not a speed one: the tiles run as Python
loops over torch ops, so it is slower than the fused SDPA kernel (see the docs' table).
"""

from __future__ import annotations

import math

import torch

__all__ = ["BLOCK_K", "BLOCK_Q", "FlashAttention", "flash_attention"]

# 128 x 128 fp32 scores are 64 KiB per (batch, head): a tile and its probabilities stay in
# L2 on a CPU (and fit a GPU's shared memory), while each torch op still does enough work
# (128^2 * hs multiply-adds) that Python's per-op overhead stays a small share at T >= 1k.
BLOCK_Q = 128
BLOCK_K = 128


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start_pos: int = 0,
    *,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(hs)) v without the score matrix; differentiable.

    q (B, nh, T, hs) sits at positions [start_pos, start_pos+T) and k, v (B, nh, S, hs) at
    [0, S), S = start_pos + T: query i sees key j iff j <= start_pos + i (the KV-cache
    convention of attention.py). Returns (B, nh, T, hs) in q's dtype. GQA callers repeat
    their K/V heads first (autograd then sums the repeated heads' gradients).
    """
    if q.size(2) == 0:
        return q.clone()
    return FlashAttention.apply(q, k, v, start_pos, block_q, block_k)


class FlashAttention(torch.autograd.Function):
    """autograd wrapper: forward saves (q, k, v, out, lse); backward recomputes the tiles."""

    @staticmethod
    def forward(ctx, q, k, v, start_pos: int, block_q: int, block_k: int):  # type: ignore[override]
        out, lse = _forward(q, k, v, start_pos, block_q, block_k)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.tiling = (start_pos, block_q, block_k)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, out, lse, *ctx.tiling)
        return dq, dk, dv, None, None, None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores, softmax statistics and accumulators run in fp32 (fp64 for fp64 inputs, so gradcheck works)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _future(q_start: int, n_q: int, k_start: int, n_k: int, device: torch.device) -> torch.Tensor:
    """Boolean (n_q, n_k): True where key k_start+j lies after query position q_start+i (masked out)."""
    q_pos = torch.arange(q_start, q_start + n_q, device=device)[:, None]  # (bq, 1)
    k_pos = torch.arange(k_start, k_start + n_k, device=device)[None, :]  # (1, bk)
    return k_pos > q_pos  # (bq, bk)


def _scores(qi: torch.Tensor, kj: torch.Tensor, scale: float, q_start: int, k_start: int) -> torch.Tensor:
    """One fp32 tile of scaled scores (B, nh, bq, bk), -inf where a key is in a query's future.

    Only tiles that straddle the diagonal build a mask; tiles wholly in the past need none,
    and tiles wholly in the future are never visited by the loops.
    """
    s = (qi @ kj.transpose(-2, -1)).to(_acc_dtype(qi.dtype)).mul_(scale)  # (B, nh, bq, bk)
    n_q, n_k = qi.size(2), kj.size(2)
    if k_start + n_k - 1 > q_start:  # the tile's last key is after its first query
        s.masked_fill_(_future(q_start, n_q, k_start, n_k, s.device), float("-inf"))
    return s


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int, block_q: int, block_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns out (B, nh, T, hs) and the fp32 log-sum-exp of each query's scores (B, nh, T).

    FlashAttention-2's order: the outer loop walks query tiles, so a tile's running max m,
    sum l and unnormalised output acc live only for its inner loop over key tiles. Each key
    tile rescales what was accumulated so far by exp(m_old - m_new), so the result equals
    one softmax over all keys. Key tiles past the query tile's last position are skipped:
    causal attention does about half the work of full attention.
    """
    B, H, T, D = q.shape
    scale, acc_dtype = 1.0 / math.sqrt(D), _acc_dtype(q.dtype)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, T, dtype=acc_dtype, device=q.device)
    for i0 in range(0, T, block_q):
        i1 = min(i0 + block_q, T)
        qi = q[:, :, i0:i1]  # (B, nh, bq, hs)
        m = torch.full((B, H, i1 - i0, 1), float("-inf"), dtype=acc_dtype, device=q.device)  # running max
        l = torch.zeros_like(m)  # running sum of exp(s - m)  # noqa: E741
        acc = torch.zeros(B, H, i1 - i0, D, dtype=acc_dtype, device=q.device)  # running sum of p v
        for j0 in range(0, min(k.size(2), start_pos + i1), block_k):  # keys up to the tile's last query
            j1 = min(j0 + block_k, start_pos + i1, k.size(2))
            s = _scores(qi, k[:, :, j0:j1], scale, start_pos + i0, j0)  # (B, nh, bq, bk)
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))  # (B, nh, bq, 1)
            p = s.sub_(m_new).exp_()  # in place: the scores are not needed again
            alpha = (m - m_new).exp_()  # how much the old maximum overstated; 0 on the first tile
            l.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
            acc.mul_(alpha).add_(p.to(v.dtype) @ v[:, :, j0:j1])  # (B, nh, bq, hs); bf16 p, as naive
            m = m_new
        out[:, :, i0:i1] = acc.div_(l).to(q.dtype)
        lse[:, :, i0:i1] = (m + l.log()).squeeze(-1)
    return out, lse


def _backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    start_pos: int,
    block_q: int,
    block_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) by recomputation, FlashAttention-2's order.

    With P = softmax(S) recomputed per tile as exp(S - lse): dV = P^T dO, dP = dO V^T,
    dS = P * (dP - rowsum(dO * O)), dQ = dS K / sqrt(hs), dK = dS^T Q / sqrt(hs). The outer
    loop walks key tiles, so dK and dV of a tile are finished in its inner loop; dQ is
    accumulated across key tiles in one (B, nh, T, hs) fp32 buffer.
    """
    B, H, T, D = q.shape
    S = k.size(2)
    scale, acc_dtype = 1.0 / math.sqrt(D), _acc_dtype(q.dtype)
    dout32 = dout.to(acc_dtype)
    delta = (dout32 * out.to(acc_dtype)).sum(dim=-1, keepdim=True)  # (B, nh, T, 1) rowsum(dO * O)
    dq = torch.zeros(B, H, T, D, dtype=acc_dtype, device=q.device)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    lse = lse.unsqueeze(-1)  # (B, nh, T, 1)
    for j0 in range(0, S, block_k):
        j1 = min(j0 + block_k, S)
        kj, vj = k[:, :, j0:j1], v[:, :, j0:j1]  # (B, nh, bk, hs)
        kj32, vj32 = kj.to(acc_dtype), vj.to(acc_dtype)
        dk_j = torch.zeros(B, H, j1 - j0, D, dtype=acc_dtype, device=q.device)
        dv_j = torch.zeros_like(dk_j)
        for i0 in range(max(0, j0 - start_pos), T, block_q):  # queries that see at least key j0
            i1 = min(i0 + block_q, T)
            s = _scores(q[:, :, i0:i1], kj, scale, start_pos + i0, j0)  # (B, nh, bq, bk)
            p = s.sub_(lse[:, :, i0:i1]).exp_()  # the forward's probabilities, recomputed
            do_i = dout32[:, :, i0:i1]  # (B, nh, bq, hs)
            dv_j += p.transpose(-2, -1) @ do_i  # (B, nh, bk, hs)
            ds = (do_i @ vj32.transpose(-2, -1)).sub_(delta[:, :, i0:i1]).mul_(p)  # (B, nh, bq, bk) dS
            dq[:, :, i0:i1] += (ds @ kj32).mul_(scale)  # (B, nh, bq, hs)
            dk_j += (ds.transpose(-2, -1) @ q[:, :, i0:i1].to(acc_dtype)).mul_(scale)  # (B, nh, bk, hs)
        dk[:, :, j0:j1] = dk_j.to(k.dtype)
        dv[:, :, j0:j1] = dv_j.to(v.dtype)
    return dq.to(q.dtype), dk, dv
