"""The compiled decode step against the eager one, and with each of its settings taken back.

One step of the model (params.yaml's shape, seeded weights) over a static cache, at each batch
size, as a time per step:

- eager: Transformer.forward with a RaggedStep, the engine's uncompiled step (batch 1: the
  plain cached step generate takes);
- compiled: CompiledDecoder as it ships (COMPILE_OPTIONS);
- "no mm decomposition": without decompose_mm_pass, so a one-row matmul stays a BLAS call;
- "python wrapper": without cpp_wrapper, so a Python function calls the generated kernels;
- "every guard": without the guard filter, so dynamo checks every guard it made before a call;
- the step's floors, timed alone: "matmuls alone" (every weight of the step multiplied by the
  rows, one BLAS call per packed weight) and "attention alone" (SDPA of one query a row over
  the whole static cache, in every layer). Their sum is the least a step of this many rows
  costs while it keeps these kernels (BLAS for every weight, attention over the whole cache);
  against batch 1's compiled step it bounds what a batch can gain, which the script prints
  after the table.

Each variant compiles once per batch size before timing (the compile seconds are printed,
with the inductor cache this process found: set TORCHINDUCTOR_CACHE_DIR to an empty folder for
a cold one). Rounds alternate the order of the variants; the figure is the median.

    python benchmarks/compiled_step.py
    python benchmarks/compiled_step.py --batches 1,16 --seq-len 272 --steps 300 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import nanollm.inference.compiled as compiled
from nanollm.config import Config
from nanollm.hardware import describe_machine
from nanollm.inference.compiled import CompiledDecoder
from nanollm.model import Transformer
from nanollm.model.attention import RaggedStep

SHIPPED = dict(compiled.COMPILE_OPTIONS)


def without(key: str) -> dict:
    return {k: v for k, v in SHIPPED.items() if k != key}


# variant -> the options the step is compiled with
VARIANTS = {
    "compiled": SHIPPED,
    "no mm decomposition": without("post_grad_fusion_options"),
    "python wrapper": without("cpp_wrapper"),
    "every guard": without("guard_filter_fn"),
}


# the step's floors: parts of it alone, at their fastest, what no fusion can take below
FLOORS = ["matmuls alone", "attention alone"]


def floor_of(model: Transformer, name: str, rows: int, seq_len: int) -> Callable[[], None]:
    """A step's matmuls (one BLAS call per packed weight, as the decode layout packs them) or its attention
    (SDPA of one query per row over the whole static cache, masked, in every layer), alone."""
    cfg = model.cfg
    if name == "matmuls alone":
        weights = [model.output.weight.detach()]
        for layer in model.layers:
            a, f = layer.attention, layer.feed_forward
            weights.append(torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]).detach())  # q, k, v in one
            weights.append(a.wo.weight.detach())
            gate_up = [f.w1.weight, f.w3.weight] if f.w3 is not None else [f.w1.weight]
            weights += [torch.cat(gate_up).detach(), f.w2.weight.detach()]
        inputs = {w.size(1): torch.randn(rows, w.size(1)) for w in weights}

        def matmuls() -> None:
            for w in weights:
                torch.nn.functional.linear(inputs[w.size(1)], w)

        return matmuls
    q = torch.randn(rows, cfg.n_head, 1, cfg.head_dim)
    k, v = torch.randn(2, rows, cfg.kv_heads, seq_len, cfg.head_dim)
    mask = (torch.arange(seq_len)[None, :] <= torch.tensor([seq_len // 2 + i for i in range(rows)])[:, None])[
        :, None, None, :
    ]  # (B, 1, 1, S), as RaggedStep.over_cache

    gqa = cfg.n_head != cfg.kv_heads

    def attention() -> None:
        for _ in model.layers:
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    return attention


def step_of(model: Transformer, name: str, rows: int, seq_len: int) -> tuple[Callable[[], None], float]:
    """(one decode step of `rows` rows at their positions, the seconds its compile took)."""
    tokens = torch.zeros(rows, 1, dtype=torch.long)
    positions = [seq_len // 2 + i for i in range(rows)]
    if name in FLOORS:
        return floor_of(model, name, rows, seq_len), 0.0
    if name == "eager":
        model.setup_cache(rows, seq_len)
        caches = [layer.attention.cache for layer in model.layers]
        step = RaggedStep.at(positions, torch.device("cpu")) if rows > 1 else positions[0]

        def eager() -> None:
            for layer, cache in zip(model.layers, caches, strict=True):
                layer.attention.cache = cache
            model(tokens, step)

        return eager, 0.0
    compiled.COMPILE_OPTIONS = VARIANTS[name]  # read when the decoder compiles
    try:
        decoder = CompiledDecoder(model, max_batch=rows, max_seq_len=seq_len)
        decoder.warmup([rows])
    finally:
        compiled.COMPILE_OPTIONS = SHIPPED

    def run() -> None:
        decoder.attach()
        decoder(tokens, positions)

    return run, decoder.compile_seconds[rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="for the model's shape")
    parser.add_argument("--batches", default="1,16", help="rows per step, comma-separated")
    parser.add_argument("--seq-len", type=int, default=272, help="positions in the static cache (16 + 256)")
    parser.add_argument("--steps", type=int, default=300, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import yaml

    raw = yaml.safe_load(args.params.read_text()) if args.params.is_file() else {}
    cfg = Config.from_dict({k: raw[k] for k in ("model", "tokenizer") if k in (raw or {})})
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.tokenizer.vocab_size).eval()
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {describe_machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"model {cfg.model.n_layer}L/{cfg.model.n_embd}d/{cfg.tokenizer.vocab_size}v, seeded weights, fp32; "
          f"cache of {args.seq_len} positions; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    names = ["eager", *VARIANTS, *FLOORS]
    rows_out, compiled_us = [], {}
    with torch.inference_mode():
        for rows in (int(b) for b in args.batches.split(",")):
            steps, compile_s = {}, {}
            for name in names:
                steps[name], compile_s[name] = step_of(model, name, rows, args.seq_len)
            times: dict[str, list[float]] = {name: [] for name in names}
            for r in range(args.rounds):
                for name in names if r % 2 == 0 else names[::-1]:
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        steps[name]()
                    times[name].append((time.perf_counter() - t0) / args.steps)
            med = {name: statistics.median(v) for name, v in times.items()}
            compiled_us[rows] = (med["compiled"], med["matmuls alone"] + med["attention alone"])
            for name in names:
                rows_out.append([str(rows), name, f"{med[name] * 1e6:.0f}", f"x{med['eager'] / med[name]:.2f}",
                                 f"x{med[name] / med['compiled']:.2f}", f"{compile_s[name]:.1f}"])  # fmt: skip
            model.clear_cache()
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    header = ["batch", "step", "us a step", "eager / this", "this / compiled", "compile (s)"]
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for r in rows_out:
        print("| " + " | ".join(r) + " |")
    if 1 in compiled_us and len(compiled_us) > 1:
        one = compiled_us[1][0]
        print("\nthe most a batch can gain over batch 1, were its step no more than its matmuls and attention alone:")
        for rows, (step, floor) in sorted(compiled_us.items()):
            if rows > 1:
                print(f"- batch {rows}: x{rows * one / floor:.1f} (batch 1's compiled step {one * 1e6:.0f} us; "
                      f"batch {rows}'s floor {floor * 1e6:.0f} us, its compiled step {step * 1e6:.0f} us: "
                      f"x{rows * one / step:.1f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
