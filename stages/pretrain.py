"""`nanollm pretrain`: train the model on the token memmaps; write checkpoint, metrics, curves, chart.

Thin: the loop is nanollm.train, the network nanollm.model, the files nanollm.checkpoint.
This module creates THE MLflow run of the model (evaluate and bench_kvcache re-open it)
and records its id in the checkpoint's run.json.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import click

from stages.cli import StageContext, pass_context

log = logging.getLogger(__name__)

_dir = click.Path(file_okay=False, path_type=Path)
_file = click.Path(dir_okay=False, path_type=Path)


@click.command("pretrain")
@click.option("--tokens", type=_dir, default=Path("data/tokens"), show_default=True, help="Token memmaps + meta.json.")
@click.option("--out", type=_dir, default=Path("models/checkpoint"), show_default=True, help="Checkpoint folder.")
@click.option(
    "--metrics", type=_file, default=Path("metrics/pretrain.json"), show_default=True, help="Metrics JSON to write."
)
@click.option(
    "--train-curve",
    type=_file,
    default=Path("reports/train_curve.csv"),
    show_default=True,
    help="CSV: step, tokens, train_loss, lr.",
)
@click.option(
    "--val-curve",
    type=_file,
    default=Path("reports/val_curve.csv"),
    show_default=True,
    help="CSV: step, tokens, val_loss.",
)
@click.option(
    "--chart", type=_file, default=Path("reports/pretrain_loss.png"), show_default=True, help="Loss chart (PNG)."
)
@click.option(
    "--upstream-metrics",
    type=_file,
    multiple=True,
    default=(Path("metrics/tokenizer.json"), Path("metrics/tokenize.json")),
    show_default=True,
    help="Earlier stages' metrics JSON to copy into the run, prefixed by file stem (repeatable; missing ones skipped).",
)
@pass_context
def command(
    ctx: StageContext,
    tokens: Path,
    out: Path,
    metrics: Path,
    train_curve: Path,
    val_curve: Path,
    chart: Path,
    upstream_metrics: tuple[Path, ...],
) -> None:
    """Pretrain the Transformer from params `model` and `train`; log the run to MLflow."""
    import torch

    from nanollm.atomic import write_json
    from nanollm.checkpoint import save_checkpoint
    from nanollm.config import flatten
    from nanollm.data.tokens import open_split, read_meta
    from nanollm.model import Transformer
    from nanollm.tracking import run_tags
    from nanollm.train import train

    config = ctx.config
    meta = read_meta(tokens)
    train_data, val_data = open_split(tokens, "train", meta), open_split(tokens, "val", meta)
    torch.manual_seed(config.seed)  # the initial weights; batches have their own generator in train()
    model = Transformer(config.model, meta.vocab_size)
    n_params = model.num_params()
    log.info(
        "model: %.2fM parameters (%.2fM without the embedding), %d train / %d val tokens",
        n_params / 1e6,
        model.num_params(exclude_embeddings=True) / 1e6,
        len(train_data),
        len(val_data),
    )

    tracker = ctx.tracker()
    with tracker:
        tags = run_tags(
            ctx.root, stage="pretrain", **{"data.sha256": meta.corpus_sha256, "tokenizer.sha256": meta.tokenizer_sha256}
        )
        run_name = _run_name(config, meta.vocab_size)
        tracker.start(run_name=run_name, tags=tags)
        tracker.log_params(flatten(config.to_dict()))
        tracker.log_metrics(_upstream(upstream_metrics))
        tracker.log_artifact(ctx.params_path)
        result = train(
            model,
            train_data,
            val_data,
            config.train,
            seed=config.seed,
            callback=lambda step, m: tracker.log_metrics(m, step=step),
        )
        save_checkpoint(
            out,
            model,
            optimizer=result.optimizer,
            train_state=result.state,
            info={"tokenizer_sha256": meta.tokenizer_sha256, "corpus_sha256": meta.corpus_sha256},
            run={"run_id": tracker.run_id, "tracking_uri": tracker.uri},
        )
        summary = _summary(result, n_params)
        write_json(metrics, summary)
        _write_csv(train_curve, ["step", "tokens", "train_loss", "lr"], result.history)
        _write_csv(val_curve, ["step", "tokens", "val_loss"], result.val_history)
        _plot_losses(chart, result.history, result.val_history, title=run_name)
        # train_loss, val_loss, tokens_per_s and mfu already have a value at the last step
        tracker.log_metrics(
            {"tokens": result.tokens, "seconds": result.seconds, "params": n_params}, step=result.state["step"]
        )
        tracker.log_artifact(chart)
    log.info("pretrain: %s", json.dumps(summary))


def _run_name(config: Any, vocab_size: int) -> str:
    """Readable and sortable in the MLflow UI: 4L256d-4096v-600s, prefixed by the DVC experiment."""
    name = f"{config.model.n_layer}L{config.model.n_embd}d-{vocab_size}v-{config.train.max_steps}s"
    exp = os.environ.get("DVC_EXP_NAME")
    return f"{exp}-{name}" if exp else name


def _summary(result: Any, n_params: int) -> dict[str, Any]:
    """metrics/pretrain.json: final losses, throughput and size, rounded for readable diffs."""
    return {
        "train_loss": round(result.train_loss, 6),
        "val_loss": round(result.val_loss, 6),
        "tokens": result.tokens,
        "seconds": round(result.seconds, 2),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "params": n_params,
        "mfu": None if result.mfu is None else round(result.mfu, 5),
    }


def _upstream(paths: tuple[Path, ...]) -> dict[str, float]:
    """Numeric values of earlier stages' metrics files, keyed "<file stem>.<key>"."""
    from nanollm.config import flatten

    values: dict[str, float] = {}
    for path in paths:
        if not path.is_file():
            log.debug("upstream metrics %s not found; skipped", path)
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            log.warning("upstream metrics %s unreadable (%s); skipped", path, err)
            continue
        for key, value in flatten(data if isinstance(data, dict) else {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[f"{path.stem}.{key}"] = value
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
