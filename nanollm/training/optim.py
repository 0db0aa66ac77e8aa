"""The optimisers and their schedule: AdamW, or Muon for the blocks' matrices with AdamW for the rest;
linear warmup, then cosine decay or warmup-stable-decay (WSD).

The loop that steps them is nanollm/training/loop.py's; their state in a checkpoint nanollm/training/state.py's.
Every param group carries `max_lr`, its peak learning rate; the loop sets each group's `lr` to
`max_lr * lr_at(step, cfg) / cfg.lr`, so one schedule drives groups with different peaks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from nanollm.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (1-based) for a group whose peak is train.lr.

    Linear 0 -> lr over warmup_steps, then by train.schedule:
    - cosine: cosine decay from lr to min_lr at max_steps;
    - wsd: constant lr, then a linear cooldown to min_lr over the last cooldown_frac of the
      steps (Hu et al. 2024's warmup-stable-decay; modded-nanogpt's schedule): the stable phase
      makes progress at full speed, and the short decay is where the loss drops.
    lr_at(0) = 0, lr_at(warmup_steps) = lr, lr_at(max_steps) = min_lr. With warmup_steps = 0
    the first step already uses the full lr.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.max_steps == cfg.warmup_steps:
        return cfg.lr
    if cfg.schedule == "wsd":
        cooldown = max(1, round(cfg.cooldown_frac * (cfg.max_steps - cfg.warmup_steps)))
        left = (cfg.max_steps - step) / cooldown  # 1 where the cooldown starts, 0 at the last step
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * min(1.0, max(0.0, left))
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


MOMENTUM_START = 0.85  # Muon's momentum at step 0 with train.muon_momentum_warmup (modded-nanogpt's)


def muon_momentum_at(step: int, cfg: TrainConfig) -> float:
    """Muon's momentum at optimizer step `step`: MOMENTUM_START rising linearly to muon_momentum over
    muon_momentum_warmup steps (at most muon_momentum, should it be set lower than the start), then flat."""
    if step >= cfg.muon_momentum_warmup:
        return cfg.muon_momentum
    start = min(MOMENTUM_START, cfg.muon_momentum)
    return start + (cfg.muon_momentum - start) * step / cfg.muon_momentum_warmup


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decay on weight matrices; none on norms, other vectors and embeddings.

    Decaying an embedding shrinks rows of rare tokens towards zero between their updates;
    a tied LM head is the embedding and is treated as one.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # a tied tensor comes once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def muon_param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Muon for the hidden matrices of the blocks; AdamW for the embedding, the LM head and every vector.

    Muon orthogonalises a matrix's update, which suits the square-ish maps inside the blocks;
    the embedding (a lookup: each row sees only its token's gradient) and the LM head (its rows
    are per-token too) are not such maps, and modded-nanogpt keeps them on Adam, as here.
    """
    blocks = {id(p) for layer in model.layers for p in layer.parameters() if p.dim() == 2}
    muon = [p for p in model.parameters() if id(p) in blocks and p.requires_grad]
    adamw = param_groups(model, cfg.weight_decay)
    for group in adamw:
        group["params"] = [p for p in group["params"] if id(p) not in blocks]
    muon_group = {"params": muon, "use_muon": True, "max_lr": cfg.muon_lr, "weight_decay": cfg.weight_decay}
    return [muon_group] + [{**g, "use_muon": False, "max_lr": cfg.lr} for g in adamw if g["params"]]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """train.optimizer: AdamW over param_groups (the fused kernel on CUDA and CPU: one pass over all
    parameters), or Muon over muon_param_groups. Every group holds its peak lr as `max_lr`.
    """
    if cfg.optimizer == "muon":
        return Muon(
            muon_param_groups(model, cfg), betas=(cfg.beta1, cfg.beta2), momentum=muon_momentum_at(0, cfg),
            ns_steps=cfg.muon_ns_steps,
        )  # fmt: skip
    groups = [{**g, "max_lr": cfg.lr} for g in param_groups(model, cfg.weight_decay)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type in ("cuda", "cpu"))


# ---------------------------------------------------------------------------- Muon

# Newton-Schulz quintic coefficients (Keller Jordan's Muon): they push every singular value of
# the normalised matrix towards ~1 (into [0.7, 1.2]) in five steps, faster than the cubic's
# convergence to exactly 1, which the update does not need.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximation of U V^T for g = U S V^T (all singular values made ~1), by Newton-Schulz.

    Runs in g's dtype, except that a CPU without native bf16 keeps fp32: torch.optim.Muon casts
    to bf16 always, and on such a CPU the emulated bf16 matmuls made a step of the default model
    1.7x as long as AdamW's. Five iterations cost ~15 small matmuls per matrix, about a fifth of
    the default model's forward and backward at 4,096 tokens per step.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.float() if g.device.type == "cpu" else g.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # (n, m) with n <= m: the Gram matrix x x^T is the smaller one
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values <= 1: inside the basin
    for _ in range(steps):
        gram = x @ x.mT  # (n, n)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-schulz for groups with use_muon, AdamW for the others.

    Muon (Jordan et al. 2024, modded-nanogpt's optimizer): Nesterov momentum on the gradient,
    then the update is orthogonalised (orthogonalize) and scaled by sqrt(max(1, rows/cols)),
    so every matrix moves by about the same spectral norm whatever its shape; decoupled
    weight decay as AdamW's. One optimizer object for both kinds keeps the loop, the loss
    scaler and checkpoints unaware of the split. Each group's lr is set by the loop.
    """

    def __init__(
        self,
        params: list[dict[str, Any]],
        *,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        ns_steps: int = 5,
    ):
        defaults = {"lr": 0.0, "momentum": momentum, "betas": betas, "eps": eps, "ns_steps": ns_steps}
        defaults |= {"weight_decay": 0.0, "use_muon": False}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        assert closure is None, "Muon takes no closure"
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["use_muon"]:
                self._muon(group, params)
            else:
                self._adamw(group, params)

    def _muon(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Matrices of one shape are orthogonalised together, as one batch (modded-nanogpt's batching).

        The default model's 28 matrices come in three shapes, so a step makes 3 batched calls of
        Newton-Schulz's ~15 small matmuls instead of 28, with the same numbers bit for bit (each
        matrix of a batch is its own matmul); benchmarks/muon_step.py times the two.
        """
        lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
        by_shape: dict[torch.Size, list[torch.Tensor]] = {}
        for p in params:
            by_shape.setdefault(p.shape, []).append(p)
        for same in by_shape.values():
            grads = [p.grad for p in same]
            bufs = []
            for p in same:
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_lerp_(bufs, grads, 1 - beta)  # (out, in) each: EMA of gradients
            nesterov = torch.stack(grads).lerp_(torch.stack(bufs), beta)  # look ahead along the momentum
            updates = orthogonalize(nesterov, group["ns_steps"]).unbind()
            torch._foreach_mul_(same, 1 - lr * wd)
            rows, cols = same[0].shape[-2:]
            torch._foreach_add_(same, updates, alpha=-lr * max(1.0, rows / cols) ** 0.5)

    def _adamw(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            state["step"] += 1
            t = state["step"].item()
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(eps)
            p.mul_(1 - lr * wd)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))
