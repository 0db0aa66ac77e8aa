"""The decode layout of linear weights: column-major, side by side where layers read one input.

Owns how weights are laid out in memory for batch-1 decoding on the CPU; the modules that
own the layers (attention.py, transformer.py) decide which layers share a pack and when to
use it, and the caller decides when to pack (Transformer.pack_for_decode). Nothing here
changes a value, a shape, a parameter name or a state_dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PackedLinears:
    """Bias-free nn.Linear layers over the same input, their weights moved into one buffer.

    The buffer is (in, sum of outs), contiguous, and each layer's weight becomes a view of
    its columns: shape (out, in) as before, strides (1, sum of outs). Two things make this
    the faster layout when one token at a time goes through the model:

    - y = x W^T with W^T stored row by row is a sum of contiguous rows scaled by x's entries,
      which the CPU BLAS streams ~1.5x faster than dot products over W's rows (~15 vs ~10
      GB/s here; the weight bytes, not the FLOPs, bound a batch-1 step);
    - layers that read the same input (q, k, v; SwiGLU's w1 and w3) become one matmul over
      one longer stream: fewer calls, ~15% less time for the matmuls of a decode step.

    The layers stay ordinary parameters: training, optimisers, load_state_dict (an
    in-place copy) and torch.save see the same values and shapes, and an optimizer step
    writes through the views into the buffer. Only the fused call bypasses the layers, so
    it is offered for no-grad work only, and only while every layer still points into the
    buffer (model.to(...) or a reassigned .data makes the pack stale, and callers then fall
    back to the layers one by one).
    """

    def __init__(self, *linears: nn.Linear):
        if any(layer.bias is not None for layer in linears):
            raise ValueError("PackedLinears packs bias-free layers only")
        self.linears = linears
        self.sizes = [layer.out_features for layer in linears]
        # A fresh tensor, made outside inference mode so that the parameters built on it
        # can still be trained even when the caller packs inside inference mode.
        with torch.no_grad(), torch.inference_mode(False):
            buf = torch.cat([layer.weight.t() for layer in linears], dim=1).contiguous()  # (in, sum outs)
            start = 0
            for layer, size in zip(linears, self.sizes, strict=True):
                layer.weight.data = buf[:, start : start + size].t()  # (out, in) view, strides (1, sum outs)
                start += size
        self.weight = buf.t()  # (sum outs, in): F.linear's orientation
        self._pointers = self._current_pointers()

    def _current_pointers(self) -> tuple[int, ...]:
        return tuple(layer.weight.data_ptr() for layer in self.linears)

    def intact(self) -> bool:
        """True while every layer's weight still lives in the buffer (nothing reassigned its .data)."""
        return self._current_pointers() == self._pointers

    def usable(self) -> bool:
        """True when a fused call is valid: no autograd wanted and the pack intact.

        A compiled graph cannot read data pointers, so while compiling the pack is trusted: the
        compiled decode step (nanollm.inference.compiled) packs the model just before it compiles.
        """
        if torch.compiler.is_compiling():
            return not torch.is_grad_enabled()
        return not torch.is_grad_enabled() and self.intact()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (..., in) -> one output per layer, (..., out_i) each, from a single matmul."""
        return F.linear(x, self.weight).split(self.sizes, dim=-1)


def pack(*linears: nn.Linear, current: PackedLinears | None = None) -> PackedLinears:
    """`current` when it still holds these layers' weights (packing twice is a no-op), else a new pack."""
    if current is not None and current.linears == linears and current.intact():
        return current
    return PackedLinears(*linears)


def column_major(linear: nn.Linear) -> None:
    """The decode layout of a layer that shares its input with no other: its weight alone, column-major.

    Idempotent, with no state to keep: the layout is read off the weight's strides.
    """
    weight = linear.weight
    if weight.stride() != (1, weight.size(0)):
        PackedLinears(linear)
