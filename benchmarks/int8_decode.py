"""Batch-1 greedy decoding in int8: nanollm int8 vs nanollm fp32 vs transformers' generate, same weights.

For each model shape, from one seeded fp32 model: (a) nanollm fp32 in its best layout
(pack_for_decode), (b) nanollm int8 (nanollm.inference.quantize.quantize_int8 of a copy) on
nanollm's own int8 kernel (nanollm/inference/int8_gemm.c) and, where that runs, the same int8
model on torch's aten._weight_int8pack_mm, which serves where ours cannot, and (c)
transformers' LlamaForCausalLM over the same weights (nanollm.inference.peers: exported with
export_hf, loaded with from_pretrained) with its dynamic and its static cache, in fp32 and in
bf16, the fastest of the four being the peer. bf16 counts although this CPU has no
native bf16: a batch-1 step streams the weights, and oneDNN's bf16 matmul reads half of
fp32's bytes (measured ~1.5x fp32 at 2 threads here). transformers has no int8 path offline
(torchao, quanto and bitsandbytes are not installed). An architecture Llama cannot express
(the pipeline's qk_norm and value_residual) meets transformers on its Llama counterpart of
the same shape (nanollm.hf_folder.llama_counterpart), as the bench stage does.

Every round runs every column once at every thread count in --threads, nanollm first on even
rounds and transformers first (in reverse order) on odd ones; tokens/s is end to end (new
tokens over the whole call, prefill included), the median over rounds. Each column's figure
is its best thread count (the same choices for every column), and the ratios compare those.

    python benchmarks/int8_decode.py                              # GPT-2 124M shape + the params.yaml model
    python benchmarks/int8_decode.py --shapes gpt2 --peer-dtypes float32 --new 64   # quicker: fp32 peer only

--out FILE also writes the figures as JSON with the command, the machine and the load
averages: docs/figures/int8_decode.json is one such run, which docs/results.py puts in the
README beside the default model's int8 ratio.

The compiled columns run the compiled decode step (nanollm.inference.compiled; int8 there is
dequantize-then-matmul fused by inductor), each compiled in the warm-up round; transformers'
"compiled" setting is its static cache with the forward compiled (nanollm.inference.peers).

Targets (issue 13): at the 124M shape, int8 >= 1.6x nanollm fp32 and >= 2.0x transformers.
(issue 19): int8 compiled >= 2.5x transformers at its best and >= 2.7x nanollm fp32 eager.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nanollm.atomic import write_json
from nanollm.config import Config, ModelConfig
from nanollm.hardware import describe_machine
from nanollm.hf_folder import llama_counterpart, llama_incompatibility
from nanollm.inference.bench.timing import round_orders
from nanollm.inference.compiled import CompiledDecoder
from nanollm.inference.generate import generate
from nanollm.inference.native import int8_gemm
from nanollm.inference.peers import PEER_CACHES, transformers_greedy
from nanollm.inference.quantize import Int8Linear, int8_native_kernel, quantize_int8
from nanollm.model import Transformer

Decoder = Callable[[torch.Tensor, int], list[int]]

# GPT-2 small (docs/presets/gpt2-124m-owt.yaml) with modded-nanogpt's options off, so that
# transformers' Llama is the very same model.
GPT2_124M = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, qk_norm=False, value_residual=False)
GPT2_VOCAB = 50257


def shapes(names: list[str], params: Path, tiny: str | None) -> list[tuple[str, ModelConfig, int]]:
    """(name, config, vocab) per requested shape: gpt2 (124M), pipeline (params.yaml), tiny (LxCxV, for tests)."""
    out = []
    for name in names:
        if name == "gpt2":
            out.append(("GPT-2 124M (12L/768d/50257v)", GPT2_124M, GPT2_VOCAB))
        elif name == "pipeline":
            import yaml

            raw = yaml.safe_load(params.read_text()) if params.is_file() else {}
            cfg = Config.from_dict({k: raw[k] for k in ("model", "tokenizer") if k in (raw or {})})
            m, vocab = cfg.model, cfg.tokenizer.vocab_size
            out.append((f"pipeline {m.n_layer}L/{m.n_embd}d/{vocab}v", m, vocab))
        elif name == "tiny" and tiny:
            layers, width, vocab = (int(x) for x in tiny.split("x"))
            out.append((f"tiny {layers}L/{width}d/{vocab}v", ModelConfig(n_layer=layers, n_head=2, n_embd=width,
                                                                        block_size=64), vocab))  # fmt: skip
        else:
            sys.exit(f"--shapes: unknown shape {name!r} (gpt2, pipeline, or tiny with --tiny LxCxV)")
    return out


def seeded(cfg: ModelConfig, vocab: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(cfg, vocab).eval()


def weight_bytes(model: Transformer) -> int:
    """Bytes one decode step reads from weights: every matrix once (a tied table as the head), norms; not the lookup."""
    total = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, Int8Linear)
                for b in (m.weight, m.scales))  # fmt: skip
    total += sum(p.numel() * p.element_size() for p in model.parameters())  # fp32 parts (int8 model: norms, table)
    table = model.tok_embeddings.weight
    if isinstance(model.output, Int8Linear) or not model.cfg.tie_embeddings:
        total -= table.numel() * table.element_size()  # the lookup reads one row, the head reads its own copy
    return total


def deciders(model: Transformer, peer_dtypes: list[str]) -> tuple[dict[str, Decoder], dict[str, int]]:
    """Each column's greedy call, (prompt, n) -> n ids, and the bytes of weights each reads per token."""
    peer_model = model
    if llama_incompatibility(model.cfg) is not None:
        counterpart = llama_counterpart(model.cfg)
        if counterpart is None:
            sys.exit(f"transformers cannot run this shape and it has no Llama counterpart: {model.cfg}")
        peer_model = seeded(counterpart, model.vocab_size)
    calls: dict[str, Decoder] = {}
    for dtype in peer_dtypes:
        hf = transformers_greedy(copy.deepcopy(peer_model).to(getattr(torch, dtype)))
        for cache in PEER_CACHES:
            calls[f"transformers {cache} {dtype}"] = lambda p, n, hf=hf, cache=cache: hf(p, n, cache=cache)
    int8 = quantize_int8(copy.deepcopy(model))
    model.pack_for_decode()  # nanollm fp32 in its best batch-1 layout, as `nanollm generate` runs it
    calls["nanollm fp32"] = lambda p, n: list(generate(model, p, n, temperature=0.0))
    calls["nanollm int8"] = lambda p, n: list(generate(int8, p, n, temperature=0.0))
    for kind, m in (("fp32", model), ("int8", int8)):  # the compiled decode step (compiles in the warm-up)
        decoders: dict[int, CompiledDecoder] = {}

        def compiled(p: torch.Tensor, n: int, m: Transformer = m, decoders: dict = decoders) -> list[int]:
            if p.numel() + n not in decoders:
                decoders[p.numel() + n] = CompiledDecoder(m, max_seq_len=p.numel() + n)
            return list(generate(m, p, n, temperature=0.0, decoder=decoders[p.numel() + n]))

        calls[f"nanollm {kind} compiled"] = compiled
    if int8_gemm() is not None:  # the same model through torch's kernel: what nanollm's own buys

        def aten(p: torch.Tensor, n: int) -> list[int]:
            with int8_native_kernel(int8, False):
                return list(generate(int8, p, n, temperature=0.0))

        calls["nanollm int8 aten kernel"] = aten
    sizes = {"nanollm fp32": weight_bytes(model), "nanollm int8": weight_bytes(int8)}
    return calls, sizes


def kernel_words() -> str:
    kernel = int8_gemm()
    if kernel is None:
        return "torch's aten._weight_int8pack_mm, bf16 inside: nanollm's kernel cannot run here"
    return f"nanollm's {kernel.isa} kernel; 'aten kernel': torch's, bf16 inside"


def columns(calls: dict[str, Decoder]) -> list[str]:
    return [k for k in calls if k.startswith("nanollm")] + [k for k in calls if k.startswith("transformers")]


def race(calls: dict[str, Decoder], prompt: torch.Tensor, n_new: int, threads: list[int], args) -> dict:
    """{(column, threads): median tokens/s} and each column's last tokens, over interleaved rounds."""
    ours = [k for k in calls if k.startswith("nanollm")]
    order = ours + [k for k in calls if k not in ours]  # nanollm first, then transformers
    for t in threads:
        torch.set_num_threads(t)
        for _ in range(args.warmup):
            for key in order:
                calls[key](prompt, n_new)
    rates: dict[tuple[str, int], list[float]] = {(k, t): [] for k in order for t in threads}
    tokens: dict[str, list[int]] = {}
    rounds = zip(round_orders(threads, 0, args.repeats), round_orders(order, 0, args.repeats), strict=True)
    for round_, ((_, thread_order), (_, keys)) in enumerate(rounds):  # nanollm first on even rounds
        for t in thread_order:
            torch.set_num_threads(t)
            for key in keys:
                t0 = time.perf_counter()
                tokens[key] = calls[key](prompt, n_new)
                rates[key, t].append(n_new / (time.perf_counter() - t0))
        print(f"  round {round_ + 1}/{args.repeats} done; load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    return {key: statistics.median(v) for key, v in rates.items()}, tokens


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def agreement(a: list[int], b: list[int]) -> str:
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
    return "identical" if first is None else f"same for {first}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="gpt2,pipeline", help="comma-separated: gpt2, pipeline, tiny")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="for the pipeline shape")
    parser.add_argument("--tiny", default=None, help="LAYERSxWIDTHxVOCAB of the tiny shape (smoke tests)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens (random ids)")
    parser.add_argument("--new", type=int, default=128, help="new tokens per call")
    parser.add_argument("--threads", default="1,2", help="torch thread counts to race, comma-separated")
    parser.add_argument("--repeats", type=int, default=4, help="timed rounds (median; even: balanced order)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per thread count")
    parser.add_argument("--peer-dtypes", default="float32,bfloat16", help="transformers dtypes to race")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    peer_dtypes = args.peer_dtypes.split(",")
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: pip install -e '.[dev]'", file=sys.stderr)
        return 1

    command = f"python {' '.join(sys.argv)}"
    load_before = os.getloadavg()
    print(f"command: {command}")
    print(f"machine: {describe_machine()}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"load average before {' '.join(f'{x:.2f}' for x in load_before)}")  # fmt: skip
    print(f"batch 1, greedy, {args.prompt}-token prompt + {args.new} new tokens, end to end; nanollm int8: "
          f"int8 weights, fp32 activations ({kernel_words()}); others: the dtype named; "
          f"median of {args.repeats} rounds after {args.warmup} warm-up, threads {args.threads}")  # fmt: skip
    per_threads, best_rows, figures, compiled_rows = [], [], [], []
    gen = torch.Generator().manual_seed(0)
    for name, cfg, vocab in shapes(args.shapes.split(","), args.params, args.tiny):
        model = seeded(cfg, vocab)
        calls, sizes = deciders(model, peer_dtypes)
        prompt = torch.randint(0, vocab, (args.prompt,), generator=gen)
        medians, tokens = race(calls, prompt, args.new, threads, args)
        peers = [k for k in calls if k.startswith("transformers")]
        for t in threads:
            peer = max(peers, key=lambda k: medians[k, t])
            row = [name, str(t), *(f"{medians[k, t]:.1f}" for k in columns(calls))]
            row += [
                peer.removeprefix("transformers "),
                f"{medians['nanollm int8', t] / medians['nanollm fp32', t]:.2f}x",
            ]
            per_threads.append(row + [f"{medians['nanollm int8', t] / medians[peer, t]:.2f}x"])
        best = {k: max(threads, key=lambda t: medians[k, t]) for k in calls}
        rate = {k: medians[k, best[k]] for k in calls}
        peer = max(peers, key=lambda k: rate[k])
        best_rows.append([
            name, f"{rate['nanollm fp32']:.1f} ({best['nanollm fp32']})", f"{rate['nanollm int8']:.1f} "
            f"({best['nanollm int8']})", f"{rate[peer]:.1f} ({peer.removeprefix('transformers ')}, {best[peer]})",
            f"{rate['nanollm int8'] / rate['nanollm fp32']:.2f}x", f"{rate['nanollm int8'] / rate[peer]:.2f}x",
            f"{sizes['nanollm fp32'] / 1e6:.0f} / {sizes['nanollm int8'] / 1e6:.0f}",
            f"{sizes['nanollm int8'] * rate['nanollm int8'] / 1e9:.1f}",
            agreement(tokens["nanollm fp32"], tokens["nanollm int8"]),
        ])  # fmt: skip
        figures.append({
            "model": name, "tok_s": {k: round(rate[k], 2) for k in columns(calls)},
            "threads": {k: best[k] for k in columns(calls)}, "peer": peer.removeprefix("transformers "),
            "int8_vs_fp32": round(rate["nanollm int8"] / rate["nanollm fp32"], 4),
            "int8_vs_transformers": round(rate["nanollm int8"] / rate[peer], 4),
            "int8_tokens_vs_fp32": agreement(tokens["nanollm fp32"], tokens["nanollm int8"]),
            "int8_compiled_vs_fp32": round(rate["nanollm int8 compiled"] / rate["nanollm fp32"], 4),
            "int8_compiled_vs_transformers": round(rate["nanollm int8 compiled"] / rate[peer], 4),
            "int8_compiled_tokens_vs_int8": agreement(tokens["nanollm int8"], tokens["nanollm int8 compiled"]),
        })  # fmt: skip
        compiled_rows.append([
            name, f"{rate['nanollm fp32 compiled']:.1f}", f"{rate['nanollm int8 compiled']:.1f}",
            f"{rate['nanollm int8 compiled'] / rate['nanollm fp32']:.2f}x",
            f"{rate['nanollm int8 compiled'] / rate['nanollm fp32 compiled']:.2f}x",
            f"{rate['nanollm int8 compiled'] / rate[peer]:.2f}x",
            agreement(tokens["nanollm int8"], tokens["nanollm int8 compiled"]),
        ])  # fmt: skip
        names = columns(calls)
        del calls, model
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print(table(["model", "threads", *names, "peer", "int8 / fp32", "int8 / peer"], per_threads))
    print("\ntokens/s, medians; each column at its best thread count (in brackets):\n")
    header = ["model", "nanollm fp32", "nanollm int8", "transformers, best setting", "int8 / fp32",
              "int8 / transformers", "weights read per token, MB (fp32 / int8)", "int8 GB/s",
              "int8 greedy tokens vs fp32"]  # fmt: skip
    print(table(header, best_rows))
    print("\nthe compiled decode step (nanollm.inference.compiled), each at its best thread count:\n")
    header = ["model", "nanollm fp32 compiled", "nanollm int8 compiled", "int8 compiled / fp32 eager",
              "int8 compiled / fp32 compiled", "int8 compiled / transformers (best)",
              "greedy tokens vs int8 eager"]  # fmt: skip
    print(table(header, compiled_rows))
    if args.out is not None:
        write_json(args.out, {
            "command": command, "machine": describe_machine(), "torch": torch.__version__,
            "transformers": transformers.__version__, "int8_kernel": "nanollm" if int8_gemm() is not None else "aten",
            "cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "batch": 1, "prompt_tokens": args.prompt, "new_tokens": args.new, "repeats": args.repeats,
            "warmup": args.warmup, "threads": threads, "shapes": figures,
        })  # fmt: skip
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
