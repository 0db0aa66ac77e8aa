"""The training step's loss made a chunk of logits at a time (ours) against all of them at once.

The model is params.yaml's, with seeded weights and a seeded batch of train.batch_size
sequences of model.block_size tokens. The sides, each a forward and backward of one
micro-batch, no optimizer step:

- chunked: Transformer.forward(idx, targets=...) as training calls it, the head and the
  cross-entropy LOSS_CHUNK rows at a time (or each --chunks value);
- whole: the logits of every position at once, then F.cross_entropy over them, as the
  training loop did before.

Rounds alternate the order of the sides; a figure is the median time per step. The losses
must agree to fp32 rounding (checked, printed): the sums are the same, in another order.

    python benchmarks/loss_chunks.py
    python benchmarks/loss_chunks.py --chunks 256,512,1024 --rounds 9
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _rounds import alternating_medians, print_table  # benchmarks/ is on sys.path when a script runs

from nanollm.config import Config
from nanollm.hardware import describe_machine
from nanollm.model import Transformer, transformer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="for the model and batch shape")
    parser.add_argument("--chunks", default=str(transformer.LOSS_CHUNK), help="comma-separated rows per chunk")
    parser.add_argument("--steps", type=int, default=3, help="forward and backward passes per timed round")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import yaml

    raw = yaml.safe_load(args.params.read_text()) if args.params.is_file() else {}
    cfg = Config.from_dict({k: raw[k] for k in ("model", "tokenizer", "train") if k in (raw or {})})
    torch.manual_seed(0)
    # zero_init_proj would leave every block an identity at step 0; time a model whose blocks compute
    model = Transformer(dataclasses.replace(cfg.model, zero_init_proj=False), cfg.tokenizer.vocab_size)
    batch = torch.randint(0, cfg.tokenizer.vocab_size, (cfg.train.batch_size, cfg.model.block_size + 1))
    x, y = batch[:, :-1], batch[:, 1:]

    def whole() -> torch.Tensor:
        return F.cross_entropy(model(x).flatten(0, 1), y.reshape(-1))

    def chunked(rows: int) -> Callable[[], torch.Tensor]:
        def loss() -> torch.Tensor:
            saved, transformer.LOSS_CHUNK = transformer.LOSS_CHUNK, rows
            try:
                return model(x, targets=y)
            finally:
                transformer.LOSS_CHUNK = saved

        return loss

    sides = {f"chunked, {rows} rows": chunked(rows) for rows in (int(c) for c in args.chunks.split(","))}
    sides["whole"] = whole
    with torch.no_grad():
        losses = {name: side().item() for name, side in sides.items()}
    agree = all(abs(v - losses["whole"]) <= 1e-5 * abs(losses["whole"]) for v in losses.values())
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {describe_machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{cfg.train.batch_size} x {cfg.model.block_size} tokens, vocab {cfg.tokenizer.vocab_size}, fp32; "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    for side in sides.values():  # warm-up
        side().backward()
    medians = alternating_medians({name: lambda side=side: side().backward() for name, side in sides.items()},
                                  args.rounds, args.steps)  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.2f}; losses agree to fp32 rounding: {agree} ({losses})\n")
    print_table("forward + backward", medians, "whole")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
