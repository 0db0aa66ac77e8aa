"""`nanollm evaluate`: held-out loss, perplexity, bits per byte vs gzip/bzip2/xz, and text samples.

Thin: checks that checkpoint, tokenizer, tokens and corpus belong together, calls
nanollm.evaluate and nanollm.inference.generate, writes the outputs and adds them to the pretrain run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from stages.cli import StageContext, pass_context, path_option

if TYPE_CHECKING:  # annotations only: importing these at run time would load torch for --help
    from nanollm.config import EvalConfig
    from nanollm.model import Transformer
    from nanollm.tokenizer import Tokenizer


@click.command("evaluate")
@path_option("--checkpoint", "models/checkpoint", "Trained model.", folder=None)
@path_option("--tokens", "data/tokens", "Token memmaps (val.bin).", folder=None)
@path_option("--tokenizer", "data/tokenizer", "Tokenizer folder.", folder=None)
@path_option("--corpus", "data/corpus", "Raw text (val documents).", folder=None)
@path_option("--metrics", "metrics/evaluate.json", "Metrics JSON to write.", folder=None)
@path_option("--samples", "reports/samples.txt", "Generated text to write.", folder=None)
@path_option("--run-record", "models/run.json", "pretrain's record of the model's MLflow run.", folder=False)
@pass_context
def command(
    ctx: StageContext,
    checkpoint: Path,
    tokens: Path,
    tokenizer: Path,
    corpus: Path,
    metrics: Path,
    samples: Path,
    run_record: Path,
) -> None:
    """Score the model on the val split and write samples from the eval prompts."""

    from nanollm.atomic import write_json, write_text
    from nanollm.checkpoint import architecture_differences, check_tokenizer, load_model, read_checkpoint_info
    from nanollm.data.corpus import iter_documents, read_manifest
    from nanollm.data.tokens import check_compatible, open_split, read_meta
    from nanollm.evaluate import compressor_bits_per_byte, evaluate_lm, lzma_with_context_bits_per_byte, text_tail
    from nanollm.hardware import pick_device
    from nanollm.tokenizer import load_tokenizer
    from nanollm.tracking.models import log_model
    from nanollm.tracking.runs import make_tracker, read_run_record, sectioned

    cfg = ctx.config.eval
    info = read_checkpoint_info(checkpoint)
    meta = read_meta(tokens)
    tok = load_tokenizer(tokenizer)
    manifest = read_manifest(corpus)
    check_compatible(meta, tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size, corpus_sha256=manifest["sha256"])
    check_tokenizer(checkpoint, info, tok, fix="re-run `dvc repro pretrain` (or pass the matching --tokenizer)")

    device = pick_device(cfg.device, key="eval.device")
    model = load_model(checkpoint, device=device)
    architecture_differences(model.cfg, ctx.config.model, checkpoint)

    def score(scored: Transformer) -> dict[str, Any]:
        return evaluate_lm(
            scored,
            open_split(tokens, "val", meta),
            block_size=model.cfg.block_size,
            batch_size=cfg.batch_size,
            token_bytes=tok.token_byte_lengths(),
            max_tokens=cfg.max_tokens,
            device=device,
        )

    result = score(model)
    int8 = None
    if cfg.int8:  # what serving with --quantize int8 costs, on the same val tokens
        import copy

        from nanollm.inference.quantize import quantize_int8

        int8 = score(quantize_int8(copy.deepcopy(model)))
    text = "".join(iter_documents(corpus, "val")).encode("utf-8")
    if cfg.max_tokens is not None:
        text = text[: result["bytes"]]  # the same amount of text the model was scored on
    baselines = compressor_bits_per_byte(text)
    # xz given the train split first: the compressor that has seen what the model has seen
    context = text_tail(iter_documents(corpus, "train"))  # all xz -9e can refer back to
    baselines["lzma_train_context"] = lzma_with_context_bits_per_byte(text, context)
    out = {
        "val_loss": round(result["loss"], 6),
        "perplexity": round(result["perplexity"], 4),
        "bits_per_byte": round(result["bits_per_byte"], 6),
        "accuracy": round(result["accuracy"], 6),
        "val_tokens": result["tokens"],
        "val_bytes": result["bytes"],
        **{f"{name}_bits_per_byte": round(bpb, 6) for name, bpb in baselines.items()},
        **(
            {
                "int8_bits_per_byte": round(int8["bits_per_byte"], 6),
                "int8_bits_per_byte_delta": round(int8["bits_per_byte"] - result["bits_per_byte"], 6),
            }
            if int8 is not None
            else {}
        ),
        "beats_lzma": int(result["bits_per_byte"] < baselines["lzma"]),
        "beats_lzma_train_context": int(result["bits_per_byte"] < baselines["lzma_train_context"]),
        "device": str(device),
    }
    write_json(metrics, out)
    model.pack_for_decode()  # only now: the loss above is scored in the layout the model trained in
    write_text(samples, _samples(model, tok, ctx.config.seed, cfg, info))
    click.echo(
        f"val loss {out['val_loss']:.4f}, {out['bits_per_byte']:.3f} bits/byte "
        f"(xz -9e {out['lzma_bits_per_byte']:.3f}, "
        f"given the train split {out['lzma_train_context_bits_per_byte']:.3f}; "
        f"gzip -9 {out['gzip_bits_per_byte']:.3f})",
        err=True,
    )

    tracker = make_tracker(ctx.config.tracking, ctx.root)
    with tracker:
        tracker.resume(read_run_record(run_record)["run_id"])
        tracker.log_metrics(sectioned("eval", out))
        tracker.set_tags({"eval.device": out["device"]})
        tracker.log_artifact(samples, "evaluate")
        tracker.log_artifact(ctx.params_path, "evaluate")
        if ctx.config.tracking.log_model:  # an MLflow model to register and serve (docs/experiments.md: its cost)
            log_model(tracker, checkpoint, tok.path, sampling=cfg, seed=ctx.config.seed)


def _samples(model: Transformer, tok: Tokenizer, seed: int, cfg: EvalConfig, info: dict[str, Any]) -> str:
    """One sample per eval prompt, each seeded on its own so that one prompt's length never shifts another's."""
    import torch

    from nanollm.inference.generate import generate

    header = (
        f"# nanollm samples: checkpoint step {info.get('step')}, {cfg.sample_tokens} new tokens at most, "
        f"temperature {cfg.temperature}, top_k {cfg.top_k or 'off'}, top_p {cfg.top_p or 'off'}, seed {seed}\n"
        "# each prompt is preceded by <|endoftext|>, i.e. generation starts a fresh document\n"
    )
    parts = [header]
    for i, prompt in enumerate(cfg.prompts):
        ids = [tok.eot_id, *tok.encode(prompt)]
        gen = torch.Generator().manual_seed(seed + i)
        new = list(
            generate(
                model,
                ids,
                cfg.sample_tokens,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                generator=gen,
                stop_id=tok.eot_id,
            )
        )
        stop = "stopped at <|endoftext|>" if len(new) < cfg.sample_tokens else "length limit"
        parts.append(f"\n{'=' * 30} sample {i + 1}/{len(cfg.prompts)}: prompt {prompt!r} ({len(new)} tokens, {stop})\n")
        parts.append(tok.decode(ids[1:] + new) + "\n")  # decoded whole: no character split at the seam
    return "".join(parts)
