"""`nanollm bench_kvcache`: greedy decoding speed of the trained model with and without the KV cache.

Thin: loads the checkpoint, runs nanollm.bench, writes the metrics (with the achieved weight-read
bandwidth), table and chart, and adds them to the pretrain run. docs/kv_cache.md is rendered
from these outputs by `python -m nanollm.bench docs/kv_cache.md`.
"""

from __future__ import annotations

from pathlib import Path

import click

from stages.cli import StageContext, pass_context, path_option


@click.command("bench_kvcache")
@path_option("--checkpoint", "models/checkpoint", "Trained model.", folder=None)
@path_option("--metrics", "metrics/bench_kvcache.json", "Summary JSON.", folder=None)
@path_option("--table", "reports/bench_kvcache.csv", "One CSV row per point.", folder=None)
@path_option("--chart", "reports/bench_kvcache.png", "PNG chart.", folder=None)
@pass_context
def command(ctx: StageContext, checkpoint: Path, metrics: Path, table: Path, chart: Path) -> None:
    """Time cached vs uncached greedy decoding at every bench.prompt_lengths x bench.new_tokens point.

    With bench.compare_transformers, transformers' generate on the same weights is timed in
    the same rounds with its dynamic and its static cache, and our cached tokens/s is
    reported as a multiple of the faster one's.
    """
    import torch

    from nanollm.atomic import write_json
    from nanollm.bench import (
        bandwidth,
        bench_kvcache,
        memory_bandwidth,
        plot,
        summarize,
        weight_bytes_per_token,
        write_table,
    )
    from nanollm.checkpoint import architecture_differences, load_model, read_run_id
    from nanollm.hardware import describe_machine, pick_device
    from nanollm.tracking import make_tracker, sectioned

    cfg = ctx.config.bench
    device = pick_device(cfg.device, key="bench.device")
    model = load_model(checkpoint, device=device)
    architecture_differences(model, ctx.config.model, checkpoint)
    peer = None
    if cfg.compare_transformers:
        from nanollm.peers import transformers_settings

        peer = transformers_settings(model)
    rows = bench_kvcache(
        model,
        prompt_lengths=cfg.prompt_lengths,
        new_tokens=cfg.new_tokens,
        repeats=cfg.repeats,
        warmup=cfg.warmup,
        seed=ctx.config.seed,
        device=device,
        transformers=peer,
    )
    summary = summarize(rows)
    summary.update(bandwidth(rows, weight_bytes_per_token(model), memory_bandwidth(device=device)))
    summary["threads"] = torch.get_num_threads()
    summary["device"] = str(device)
    summary["machine"] = describe_machine(device)  # decoding speed is the machine's as much as the model's
    write_json(metrics, summary)
    write_table(rows, table)
    arch = model.cfg
    plot(rows, chart, title=f"{arch.n_layer}L/{arch.n_embd}d model, vocab {model.vocab_size}, on {device}")
    best = max(rows, key=lambda r: r["speedup"])
    click.echo(
        f"KV cache on {device}: up to x{best['speedup']:.1f} faster "
        f"(prompt {best['prompt_len']}, {best['new_tokens']} new tokens: "
        f"{best['cached_tok_s']:.0f} vs {best['uncached_tok_s']:.0f} tokens/s); weights read at "
        f"{summary['weight_read_gb_s']:.1f} GB/s of {summary['memory_copy_gb_s']:.1f} GB/s measured"
        + (f"; cached decoding x{summary['min_vs_transformers']:.2f} or more transformers' best" if peer else ""),
        err=True,
    )

    tracker = make_tracker(ctx.config.tracking, ctx.root)
    with tracker:
        tracker.resume(read_run_id(checkpoint))
        tracker.log_metrics(sectioned("bench", summary))
        tracker.set_tags({"bench.device": summary["device"], "bench.machine": summary["machine"]})
        tracker.log_artifact(table, "bench_kvcache")
        tracker.log_artifact(chart, "bench_kvcache")
