"""The int8 matmuls of one decode step, alone: nanollm's kernel vs aten's vs dequantize-then-matmul vs fp32 BLAS.

One call per weight matrix of a model shape, as a decode step makes them (q/k/v fused, wo,
w1/w3 fused, w2 per layer, then the LM head), all distinct matrices, so that they stream from
memory as in a real step rather than from the cache. For each row count M (batch x new
tokens) and thread count, the time of the whole set, the median over --repeats:

- nanollm: nanollm/inference/int8_gemm.c (fp32 activations), where it runs here;
- aten: torch.ops.aten._weight_int8pack_mm (bf16 activations, as quantize.py feeds it);
- dequantize: F.linear(x, w.float()) * scales, quantize.py's path above NATIVE_MAX_ROWS (ATEN_MAX_ROWS on aten's);
- fp32: F.linear over fp32 weights in the decode layout (packing.py's column-major
  transpose), the same matmuls without int8;
- inductor: dequantize-then-matmul of every matrix in one torch.compile'd function with the
  compiled decode step's settings (nanollm.inference.compiled.INDUCTOR_OPTIONS): the int8 path
  of `nanollm serve`'s compiled step, where a one-row matmul becomes a fused product and sum;
- torchao: torchao's Int8WeightOnlyConfig on nn.Linear layers of the same (dequantized)
  weights, compiled the same way (only with torchao installed: pip install torchao).
The last two compile once per M before timing (untimed).

GB/s is the weights' bytes (int8, or fp32 for the last column) over the time: for M = 1 the
speed at which each path streams them.

    python benchmarks/int8_matmul.py                     # GPT-2 124M shape, M = 1, 4, 16, 64
    python benchmarks/int8_matmul.py --rows 1 --threads 1,2
    python benchmarks/int8_matmul.py --rows 1,4,16,128 --threads 2 --shape 4x128x4096   # nanollm's default
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from nanollm.config import ModelConfig
from nanollm.hardware import describe_machine
from nanollm.inference.compiled import INDUCTOR_OPTIONS
from nanollm.inference.native import int8_gemm
from nanollm.inference.quantize import quantize_rows
from nanollm.model import Transformer


def step_shapes(layers: int, width: int, vocab: int) -> list[tuple[int, int]]:
    """(in, out) of each matmul of one decode step of nanollm's model, in order, as quantize_int8 fuses them.

    The model is built on the meta device (no memory) with modded-nanogpt's options off, as
    int8_decode.py's GPT-2 124M shape; its FeedForward decides the hidden width (SwiGLU).
    """
    cfg = ModelConfig(n_layer=layers, n_head=width // 64, n_embd=width, block_size=1024, qk_norm=False,
                      value_residual=False)  # fmt: skip
    with torch.device("meta"):
        model = Transformer(cfg, vocab)
    shapes = []
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        shapes.append((width, attn.wq.out_features + attn.wk.out_features + attn.wv.out_features))
        shapes.append((attn.wo.in_features, attn.wo.out_features))
        shapes.append((width, ffn.w1.out_features + (ffn.w3.out_features if ffn.w3 is not None else 0)))
        shapes.append((ffn.w2.in_features, ffn.w2.out_features))
    return shapes + [(width, vocab)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="12x768x50257", help="LAYERSxWIDTHxVOCAB (default: GPT-2 124M)")
    parser.add_argument("--rows", default="1,4,16,64", help="M values, comma-separated")
    parser.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per cell (median)")
    args = parser.parse_args()
    layers, width, vocab = (int(v) for v in args.shape.split("x"))
    shapes = step_shapes(layers, width, vocab)
    kernel = int8_gemm()

    torch.manual_seed(0)
    weights = []
    for k, n in shapes:
        q, scales = quantize_rows(torch.randn(n, k) / k**0.5)
        fp32 = (q.float() * scales[:, None]).t().contiguous().t()  # (n, k), column-major as packing.py lays it
        weights.append((q, scales, scales.bfloat16(), fp32))
    int8_bytes = sum(q.numel() for q, *_ in weights)

    def dequantize_all(xs: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        pairs = zip(shapes, weights, strict=True)
        return [F.linear(xs[k], q.to(xs[k].dtype)) * scales for (k, _), (q, scales, *_) in pairs]

    compiled = {"inductor": torch.compile(dequantize_all, dynamic=False, options=INDUCTOR_OPTIONS)}
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        print("torchao is not installed: its column is left out (pip install torchao)")
    else:
        linears = torch.nn.ModuleList(torch.nn.Linear(k, n, bias=False) for k, n in shapes)
        with torch.no_grad():
            for linear, (_, _, _, fp32) in zip(linears, weights, strict=True):
                linear.weight.copy_(fp32)
        quantize_(linears, Int8WeightOnlyConfig())

        def torchao_all(xs: dict[int, torch.Tensor]) -> list[torch.Tensor]:
            return [linear(xs[k]) for (k, _), linear in zip(shapes, linears, strict=True)]

        compiled["torchao"] = torch.compile(torchao_all, dynamic=False, options=INDUCTOR_OPTIONS)

    def run_all(path: str, xs: dict[int, torch.Tensor]) -> None:
        if path in compiled:
            with torch.inference_mode():
                compiled[path](xs)
            return
        for (k, _), (q, scales, scales_bf16, fp32) in zip(shapes, weights, strict=True):
            x = xs[k]
            if path == "nanollm":
                kernel(x, q, scales)
            elif path == "aten":
                torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, scales_bf16).float()
            elif path == "dequantize":
                F.linear(x, q.float()) * scales
            else:
                F.linear(x, fp32)

    paths = (["nanollm"] if kernel is not None else []) + ["aten", "dequantize", "fp32", *compiled]
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {describe_machine()}, torch {torch.__version__}; nanollm kernel: "
          f"{kernel.isa if kernel else 'cannot run here'}; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"{len(shapes)} matmuls per step, {int8_bytes / 1e6:.0f} MB of int8 weights "
          f"({4 * int8_bytes / 1e6:.0f} MB in fp32); median of {args.repeats} passes\n")  # fmt: skip
    versus = [p for p in ("aten", "fp32", *compiled) if p in paths]
    print("| M | threads | " + " | ".join(f"{p} ms (GB/s)" for p in paths) + " | "
          + " | ".join(f"{p} / nanollm" for p in versus) + " |")  # fmt: skip
    print("| ---: | ---: | " + " | ".join("---:" for _ in paths) + " | " + " | ".join("---:" for _ in versus) + " |")
    before = torch.get_num_threads()
    for m in (int(v) for v in args.rows.split(",")):
        xs = {k: torch.randn(m, k) for k in {k for k, _ in shapes}}
        for t in (int(v) for v in args.threads.split(",")):
            torch.set_num_threads(t)
            times: dict[str, list[float]] = {p: [] for p in paths}
            for p in paths:
                run_all(p, xs)  # warm-up
            for r in range(args.repeats):
                for p in paths if r % 2 == 0 else paths[::-1]:
                    t0 = time.perf_counter()
                    run_all(p, xs)
                    times[p].append(time.perf_counter() - t0)
            med = {p: statistics.median(v) for p, v in times.items()}
            cells = [f"{med[p] * 1e3:.2f} ({(4 if p == 'fp32' else 1) * int8_bytes / med[p] / 1e9:.1f})" for p in paths]
            ratios = [f"{med[p] / med['nanollm']:.2f}x" if kernel else "-" for p in versus]
            print(f"| {m} | {t} | " + " | ".join(cells + ratios) + " |")
    torch.set_num_threads(before)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
