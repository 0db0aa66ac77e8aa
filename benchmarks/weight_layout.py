"""How fast one token's matmuls stream a model's weights in each layout: why pack_for_decode exists.

Takes the weights of a freshly initialised model, runs one row through every linear layer in
turn (as one decode step does, so each weight has been evicted from cache by the others
before it is read again when the model outgrows the cache), and reports time per token and
bytes streamed per second for: nn.Linear's row-major weights; the same column-major; the
decode layout of nanollm/model/packing.py (column-major, q/k/v and w1/w3 packed); and a
plain sum() over the same bytes, the reading ceiling. Medians of interleaved rounds.

    python benchmarks/weight_layout.py                                # 6 layers x 384, vocab 8192
    python benchmarks/weight_layout.py --layers 4 --width 256 --heads 4 --vocab 4096 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from nanollm.config import ModelConfig
from nanollm.model import Transformer


def layer_groups(model: Transformer) -> list[list[torch.nn.Linear]]:
    """The linear layers of one decode step, grouped by shared input as pack_for_decode packs them."""
    groups = []
    for block in model.layers:
        attn, ffn = block.attention, block.feed_forward
        groups += [[attn.wq, attn.wk, attn.wv], [attn.wo], [ffn.w1] + ([ffn.w3] if ffn.swiglu else []), [ffn.w2]]
    return groups + [[model.output]]


def packed_weights(model: Transformer) -> list[torch.Tensor]:
    """The weights one decode step multiplies after pack_for_decode, one per packed group, (sum outs, in) each."""
    weights = []
    for block in model.layers:
        attn, ffn = block.attention, block.feed_forward
        ffn_in = ffn.packed_in.weight if ffn.packed_in is not None else ffn.w1.weight  # GELU: w1 alone
        weights += [attn.packed_qkv.weight, attn.wo.weight, ffn_in, ffn.w2.weight]
    return [w.detach() for w in weights] + [model.output.weight.detach()]


def step_functions(model: Transformer) -> dict[str, callable]:
    """One function per layout, each running every weight of a decode step once."""
    groups = layer_groups(model)
    row_major = [[layer.weight.detach().contiguous() for layer in group] for group in groups]
    column_major = [[w.t().contiguous().t() for w in group] for group in row_major]
    decoding = copy.deepcopy(model)
    decoding.pack_for_decode()  # the real thing: one (sum outs, in) column-major weight per group
    packed = packed_weights(decoding)
    inputs = {w.size(1): torch.randn(1, w.size(1)) for group in row_major for w in group}
    flat = [w for group in row_major for w in group]

    return {
        "nn.Linear (row-major), one matmul per layer": lambda: [F.linear(inputs[w.size(1)], w) for w in flat],
        "column-major, one matmul per layer": lambda: [
            F.linear(inputs[w.size(1)], w) for group in column_major for w in group
        ],
        "decode layout: column-major, q/k/v and w1/w3 packed": lambda: [F.linear(inputs[w.size(1)], w) for w in packed],
        "sum() over the same bytes (reading ceiling)": lambda: [w.sum() for w in flat],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30, help="decode steps per round")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig(n_layer=args.layers, n_head=args.heads, n_embd=args.width, block_size=64)
    model = Transformer(cfg, args.vocab)
    weight_bytes = sum(w.numel() * w.element_size() for group in layer_groups(model) for w in (x.weight for x in group))
    functions = step_functions(model)
    times: dict[str, list[float]] = {name: [] for name in functions}
    with torch.inference_mode():
        for fn in functions.values():
            fn()  # warm-up
        for _ in range(args.rounds):
            for name, fn in functions.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                times[name].append((time.perf_counter() - start) / args.steps)
    print(f"command: python benchmarks/weight_layout.py {' '.join(sys.argv[1:])}")
    print(
        f"model: {args.layers} layers x {args.width} wide, vocab {args.vocab}: {weight_bytes / 1e6:.1f} MB of "
        f"weights per token; {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
    )
    print("| layout of the weights | matmul time per token | streamed |\n| --- | ---: | ---: |")
    for name, samples in times.items():
        seconds = statistics.median(samples)
        print(f"| {name} | {seconds * 1e3:.2f} ms | {weight_bytes / seconds / 1e9:.1f} GB/s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
