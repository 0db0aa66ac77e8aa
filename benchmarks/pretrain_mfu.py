"""Tokens/s and MFU of the pretrain loop on a preset's model, on random tokens, in one or several dtypes.

Runs nanollm.training.loop.train (the very loop of `nanollm pretrain`: autocast, compile, fused
AdamW, gradient accumulation, clipping) for a few steps of a preset's model and training
settings on random token ids, so no corpus, tokenizer file or network is needed. Prints the
throughput and MFU that the loop itself measures (warm-up and compile step excluded,
against nanollm.hardware.peak_flops: the dense bf16 table rate of a known GPU, a measured
matmul rate on a CPU), the peak memory and the pre-flight estimate.

With several dtypes (`--dtype auto,float32,bfloat16`) each is trained in turn, `--rounds`
times in alternating order, and the table gives the median tokens/s of each and what
train.dtype: auto picked (and why) as a multiple of the fastest explicit dtype: the check
that auto is right on this machine.

    python benchmarks/pretrain_mfu.py                                # GPT-2 124M preset, 20 steps, cuda
    python benchmarks/pretrain_mfu.py --grad-accum 4 --steps 30      # shorter steps, same micro-batch
    python benchmarks/pretrain_mfu.py --preset params.yaml --device cpu --no-compile \
        --dtype auto,float32,bfloat16 --steps 20 --rounds 3          # the default model: is auto the fastest?

Target (issue 5): >= 40% MFU for the GPT-2 124M preset with bf16 and compile on one H100.
Target (issue 11): auto >= 0.95x the fastest explicit dtype, on CPUs with and without native bf16.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "docs" / "presets" / "gpt2-124m-owt.yaml"
GPT2_VOCAB = 50257  # tiktoken's GPT-2 encoding, the preset's tokenizer


def main() -> int:
    args = _parse()
    import numpy as np
    import torch

    from nanollm.hardware import choose_dtype, describe_machine, pick_device
    from nanollm.model import Transformer
    from nanollm.training.loop import train
    from nanollm.training.memory import format_bytes

    dtypes = args.dtype.split(",") if args.dtype else [None]
    configs = {name: _config(args, name) for name in dtypes}
    config = next(iter(configs.values()))
    device = pick_device(args.device, key="--device")
    if device.type == "cpu" and config.train.compile:
        print("note: compiling on a CPU measures inductor's C++ code; pass --no-compile for eager", file=sys.stderr)
    vocab = args.vocab or (GPT2_VOCAB if config.tokenizer.kind == "gpt2" else config.tokenizer.vocab_size)
    tokens_per_step = config.train.batch_size * config.train.grad_accum * config.model.block_size
    # Random ids: the step's work does not depend on the values, and enough of them that
    # windows rarely repeat (the loop samples random windows, as pretrain does).
    data = np.random.default_rng(0).integers(0, vocab, max(4 * tokens_per_step, 1 << 20), dtype=np.int64)
    data = data.astype(np.uint16 if vocab <= 65536 else np.uint32)
    m = config.model
    probe = Transformer(m, vocab)
    print(f"command: python benchmarks/pretrain_mfu.py {' '.join(sys.argv[1:])}")
    print(
        f"machine: {describe_machine(device)}; {device}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"model: {m.n_layer} layers x {m.n_embd} wide, {m.n_head} heads, context {m.block_size}, vocab {vocab}, "
        f"{probe.num_params() / 1e6:.1f}M parameters, {probe.flops_per_token(m.block_size) / 1e6:,.1f} MFLOP per "
        f"token; batch {config.train.batch_size} x grad_accum {config.train.grad_accum} = {tokens_per_step:,} "
        f"tokens per step; compile {config.train.compile}, {config.train.max_steps} steps x {args.rounds} round(s)"
    )
    rates: dict[str, list[float]] = {name: [] for name in configs}
    results = {}
    for round_ in range(args.rounds):
        order = list(configs) if round_ % 2 == 0 else list(reversed(configs))  # drift hits every dtype alike
        for name in order:
            torch.manual_seed(0)
            model = Transformer(configs[name].model, vocab)
            results[name] = train(model, data, data, configs[name].train, seed=0, device=device)
            rates[name].append(results[name].tokens_per_s)

    print("\n| train.dtype | runs in | tokens/s (median) | MFU | peak memory |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, result in results.items():
        median = statistics.median(rates[name])
        mfu = f"{result.mfu * median / result.tokens_per_s:.1%}" if result.mfu is not None else "n/a"
        peak = format_bytes(result.peak_memory) if result.peak_memory else "n/a"
        print(f"| {configs[name].train.dtype} | {result.dtype} | {median:,.0f} | {mfu} | {peak} |")
    if len(results) == 1:
        (result,) = results.values()
        mfu = f"{result.mfu:.1%}" if result.mfu is not None else "n/a (peak unknown for this device)"
        print(f"\ntokens/s: {result.tokens_per_s:,.0f}   MFU: {mfu}")
        if result.memory_estimate is not None and result.peak_memory:
            estimate = result.memory_estimate.describe()
            print(f"peak memory: {format_bytes(result.peak_memory)} (pre-flight estimate {estimate})")
    explicit = {n: statistics.median(r) for n, r in rates.items() if configs[n].train.dtype != "auto"}
    if "auto" in [configs[n].train.dtype for n in configs] and explicit:
        auto = next(n for n in configs if configs[n].train.dtype == "auto")
        fastest = max(explicit, key=explicit.get)
        choice = choose_dtype("auto", device)
        ratio = statistics.median(rates[auto]) / explicit[fastest]
        print(
            f"\nauto picked {choice.name} ({choice.reason}): x{ratio:.2f} the tokens/s of the fastest explicit "
            f"dtype, {configs[fastest].train.dtype}"
        )
    return 0


def _config(args: argparse.Namespace, dtype: str | None):
    """params.yaml defaults, the preset (or params.yaml itself) over them, then the command line over both."""
    import yaml

    from nanollm.config import Config

    preset = yaml.safe_load(Path(args.preset).read_text())
    model = {
        **preset.get("model", {}),
        **_given(layers="n_layer", width="n_embd", heads="n_head", seq="block_size", args=args),
    }
    train = {
        **preset.get("train", {}),
        **_given(batch="batch_size", grad_accum="grad_accum", args=args),
        "max_steps": args.steps,  # not the preset's 5000: that is a real run
        "small_batch_steps": 0,  # every step of the preset's whole batch: its rate is what is measured
        "warmup_steps": min(preset.get("train", {}).get("warmup_steps", 0), args.steps),  # the lr is irrelevant here
        "device": args.device,
        "compile": args.compile,
        "eval_interval": 10**9,  # the final estimate only: this measures training
        "eval_batches": 1,
        "log_interval": max(1, args.steps // 4),
    }
    if dtype:
        train["dtype"] = dtype
    return Config.from_dict({"tokenizer": preset.get("tokenizer", {}), "model": model, "train": train})


def _given(args: argparse.Namespace, **names: str) -> dict:
    return {key: getattr(args, arg) for arg, key in names.items() if getattr(args, arg) is not None}


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=str(PRESET), help="a params fragment from docs/presets/")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, cpu, auto")
    parser.add_argument(
        "--dtype", default=None, help="train.dtype override, or several comma-separated (e.g. auto,float32,bfloat16)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs of each dtype, in alternating order")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="train.compile")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps; the first (compile) is not timed")
    parser.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (preset: 32)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per micro-batch (preset: 16)")
    for name in ("layers", "width", "heads", "seq", "vocab"):
        parser.add_argument(f"--{name}", type=int, default=None, help="override the preset's model (smoke runs)")
    return parser.parse_args()


if __name__ == "__main__":
    raise SystemExit(main())
