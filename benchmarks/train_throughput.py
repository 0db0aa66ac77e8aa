"""Training tokens/s of our Transformer against transformers' LlamaForCausalLM with the same dims, fp32 on CPU.

Both models have the same parameters (a Llama block: RMSNorm, RoPE, SDPA attention, SwiGLU,
tied embeddings), so the same FLOPs per token; both are trained by the very same step:
nanollm.training.loop.train_step (forward, cross-entropy, backward, clipping) then our fused AdamW. Timed
rounds alternate between the two models and a round of plain 1024 x 1024 fp32 matmuls, so that
load from other processes weighs on all three alike, and the figures are medians of per-round
ratios. Our achieved FLOP/s is given against the matmul rate of the same round (our MFU on a
CPU, robust on a shared machine) and against the best matmul rate seen (single matmuls as in
nanollm.hardware.cpu_matmul_peak, or a round), the unloaded ceiling.

    python benchmarks/train_throughput.py                       # 6 layers x 384, vocab 8192, 8 x 256 tokens
    python benchmarks/train_throughput.py --threads 2 --rounds 5

Targets (issue 5): ours >= 1.0x the peer, and >= 65% of the measured matmul rate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

from nanollm.hardware import describe_machine


def main() -> None:
    args = _parse()
    import transformers

    from nanollm.config import ModelConfig
    from nanollm.hardware import cpu_matmul_peak

    torch.set_num_threads(args.threads)
    cfg = ModelConfig(n_layer=args.layers, n_head=args.heads, n_embd=args.width, block_size=args.seq)
    torch.manual_seed(0)
    ours, peer = _ours(cfg, args.vocab), _peer(cfg, args.vocab)
    n_ours, n_peer = (sum(p.numel() for p in m.parameters()) for m in (ours, peer))
    if n_ours != n_peer:
        sys.exit(f"parameter counts differ: ours {n_ours}, peer {n_peer}; the comparison would be unfair")
    flops_per_token = ours.flops_per_token(args.seq)
    peak = cpu_matmul_peak(args.threads)
    print(
        f"command: python benchmarks/train_throughput.py {' '.join(sys.argv[1:])}\n"
        f"machine: {describe_machine()}, {args.threads} threads, "
        f"torch {torch.__version__}, transformers {transformers.__version__}; load average before: {_load()}\n"
        f"model: {args.layers} layers x {args.width} wide, {args.heads} heads, vocab {args.vocab}, "
        f"{n_ours / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOP per token; "
        f"batch {args.batch} x {args.seq} tokens, fp32; {args.steps} steps per round, median of {args.rounds} rounds\n"
    )
    rates: dict[str, list[float]] = {"ours": [], "peer": [], "matmul": []}
    steppers = {"ours": _stepper(ours, args), "peer": _stepper(_LogitsOnly(peer), args), "matmul": _matmuls}
    for stepper in steppers.values():
        stepper(args.warmup)  # allocator, thread pools, lazy imports
    for _ in range(args.rounds):
        for name, stepper in steppers.items():
            rates[name].append(stepper(args.steps))
    # Each round's three timings are seconds apart, so their ratios cancel most of the load from
    # other processes; the median over rounds drops the rounds a burst of load hit unevenly.
    ratio = statistics.median(o / p for o, p in zip(rates["ours"], rates["peer"], strict=True))
    best = max(peak, *rates["matmul"])
    print("| model | tokens/s (median) | rounds | GFLOP/s | of the matmul rate, same round (median) |")
    print("| --- | --- | --- | --- | --- |")
    for label, name in (("nanollm Transformer", "ours"), ("transformers LlamaForCausalLM (sdpa)", "peer")):
        rate = statistics.median(rates[name])
        share = statistics.median(r * flops_per_token / m for r, m in zip(rates[name], rates["matmul"], strict=True))
        runs = ", ".join(f"{r:,.0f}" for r in rates[name])
        print(f"| {label} | {rate:,.0f} | {runs} | {rate * flops_per_token / 1e9:.1f} | {share:.0%} |")
    mfu = statistics.median(r * flops_per_token / m for r, m in zip(rates["ours"], rates["matmul"], strict=True))
    of_best = statistics.median(rates["ours"]) * flops_per_token / best
    print(
        f"\nours / peer, median of per-round ratios: {ratio:.2f}x (target >= 1.0)\n"
        f"ours against the fp32 matmul rate of the same round (rounds: "
        f"{', '.join(f'{r / 1e9:.0f}' for r in rates['matmul'])} GFLOP/s): {mfu:.0%} (target >= 65%); against the "
        f"best matmul rate seen ({best / 1e9:.0f} GFLOP/s): {of_best:.0%}"
        f"\nload average after: {_load()}"
    )


def _matmuls(steps: int, size: int = 1024, per_step: int = 8) -> float:
    """FLOP/s of steps x per_step back-to-back (size x size) fp32 matmuls: the machine's rate in this round.

    Timed in the same rounds as the models, so other processes' load weighs on both alike; ~1 s
    per round at 165 GFLOP/s. cpu_matmul_peak's best single matmul is the unloaded ceiling.
    """
    a, b = torch.randn(size, size), torch.randn(size, size)
    start = time.perf_counter()
    for _ in range(steps * per_step):
        a @ b
    return 2 * size**3 * steps * per_step / (time.perf_counter() - start)


def _ours(cfg, vocab: int):
    from nanollm.model import Transformer

    return Transformer(cfg, vocab)


def _peer(cfg, vocab: int):
    """LlamaForCausalLM with our dims: no biases, tied embeddings, RoPE theta and RMSNorm eps as ours."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


class _LogitsOnly(torch.nn.Module):
    """Makes a transformers model callable as ours: ids (B, T) -> logits (B, T, vocab); with targets (B, T), the
    mean cross-entropy over all the logits at once, as transformers' own loss computes it."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.inner(input_ids=idx, use_cache=False).logits  # (B, T, vocab)
        if targets is None:
            return logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1))


def _stepper(model, args):
    """A function running n training steps of `model` and returning its tokens/s."""
    from nanollm.config import TrainConfig
    from nanollm.training.loop import sample_batch, train_step
    from nanollm.training.optim import make_optimizer

    model.train()
    optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))  # ours: fused AdamW, for both
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    data = np.random.default_rng(0).integers(0, args.vocab, 200_000).astype(np.uint16)
    generator = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            batch = sample_batch(data, args.batch, args.seq, generator)
            train_step(model, batch, optimizer, scaler, 1, torch.float32, cpu, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return steps * args.batch * args.seq / (time.perf_counter() - start)

    return run


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="training steps per timed round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    return parser.parse_args()


if __name__ == "__main__":
    main()
