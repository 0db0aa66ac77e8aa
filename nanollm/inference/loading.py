"""A checkpoint and its tokenizer made ready to decode: checked to belong together, weights in decode layout.

Owns what every decoding entry point (`nanollm generate`, `nanollm serve`, the MLflow pyfunc)
does before its first token: load both, refuse a tokenizer the model was not trained with,
lay the weights out for decoding (packing.py) or quantize them (quantize.py), and turn a text
prompt into the ids a completion starts from. Sampling and batching are generate.py's and
engine.py's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanollm.checkpoint import check_tokenizer, load_model, read_checkpoint_info
from nanollm.errors import NanollmError
from nanollm.model import Transformer
from nanollm.tokenizer import Tokenizer, load_tokenizer

QUANTIZE_CHOICES = ("none", "int8")


def load_for_decoding(
    checkpoint: str | Path, tokenizer: str | Path, *, device: str | torch.device = "cpu", quantize: str = "none"
) -> tuple[Tokenizer, Transformer]:
    """(tokenizer, model in eval mode) from a checkpoint folder and a tokenizer file or folder.

    quantize "int8" converts every linear layer to int8 weights with per-channel scales
    (nanollm.inference.quantize: a quarter of the bytes fp32 weights take); "none" keeps the
    trained dtype and moves the weights to the layout batch-1 decoding streams fastest.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise NanollmError(f"quantize is {quantize!r}; use one of {', '.join(QUANTIZE_CHOICES)}")
    tok = load_tokenizer(tokenizer)
    check_tokenizer(checkpoint, read_checkpoint_info(checkpoint), tok)
    model = load_model(checkpoint, device=device).eval()
    if quantize == "int8":
        from nanollm.inference.quantize import quantize_int8

        return tok, quantize_int8(model)
    model.pack_for_decode()
    return tok, model


def document_prompt(tok: Tokenizer, text: str) -> list[int]:
    """The ids a completion of `text` starts from: <|endoftext|> first, so the model begins a fresh document."""
    return [tok.eot_id, *tok.encode(text)]
