"""The peer our inference is measured against: transformers' LlamaForCausalLM over the very same weights.

Owns building that twin (through nanollm.hf's Llama export, so both sides hold identical
numbers) and its greedy decoding call. Timing is the caller's (nanollm.bench, the scripts
in benchmarks/). `transformers` is imported lazily, and only here.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nanollm.errors import NanollmError
from nanollm.hf import export_hf
from nanollm.model import Transformer

__all__ = ["transformers_greedy", "transformers_twin"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise NanollmError(
            "the comparison with transformers needs it installed: pip install transformers "
            "(or set bench.compare_transformers: false)"
        ) from None
    transformers.logging.set_verbosity_error()  # "exceeds max_position_embeddings" is expected past block_size
    transformers.logging.disable_progress_bar()
    return transformers


def transformers_twin(model: Transformer) -> Any:
    """LlamaForCausalLM holding `model`'s weights, in its dtype, on its device, in eval mode.

    The model is exported with nanollm.hf.export_hf to a temporary folder and loaded back
    with from_pretrained, which is the path a user of `nanollm export-hf` takes; its logits
    equal ours within 1e-4 (tests/test_hf.py). Attention is transformers' default (SDPA).
    """
    transformers = _transformers()
    weight = model.tok_embeddings.weight
    with tempfile.TemporaryDirectory(prefix="nanollm-peer-") as tmp:
        export_hf(model, Path(tmp) / "hf")
        twin = transformers.LlamaForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=weight.dtype)
    return twin.to(weight.device).eval()


def transformers_greedy(model: Transformer) -> Callable[..., list[int]]:
    """A function (prompt ids (T,), n, use_cache=True) -> the n ids transformers' generate draws greedily.

    Exactly n tokens (min_new_tokens = n: an end-of-text id does not stop it early), batch 1,
    an all-ones attention mask, as a user calls generate for one prompt; use_cache=False is
    its no-cache baseline.
    """
    twin = transformers_twin(model)

    def greedy(prompt: torch.Tensor, new_tokens: int, use_cache: bool = True) -> list[int]:
        ids = prompt.view(1, -1).to(twin.device)  # (1, T)
        with torch.inference_mode():
            out = twin.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=use_cache,
                pad_token_id=0,
            )  # (1, T + n)
        return out[0, ids.size(1) :].tolist()

    return greedy
