"""Batch-1 greedy decoding: ours (nanollm.generate) beside transformers' generate on the same exported weights.

For each model shape the model is exported with nanollm.hf.export_hf and loaded back with
LlamaForCausalLM.from_pretrained, so both sides run the same weights in fp32 on the same
torch threads. Each point generates exactly the same number of tokens greedily from the
same random prompt, with and without the KV cache, in interleaved rounds (so load spikes
hit every column alike); tokens/s is end to end (new tokens over the time of the whole
call, prefill included; wall time unless --clock cpu), the median over rounds. The
bandwidth table is gpt-fast's figure: weight bytes read per token x cached tokens/s,
against a 256 MB tensor copy.

    python benchmarks/decode_vs_transformers.py                       # pipeline shape + 6L/384d/8192
    python benchmarks/decode_vs_transformers.py --checkpoint models/checkpoint --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from nanollm.bench import memory_bandwidth, weight_bytes_per_token
from nanollm.config import Config, ModelConfig
from nanollm.generate import generate
from nanollm.model import Transformer
from nanollm.peers import transformers_greedy

POINTS = ((16, 256), (512, 256))  # (prompt tokens, new tokens)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def pipeline_shape(params: Path) -> tuple[str, ModelConfig, int]:
    """The model section and tokenizer vocab of params.yaml (defaults where it is missing)."""
    import yaml

    raw = yaml.safe_load(params.read_text()) if params.is_file() else {}
    cfg = Config.from_dict({k: raw[k] for k in ("model", "tokenizer") if k in (raw or {})})
    m = cfg.model
    return f"pipeline {m.n_layer}L/{m.n_embd}d/{cfg.tokenizer.vocab_size}v", m, cfg.tokenizer.vocab_size


def build(cfg: ModelConfig, vocab: int, checkpoint: Path | None) -> Transformer:
    if checkpoint is not None:
        from nanollm.checkpoint import load_model

        return load_model(checkpoint)
    torch.manual_seed(0)
    return Transformer(cfg, vocab).eval()


def ours(model: Transformer, prompt: torch.Tensor, n: int, use_cache: bool) -> tuple[list[int], float]:
    t0 = clock()
    out = list(generate(model, prompt, n, temperature=0.0, use_cache=use_cache))
    return out, clock() - t0


def theirs(greedy, prompt: torch.Tensor, n: int, use_cache: bool) -> tuple[list[int], float]:
    t0 = clock()
    out = greedy(prompt, n, use_cache=use_cache)
    return out, clock() - t0


def first_difference(a: list[int], b: list[int]) -> str:
    i = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    return "identical" if i is None and len(a) == len(b) else f"differ from token {i}"


def run_shape(name: str, model: Transformer, args: argparse.Namespace) -> list[dict]:
    hf = transformers_greedy(model)  # exported with export_hf, loaded by LlamaForCausalLM.from_pretrained
    gen = torch.Generator().manual_seed(0)
    rows = []
    for prompt_len, n_new in POINTS:
        prompt = torch.randint(0, model.vocab_size, (prompt_len,), generator=gen)
        ours(model, prompt, 8, True), theirs(hf, prompt, 8, True)  # warm-up: first-call costs
        rates: dict[str, list[float]] = {k: [] for k in ("hf_cached", "ours_cached", "hf_uncached", "ours_uncached")}
        tokens = {}
        for round_ in range(args.repeats):
            for key, fn, cache in (("hf_cached", theirs, True), ("ours_cached", ours, True)):
                tokens[key], seconds = fn(hf if fn is theirs else model, prompt, n_new, cache)
                rates[key].append(n_new / seconds)
            if round_ < args.uncached_repeats:
                for key, fn in (("hf_uncached", theirs), ("ours_uncached", ours)):
                    tokens[key], seconds = fn(hf if fn is theirs else model, prompt, n_new, False)
                    rates[key].append(n_new / seconds)
        medians = {k: statistics.median(v) if v else math.nan for k, v in rates.items()}  # nan: not run
        row = {"model": name, "point": f"{prompt_len} + {n_new}", **medians}
        row["tokens"] = first_difference(tokens["ours_cached"], tokens["hf_cached"])
        # without uncached rounds there is nothing to check against
        row["self_check"] = first_difference(tokens["ours_cached"], tokens.get("ours_uncached", tokens["ours_cached"]))
        print(
            f"  {name}, prompt {prompt_len} + {n_new}: ours {row['ours_cached']:.0f} / {row['ours_uncached']:.1f}, "
            f"transformers {row['hf_cached']:.0f} / {row['hf_uncached']:.1f} tok/s (cached / uncached)",
            file=sys.stderr,
        )
        rows.append(row)
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def print_tables(rows: list[dict], bandwidth: list[tuple], copy: float) -> None:
    header = ["model", "prompt + new", "transformers cached", "ours cached", "ours / transformers"]
    header += ["transformers uncached", "ours uncached", "cache speedup, transformers", "cache speedup, ours"]
    header += ["greedy tokens vs transformers"]
    body = [
        [r["model"], r["point"], f"{r['hf_cached']:.0f}", f"{r['ours_cached']:.0f}"]
        + [f"x{r['ours_cached'] / r['hf_cached']:.2f}", f"{r['hf_uncached']:.1f}", f"{r['ours_uncached']:.1f}"]
        + [f"x{r['hf_cached'] / r['hf_uncached']:.1f}", f"x{r['ours_cached'] / r['ours_uncached']:.1f}", r["tokens"]]
        for r in rows
    ]
    print(table(header, body))
    print(f"\ntokens/s, batch 1, greedy, fp32. 256 MB tensor copy, best of 5: {copy / 1e9:.1f} GB/s\n")
    header = ["model", "weights read per token (MB)", "ours: GB/s (share of copy)", "transformers: GB/s (share)"]
    body = [
        [name, f"{w / 1e6:.1f}", f"{w * ours_s / 1e9:.1f} ({w * ours_s / copy:.0%})"]
        + [f"{w * hf_s / 1e9:.1f} ({w * hf_s / copy:.0%})"]
        for name, w, ours_s, hf_s in bandwidth
    ]
    print(table(header, body))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="for the pipeline's model shape")
    parser.add_argument("--checkpoint", type=Path, default=None, help="use these trained weights for the pipeline row")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the cached runs (median reported)")
    parser.add_argument("--uncached-repeats", type=int, default=1, help="rounds of the slow uncached runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default="wall",
        help="wall: what a user waits; cpu: process CPU time, robust to other processes on a shared machine "
        "(meaningful with --threads 1)",
    )
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: pip install -e '.[dev]'", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)

    name, pipeline_cfg, vocab = pipeline_shape(args.params)
    shapes = [
        (name, build(pipeline_cfg, vocab, args.checkpoint)),
        ("6L/384d/8192v", build(ModelConfig(n_layer=6, n_head=6, n_embd=384, block_size=256), 8192, None)),
    ]
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {torch.get_num_threads()} threads, {args.clock} clock; load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    rows, bandwidth = [], []
    copy = memory_bandwidth()
    for shape_name, model in shapes:
        shape_rows = run_shape(shape_name, model, args)
        rows += shape_rows
        weights = weight_bytes_per_token(model)
        fastest = max(shape_rows, key=lambda r: r["ours_cached"])
        bandwidth.append((shape_name, weights, fastest["ours_cached"], fastest["hf_cached"]))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")

    print_tables(rows, bandwidth, copy)
    mismatched = [r for r in rows if r["self_check"] != "identical"]
    for r in mismatched:
        print(f"warning: our cached and uncached greedy tokens {r['self_check']} at {r['model']} {r['point']}")
    return 1 if mismatched else 0


if __name__ == "__main__":
    raise SystemExit(main())
