"""The pretraining loop: batches from token memmaps, AdamW, warmup + cosine, accumulation, DDP, resume.

`train()` is a plain function that reports through callbacks, so it knows nothing of MLflow,
files or params.yaml; the pretrain stage wires it to those. Writing checkpoint files is
nanollm.checkpoint's business, the machine's capabilities nanollm.hardware's, process groups
nanollm.training.distributed's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from nanollm.config import TrainConfig
from nanollm.errors import NanollmError
from nanollm.hardware import choose_dtype, fast_fp32_matmuls, peak_flops, pick_device, resolve_dtype
from nanollm.private import private_inductor_cache
from nanollm.training.average import WeightAverage
from nanollm.training.distributed import Distributed, split_evenly
from nanollm.training.interrupt import GracefulStop, TrainingInterrupted
from nanollm.training.memory import MemoryEstimate, PeakMemory, activation_checkpointing, estimate_memory, format_bytes
from nanollm.training.optim import lr_at, make_optimizer, muon_momentum_at
from nanollm.training.state import Progress, capture, restore

log = logging.getLogger(__name__)

Callback = Callable[[int, dict[str, float]], None]
# checkpoint(model, optimizer, state): save a resumable checkpoint; called on rank 0 only
CheckpointFn = Callable[[nn.Module, torch.optim.Optimizer, dict[str, Any]], None]


@dataclass
class TrainResult:
    """What a finished run reports. `state` is what a checkpoint needs to resume."""

    train_loss: float  # mean over the last log window
    val_loss: float  # the final val estimate
    tokens: int  # training tokens consumed, over all processes
    seconds: float  # wall time of train(), evaluation included, summed over resumed sessions
    tokens_per_s: float  # training throughput (evaluation and each session's warm-up step excluded)
    mfu: float | None  # model FLOP utilisation per device at that rate; None when the peak is unknown
    history: list[dict[str, float]] = field(default_factory=list)  # one row per log window
    val_history: list[dict[str, float]] = field(default_factory=list)  # one row per val estimate
    state: dict[str, Any] = field(default_factory=dict)  # step, tokens_seen, RNG states, progress
    optimizer: torch.optim.Optimizer | None = None
    resumed_from: int = 0  # the step this session started after (0: a fresh run)
    memory_estimate: MemoryEstimate | None = None
    peak_memory: int | None = None  # bytes, see nanollm.training.memory.PeakMemory
    device: str = "cpu"  # where it trained, e.g. "cpu", "cuda:0"
    dtype: str = "float32"  # the compute dtype the matmuls ran in (autocast's, or fp32)
    dtype_reason: str = ""  # why that dtype (nanollm.hardware.choose_dtype)


# ---------------------------------------------------------------------------- batches


def sample_batch(data: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """batch_size random windows of block_size + 1 contiguous tokens, (B, T+1) int64 on the CPU.

    Windows may straddle document boundaries (the eot token marks them), as in GPT-2 and
    nanoGPT; the model learns to reset after eot. The generator's state is the data position.
    """
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
    windows = np.stack([data[s : s + block_size + 1] for s in starts.tolist()])  # (B, T+1)
    return torch.from_numpy(windows.astype(np.int64))


def micro_batches_per_rank(grad_accum: int, world_size: int, batch_size: int) -> int:
    """How many micro-batches each rank splits its share of a step into.

    grad_accum counts micro-batches of batch_size sequences over all ranks, so the effective
    batch (batch_size * grad_accum) does not depend on the world size: with grad_accum a
    multiple of it, each rank runs grad_accum / world_size micro-batches of batch_size; with
    fewer (the default grad_accum 1 under torchrun), each rank runs one micro-batch of its
    equal share. The step's sequences must split evenly over ranks and micro-batches.
    """
    micro = -(-grad_accum // world_size)
    sequences = batch_size * grad_accum
    if sequences % (world_size * micro):
        raise NanollmError(
            f"train.batch_size * train.grad_accum ({batch_size} * {grad_accum} = {sequences} sequences a step) "
            f"does not split evenly over {world_size} processes in {micro} micro-batch(es) each; make it a "
            f"multiple of {world_size * micro}, e.g. set train.grad_accum to {world_size}"
        )
    return micro


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
    return model(x, targets=y)  # the mean cross-entropy, fp32, from logits made a chunk at a time


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def estimate_val_loss(
    model: nn.Module,
    data: np.ndarray,
    cfg: TrainConfig,
    block_size: int,
    seed: int,
    device: torch.device,
    dist: Distributed | None = None,
) -> float:
    """Mean loss over eval_batches micro-batches of val windows, the same windows every call.

    Re-seeding a private generator each call makes successive estimates differ only by the
    model, not by which windows were drawn, so the val curve is smooth without more batches.
    Under DDP rank r evaluates batches r, r + world, ... and the sum is all-reduced, so the
    estimate is the same whatever the number of processes.
    """
    dist = dist or Distributed()
    generator = torch.Generator().manual_seed(seed + 1)  # +1: never the training windows' stream
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for i in range(cfg.eval_batches):
        batch = sample_batch(data, cfg.batch_size, block_size, generator)  # every rank draws, to stay in step
        if i % dist.world_size == dist.rank:
            x, y = _to_device(batch, device)
            with _autocast(device, resolve_dtype(cfg.dtype, device)):
                total += _loss(model, x, y).float()
    model.train(was_training)
    return dist.sum(total).item() / cfg.eval_batches


# ---------------------------------------------------------------------------- model wrappers


def _wrap(
    model: nn.Module, cfg: TrainConfig, device: torch.device, dist: Distributed
) -> tuple[nn.Module, DistributedDataParallel | None]:
    """(module to train through, the DDP wrapper or None): DDP across ranks, then torch.compile if asked.

    Compiling the DDP module (not the reverse) lets the compiler split the graph at DDP's
    gradient buckets, so the all-reduce of one bucket overlaps the backward of the next.
    """
    ddp = None
    runner = model
    if dist.enabled:
        ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
        )
        runner = ddp
    if cfg.compile:
        # inductor's default cache, /tmp/torchinductor_<user>, is a name anyone could create first
        private_inductor_cache("the training step", "train with train.compile: false")
        runner = torch.compile(runner)
    return runner, ddp


# ---------------------------------------------------------------------------- one step


def tokens_through(step: int, cfg: TrainConfig, block_size: int) -> int:
    """Tokens trained in steps 1..step over all processes; train.small_batch_steps' steps train half a step's."""
    full = cfg.batch_size * cfg.grad_accum * block_size
    return step * full - min(step, cfg.small_batch_steps) * (full // 2)


def first_halves(batch: torch.Tensor, micro_batches: int) -> torch.Tensor:
    """The first half of each of a step's micro-batches, (M*B, T+1) -> (M*B/2, T+1): a step of half the batch."""
    micro = batch.reshape(micro_batches, -1, batch.shape[-1])
    return micro[:, : micro.shape[1] // 2].reshape(-1, batch.shape[-1])


def train_step(
    model: nn.Module,
    batch: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    micro_batches: int,
    dtype: torch.dtype,
    device: torch.device,
    max_norm: float,
    ddp: DistributedDataParallel | None = None,
) -> tuple[torch.Tensor, float]:
    """Forward and backward over this rank's batch (M*B, T+1) in M micro-batches; unscale and clip.

    Leaves the gradients in place for the caller to step (or not, if the loss is not finite).
    Each micro-batch loss is divided by M, so the summed gradient is that of the mean loss
    over the whole batch, as if it were one micro-batch; DDP then averages over the ranks.
    Gradients are all-reduced once, in the last micro-batch's backward (no_sync before).
    Returns (this rank's mean loss as a device tensor, global grad norm before clipping).
    """
    loss_sum = torch.zeros((), device=device)
    micros = batch.chunk(micro_batches)  # M micro-batches of (B, T+1)
    for i, micro in enumerate(micros):
        x, y = _to_device(micro, device)
        sync = ddp is None or i == len(micros) - 1
        with contextlib.nullcontext() if sync else ddp.no_sync():
            with _autocast(device, dtype):
                loss = _loss(model, x, y) / micro_batches
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return loss_sum, float(grad_norm)


# ---------------------------------------------------------------------------- the loop


def train(
    model: nn.Module,
    train_data: np.ndarray,
    val_data: np.ndarray,
    cfg: TrainConfig,
    *,
    seed: int,
    device: str | torch.device | None = None,
    callback: Callback | None = None,
    checkpoint: CheckpointFn | None = None,
    resume: dict[str, Any] | None = None,
    stop: GracefulStop | None = None,
    dist: Distributed | None = None,
) -> TrainResult:
    """Run optimizer steps 1..cfg.max_steps on `model` (moved to `device`), return a TrainResult.

    Each step draws grad_accum * batch_size windows from a generator seeded with `seed`;
    under DDP every rank draws the same windows and trains on its contiguous share, so the
    run is the same (up to float rounding) for any number of processes, and bitwise
    repeatable on one CPU process. `callback(step, metrics)` gets train metrics every
    log_interval steps and {"val_loss"} every eval_interval steps, both also at the last.
    `checkpoint(model, optimizer, state)` runs on rank 0 every checkpoint_interval steps, at
    the last step and when `stop` saw a signal (then TrainingInterrupted is raised). `resume`
    is the state of such a checkpoint (weights already loaded by the caller): training goes
    on from its step exactly as if never interrupted. Model initialisation is the caller's.
    """
    started = time.perf_counter()
    dist = dist or Distributed()
    device = pick_device(cfg.device, dist.local_rank) if device is None else torch.device(device)
    choice = choose_dtype(cfg.dtype, device)
    dtype = choice.dtype
    log.info("training on %s in %s (%s)", device, choice.name, choice.reason)
    _check_length(train_data, model.cfg.block_size, "train")
    _check_length(val_data, model.cfg.block_size, "val")
    model.to(device).train()
    loop = _Loop(model, train_data, val_data, cfg, seed, device, dtype, dist, callback, checkpoint, stop)
    progress = restore(resume, loop.optimizer, loop.scaler, loop.generator, device) if resume else Progress()
    if resume and loop.average is not None:
        if "weight_average" not in resume:
            raise NanollmError("the checkpoint to resume holds no weight average (train.ema_decay was off); "
                               "start a new run (delete the checkpoint) or set train.ema_decay: null")  # fmt: skip
        loop.average.load_state_dict(resume["weight_average"])
    if resume:
        log.info("resuming after step %d of %d", progress.step, cfg.max_steps)
    resumed_from = progress.step
    estimate = estimate_memory(
        model.cfg, model.vocab_size, cfg.batch_size, dtype, cfg.activation_checkpointing, bool(cfg.ema_decay)
    )
    log.info("memory estimate per process: %s", estimate.describe())
    memory = PeakMemory(device, resident=estimate.params)  # the weights are in memory already

    with fast_fp32_matmuls(device), activation_checkpointing(model, cfg.activation_checkpointing):
        loop.run(progress, memory, estimate)

    progress.seconds += time.perf_counter() - started
    tokens_per_s = progress.timed_tokens / progress.train_seconds if progress.timed_steps else 0.0
    return TrainResult(
        train_loss=progress.history[-1]["train_loss"],
        val_loss=progress.val_history[-1]["val_loss"],
        tokens=tokens_through(cfg.max_steps, cfg, loop.block_size),
        seconds=progress.seconds,
        tokens_per_s=tokens_per_s,
        mfu=loop.mfu(tokens_per_s),
        history=progress.history,
        val_history=progress.val_history,
        state=loop.state(progress),
        optimizer=loop.optimizer,
        resumed_from=resumed_from,
        memory_estimate=estimate,
        peak_memory=memory.peak(),
        device=str(device),
        dtype=choice.name,
        dtype_reason=choice.reason,
    )


@dataclass
class _Loop:
    """The step loop of train(), with what every step needs at hand; one instance per call."""

    model: nn.Module
    train_data: np.ndarray
    val_data: np.ndarray
    cfg: TrainConfig
    seed: int
    device: torch.device
    dtype: torch.dtype
    dist: Distributed
    callback: Callback | None
    checkpoint: CheckpointFn | None
    stop: GracefulStop | None

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.block_size = self.model.cfg.block_size
        self.micro_batches = micro_batches_per_rank(cfg.grad_accum, self.dist.world_size, cfg.batch_size)
        self.rows = split_evenly(cfg.grad_accum * cfg.batch_size, self.dist.world_size, self.dist.rank)  # this rank's
        # train.small_batch_steps' steps: the first half of each of the step's grad_accum micro-batches,
        # shared out as the whole step is, so the run is the same for any number of processes
        self.small_rows = split_evenly(cfg.grad_accum * cfg.batch_size // 2, self.dist.world_size, self.dist.rank)
        per_micro = len(self.rows) // self.micro_batches
        if cfg.small_batch_steps and (cfg.batch_size % 2 or per_micro % 2):
            raise NanollmError(
                f"train.small_batch_steps halves each micro-batch, but train.batch_size is {cfg.batch_size} and "
                f"each of {self.dist.world_size} process(es) runs micro-batches of {per_micro} sequence(s); "
                "make both even (train.batch_size, train.grad_accum) or set train.small_batch_steps: 0"
            )
        self.flops_per_token = self.model.flops_per_token(self.block_size)
        self.peak = peak_flops(self.device, self.dtype)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.average = WeightAverage(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)  # fp16: loss scaling
        self.generator = torch.Generator().manual_seed(self.seed)  # the training windows, so the data position
        self.callback = self.callback or (lambda step, metrics: None)

    def state(self, progress: Progress) -> dict[str, Any]:
        tokens_seen = tokens_through(progress.step, self.cfg, self.block_size)
        state = capture(progress, self.optimizer, self.scaler, self.generator, self.device, tokens_seen)
        if self.average is not None:
            state["weight_average"] = self.average.state_dict()
        return state

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOP utilisation per device at a whole-job rate of tokens_per_s."""
        if not self.peak or not tokens_per_s:
            return None
        return self.flops_per_token * tokens_per_s / (self.peak * self.dist.world_size)

    def run(self, progress: Progress, memory: PeakMemory, estimate: MemoryEstimate) -> None:
        cfg, dist, optimizer, scaler = self.cfg, self.dist, self.optimizer, self.scaler
        runner, ddp = _wrap(self.model, cfg, self.device, dist)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf  # inf: measure the norm, clip nothing
        last_saved, first = progress.step, progress.step + 1
        bar = tqdm(
            range(first, cfg.max_steps + 1), initial=progress.step, total=cfg.max_steps, desc="pretrain",
            unit="step", disable=None if dist.is_main else True,
        )  # fmt: skip
        for step in bar:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)  # AdamW's; every group follows the same schedule from its own peak
            momentum = muon_momentum_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = group["max_lr"] * lr / cfg.lr
                if group.get("use_muon"):
                    group["momentum"] = momentum
            # The whole step's windows are drawn whatever the step trains on, so the data stream does not
            # depend on train.small_batch_steps.
            batch = sample_batch(self.train_data, cfg.grad_accum * cfg.batch_size, self.block_size, self.generator)
            rows = self.rows
            if step <= cfg.small_batch_steps:
                batch, rows = first_halves(batch, cfg.grad_accum), self.small_rows
            batch = batch[rows.start : rows.stop]
            loss, grad_norm = train_step(
                runner, batch, optimizer, scaler, self.micro_batches, self.dtype, self.device, max_norm, ddp
            )
            # One all-reduce per step carries the loss and the ranks' votes to stop, so all stop together.
            stop_here = float(self.stop is not None and self.stop.signum is not None)
            totals = dist.sum(torch.stack([loss.float(), torch.tensor(stop_here, device=self.device)]))
            step_loss, stops = totals[0].item() / dist.world_size, totals[1].item()
            if not math.isfinite(step_loss) or (not scaler.is_enabled() and not math.isfinite(grad_norm)):
                bar.close()
                raise NanollmError(
                    f"training diverged at step {step} (loss {step_loss}, grad norm {grad_norm}); "
                    + (f"the checkpoint of step {last_saved} is kept; " if last_saved else "")
                    + "lower train.lr, set train.grad_clip > 0 or use train.dtype: float32 (a new run)"
                )
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if self.average is not None:
                self.average.update()
                if step == cfg.max_steps:
                    self.average.copy_to_model()  # the last val estimate and the saved weights are the average's
            tokens = tokens_through(step, cfg, self.block_size) - tokens_through(step - 1, cfg, self.block_size)
            self._account(progress, step, time.perf_counter() - t0, step_loss, tokens, first)
            bar.set_postfix(loss=f"{step_loss:.3f}", refresh=False)
            if step == first:
                self._log_memory(step, memory, estimate)
            self._report(progress, step, lr, grad_norm)
            if (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0) or step == cfg.max_steps or stops:
                self._save(progress)
                last_saved = step
            if stops:
                bar.close()
                raise TrainingInterrupted(step, (self.stop and self.stop.signum) or signal.SIGTERM)
        bar.close()

    def _account(self, progress: Progress, step: int, elapsed: float, loss: float, tokens: int, first: int) -> None:
        progress.step = step
        if step > first or self.cfg.max_steps == first:  # a session's first step pays one-off costs
            progress.train_seconds += elapsed
            progress.timed_steps += 1
            progress.timed_tokens += tokens
        progress.window_seconds += elapsed
        progress.window_losses.append(loss)

    def _log_memory(self, step: int, memory: PeakMemory, estimate: MemoryEstimate) -> None:
        peak = memory.peak()
        if peak is not None:
            log.info(
                "memory after step %d: %s measured at the peak, %s estimated",
                step, format_bytes(peak), format_bytes(estimate.total),
            )  # fmt: skip

    def _report(self, progress: Progress, step: int, lr: float, grad_norm: float) -> None:
        cfg = self.cfg
        last = step == cfg.max_steps
        if step % cfg.log_interval == 0 or last:
            window_start = step - len(progress.window_losses)
            window_tokens = tokens_through(step, cfg, self.block_size) - tokens_through(
                window_start, cfg, self.block_size
            )
            tokens_per_s = window_tokens / progress.window_seconds
            row = {
                "train_loss": sum(progress.window_losses) / len(progress.window_losses),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s,
                "mfu": self.mfu(tokens_per_s),
                "tokens": tokens_through(step, cfg, self.block_size),
            }
            progress.history.append({"step": step, **row})
            self.callback(step, row)
            progress.window_losses, progress.window_seconds = [], 0.0
        if step % cfg.eval_interval == 0 or last:
            val_loss = estimate_val_loss(
                self.model, self.val_data, cfg, self.block_size, self.seed, self.device, self.dist
            )
            tokens = tokens_through(step, cfg, self.block_size)
            progress.val_history.append({"step": step, "tokens": tokens, "val_loss": val_loss})
            self.callback(step, {"val_loss": val_loss})
            log.info("step %d: train loss %.4f, val loss %.4f", step, progress.history[-1]["train_loss"], val_loss)

    def _save(self, progress: Progress) -> None:
        """Rank 0 writes; the others wait, so none runs ahead into a collective while it writes."""
        if self.checkpoint is not None and self.dist.is_main:
            self.checkpoint(self.model, self.optimizer, self.state(progress))
        self.dist.barrier()
