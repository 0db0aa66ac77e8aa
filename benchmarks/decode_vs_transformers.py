"""Batch-1 greedy decoding: ours (nanollm.inference.generate) beside transformers' generate on the same weights.

For each model shape the model is exported with nanollm.hf_folder.export_hf and loaded back with
LlamaForCausalLM.from_pretrained, so both sides run the same weights in fp32 on the same
torch threads. Each point generates exactly the same number of tokens greedily from the
same random prompt: ours with and without the KV cache, and through the compiled decode step
(nanollm.inference.compiled, one CompiledDecoder per point); transformers with its default
dynamic cache, with a static cache sized to the call (`cache_implementation="static"`'s
cache, nanollm.inference.peers), with that static cache and its forward compiled, and without
a cache. The peer is the fastest of transformers' cached settings at each point (median over
rounds): a comparison counts only against the peer's best settings. The compiled columns
compile in the warm-up round (keep --warmup >= 1). Every round runs every column once, ours first on even rounds and
transformers first (in reverse order) on odd ones, so that ordering effects and load
spikes weigh on both sides alike; tokens/s is end to end (new tokens over the time of the
whole call, prefill included; wall time unless --clock cpu), the median over rounds. The
bandwidth table is gpt-fast's figure: weight bytes read per token x cached tokens/s,
against a large tensor copy.

    python benchmarks/decode_vs_transformers.py                       # pipeline shape + 6L/384d/8192
    python benchmarks/decode_vs_transformers.py --checkpoint models/checkpoint
    python benchmarks/decode_vs_transformers.py --checkpoint models/checkpoint --threads 1

Targets: ours cached >= 1.5x the peer at every point (issue 11); ours compiled >= 3x ours cached
and >= 2x the peer, compiled static cache included (issue 19).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nanollm.config import Config, ModelConfig
from nanollm.hardware import describe_machine
from nanollm.inference.bench.bandwidth import memory_bandwidth, weight_bytes_per_token
from nanollm.inference.compiled import CompiledDecoder
from nanollm.inference.generate import generate
from nanollm.inference.peers import PEER_CACHES, transformers_greedy
from nanollm.model import Transformer

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]  # --clock sets it
CACHED = ("ours_cached", "ours_compiled", *(f"hf_{cache}" for cache in PEER_CACHES))  # timed every round
UNCACHED = ("ours_uncached", "hf_uncached")  # the slow baselines, timed in the first --uncached-repeats rounds


def pipeline_shape(params: Path) -> tuple[str, ModelConfig, int]:
    """The model section and tokenizer vocab of params.yaml (defaults where it is missing)."""
    import yaml

    raw = yaml.safe_load(params.read_text()) if params.is_file() else {}
    cfg = Config.from_dict({k: raw[k] for k in ("model", "tokenizer") if k in (raw or {})})
    m = cfg.model
    return f"pipeline {m.n_layer}L/{m.n_embd}d/{cfg.tokenizer.vocab_size}v", m, cfg.tokenizer.vocab_size


def reference_shape(spec: str) -> tuple[str, ModelConfig, int] | None:
    """'LAYERSxWIDTHxVOCAB' (heads of 64) -> (name, config, vocab); 'none' -> None."""
    if spec == "none":
        return None
    try:
        layers, width, vocab = (int(x) for x in spec.split("x"))
    except ValueError:
        sys.exit(f"--reference {spec!r}: expected LAYERSxWIDTHxVOCAB such as 6x384x8192, or none")
    cfg = ModelConfig(n_layer=layers, n_head=max(1, width // 64), n_embd=width, block_size=256)
    return f"{layers}L/{width}d/{vocab}v", cfg, vocab


def parse_points(spec: str) -> list[tuple[int, int]]:
    """'16+256,512+256' -> [(16, 256), (512, 256)]: (prompt tokens, new tokens) per point."""
    try:
        points = [tuple(int(x) for x in point.split("+")) for point in spec.split(",")]
    except ValueError:
        points = []
    if not points or any(len(p) != 2 or min(p) < 1 for p in points):
        sys.exit(f"--points {spec!r}: expected PROMPT+NEW pairs such as 16+256,512+256")
    return points


def build(cfg: ModelConfig, vocab: int, checkpoint: Path | None) -> Transformer:
    if checkpoint is not None:
        from nanollm.checkpoint import load_model

        return load_model(checkpoint)
    torch.manual_seed(0)
    return Transformer(cfg, vocab).eval()


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def deciders(model: Transformer, hf: Callable[..., list[int]]) -> dict[str, Callable[[torch.Tensor, int], list[int]]]:
    """Each column's greedy call: (prompt, n) -> n ids."""
    decoders: dict[int, CompiledDecoder] = {}  # one per cache length, as the bench stage keeps one per point

    def compiled(p: torch.Tensor, n: int) -> list[int]:
        if p.numel() + n not in decoders:
            decoders[p.numel() + n] = CompiledDecoder(model, max_seq_len=p.numel() + n)
        return list(generate(model, p, n, temperature=0.0, decoder=decoders[p.numel() + n]))

    calls = {
        "ours_cached": lambda p, n: list(generate(model, p, n, temperature=0.0)),
        "ours_compiled": compiled,
        "ours_uncached": lambda p, n: list(generate(model, p, n, temperature=0.0, use_cache=False)),
        "hf_uncached": lambda p, n: hf(p, n, cache=None),
    }
    for cache in PEER_CACHES:
        calls[f"hf_{cache}"] = lambda p, n, cache=cache: hf(p, n, cache=cache)
    return calls


def run_point(calls: dict, prompt: torch.Tensor, n_new: int, args: argparse.Namespace) -> tuple[dict, dict]:
    """Median tokens/s of every column over the rounds, and each column's tokens (of the last round)."""
    for _ in range(args.warmup):  # first-call costs, and on CUDA the static cache's compile at this length
        for key in CACHED:
            calls[key](prompt, n_new)
    for key in UNCACHED:
        calls[key](prompt, min(n_new, 8))
    rates: dict[str, list[float]] = {key: [] for key in calls}
    tokens: dict[str, list[int]] = {}
    order = ["ours_cached", "ours_compiled", "ours_uncached", *CACHED[2:], "hf_uncached"]
    for round_ in range(args.repeats):
        keys = order if round_ < args.uncached_repeats else [k for k in order if k not in UNCACHED]
        for key in keys if round_ % 2 == 0 else keys[::-1]:  # ours first on even rounds, transformers on odd
            t0 = clock()
            tokens[key] = calls[key](prompt, n_new)
            rates[key].append(n_new / (clock() - t0))
    return {k: statistics.median(v) if v else math.nan for k, v in rates.items()}, tokens  # nan: not run


def run_shape(name: str, model: Transformer, args: argparse.Namespace) -> list[dict]:
    hf = transformers_greedy(model)  # exported with export_hf, loaded by LlamaForCausalLM.from_pretrained
    model.pack_for_decode()  # ours decodes in the layout `nanollm generate` and the bench stage use
    calls = deciders(model, hf)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for prompt_len, n_new in args.points:
        prompt = torch.randint(0, model.vocab_size, (prompt_len,), generator=gen)
        medians, tokens = run_point(calls, prompt, n_new, args)
        peer = max(PEER_CACHES, key=lambda cache: medians[f"hf_{cache}"])
        row = {"model": name, "point": f"{prompt_len} + {n_new}", "peer": peer, **medians}
        row["hf_best"] = medians[f"hf_{peer}"]
        parted = {c: first_difference(tokens["ours_cached"], tokens[f"hf_{c}"]) for c in PEER_CACHES}
        parted["ours compiled"] = first_difference(tokens["ours_cached"], tokens["ours_compiled"])
        row["tokens"] = "; ".join(f"{c}: {'identical' if i is None else f'differ from {i}'}" for c, i in parted.items())
        # without uncached rounds there is nothing to check against
        row["self_check"] = first_difference(tokens["ours_cached"], tokens.get("ours_uncached", tokens["ours_cached"]))
        print(
            f"  {name}, prompt {prompt_len} + {n_new}: ours {row['ours_cached']:.0f} / {row['ours_uncached']:.1f}, "
            f"compiled {row['ours_compiled']:.0f}, "
            + ", ".join(f"transformers {c} {medians[f'hf_{c}']:.0f}" for c in PEER_CACHES)
            + f" / {row['hf_uncached']:.1f} tok/s (cached / uncached)",
            file=sys.stderr,
        )
        rows.append(row)
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def print_tables(rows: list[dict], bandwidth: list[tuple], copy: float, copy_mb: int) -> None:
    header = ["model", "prompt + new", *(f"transformers {c} cache" for c in PEER_CACHES), "peer", "ours cached"]
    header += ["ours / peer", "ours compiled", "compiled / ours cached", "compiled / peer"]
    header += ["transformers uncached", "ours uncached", "cache speedup, transformers (peer)"]
    header += ["cache speedup, ours compiled", "greedy tokens vs ours cached"]
    body = [
        [r["model"], r["point"], *(f"{r[f'hf_{c}']:.0f}" for c in PEER_CACHES), r["peer"], f"{r['ours_cached']:.0f}"]
        + [f"x{r['ours_cached'] / r['hf_best']:.2f}", f"{r['ours_compiled']:.0f}"]
        + [f"x{r['ours_compiled'] / r['ours_cached']:.2f}", f"x{r['ours_compiled'] / r['hf_best']:.2f}"]
        + [f"{r['hf_uncached']:.1f}", f"{r['ours_uncached']:.1f}"]
        + [f"x{r['hf_best'] / r['hf_uncached']:.1f}", f"x{r['ours_compiled'] / r['ours_uncached']:.1f}", r["tokens"]]
        for r in rows
    ]
    print(table(header, body))
    print(f"\ntokens/s, batch 1, greedy, fp32. {copy_mb} MB tensor copy, best of 5: {copy / 1e9:.1f} GB/s\n")
    header = ["model", "weights read per token (MB)", "ours: GB/s (share of copy)", "peer: GB/s (share)"]
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
    parser.add_argument(
        "--reference", default="6x384x8192", help="LAYERSxWIDTHxVOCAB of a randomly initialised second row, or none"
    )
    parser.add_argument("--points", default="16+256,512+256", help="PROMPT+NEW tokens per point, comma-separated")
    parser.add_argument("--repeats", type=int, default=4, help="rounds of the cached runs (median; even: balanced)")
    parser.add_argument("--uncached-repeats", type=int, default=2, help="rounds of the slow uncached runs")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of the cached runs per point")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    parser.add_argument("--copy-mb", type=int, default=256, help="size of the tensor copy measuring memory bandwidth")
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default="wall",
        help="wall: what a user waits; cpu: process CPU time, robust to other processes on a shared machine "
        "(meaningful with --threads 1)",
    )
    args = parser.parse_args()
    args.points = parse_points(args.points)
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
    shapes = [(name, build(pipeline_cfg, vocab, args.checkpoint))]
    if (reference := reference_shape(args.reference)) is not None:
        shapes.append((reference[0], build(reference[1], reference[2], None)))
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"machine: {describe_machine()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {torch.get_num_threads()} threads, {args.clock} clock; load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    print(
        f"rounds: {args.repeats} cached, {args.uncached_repeats} uncached, after {args.warmup} warm-up; "
        "medians; ours first on even rounds, transformers first on odd ones"
    )
    rows, bandwidth = [], []
    copy = memory_bandwidth(size_mb=args.copy_mb)
    for shape_name, model in shapes:
        shape_rows = run_shape(shape_name, model, args)
        rows += shape_rows
        weights = weight_bytes_per_token(model)
        fastest = max(shape_rows, key=lambda r: r["ours_cached"])
        bandwidth.append((shape_name, weights, fastest["ours_cached"], fastest["hf_best"]))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")

    print_tables(rows, bandwidth, copy, args.copy_mb)
    for r in rows:
        if r["self_check"] is not None:
            print(
                f"note: our cached and uncached greedy tokens differ from token {r['self_check']} at {r['model']} "
                f"{r['point']}: a near-tie or a bug; `dvc repro bench_kvcache` tells them apart"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
