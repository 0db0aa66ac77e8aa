"""`nanollm export-hf`: write a checkpoint and its tokenizer as a Hugging Face model folder
(config.json + model.safetensors, generation_config.json, tokenizer.json and its configs).

Thin: loads the checkpoint and its tokenizer, checks they belong together, and calls
nanollm.hf_folder, which picks the form (Llama, Qwen3, or the custom architecture shipped as
remote code; docs/export.md); the command says which it wrote and why.
Not a pipeline stage: run it by hand on the pipeline's output.
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
    "Tokenizer folder, exported alongside (its <|endoftext|> is bos and eos); a missing one exports the model alone.",
    folder=None,
)
@pass_context
def command(ctx: StageContext, checkpoint: Path, out: Path, tokenizer: Path) -> None:
    """Export the checkpoint so that transformers' AutoTokenizer, AutoModelForCausalLM and pipeline load OUT.

    The architecture decides the form: LlamaForCausalLM with every model option off,
    Qwen3ForCausalLM with qk_norm alone, else a custom architecture whose code ships in OUT
    (load it with trust_remote_code=True). Without the tokenizer folder, the model alone is
    exported, with a warning.
    """
    # A warning, not an error: the weights alone serve logits comparisons and `import-hf`, and
    # refusing would leave a checkpoint whose tokenizer is elsewhere (copied alone, or trained
    # on tokens from another project) with no way out.
    import logging

    from nanollm.checkpoint import check_tokenizer, load_model, read_checkpoint_info
    from nanollm.hf_folder import export_form, export_hf

    info = read_checkpoint_info(checkpoint)
    tok = None
    if tokenizer.exists():
        from nanollm.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
        check_tokenizer(checkpoint, info, tok, fix="pass the matching --tokenizer")
    else:
        logging.getLogger(__name__).warning(
            "%s not found: exporting the model without a tokenizer (AutoTokenizer and pipeline will not load %s); "
            "pass --tokenizer to include one",
            tokenizer,
            out,
        )
    model = load_model(checkpoint)
    export_hf(model, out, tokenizer=tok)
    what = "with its tokenizer" if tok is not None else "without a tokenizer"
    form = export_form(model.cfg).describe()
    click.echo(f"wrote {out} ({model.num_params() / 1e6:.2f}M parameters, {what}); {form}", err=True)
