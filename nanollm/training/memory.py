"""Training memory: a pre-flight estimate from the architecture, the peak actually reached, and recomputation.

The estimate counts what AdamW training keeps alive (weights, gradients, two moments) plus the
tensors autograd saves during one micro-batch's forward pass. The loop (nanollm/training/loop.py)
logs it before the first step and compares it with `PeakMemory` afterwards;
`activation_checkpointing` trades compute for most of the activations.
"""

from __future__ import annotations

import contextlib
import functools
import resource
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute

from nanollm.config import ModelConfig
from nanollm.errors import NanollmError
from nanollm.model.transformer import value_embed_layers


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes that training holds at its peak, by kind (per process; DDP replicates all of it)."""

    params: int  # fp32 master weights
    grads: int  # fp32 gradients, one per weight
    optimizer: int  # AdamW's exp_avg and exp_avg_sq, fp32
    activations: int  # saved for backward over one micro-batch, plus the logits' transient peak

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    def describe(self) -> str:
        parts = ", ".join(
            f"{k} {format_bytes(getattr(self, k))}" for k in ("params", "grads", "optimizer", "activations")
        )
        return f"{format_bytes(self.total)} ({parts})"


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': three significant digits in the largest unit that keeps the number >= 1."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def estimate_memory(
    cfg: ModelConfig,
    vocab_size: int,
    batch_size: int,
    dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    weight_average: bool = False,
) -> MemoryEstimate:
    """Peak training memory of the Transformer for micro-batches of batch_size x cfg.block_size tokens.

    Activations per token and layer, counted from what autograd saves in nanollm/model (and
    checked against a saved-tensor count in tests/test_train.py, within 15%):
    10 C (norm outputs and their inputs, q/k/v before and after RoPE, the attention output and
    wo's input) + 4 H for SwiGLU (w1 and w3 outputs, silu, their product) or 2 H for GELU,
    in fp32: 4 bytes each. qk_norm adds its norms' saved tensors (~5 C + 2 n_head in fp32),
    value_residual each later layer's values (C) and value_embeddings each fed layer's table
    rows (C). Under 16-bit autocast the matmul outputs take 2 bytes while the
    norms and residual stream stay fp32 (~34 C + 2 k H bytes), and autocast keeps a 16-bit
    copy of every weight. The LM head saves log-softmax's fp32 (B, T, V), and the backward
    pass briefly holds two more (B, T, V) tensors: at vocab 50k and T = 1024 that is ~0.6 GB
    per sequence, the largest single term for small models. Activation checkpointing keeps only
    each block's fp32 input and recomputes one block at a time during backward. The optimizer
    term is AdamW's two fp32 moments (Muon keeps less), plus one fp32 copy of the weights with
    weight_average (train.ema_decay).
    """
    n_params = sum(_param_shapes(cfg, vocab_size))
    saved, transient = activation_bytes(cfg, vocab_size, batch_size, dtype, activation_checkpointing)
    return MemoryEstimate(
        params=4 * n_params,
        grads=4 * n_params,
        optimizer=(12 if weight_average else 8) * n_params,
        activations=saved + transient,
    )


def activation_bytes(
    cfg: ModelConfig, vocab_size: int, batch_size: int, dtype: torch.dtype, activation_checkpointing: bool
) -> tuple[int, int]:
    """(bytes autograd saves in one micro-batch's forward, extra bytes the LM head's backward holds briefly)."""
    tokens = batch_size * cfg.block_size
    C, H, k = cfg.n_embd, cfg.hidden_dim, 4 if cfg.mlp == "swiglu" else 2
    low = dtype != torch.float32
    per_layer = (34 * C + 2 * k * H) if low else 4 * (10 * C + k * H + cfg.n_head + 2)  # bytes per token
    kv = cfg.kv_heads * cfg.head_dim
    if cfg.qk_norm:  # fp32 norms of q and k: their inputs, normed outputs, gained outputs (~2.5 each), RMS per head
        per_layer += 4 * (5 * (C + kv) // 2 + cfg.n_head + cfg.kv_heads)
    mixes = 4 * kv * (cfg.n_layer - 1) if cfg.value_residual else 0  # each later layer's own v, for the mix's grads
    mixes += 4 * kv * value_embed_layers(cfg)  # each value embedding's fp32 rows, for its factor's grad
    if activation_checkpointing:
        blocks = tokens * (4 * C * cfg.n_layer + per_layer)  # the blocks' inputs, and one block recomputed
    else:
        blocks = tokens * (per_layer * cfg.n_layer + mixes)
    head = tokens * (4 * vocab_size + 4 * 3 * C)  # fp32 log-softmax; the final norm's input, normed, output
    embedding, layers, norm, untied_head, _ = _param_shapes(cfg, vocab_size)
    matrices = layers - cfg.n_layer * 2 * C + (untied_head or embedding)  # what matmuls read
    weight_copies = 2 * matrices if low else 0  # autocast's 16-bit weight casts, saved for backward
    return blocks + head + weight_copies, tokens * 2 * 4 * vocab_size  # grad of log-softmax and of logits


def _param_shapes(cfg: ModelConfig, vocab_size: int) -> list[int]:
    """Parameter counts of the Transformer (a tied LM head counted once), without building it."""
    C, H, kv = cfg.n_embd, cfg.hidden_dim, cfg.kv_heads * cfg.head_dim
    attention = C * C * 2 + C * kv * 2  # wq, wo; wk, wv
    mlp = C * H * (3 if cfg.mlp == "swiglu" else 2)
    per_layer = attention + mlp + 2 * C  # + two RMSNorm weights
    per_layer += 2 * cfg.head_dim if cfg.qk_norm else 0  # q_norm and k_norm gains
    mixes = 2 * (cfg.n_layer - 1) if cfg.value_residual else 0  # (a, b) in every layer but the first
    mixes += value_embed_layers(cfg) + (cfg.n_layer // 2 if cfg.unet_skips else 0)  # their factors c; skip weights
    head = 0 if cfg.tie_embeddings else vocab_size * C
    value_embeds = cfg.value_embeddings * vocab_size * kv  # looked up, so neither matmul nor autocast copy
    # embedding, blocks, final norm, head, value embedding tables
    return [vocab_size * C, cfg.n_layer * per_layer + mixes, C, head, value_embeds]


class PeakMemory:
    """The memory high-water mark of training on `device`, from when it was created.

    CUDA: torch.cuda.max_memory_allocated, tensors only (the caching allocator reserves a bit
    more). CPU: the rise of the process's peak resident set (getrusage), plus `resident`, what
    was already allocated for training when counting began (the weights). RSS also counts
    pages of the token memmaps read so far and the allocator's slack, so on a CPU the figure
    reads high by up to a few tens of MB for small models. MPS: not measured (None).
    """

    def __init__(self, device: torch.device, resident: int = 0):
        self.device, self.resident = device, resident
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self._start = _max_rss()

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.device.type == "cpu":
            return self.resident + _max_rss() - self._start
        return None


def _max_rss() -> int:
    """Peak resident set size of this process in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Recompute each block of model.layers during backward instead of keeping its activations.

    Only each block's input survives the forward pass (B*T*C fp32 per layer), at the price of
    a second forward through every block (~1/3 more compute). The blocks' forward methods are
    patched on the instances, so parameter names and checkpoints are unchanged; undone on exit.
    """
    if not enabled:
        yield
        return
    blocks = list(getattr(model, "layers", []))
    if not blocks:
        raise NanollmError("train.activation_checkpointing needs a model with a `layers` list of blocks")
    for block in blocks:
        block.forward = functools.partial(_recomputed, block.forward)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # back to the class's forward


def _recomputed(forward: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return forward(*args)
    return recompute(forward, *args, use_reentrant=False)  # non-reentrant: works with DDP and compile
