"""Muon's step on the default model's matrices: batched by shape (ours) against one matrix at a time and torch's Muon.

The matrices are the blocks' weights of params.yaml's model (the ones Muon trains), with
seeded random gradients. The sides, each a whole optimizer step over those matrices:

- batched: nanollm.training.optim.Muon as it ships, Newton-Schulz over every matrix of a
  shape at once (3 batched calls for the default model's 28 matrices);
- one at a time: the same momentum, Newton-Schulz (our orthogonalize) and update, one matrix
  after another, as our Muon did before;
- torch.optim.Muon: PyTorch's own (its defaults: Newton-Schulz in bf16, which a CPU without
  native bf16 emulates).

Rounds alternate the order of the sides; a figure is the median time per step. The first two
give the same weights bit for bit (checked, printed).

    python benchmarks/muon_step.py
    python benchmarks/muon_step.py --threads 1 --rounds 7
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _rounds import alternating_medians, print_table  # benchmarks/ is on sys.path when a script runs

from nanollm.config import Config
from nanollm.hardware import describe_machine
from nanollm.model import Transformer
from nanollm.training.optim import Muon, orthogonalize


def matrices(params: Path) -> list[torch.Tensor]:
    """The blocks' 2-D weights of params.yaml's model, each with a seeded random gradient."""
    import yaml

    raw = yaml.safe_load(params.read_text()) if params.is_file() else {}
    cfg = Config.from_dict({k: raw[k] for k in ("model", "tokenizer") if k in (raw or {})})
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.tokenizer.vocab_size)
    out = [p.detach().clone().requires_grad_() for layer in model.layers for p in layer.parameters() if p.dim() == 2]
    for p in out:
        p.grad = torch.randn_like(p)
    return out


def one_at_a_time(params: list[torch.Tensor], lr: float, wd: float, beta: float) -> Callable[[], None]:
    """Our Muon's step before batching: momentum, Newton-Schulz and update, matrix by matrix."""
    bufs = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step() -> None:
        for p, buf in zip(params, bufs, strict=True):
            buf.lerp_(p.grad, 1 - beta)
            update = orthogonalize(p.grad.lerp(buf, beta))
            p.mul_(1 - lr * wd)
            p.add_(update, alpha=-lr * max(1.0, p.size(-2) / p.size(-1)) ** 0.5)

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="for the model's shape")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lr, wd, beta = 0.02, 0.1, 0.95
    sides: dict[str, tuple[list[torch.Tensor], Callable[[], None]]] = {}
    ours = matrices(args.params)
    optimizer = Muon([{"params": ours, "use_muon": True, "lr": lr, "weight_decay": wd}], momentum=beta)
    sides["batched (ours)"] = ours, optimizer.step
    loop = matrices(args.params)
    sides["one at a time"] = loop, one_at_a_time(loop, lr, wd, beta)
    theirs = matrices(args.params)
    sides["torch.optim.Muon"] = theirs, torch.optim.Muon(theirs, lr=lr, weight_decay=wd, momentum=beta).step
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {describe_machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{len(ours)} matrices ({sorted({tuple(p.shape) for p in ours})}), fp32; "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    for _, step in sides.values():  # warm-up, and the same number of steps on each side before the equality check
        step()
    same = all(torch.equal(a, b) for a, b in zip(ours, loop, strict=True))
    medians = alternating_medians({name: step for name, (_, step) in sides.items()}, args.rounds, args.steps)
    print(f"load average after: {os.getloadavg()[0]:.2f}; batched and one at a time equal after a step: {same}\n")
    print_table("step", medians, "batched (ours)")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
