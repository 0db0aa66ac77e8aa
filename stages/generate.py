"""`nanollm generate`: continue one prompt, streaming text as tokens arrive, or several, decoded as one batch.

Thin: loads checkpoint and tokenizer (nanollm.inference.loading), samples ids with
nanollm.inference.generate or, for several prompts, the batching engine (both know no text),
and decodes bytes incrementally, so a character split across tokens is printed whole once
its last byte arrives. Not a pipeline stage.
"""

from __future__ import annotations

from pathlib import Path

import click

from stages.cli import StageContext, pass_context, path_option, quantize_option


@click.command("generate")
@path_option("--checkpoint", "models/checkpoint", "Trained model.", folder=None)
@path_option("--tokenizer", "data/tokenizer", "Tokenizer folder.", folder=None)
@click.option(
    "--prompt",
    "prompts",
    multiple=True,
    help="Text to continue; empty starts a fresh document. Repeat it to decode several prompts as one batch "
    "(prompt i sampled with seed + i), printed in order once all are done.",
)
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
@quantize_option
@click.option(
    "--compile/--no-compile",
    "compile_",
    default=False,
    show_default=True,
    help="Decode through a torch.compile'd step: seconds of compiling first (less with a warm compile cache), "
    "then each token several times faster (docs/kv_cache.md). Pays off for long outputs.",
)
@pass_context
def command(
    ctx: StageContext,
    checkpoint: Path,
    tokenizer: Path,
    prompts: tuple[str, ...],
    max_new_tokens: int,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    device: str | None,
    threads: int | None,
    quantize: str,
    compile_: bool,
) -> None:
    """Sample up to --max-new-tokens tokens after each --prompt; each stops early at <|endoftext|>."""
    import codecs
    import logging
    import time

    import torch

    from nanollm.hardware import pick_device
    from nanollm.inference.generate import generate
    from nanollm.inference.loading import document_prompt, load_for_decoding
    from nanollm.threads import apply_threads

    cfg = ctx.config.eval
    temperature = cfg.temperature if temperature is None else temperature
    top_k = cfg.top_k if top_k is None else (top_k or None)
    top_p = cfg.top_p if top_p is None else top_p
    seed = ctx.config.seed if seed is None else seed
    prompts = prompts or ("",)

    if threads:
        apply_threads(threads)
    device = pick_device(cfg.device if device is None else device, key="eval.device" if device is None else "--device")
    tok, model = load_for_decoding(checkpoint, tokenizer, device=device, quantize=quantize)
    log = logging.getLogger(__name__)
    start = time.perf_counter()
    if len(prompts) > 1:
        from nanollm.inference.engine import SamplingParams, generate_batch

        params = [
            SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed + i)
            for i in range(len(prompts))
        ]
        outputs = generate_batch(
            model, [document_prompt(tok, p) for p in prompts], params, stop_id=tok.eot_id, compile=compile_
        )
        for i, (prompt, new) in enumerate(zip(prompts, outputs, strict=True)):
            if i:
                click.echo()
            click.echo(f"--- prompt {i + 1} of {len(prompts)} ---")
            click.echo(prompt + tok.decode(new))
        seconds, n = time.perf_counter() - start, sum(map(len, outputs))
        log.info("%d prompts, %d tokens in %.2f s (%.0f tokens/s) on %s", len(prompts), n, seconds, n / seconds, device)
        return

    [prompt] = prompts
    ids = document_prompt(tok, prompt)
    compiled = None
    if compile_:
        from nanollm.inference.compiled import CompiledDecoder

        compiled = CompiledDecoder(model, max_seq_len=len(ids) + max_new_tokens)
        compiled.warmup()  # before any text: a failed compile is a one-line error, not a stream cut short
    stream = generate(
        model,
        ids,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=torch.Generator().manual_seed(seed),
        stop_id=tok.eot_id,
        decoder=compiled,
    )
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    click.echo(prompt, nl=False)
    n = 0
    for token in stream:
        n += 1
        text = decoder.decode(tok.decode_bytes([token]))
        if text:
            click.echo(text, nl=False)  # click.echo flushes: the text appears as it is sampled
    click.echo(decoder.decode(b"", final=True))
    seconds = time.perf_counter() - start
    log.info(
        "%d tokens in %.2f s (%.0f tokens/s) on %s, %s",
        n,
        seconds,
        n / seconds if seconds else 0.0,
        device,
        "stopped at <|endoftext|>" if n < max_new_tokens else "length limit",
    )
