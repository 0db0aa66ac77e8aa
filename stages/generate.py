"""`nanollm generate`: continue a prompt with the trained model, streaming text to stdout as tokens arrive.

Thin: loads checkpoint and tokenizer, samples ids with nanollm.inference.generate (which knows no
text) and decodes each token's bytes incrementally, so a character split across tokens
is printed whole once its last byte arrives. Not a pipeline stage.
"""

from __future__ import annotations

from pathlib import Path

import click

from stages.cli import StageContext, pass_context, path_option


@click.command("generate")
@path_option("--checkpoint", "models/checkpoint", "Trained model.", folder=None)
@path_option("--tokenizer", "data/tokenizer", "Tokenizer folder.", folder=None)
@click.option("--prompt", default="", help="Text to continue; empty starts a fresh document.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option(
    "--temperature", type=click.FloatRange(min=0.0), default=None, help="0 is greedy. [default: eval.temperature]"
)
@click.option("--top-k", type=click.IntRange(min=0), default=None, help="0 turns it off. [default: eval.top_k]")
@click.option(
    "--top-p",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=None,
    help="1 turns it off. [default: eval.top_p]",
)
@click.option("--seed", type=int, default=None, help="Sampling seed. [default: seed in params.yaml]")
@click.option(
    "--device", default=None, help="auto (cuda, then mps, then cpu), cpu, mps, cuda or cuda:N. [default: eval.device]"
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for torch. Batch-1 decoding of a small model is memory-bound, and on a busy machine "
    "1 thread can be 10x faster than 2. [default: threads in params.yaml, else the CPUs shared among this "
    "node's nanollm processes]",
)
@pass_context
def command(
    ctx: StageContext,
    checkpoint: Path,
    tokenizer: Path,
    prompt: str,
    max_new_tokens: int,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    device: str | None,
    threads: int | None,
) -> None:
    """Sample up to --max-new-tokens tokens after --prompt; stops early at <|endoftext|>."""
    import codecs
    import logging
    import time

    import torch

    from nanollm.checkpoint import load_model, read_checkpoint_info
    from nanollm.errors import NanollmError
    from nanollm.hardware import pick_device
    from nanollm.inference.generate import generate
    from nanollm.threads import apply_threads
    from nanollm.tokenizer import load_tokenizer

    cfg = ctx.config.eval
    temperature = cfg.temperature if temperature is None else temperature
    top_k = cfg.top_k if top_k is None else (top_k or None)
    top_p = cfg.top_p if top_p is None else top_p
    seed = ctx.config.seed if seed is None else seed

    tok = load_tokenizer(tokenizer)
    info = read_checkpoint_info(checkpoint)
    if info.get("tokenizer_sha256") not in (None, tok.sha256):
        raise NanollmError(
            f"{checkpoint} was trained with tokenizer sha256 {str(info['tokenizer_sha256'])[:12]}, but {tokenizer} "
            f"is {tok.sha256[:12]}; pass the matching --tokenizer"
        )
    if threads:
        apply_threads(threads)
    device = pick_device(cfg.device if device is None else device, key="eval.device" if device is None else "--device")
    model = load_model(checkpoint, device=device)
    model.pack_for_decode()  # batch-1 decoding streams every weight per token: the layout that streams fastest
    if tok.vocab_size > model.vocab_size:
        raise NanollmError(
            f"{tokenizer} has {tok.vocab_size} tokens but {checkpoint} only {model.vocab_size}; pass the matching "
            "--tokenizer"
        )

    ids = [tok.eot_id, *tok.encode(prompt)]  # after <|endoftext|>: the model starts a fresh document
    stream = generate(
        model,
        ids,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=torch.Generator().manual_seed(seed),
        stop_id=tok.eot_id,
    )
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    click.echo(prompt, nl=False)
    start, n = time.perf_counter(), 0
    for token in stream:
        n += 1
        text = decoder.decode(tok.decode_bytes([token]))
        if text:
            click.echo(text, nl=False)  # click.echo flushes: the text appears as it is sampled
    click.echo(decoder.decode(b"", final=True))
    seconds = time.perf_counter() - start
    logging.getLogger(__name__).info(
        "%d tokens in %.2f s (%.0f tokens/s) on %s, %s",
        n,
        seconds,
        n / seconds if seconds else 0.0,
        device,
        "stopped at <|endoftext|>" if n < max_new_tokens else "length limit",
    )
