"""int8 weight-only quantization for inference: `quantize_int8(model)` turns a Transformer's linear layers to int8.

Owns the int8 format (one symmetric scale per output channel), the choice of matmul that
reads it and the conversion of a model in place. What to quantize is decided here; the
architecture stays transformer.py's and attention.py's, which see ordinary modules with the
same call signature. What int8 costs in bits per byte is the evaluate stage's to measure
(eval.int8); the speed, benchmarks/int8_decode.py's.

Why it pays: a batch-1 decode step reads every weight once, so its time is the time to
stream the weights, and int8 is a quarter of fp32's bytes. It pays as far as the kernel
keeps up with memory: nanollm's own (native.py, int8_gemm.c; x86 with AVX2) streams int8
weights ~2.5x faster than torch's aten._weight_int8pack_mm on a CPU without native bf16,
which serves where ours cannot run. benchmarks/README.md has the figures and commands.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanollm.inference.native import int8_kernel
from nanollm.model.transformer import Transformer

__all__ = [
    "Int8Linear",
    "Int8Transformer",
    "int8_kernel_rows",
    "int8_native_kernel",
    "quantize_int8",
    "quantize_rows",
]

QMAX = 127  # symmetric range [-127, 127]: -128 is left out so that w and -w quantize alike

# Up to this many rows (batch x tokens) an int8 kernel runs; above it the weight is
# dequantized to the activations' dtype and a BLAS matmul runs. A kernel widens every weight
# once per few rows (ours and aten's per 4), so its cost grows with the rows, while
# dequantizing costs one pass over the weights (written as fp32) plus a GEMM. On the 2-core
# AVX2 machine, over the 124M shape's 49 matmuls at 2 threads (benchmarks/int8_matmul.py),
# ours took 0.06x dequantize-then-matmul's time at 1 row, 0.23x at 16, 0.55-0.57x at 64,
# 0.81x at 128 and ~1.03x at 256; aten's 0.41x at 16 and ~0.9-1x at 64. Batched decoding
# (B <= 16) and prompts of up to 128 tokens (64 on aten's) stay on a kernel; evaluation
# batches and longer prefills dequantize.
NATIVE_MAX_ROWS = 128
ATEN_MAX_ROWS = 64


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) float -> (int8 (out, in), fp32 scales (out,)) with weight ~= int8 * scales[:, None].

    Each row (output channel) gets scale = max|row| / 127, rounded up to the nearest bfloat16
    value: aten's kernel takes its scales in bf16, and with the scale exactly representable
    it and the fp32 paths dequantize to the same numbers (rounding up keeps every
    |w / scale| <= 127, so nothing clips). The worst error per weight is half a step,
    scale / 2, i.e. 0.4% of the row's largest weight (plus the rounding-up of the scale,
    at most 2^-8 of it). An all-zero row gets the smallest normal scale and all-zero int8.
    """
    w = weight.detach().float().contiguous()  # row-major, whatever the layout (pack_for_decode's is column-major)
    scales = w.abs().amax(dim=1) / QMAX  # (out,)
    scales = scales.clamp(min=torch.finfo(torch.bfloat16).tiny)
    rounded = scales.to(torch.bfloat16)
    below = rounded.float() < scales  # round-to-nearest went down: step to the next bf16 value up
    rounded[below] = (rounded[below].view(torch.int16) + 1).view(torch.bfloat16)  # positive: next bit pattern
    scales = rounded.float()
    q = torch.round(w / scales[:, None]).clamp(-QMAX, QMAX).to(torch.int8)  # (out, in), row-major: the kernel's B
    return q, scales


def kernel_takes(in_features: int) -> bool:
    """Whether aten._weight_int8pack_mm's vectorised CPU path can serve a layer with this many inputs.

    The fallback where nanollm's kernel (native.py) cannot run. Its contract in torch 2.13 on
    CPU: A (M, K) contiguous, in the dtype of the scales (fp32, bf16 or fp16), B (N, K) int8
    contiguous, scales (N,), out (M, N) in A's dtype; no autograd. Only bf16 has an
    AVX2/AVX-512 kernel on x86; fp32 and fp16 take a scalar loop ~10x slower than an fp32
    BLAS matmul, so fp32 activations are cast to bf16 for it. The bf16 kernel loads A 8
    values at a time with aligned loads and has no remainder loop: K must be a multiple of 8
    (else it reads past each row, or crashes on a misaligned row), and A's rows must start
    16-byte aligned. Without native bf16 it is compute-bound: streaming 126 MB of int8
    weights it reached 6.1 GB/s on one core and 10.5 on two, where fp32 BLAS streams 14-16.
    """
    return in_features % 8 == 0


def _int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, scales_bf16: torch.Tensor,
                 max_rows: int | None, native: bool) -> torch.Tensor:  # fmt: skip
    """x (..., in) @ (weight * scales[:, None])^T -> (..., out) in x's dtype.

    Few fp32 rows on the CPU (up to `max_rows`, or None: NATIVE_MAX_ROWS for nanollm's
    kernel, ATEN_MAX_ROWS for aten's): nanollm's kernel (fp32 activations throughout) where it
    runs and `native` allows, else aten's (bf16 activations inside). Otherwise
    dequantize-then-matmul. The decode hot path is written for few Python-level ops: a 124M
    decode step makes 49 calls, and each microsecond here is ~0.1% of the step. (Passing a
    shape as a tuple, as in view(x.shape[:-1] + (n,)), costs 5 us; unpacked, 1-3 us.)
    """
    K = x.shape[-1]
    if torch.compiler.is_compiling():
        # One opaque operator in a compiled graph, which runs this function's eager choice of kernel when called:
        # dynamo cannot trace the ctypes kernel, and inductor's own dequantize-then-matmul streams the weights
        # several times slower than it (benchmarks/int8_matmul.py; docs/serving.md)
        return torch.ops.nanollm.int8_matmul(x, weight, scales, scales_bf16, max_rows, native)
    if native and x.dtype == torch.float32 and x.is_cpu:
        if x.numel() <= (NATIVE_MAX_ROWS if max_rows is None else max_rows) * K:
            kernel = int8_kernel()
            if kernel is not None:
                return kernel(x, weight, scales)  # (..., N) fp32, x's rows read in place
    *lead, _ = x.shape
    rows = x.reshape(-1, K)  # (M, K)
    few_rows = rows.size(0) <= (ATEN_MAX_ROWS if max_rows is None else max_rows) and x.is_cpu
    if few_rows and x.dtype in (torch.float32, torch.bfloat16) and kernel_takes(K):
        if x.dtype == torch.float32:
            # rows.bfloat16() is a fresh contiguous tensor, which the allocator aligns to 64 bytes
            y = torch.ops.aten._weight_int8pack_mm(rows.bfloat16(), weight, scales_bf16)  # (M, N) bf16
            return y.float().view(*lead, weight.size(0))
        rows = rows.contiguous()
        if rows.data_ptr() % 16:  # a view at an odd offset: the kernel's aligned loads need a copy
            rows = rows.clone()
        return torch.ops.aten._weight_int8pack_mm(rows, weight, scales_bf16).view(*lead, weight.size(0))
    # Dequantize, then a plain matmul in x's dtype: correct on every device and dtype, and the
    # faster path for many rows (prefill, evaluation), where the GEMM's FLOPs dominate.
    y = F.linear(rows, weight.to(x.dtype)) * scales.to(x.dtype)  # (M, N)
    return y.view(*lead, weight.size(0))


@torch.library.custom_op("nanollm::int8_matmul", mutates_args=())
def _int8_matmul_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    scales_bf16: torch.Tensor,
    max_rows: int | None,
    native: bool,
) -> torch.Tensor:
    """_int8_matmul as one operator (nanollm::int8_matmul), which a compiled graph calls as it is (compiled.py).

    A Python custom op costs a few microseconds a call more than the eager function: a price worth
    paying where the weights are large, which is where int8 pays at all (docs/serving.md).
    """
    return _int8_matmul(x, weight, scales, scales_bf16, max_rows, native)


@_int8_matmul_op.register_fake
def _(x, weight, scales, scales_bf16, max_rows, native):
    return x.new_empty((*x.shape[:-1], weight.size(0)))


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights: y = (x W_int8^T) * scales, one scale per output channel.

    Buffers, not parameters: `weight` (out, in) int8 and `scales` (out,) fp32 are in the state
    dict; `scales_bf16`, aten's kernel's copy, is not. Nothing here trains (the kernel has no
    backward). `weight` may be a row slice of a fused matrix (Int8Fused), contiguous all the same.
    """

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("scales_bf16", scales.to(torch.bfloat16), persistent=False)
        self.kernel_max_rows: int | None = None  # None: each kernel's own limit (NATIVE_MAX_ROWS, ATEN_MAX_ROWS)
        self.native_kernel = True  # nanollm's kernel where it runs (native.py); False: aten's

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("Int8Linear quantizes bias-free layers only (nanollm has no biases)")
        return cls(*quantize_rows(linear.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _int8_matmul(x, self.weight, self.scales, self.scales_bf16, self.kernel_max_rows, self.native_kernel)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8Fused:
    """Int8Linear layers over the same input (q/k/v; SwiGLU's w1/w3) run as one int8 matmul.

    Their rows are stacked into one (sum of outs, in) matrix and each layer's weight becomes a
    row slice of it, so the fused call and the layers one by one read the same bytes. At the
    124M shape (2 threads) the fused calls took 0.88x the time of separate ones for q/k/v
    and 0.93x for w1/w3 (~0.7 ms of an ~18 ms decode step): fewer calls and wrappers. It
    fills the slot attention.py and transformer.py keep for packing.py's fp32 packs
    (`packed_qkv`, `packed_in`), so it speaks that interface: `usable()`, a call returning
    one output per layer, and `linears`/`intact()` for pack() (a no-op repack).
    """

    def __init__(self, *linears: Int8Linear):
        self.linears = linears
        self.sizes = [layer.out_features for layer in linears]
        self.weight = torch.cat([layer.weight for layer in linears])  # (sum outs, in) int8
        self.scales = torch.cat([layer.scales for layer in linears])  # (sum outs,)
        self.scales_bf16 = self.scales.to(torch.bfloat16)
        start = 0
        for layer, size in zip(linears, self.sizes, strict=True):
            layer.weight = self.weight[start : start + size]  # a contiguous row slice: no copy
            layer.scales = self.scales[start : start + size]
            layer.scales_bf16 = self.scales_bf16[start : start + size]
            start += size

    def intact(self) -> bool:
        """True while the layers' weights still live in the fused matrix (model.to(...) moves the layers only)."""
        return self.linears[0].weight.data_ptr() == self.weight.data_ptr()

    def usable(self) -> bool:
        """int8 weights never train, so grad mode does not matter; a compiled graph trusts the fusion
        (it cannot read data pointers; packing.py's packs are trusted alike)."""
        return torch.compiler.is_compiling() or self.intact()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (..., in) -> one output per layer, (..., out_i) each, from a single int8 matmul."""
        first = self.linears[0]
        y = _int8_matmul(x, self.weight, self.scales, self.scales_bf16, first.kernel_max_rows, first.native_kernel)
        return y.split(self.sizes, dim=-1)


class Int8Transformer(Transformer):
    """A Transformer whose linear layers quantize_int8 has turned into Int8Linear: inference only.

    Never constructed directly: quantize_int8 converts a trained model in place and sets its
    class to this one, which changes two methods. pack_for_decode is a no-op, as the int8
    layout (row-major rows, q/k/v and w1/w3 fused) is already the decode layout; and train()
    refuses, since int8 weights have no gradient.
    """

    def pack_for_decode(self) -> None:
        """Nothing to do: quantize_int8 laid the int8 weights out for decoding (fused, row-major)."""

    def train(self, mode: bool = True) -> Int8Transformer:
        if mode:
            raise RuntimeError(
                "this model holds int8 weights (quantize_int8) and is for inference only: "
                "train the fp32 model and quantize the result"
            )
        return super().train(False)


def quantize_int8(model: Transformer) -> Int8Transformer:
    """Convert `model` in place for inference: every linear weight becomes per-channel int8; returns it.

    Quantized: attention wq/wk/wv/wo, the MLP's w1/w2/w3 and the LM head `output` (with
    tie_embeddings a quantized copy of the shared table). The token embedding stays fp32: a
    lookup reads one row per token, so int8 would save memory (a quarter of the table) but
    no decode time, and the KV cache and the callers read the model's dtype from it. Norm
    gains and value_residual's mixes stay as they are. q/k/v and SwiGLU's w1/w3 are fused
    into one int8 matmul each (as packing.py does for fp32). Any fp32 decode packs are
    dropped; the model is left in eval mode with requires_grad off everywhere, and its
    class becomes Int8Transformer (pack_for_decode a no-op, train() an error).

    The matmul, for few fp32 rows on the CPU (decode, batched decode, short prompts):
    nanollm's kernel (native.py, up to NATIVE_MAX_ROWS) where it runs, else
    aten._weight_int8pack_mm (up to ATEN_MAX_ROWS) with the activations cast to bf16 for
    it (see kernel_takes). Otherwise dequantize-then-matmul in
    the activations' dtype, which also serves every other device.
    """
    if isinstance(model, Int8Transformer):
        return model
    if not isinstance(model, Transformer):
        raise TypeError(f"quantize_int8 takes a nanollm Transformer, got {type(model).__name__}")
    with torch.no_grad():
        for layer in model.layers:
            attn, ffn = layer.attention, layer.feed_forward
            for name in ("wq", "wk", "wv", "wo"):
                setattr(attn, name, Int8Linear.from_linear(getattr(attn, name)))
            attn.packed_qkv = Int8Fused(attn.wq, attn.wk, attn.wv)
            for name in ("w1", "w2", "w3"):
                if getattr(ffn, name) is not None:
                    setattr(ffn, name, Int8Linear.from_linear(getattr(ffn, name)))
            ffn.packed_in = Int8Fused(ffn.w1, ffn.w3) if ffn.w3 is not None else None
        model.output = Int8Linear.from_linear(model.output)
    for p in model.parameters():
        p.requires_grad_(False)
    model.__class__ = Int8Transformer
    return model.eval()


def int8_modules(model: nn.Module) -> list[Int8Linear]:
    return [m for m in model.modules() if isinstance(m, Int8Linear)]


@contextmanager
def _int8_setting(model: nn.Module, name: str, value: Any) -> Iterator[None]:
    """Within the block, every Int8Linear of `model` has attribute `name` set to `value`."""
    modules = int8_modules(model)
    before = [getattr(m, name) for m in modules]
    try:
        for m in modules:
            setattr(m, name, value)
        yield
    finally:
        for m, old in zip(modules, before, strict=True):
            setattr(m, name, old)


def int8_kernel_rows(model: nn.Module, max_rows: int | None) -> AbstractContextManager[None]:
    """Within the block, an int8 kernel serves calls of up to `max_rows` rows (0: never, a large number: always,
    None: each kernel's own limit, the default).

    For measurements: the quality of the kernel path at evaluation's batch sizes, or the
    crossover with dequantize-then-matmul.
    """
    return _int8_setting(model, "kernel_max_rows", max_rows)


def int8_native_kernel(model: nn.Module, enabled: bool) -> AbstractContextManager[None]:
    """Within the block, nanollm's int8 kernel serves where it runs (True) or aten's always does (False).

    For measurements: benchmarks/int8_decode.py races the two; tests compare their outputs.
    """
    return _int8_setting(model, "native_kernel", enabled)
