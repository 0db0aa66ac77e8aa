"""`nanollm import-hf DIR`: turn a Hugging Face Llama, Qwen3 or nanollm-form folder into a nanollm checkpoint.

Thin: nanollm.hf_folder reads and checks the folder, nanollm.checkpoint writes ours. The result
loads wherever a checkpoint does (`nanollm generate --checkpoint OUT`); it records no
tokenizer, since a Hugging Face tokenizer is no nanollm one.
"""

from __future__ import annotations

from pathlib import Path

import click

from stages.cli import StageContext, pass_context, path_option

_path = click.Path(path_type=Path)


@click.command("import-hf")
@click.argument("hf_dir", metavar="DIR", type=_path, required=False)
@path_option("--out", "models/imported", "Checkpoint to write.", folder=None)
@pass_context
def command(ctx: StageContext, hf_dir: Path | None, out: Path) -> None:
    """Import DIR (config.json + safetensors of a Llama, Qwen3 or `export-hf` custom-form model) as a checkpoint."""
    from nanollm.checkpoint import save_checkpoint
    from nanollm.errors import NanollmError
    from nanollm.hf_folder import load_hf

    if hf_dir is None:  # checked here, not by click, so that bad params are reported first
        raise NanollmError("import-hf needs the Hugging Face folder to read: nanollm import-hf DIR --out FOLDER")
    model = load_hf(hf_dir)
    save_checkpoint(
        out,
        model,
        train_state={"step": 0, "tokens_seen": 0},
        info={"tokenizer_sha256": None, "corpus_sha256": None, "imported_from": str(hf_dir)},
    )
    cfg = model.cfg
    click.echo(
        f"wrote {out}: {cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.n_head} heads ({cfg.kv_heads} KV), "
        f"vocab {model.vocab_size}, {model.num_params() / 1e6:.2f}M parameters",
        err=True,
    )
