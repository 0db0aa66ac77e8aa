"""`nanollm pretrain`: train the model on the token memmaps; write checkpoint, metrics, curves, chart.

Thin: the loop is nanollm.training.loop, the network nanollm.model, the files nanollm.checkpoint,
process groups nanollm.training.distributed. This module creates THE MLflow run of the model (evaluate
and bench_kvcache re-open it; a resumed training re-opens it too) and leaves its id in the run
record (--run-record, nanollm.tracking.runs). Under torchrun only rank 0 writes files and talks to MLflow.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from stages.cli import StageContext, pass_context, path_option

if TYPE_CHECKING:  # annotations only: torch loads inside the command, so `nanollm --help` stays instant
    import torch

    from nanollm.training.distributed import Distributed

log = logging.getLogger(__name__)


@click.command("pretrain")
@path_option("--tokens", "data/tokens", "Token memmaps + meta.json.")
@path_option("--out", "models/checkpoint", "Checkpoint folder.")
@path_option("--run-record", "models/run.json", "JSON naming the model's MLflow run (id, store).", folder=False)
@path_option("--metrics", "metrics/pretrain.json", "Metrics JSON to write.", folder=False)
@path_option("--train-curve", "reports/train_curve.csv", "CSV: step, tokens, train_loss, lr.", folder=False)
@path_option("--val-curve", "reports/val_curve.csv", "CSV: step, tokens, val_loss.", folder=False)
@path_option("--chart", "reports/pretrain_loss.png", "Loss chart (PNG).", folder=False)
@pass_context
def command(
    ctx: StageContext,
    tokens: Path,
    out: Path,
    run_record: Path,
    metrics: Path,
    train_curve: Path,
    val_curve: Path,
    chart: Path,
) -> None:
    """Pretrain the Transformer from params `model` and `train`; log the run to MLflow.

    Resumes from a checkpoint in --out written under the same params, data and code (after a
    kill, a SIGINT/SIGTERM or a crash); `torchrun --nproc_per_node N nanollm pretrain` trains
    with DistributedDataParallel. SIGINT/SIGTERM save a checkpoint and exit with 128 + signal.
    """
    from nanollm.errors import NanollmError
    from nanollm.hardware import pick_device
    from nanollm.training.distributed import Distributed, lost_the_job

    dist = Distributed.from_env()
    device = pick_device(ctx.config.train.device, dist.local_rank)
    dist.init(device)
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one rank narrates
    try:
        _pretrain(ctx, dist, device, tokens, out, run_record, (metrics, train_curve, val_curve, chart))
    except Exception as err:
        reason = lost_the_job(err) if dist.enabled else None
        if reason is None:
            raise
        from nanollm.checkpoint import CONFIG_FILE, read_checkpoint_info

        kept = (
            f"{out} keeps step {read_checkpoint_info(out)['step']}"
            if (out / CONFIG_FILE).is_file()
            else (f"{out} holds no checkpoint yet" if dist.is_main else "rank 0's node keeps the last checkpoint")
        )
        raise NanollmError(
            f"process {dist.rank} of {dist.world_size} lost the rest of the job ({reason}); {kept}: start torchrun "
            "again on every node to resume from it"
        ) from None
    finally:
        dist.close()


def _pretrain(
    ctx: StageContext,
    dist: Distributed,
    device: torch.device,
    tokens: Path,
    out: Path,
    run_record: Path,
    outputs: tuple[Path, ...],
) -> None:
    import torch

    from nanollm.checkpoint import fingerprint, resumable_state, save_checkpoint
    from nanollm.data.tokens import open_split, read_meta
    from nanollm.hardware import choose_dtype
    from nanollm.model import Transformer
    from nanollm.tracking.runs import NullTracker, make_tracker, sectioned, write_run_record
    from nanollm.training.interrupt import GracefulStop, TrainingInterrupted
    from nanollm.training.loop import train

    config = ctx.config
    meta = read_meta(tokens)
    train_data, val_data = open_split(tokens, "train", meta), open_split(tokens, "val", meta)
    torch.manual_seed(config.seed)  # the initial weights; batches have their own generator in train()
    model = Transformer(config.model, meta.vocab_size)
    n_params = model.num_params()
    sequences = config.train.batch_size * config.train.grad_accum
    small = min(config.train.small_batch_steps, config.train.max_steps)
    log.info(
        "model: %.2fM parameters (%.2fM without the embedding), %d train / %d val tokens; %d process(es) on %s, "
        "%d sequences of %d tokens per step%s",
        n_params / 1e6, model.num_params(exclude_embeddings=True) / 1e6, len(train_data), len(val_data),
        dist.world_size, device.type, sequences, config.model.block_size,
        f" ({sequences // 2} in the first {small})" if small else "",
    )  # fmt: skip

    dtype = choose_dtype(config.train.dtype, device)
    wanted = fingerprint(config.seed, config.model, config.train, meta.to_dict(), dtype.name)
    resume = dist.broadcast(resumable_state(out, wanted) if dist.is_main else None)
    if resume:
        model.load_state_dict(resume["model"])

    tracker = make_tracker(ctx.config.tracking, ctx.root) if dist.is_main else NullTracker()
    info = {"tokenizer_sha256": meta.tokenizer_sha256, "corpus_sha256": meta.corpus_sha256, "fingerprint": wanted}

    def save(model: Any, optimizer: Any, state: dict[str, Any]) -> None:
        save_checkpoint(out, model, train_state=state, info=info)

    status = "FAILED"
    try:
        _open_run(tracker, ctx, meta, resume, run_record)
        if dist.is_main:  # at once: a killed run resumes into the same MLflow run
            write_run_record(run_record, tracker)
        tracker.set_tags({"device": str(device), "dtype": dtype.name, "dtype_reason": dtype.reason})
        tracking = ctx.config.tracking
        system_metrics = (
            tracker.system_metrics(tracking.system_metrics_interval) if tracking.system_metrics else nullcontext()
        )
        with GracefulStop() as stop, system_metrics:
            result = train(
                model, train_data, val_data, config.train, seed=config.seed, device=device,
                callback=lambda step, m: tracker.log_metrics(sectioned("train", m), step=step), checkpoint=save,
                resume=resume["state"] if resume else None, stop=stop, dist=dist,
            )  # fmt: skip
        if dist.is_main:
            _write_outputs(outputs, result, n_params, tracker, _run_name(config, meta.vocab_size))
        status = "FINISHED"
    except TrainingInterrupted as err:
        status = "KILLED"
        if dist.is_main:
            click.echo(f"Error: {err}", err=True)
        # Non-zero, as a shell reports a signal: DVC records nothing for a half-trained model,
        # and the checkpoint folder (persist: true) waits for the next `dvc repro` to resume.
        raise click.exceptions.Exit(128 + err.signum) from None
    finally:
        tracker.end(status)


def _open_run(tracker: Any, ctx: StageContext, meta: Any, resume: dict[str, Any] | None, run_record: Path) -> None:
    """Re-open the resumed checkpoint's MLflow run (the run record's) when it lives in this store; else start one."""
    from nanollm.config import flatten
    from nanollm.errors import NanollmError
    from nanollm.tracking.runs import read_run_record, run_tags, sectioned

    config = ctx.config
    previous: dict[str, Any] = {}
    if resume and run_record.is_file():
        try:
            previous = read_run_record(run_record)
        except NanollmError as err:
            log.warning("%s; logging the resumed training to a new run", err)
    if previous.get("run_id") and previous.get("tracking_uri") == tracker.uri:
        try:
            tracker.resume(previous["run_id"])
            tracker.set_tags({"resumed_from_step": resume["state"]["step"]})
            tracker.log_metrics(sectioned("data", _data_metrics(meta)))
            return
        except NanollmError as err:
            log.warning("%s; logging the resumed training to a new run", err)
    tags = run_tags(
        ctx.root, stage="pretrain", **{"data.sha256": meta.corpus_sha256, "tokenizer.sha256": meta.tokenizer_sha256}
    )
    tracker.start(run_name=_run_name(config, meta.vocab_size), tags=tags)
    tracker.log_params(flatten(config.to_dict()))
    tracker.log_metrics(sectioned("data", _data_metrics(meta)))
    tracker.log_artifact(ctx.params_path)
    for split in ("train", "val"):  # lineage: the run's Datasets panel, digest = the corpus sha256
        tracker.log_dataset(f"corpus-{split}", meta.corpus_sha256, source=f"data/tokens/{split}.bin", context=split)


def _write_outputs(outputs: tuple[Path, ...], result: Any, n_params: int, tracker: Any, title: str) -> None:
    """metrics JSON, train/val curves, the loss chart; the final numbers to MLflow."""
    from nanollm.atomic import write_json
    from nanollm.tracking.runs import sectioned

    metrics, train_curve, val_curve, chart = outputs
    summary = _summary(result, n_params)
    write_json(metrics, summary)
    _write_csv(train_curve, ["step", "tokens", "train_loss", "lr"], result.history)
    _write_csv(val_curve, ["step", "tokens", "val_loss"], result.val_history)
    _plot_losses(chart, result.history, result.val_history, title=title)
    # train_loss, val_loss, tokens_per_s and mfu already have a value at the last step
    step = result.state["step"]
    totals = {"tokens": result.tokens, "seconds": result.seconds, "params": n_params}
    tracker.log_metrics(sectioned("train", totals), step=step)
    tracker.log_artifact(chart)
    log.info("pretrain: %s", json.dumps(summary))


def _run_name(config: Any, vocab_size: int) -> str:
    """Readable and sortable in the MLflow UI: 4L256d-4096v-600s, prefixed by the DVC experiment."""
    name = f"{config.model.n_layer}L{config.model.n_embd}d-{vocab_size}v-{config.train.max_steps}s"
    exp = os.environ.get("DVC_EXP_NAME")
    return f"{exp}-{name}" if exp else name


def _summary(result: Any, n_params: int) -> dict[str, Any]:
    """metrics/pretrain.json: final losses, throughput and size, rounded for readable diffs; where it ran."""
    import torch

    from nanollm.hardware import describe_machine

    return {
        "train_loss": round(result.train_loss, 6),
        "val_loss": round(result.val_loss, 6),
        "tokens": result.tokens,
        "seconds": round(result.seconds, 2),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "params": n_params,
        "mfu": None if result.mfu is None else round(result.mfu, 5),
        "peak_memory_mb": None if result.peak_memory is None else round(result.peak_memory / 2**20, 1),
        "estimated_memory_mb": round(result.memory_estimate.total / 2**20, 1),
        "device": result.device,
        "dtype": result.dtype,
        "dtype_reason": result.dtype_reason,
        "machine": describe_machine(result.device),
        "threads": torch.get_num_threads(),
    }


def _data_metrics(meta: Any) -> dict[str, float]:
    """What the run trained on, from data/tokens/meta.json: tokens, documents, bytes per token per split.

    Read from the stage's own input rather than from the earlier stages' metrics files: those
    also hold timings, which differ on every rerun, and as dependencies they would make DVC
    retrain an unchanged model after a rerun of the tokenizer or tokenize stage.
    """
    values: dict[str, float] = {"vocab_size": meta.vocab_size}
    for split, counts in meta.splits.items():
        values[f"{split}_tokens"] = counts["tokens"]
        values[f"{split}_documents"] = counts["documents"]
        if counts["tokens"]:
            values[f"{split}_bytes_per_token"] = round(counts["bytes"] / counts["tokens"], 4)
    return values


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    import csv
    import io

    from nanollm.atomic import write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def _plot_losses(path: Path, history: list[dict[str, Any]], val_history: list[dict[str, Any]], title: str) -> None:
    """Train and val loss against tokens seen. Uses matplotlib's Figure API: no pyplot, no global backend."""
    from matplotlib.figure import Figure

    from nanollm.atomic import atomic_path

    fig = Figure(figsize=(7, 4.2), dpi=100)  # ~700x420 px: readable in the MLflow UI and in a README
    ax = fig.subplots()
    ax.plot([r["tokens"] for r in history], [r["train_loss"] for r in history], label="train")
    ax.plot([r["tokens"] for r in val_history], [r["val_loss"] for r in val_history], "o-", label="val")
    ax.set(xlabel="tokens", ylabel="cross-entropy loss (nats)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
