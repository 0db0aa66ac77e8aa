"""`nanollm export-hf`: write a checkpoint as a Hugging Face Llama folder (config.json + model.safetensors).

Thin: loads the checkpoint (and, when present, its tokenizer for the <|endoftext|> id) and
calls nanollm.hf. Not a pipeline stage: run it by hand on the pipeline's output.
"""

from __future__ import annotations

from pathlib import Path

import click

from stages.cli import StageContext, pass_context, path_option


@click.command("export-hf")
@path_option("--checkpoint", "models/checkpoint", "Our checkpoint.", folder=None)
@path_option("--out", "models/hf", "Folder to write.", folder=None)
@path_option(
    "--tokenizer",
    "data/tokenizer",
    "Tokenizer folder; its <|endoftext|> id becomes eos_token_id (skipped if the folder is missing).",
    folder=None,
)
@pass_context
def command(ctx: StageContext, checkpoint: Path, out: Path, tokenizer: Path) -> None:
    """Export the checkpoint so that transformers' LlamaForCausalLM.from_pretrained(OUT) loads it."""
    import logging

    from nanollm.checkpoint import load_model, read_checkpoint_info
    from nanollm.errors import NanollmError
    from nanollm.hf import export_hf

    info = read_checkpoint_info(checkpoint)
    eos = None
    if tokenizer.exists():
        from nanollm.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
        if info.get("tokenizer_sha256") not in (None, tok.sha256):
            raise NanollmError(
                f"{checkpoint} was trained with another tokenizer than {tokenizer} (sha256 "
                f"{str(info['tokenizer_sha256'])[:12]} vs {tok.sha256[:12]}); pass the matching --tokenizer"
            )
        if tok.vocab_size > int(info["vocab_size"]):
            raise NanollmError(
                f"{tokenizer} has {tok.vocab_size} tokens but {checkpoint} only {info['vocab_size']}; "
                "pass the matching --tokenizer"
            )
        eos = tok.eot_id
    else:
        logging.getLogger(__name__).warning("%s not found: exporting without eos_token_id", tokenizer)
    model = load_model(checkpoint)
    export_hf(model, out, eos_token_id=eos)
    click.echo(f"wrote {out} ({model.num_params() / 1e6:.2f}M parameters, Llama format)", err=True)
