"""What a run is besides its weights: progress, the RNG streams it draws from, optimizer and loss-scale state.

`capture` makes the dict a checkpoint stores (torch.load(weights_only=True) reads it back);
`restore` puts it back so the next step is the one an uninterrupted run would take. Files are
nanollm/checkpoint.py's business; the loop that calls these is nanollm/training/loop.py.

The streams saved are the ones training draws from: the batch generator and torch's global
stream (CUDA's on a GPU). Nothing in training draws from numpy's or Python's, and nothing
seeds them, so their states were the operating system's entropy: saved, they made two
runs of the same steps differ in state they never used. Anything that draws from torch's
global stream once per session with a count that depends on the machine (a timing probe)
must take a generator of its own, or a resumed run's state would not be an unbroken one's
(tests/test_resume.py compares every entry but the wall-clock ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Progress:
    """Everything about a run so far that is not weights, optimizer or RNG: saved in each checkpoint."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    val_history: list[dict[str, float]] = field(default_factory=list)
    window_losses: list[float] = field(default_factory=list)  # steps since the last history row
    window_seconds: float = 0.0
    train_seconds: float = 0.0  # timed steps only (each session's first step is warm-up)
    timed_steps: int = 0
    timed_tokens: int = 0  # trained in the timed steps, over all processes (which steps were timed: the sessions')
    seconds: float = 0.0  # wall time of earlier sessions

    def to_state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """The random streams training draws from: the batch generator (the data position), torch's, CUDA's."""
    state = {"batch_rng": generator.get_state(), "torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator, device: torch.device) -> None:
    generator.set_state(state["batch_rng"])
    torch.set_rng_state(state["torch_rng"])  # numpy_rng, python_rng in older checkpoints: never drawn from
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def capture(
    progress: Progress, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, generator: torch.Generator,
    device: torch.device, tokens_seen: int,
) -> dict[str, Any]:  # fmt: skip
    """The resumable state after progress.step steps (tokens_seen over all processes): optimizer, loss scale,
    progress, RNG streams."""
    return {
        "step": progress.step,
        "tokens_seen": tokens_seen,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "progress": progress.to_state(),
        **rng_state(generator, device),
    }


def restore(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, generator: torch.Generator,
    device: torch.device,
) -> Progress:  # fmt: skip
    """Put a captured state's optimizer, loss scale and RNG streams back; return its progress."""
    # this machine's kernel choice, not the saving one's (where a group has one: Muon's have none)
    kernels = [{k: group[k] for k in ("fused", "foreach") if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, kernel in zip(optimizer.param_groups, kernels, strict=True):
        group.update(kernel)
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    restore_rng(state, generator, device)
    saved = dict(state["progress"])
    saved.pop("window_tokens", None)  # kept by some checkpoints; it follows from the step and window_losses
    if "timed_tokens" not in saved:  # saved before train.small_batch_steps: every step trained the same tokens
        saved["timed_tokens"] = saved["timed_steps"] * (state["tokens_seen"] // max(1, state["step"]))
    return Progress(**saved)
