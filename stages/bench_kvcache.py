"""`nanollm bench_kvcache`: greedy decoding speed of the model's architecture with and without the KV cache.

Thin: builds the network that the checkpoint's architecture.json describes, runs nanollm.inference.bench
(the cache's table; then int8 weights against the model's at batch 1, and the batching engine's
throughput), writes the metrics (with the achieved weight-read bandwidth), tables and chart, and
adds them to the pretrain run. Decoding speed depends on the architecture, not on the values of the weights,
so the stage measures seeded random weights of that shape and depends on architecture.json
alone: a sweep over train.* re-trains and re-evaluates, but does not re-run this stage.
docs/kv_cache.md is rendered from these outputs by `python docs/results.py`.
"""

from __future__ import annotations

from pathlib import Path

import click

from stages.cli import StageContext, pass_context, path_option


@click.command("bench_kvcache")
@path_option(
    "--architecture",
    "models/checkpoint/architecture.json",
    "The checkpoint's architecture.",
    folder=False,
)
@path_option(
    "--run-record",
    "models/run.json",
    "pretrain's record of the model's MLflow run, which the figures are added to (none: a new run).",
    folder=False,
)
@path_option("--metrics", "metrics/bench_kvcache.json", "Summary JSON.", folder=None)
@path_option("--table", "reports/bench_kvcache.csv", "One CSV row per point.", folder=None)
@path_option("--chart", "reports/bench_kvcache.png", "PNG chart.", folder=None)
@path_option(
    "--batch-table", "reports/bench_kvcache_batching.csv", "One CSV row per (weights, batch size).", folder=None
)
@pass_context
def command(
    ctx: StageContext, architecture: Path, run_record: Path, metrics: Path, table: Path, chart: Path, batch_table: Path
) -> None:
    """Time cached vs uncached greedy decoding at every bench.prompt_lengths x bench.new_tokens point.

    The weights are random (seeded), as the speed is the architecture's; greedy decoding
    with and without the cache must still agree. With bench.compare_transformers,
    transformers' generate on the same weights is timed in
    the same rounds with its dynamic and its static cache, and our cached tokens/s is
    reported as a multiple of the faster one's. Then, at bench.batch_prompt_len +
    bench.batch_new_tokens, the batching engine's tokens/s at each of bench.batch_sizes, with
    the model's weights and (bench.int8) with int8 weights.
    """
    import torch

    from nanollm.atomic import write_json
    from nanollm.checkpoint import architecture_differences, architecture_model, load_architecture
    from nanollm.hardware import describe_machine, pick_device
    from nanollm.inference.bench.bandwidth import bandwidth, memory_bandwidth, weight_bytes_per_token
    from nanollm.inference.bench.chart import plot
    from nanollm.inference.bench.results import summarize, summarize_serving, write_batch_table, write_table
    from nanollm.inference.bench.timing import (
        COMPILED_COUNTERPART_COLUMN,
        COUNTERPART_COLUMN,
        PEER_COLUMNS,
        bench_kvcache,
    )
    from nanollm.tracking.runs import make_tracker, read_run_record, sectioned

    cfg = ctx.config.bench
    device = pick_device(cfg.device, key="bench.device")
    architecture_differences(load_architecture(architecture)[0], ctx.config.model, architecture)
    model = architecture_model(architecture, seed=ctx.config.seed, device=device)  # the trained shape, seeded weights
    peer, peer_model = None, _peer_model(model, ctx.config.seed, device) if cfg.compare_transformers else None
    if peer_model is not None:
        from nanollm.inference.peers import transformers_settings

        peer = transformers_settings(peer_model)
    rounds = dict(repeats=cfg.repeats, warmup=cfg.warmup, seed=ctx.config.seed, device=device)
    timing = dict(prompt_lengths=cfg.prompt_lengths, new_tokens=cfg.new_tokens, min_seconds=cfg.min_seconds, **rounds)
    rows = bench_kvcache(model, transformers=peer if peer_model is model else None, compiled=cfg.compile, **timing)
    if peer is not None and peer_model is not model:  # the engines, compared on the counterpart alone
        theirs_rows = bench_kvcache(peer_model, transformers=peer, uncached=False, compiled=cfg.compile, **timing)
        for row, theirs in zip(rows, theirs_rows, strict=True):
            row.update({c: theirs[c] for c in PEER_COLUMNS}, **{COUNTERPART_COLUMN: theirs["cached_tok_s"]})
            if cfg.compile:  # ours compiled over the peer at its best, both on the counterpart
                row.update(
                    compiled_vs_transformers=theirs["compiled_vs_transformers"],
                    **{COMPILED_COUNTERPART_COLUMN: theirs["compiled_tok_s"]},
                )
    batch_rows = _serving(model, architecture, ctx.config.bench, rounds)
    summary = summarize(rows)
    summary.update(summarize_serving(batch_rows))
    summary["peer_on_llama_counterpart"] = float(peer is not None and peer_model is not model)
    summary.update(bandwidth(rows, weight_bytes_per_token(model), memory_bandwidth(device=device)))
    summary["threads"] = torch.get_num_threads()
    summary["device"] = str(device)
    summary["machine"] = describe_machine(device)  # decoding speed is the machine's as much as the model's
    summary.update(_what_was_timed(ctx.config.seed, device, int8=bool(cfg.int8 and batch_rows)))
    write_json(metrics, summary)
    write_table(rows, table)
    write_batch_table(batch_rows, batch_table)
    arch = model.cfg
    title = f"{arch.n_layer}L/{arch.n_embd}d model, vocab {model.vocab_size}, on {device}"
    plot(rows, chart, title=title, batch_rows=batch_rows)
    best = max(rows, key=lambda r: r["speedup"])
    click.echo(
        f"KV cache on {device}: up to x{best['speedup']:.1f} faster "
        f"(prompt {best['prompt_len']}, {best['new_tokens']} new tokens: "
        f"{best['cached_tok_s']:.0f} vs {best['uncached_tok_s']:.0f} tokens/s); weights read at "
        f"{summary['weight_read_gb_s']:.1f} GB/s of {summary['memory_copy_gb_s']:.1f} GB/s measured"
        + (f"; cached decoding x{summary['min_vs_transformers']:.2f} or more transformers' best" if peer else "")
        + (
            f"; int8 x{summary['int8_vs_fp32']:.2f} fp32 ({summary['int8_kernel']} kernel)"
            if "int8_vs_fp32" in summary
            else ""
        )
        + (f"; batch {max(cfg.batch_sizes)} x{summary['max_batch_vs_batch1']:.1f} batch 1" if batch_rows else ""),
        err=True,
    )

    tracker = make_tracker(ctx.config.tracking, ctx.root)
    with tracker:
        tracker.resume(read_run_record(run_record)["run_id"] if run_record.is_file() else None)
        tracker.log_metrics(sectioned("bench", summary))
        described = ("device", "machine", "timed_weights", "int8_kernel")  # MLflow metrics are numbers: these are tags
        tracker.set_tags({f"bench.{key}": summary[key] for key in described if key in summary})
        tracker.log_artifact(table, "bench_kvcache")
        tracker.log_artifact(chart, "bench_kvcache")
        tracker.log_artifact(batch_table, "bench_kvcache")


def _what_was_timed(seed: int, device, *, int8: bool) -> dict[str, str]:
    """The summary's words on what its figures measured: the weights (seeded, not the trained ones: speed is the
    architecture's) and, with int8 rows, which int8 kernel served them (native.py's choice; off the CPU none)."""
    from nanollm.inference.native import int8_kernel_name

    timed = {"timed_weights": f"seeded random weights (seed {seed}) of the trained architecture, not the trained ones"}
    if int8:
        timed["int8_kernel"] = int8_kernel_name() if device.type == "cpu" else "none: dequantize-then-matmul"
    return timed


def _serving(model, architecture: Path, cfg, rounds: dict) -> list[dict]:
    """The batching engine's rows: the seeded fp32 weights (architecture_model's) and, with bench.int8, the
    same weights quantized; batch 1 among them compares the two kinds at batch 1."""
    from nanollm.checkpoint import architecture_model
    from nanollm.inference.bench.serving import bench_batching

    if not cfg.batch_sizes:
        return []
    models = {"fp32": model}
    if cfg.int8:
        from nanollm.inference.quantize import quantize_int8

        models["int8"] = quantize_int8(architecture_model(architecture, seed=rounds["seed"], device=rounds["device"]))
    return bench_batching(
        models,
        batch_sizes=cfg.batch_sizes,
        prompt_len=cfg.batch_prompt_len,
        new_tokens=cfg.batch_new_tokens,
        compiled=cfg.compile,
        **rounds,
    )


def _peer_model(model, seed: int, device):
    """The model transformers' Llama is compared on: this one, or its Llama counterpart (same seed), or None.

    An architecture Llama cannot express (qk_norm, value_residual, logit_softcap) is compared
    through its counterpart of the same shape without them: the comparison is of the two
    engines on the same weights, and those options add only elementwise work per layer.
    """
    import logging

    from nanollm.checkpoint import seeded_model
    from nanollm.hf_folder import llama_counterpart, llama_incompatibility

    unportable = llama_incompatibility(model.cfg)
    if unportable is None:
        return model
    counterpart = llama_counterpart(model.cfg)
    log = logging.getLogger(__name__)
    if counterpart is None:
        log.warning("no comparison with transformers: %s", unportable)
        return None
    log.info(
        "transformers cannot run this architecture, so the engines are compared on its Llama counterpart: %s",
        unportable,
    )
    return seeded_model(counterpart, model.vocab_size, seed=seed, device=device)
