"""The pretraining loop: batches from token memmaps, AdamW, warmup + cosine, accumulation, clipping.

`train()` is a plain function that reports through a callback, so it knows nothing of
MLflow, files or params.yaml; the pretrain stage wires it to those. Checkpoint files are
nanollm.checkpoint's business.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from nanollm.config import TrainConfig
from nanollm.errors import NanollmError

log = logging.getLogger(__name__)

Callback = Callable[[int, dict[str, float]], None]

# Dense peak FLOP/s per GPU (vendor spec sheets, no sparsity): (bf16/fp16 tensor cores, plain fp32).
# Matched by substring of torch.cuda.get_device_name, first hit wins, so longer names come first.
GPU_PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756e12, 51e12),
    ("H100", 989e12, 67e12),
    ("H200", 989e12, 67e12),
    ("A100", 312e12, 19.5e12),
    ("L40S", 362e12, 91.6e12),
    ("A10G", 70e12, 31.2e12),
    ("A10", 125e12, 31.2e12),
    ("L4", 121e12, 30.3e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("V100", 125e12, 15.7e12),
    ("T4", 65e12, 8.1e12),
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for train.dtype; "auto" picks bf16 wherever the hardware runs it natively.

    auto: bf16 on CUDA when supported (else fp16 with loss scaling); on a CPU, bf16 when oneDNN
    has native bf16 kernels (AVX512-BF16/AMX: 1.6x the fp32 tokens/s of the default model on
    our 2-core EPYC), else fp32, where emulated bf16 would be slower; fp32 on MPS. The choice
    depends only on the hardware, so a seeded run stays repeatable on the same machine.
    """
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


@dataclass
class TrainResult:
    """What a finished run reports. `state` is what a checkpoint needs to resume."""

    train_loss: float  # mean over the last log window
    val_loss: float  # the final val estimate
    tokens: int  # training tokens consumed
    seconds: float  # wall time of train(), evaluation included
    tokens_per_s: float  # training throughput over steps 2.. (evaluation and step-1 warm-up excluded)
    mfu: float | None  # model FLOP utilisation at that rate; None when the peak is unknown
    history: list[dict[str, float]] = field(default_factory=list)  # one row per log window
    val_history: list[dict[str, float]] = field(default_factory=list)  # one row per val estimate
    state: dict[str, Any] = field(default_factory=dict)  # step, tokens_seen, RNG states
    optimizer: torch.optim.Optimizer | None = None


# ---------------------------------------------------------------------------- devices and peaks


def pick_device(name: str = "auto") -> torch.device:
    """auto: cuda if available, then mps, then cpu. An explicit device that is absent is an error."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise NanollmError(f"train.device is {name!r} but this machine has none; set train.device: auto or cpu")
    return torch.device(name)


@functools.cache
def cpu_matmul_peak(threads: int, size: int = 1024, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Measured FLOP/s of a (size x size) matmul in `dtype` on the CPU with `threads` threads (cached).

    Takes ~0.15 s once. CPUs publish no usable peak, so MFU on a CPU is relative to what
    torch's own best-case GEMM reaches here (~165 GFLOP/s on 2 cores of our machines). The
    fastest of `repeats` single matmuls is kept: other processes only ever slow a matmul
    down, so the minimum time is the least disturbed estimate.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up: thread pool start, page faults
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 2 * size**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s for MFU: the GPU table, a measured matmul peak on CPU, None if unknown."""
    if device.type == "cpu":
        return cpu_matmul_peak(torch.get_num_threads(), dtype=dtype)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, low_precision, fp32 in GPU_PEAK_FLOPS:
            if key in name:
                return fp32 if dtype == torch.float32 else low_precision
    return None


# ---------------------------------------------------------------------------- schedule and optimizer


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
    """AdamW over param_groups; the fused kernel on CUDA (one launch for all parameters)."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=lr_at(1, cfg),
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type == "cuda",
    )


# ---------------------------------------------------------------------------- batches


def sample_batch(data: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """batch_size random windows of block_size + 1 contiguous tokens, (B, T+1) int64 on the CPU.

    Windows may straddle document boundaries (the eot token marks them), as in GPT-2 and
    nanoGPT; the model learns to reset after eot.
    """
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
    windows = np.stack([data[s : s + block_size + 1] for s in starts.tolist()])  # (B, T+1)
    return torch.from_numpy(windows.astype(np.int64))


def _check_length(data: np.ndarray, block_size: int, split: str) -> None:
    if len(data) < block_size + 1:
        raise NanollmError(
            f"the {split} split has {len(data)} tokens, fewer than model.block_size + 1 ({block_size + 1}); "
            "lower model.block_size or use a larger corpus"
        )


def _to_device(batch: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)  # overlap the copy with compute
    else:
        batch = batch.to(device)
    return batch[:, :-1], batch[:, 1:]  # inputs (B, T), targets (B, T)


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)  # (B, T, vocab), fp32
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def estimate_val_loss(
    model: nn.Module, data: np.ndarray, cfg: TrainConfig, block_size: int, seed: int, device: torch.device
) -> float:
    """Mean loss over eval_batches micro-batches of val windows, the same windows every call.

    Re-seeding a private generator each call makes successive estimates differ only by the
    model, not by which windows were drawn, so the val curve is smooth without more batches.
    """
    generator = torch.Generator().manual_seed(seed + 1)  # +1: never the training windows' stream
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(cfg.eval_batches):
        x, y = _to_device(sample_batch(data, cfg.batch_size, block_size, generator), device)
        with _autocast(device, resolve_dtype(cfg.dtype, device)):
            total += _loss(model, x, y).item()
    model.train(was_training)
    return total / cfg.eval_batches


# ---------------------------------------------------------------------------- the loop


def train_step(
    model: nn.Module,
    batch: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    device: torch.device,
    max_norm: float,
) -> tuple[float, float]:
    """Forward and backward over batch (A*B, T+1) in grad_accum micro-batches; unscale and clip.

    Leaves the gradients in place for the caller to step (or not, if the loss is not finite).
    Each micro-batch loss is divided by grad_accum, so the summed gradient is that of the mean
    loss over the whole batch, as if it were one micro-batch. Returns (loss, grad norm before
    clipping).
    """
    dtype = resolve_dtype(cfg.dtype, device)
    loss_sum = torch.zeros((), device=device)
    for micro in batch.split(cfg.batch_size):  # grad_accum micro-batches of (B, T+1)
        x, y = _to_device(micro, device)
        with _autocast(device, dtype):
            loss = _loss(model, x, y) / cfg.grad_accum
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return loss_sum.item(), float(grad_norm)  # one host sync per step: cheap next to the step


def train(
    model: nn.Module,
    train_data: np.ndarray,
    val_data: np.ndarray,
    cfg: TrainConfig,
    *,
    seed: int,
    device: str | torch.device | None = None,
    callback: Callback | None = None,
) -> TrainResult:
    """Run cfg.max_steps optimizer steps on `model` (moved to `device`), return a TrainResult.

    Steps are numbered 1..max_steps; each draws grad_accum * batch_size windows at once
    from a generator seeded with `seed`, so a run is bitwise repeatable on the CPU and
    splitting a batch into micro-batches changes nothing but rounding. `callback(step,
    metrics)` gets train metrics every log_interval steps and {"val_loss"} every
    eval_interval steps, both also at the last step. Model initialisation is the caller's
    (seed torch before building the model).
    """
    started = time.perf_counter()
    device = pick_device(cfg.device) if device is None else torch.device(device)
    dtype = resolve_dtype(cfg.dtype, device)
    block_size = model.cfg.block_size
    _check_length(train_data, block_size, "train")
    _check_length(val_data, block_size, "val")
    callback = callback or (lambda step, metrics: None)

    model.to(device).train()
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling
    generator = torch.Generator().manual_seed(seed)
    peak = peak_flops(device, dtype)
    flops_per_token = model.flops_per_token(block_size)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * block_size
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf  # inf: measure the norm, clip nothing

    history: list[dict[str, float]] = []
    val_history: list[dict[str, float]] = []
    window_losses: list[float] = []
    step_seconds, window_seconds = 0.0, 0.0
    val_loss = math.nan
    bar = tqdm(range(1, cfg.max_steps + 1), desc="pretrain", unit="step", disable=None)
    for step in bar:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sample_batch(train_data, cfg.batch_size * cfg.grad_accum, block_size, generator)  # (A*B, T+1)
        step_loss, grad_norm = train_step(model, batch, optimizer, scaler, cfg, device, max_norm)
        if not math.isfinite(step_loss):
            bar.close()
            raise NanollmError(
                f"training loss is {step_loss} at step {step}; lower train.lr, set train.grad_clip > 0 "
                "or use train.dtype: float32"
            )
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        if step > 1 or cfg.max_steps == 1:  # step 1 pays one-off costs (lazy imports, allocator warm-up)
            step_seconds += elapsed
        window_seconds += elapsed
        window_losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.3f}", refresh=False)

        last = step == cfg.max_steps
        if step % cfg.log_interval == 0 or last:
            tokens_per_s = len(window_losses) * tokens_per_step / window_seconds
            row = {
                "train_loss": sum(window_losses) / len(window_losses),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s,
                "mfu": flops_per_token * tokens_per_s / peak if peak else None,
                "tokens": step * tokens_per_step,
            }
            history.append({"step": step, **row})
            callback(step, row)
            window_losses, window_seconds = [], 0.0
        if step % cfg.eval_interval == 0 or last:
            val_loss = estimate_val_loss(model, val_data, cfg, block_size, seed, device)
            val_history.append({"step": step, "tokens": step * tokens_per_step, "val_loss": val_loss})
            callback(step, {"val_loss": val_loss})
            log.info("step %d: train loss %.4f, val loss %.4f", step, step_loss, val_loss)
    bar.close()

    tokens = cfg.max_steps * tokens_per_step
    tokens_per_s = max(1, cfg.max_steps - 1) * tokens_per_step / step_seconds
    return TrainResult(
        train_loss=history[-1]["train_loss"],
        val_loss=val_loss,
        tokens=tokens,
        seconds=time.perf_counter() - started,
        tokens_per_s=tokens_per_s,
        mfu=flops_per_token * tokens_per_s / peak if peak else None,
        history=history,
        val_history=val_history,
        state=_resume_state(cfg.max_steps, tokens, generator, scaler, device),
        optimizer=optimizer,
    )


def _resume_state(
    step: int, tokens: int, generator: torch.Generator, scaler: torch.amp.GradScaler, device: torch.device
) -> dict[str, Any]:
    """What a resumed run needs besides weights and optimizer: position, RNG streams, loss scale."""
    state = {
        "step": step,
        "tokens_seen": tokens,
        "batch_rng": generator.get_state(),  # continues the same window sequence
        "torch_rng": torch.get_rng_state(),
        "scaler": scaler.state_dict(),
    }
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state
