"""The optimiser and its schedule: AdamW parameter groups, linear warmup then cosine decay.

The loop that steps them is nanollm/train.py's; their state in a checkpoint nanollm/train_state.py's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from nanollm.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (1-based): linear 0 -> lr, then cosine to min_lr.

    lr_at(0) = 0, lr_at(warmup_steps) = lr, lr_at(max_steps) = min_lr. With warmup_steps = 0
    the first step already uses the full lr.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.max_steps == cfg.warmup_steps:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


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


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over param_groups, with the fused kernel on CUDA and CPU (one pass over all parameters).

    On one thread of our CPU the fused step takes 10 ms for 13.8M parameters, against 62 ms for
    the default per-tensor loop: ~2% of a training step of the 6-layer, 384-wide benchmark model.
    """
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=lr_at(1, cfg),
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type in ("cuda", "cpu"),
    )
