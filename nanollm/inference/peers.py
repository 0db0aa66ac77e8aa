"""The peer our inference is measured against: transformers' LlamaForCausalLM over the very same weights.

Owns building that twin (through nanollm.hf_folder's Llama export, so both sides hold identical
numbers) and its greedy decoding call, with each cache setting a comparison must race.
Timing is the caller's (nanollm.inference.bench, the scripts in benchmarks/). `transformers` is
imported lazily, and only here.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nanollm.errors import NanollmError
from nanollm.hf_folder import export_hf
from nanollm.model import Transformer

__all__ = ["PEER_CACHES", "transformers_greedy", "transformers_settings", "transformers_twin"]

# The settings transformers offers a Llama model for batch-1 greedy decoding: its two caches, and
# the static one with the forward compiled (its documented fast path). A comparison counts only
# against the fastest of them, per point.
PEER_CACHES = ("dynamic", "static", "compiled")


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

    The model is exported with nanollm.hf_folder.export_hf (Llama form) to a temporary folder and loaded back
    with from_pretrained, which is the path a user of `nanollm export-hf` takes; its logits
    equal ours within 1e-4 (tests/test_hf.py). Attention is transformers' default (SDPA).
    """
    transformers = _transformers()
    weight = model.tok_embeddings.weight
    with tempfile.TemporaryDirectory(prefix="nanollm-peer-") as tmp:
        export_hf(model, Path(tmp) / "hf", form="llama")  # llama_incompatibility names what Llama lacks
        twin = transformers.LlamaForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=weight.dtype)
    return twin.to(weight.device).eval()


def transformers_greedy(model: Transformer) -> Callable[..., list[int]]:
    """A function (prompt ids (T,), n, cache="dynamic") -> the n ids transformers' generate draws greedily.

    Exactly n tokens (min_new_tokens = n: an end-of-text id does not stop it early), batch 1,
    an all-ones attention mask, as a user calls generate for one prompt. `cache` is one of
    PEER_CACHES, or None for its no-cache baseline (use_cache=False):
    - "dynamic", generate's default: a DynamicCache that grows by concatenation each step;
    - "static": a StaticCache preallocated for exactly T + n - 1 positions (what generate
      itself would size for this call: the last token needs no forward). A fresh cache per
      call, passed in, rather than cache_implementation="static": generate remembers the
      largest static length of earlier calls on the model (`_previous_max_cache_length`) and
      never shrinks below it, so a short prompt after a long one would attend over unused
      slots. Decode steps then have fixed shapes, which is what torch.compile wants:
      generate compiles the forward by itself with a static cache on CUDA (the first call
      at each length pays for it, so time only after a warm-up call) and runs it eagerly
      on a CPU (transformers 5.24 compiles there only through a private CompileConfig
      flag), where the static cache is measured as it is.
    - "compiled": the same static cache with the forward compiled, as transformers' docs on
      static caches and torch.compile set it up (model.forward = torch.compile(model.forward,
      fullgraph=True)), on a twin of its own so the other settings stay eager, and with the
      settings of our own compiled step (nanollm.inference.compiled.COMPILE_OPTIONS: its
      inductor options and its tensor-only guards), so both sides get the same compiler. Each
      new shape compiles once (prefill at each prompt length, the decode step at each cache
      length): time only after a warm-up call.
    """
    twin = transformers_twin(model)
    compiled_twin = None
    from transformers import StaticCache

    def greedy(prompt: torch.Tensor, new_tokens: int, cache: str | None = "dynamic") -> list[int]:
        if cache is not None and cache not in PEER_CACHES:
            raise ValueError(f"cache must be one of {PEER_CACHES} or None, got {cache!r}")
        nonlocal compiled_twin
        ids = prompt.view(1, -1).to(twin.device)  # (1, T)
        setting: dict[str, Any] = {"use_cache": cache is not None}
        if cache in ("static", "compiled"):
            setting["cache"] = StaticCache(config=twin.config, max_cache_len=ids.size(1) + new_tokens - 1)
        runner = twin
        if cache == "compiled":
            if compiled_twin is None:
                from nanollm.inference.compiled import COMPILE_OPTIONS

                compiled_twin = transformers_twin(model)
                compiled_twin.forward = torch.compile(
                    compiled_twin.forward, fullgraph=True, dynamic=False, options=COMPILE_OPTIONS
                )
            runner = compiled_twin
        # Dynamo counts compiled graphs per code object, and every LlamaForCausalLM shares its forward's: a
        # process that races several twins (or many prompt lengths) passes the default limit of 8, where a
        # fullgraph compile raises. The limit is lifted for the peer's calls alone.
        limit = torch._dynamo.config.patch(recompile_limit=256) if cache == "compiled" else contextlib.nullcontext()
        with torch.inference_mode(), limit:
            out = runner.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                **setting,
            )  # (1, T + n)
        return out[0, ids.size(1) :].tolist()

    return greedy


def transformers_settings(model: Transformer) -> dict[str, Callable[[torch.Tensor, int], list[int]]]:
    """{cache setting: (prompt ids (T,), n) -> n greedy ids} for every PEER_CACHES entry, over one twin.

    What nanollm.inference.bench.timing.bench_kvcache races: the faster setting at each point is the peer.
    """
    greedy = transformers_greedy(model)
    return {cache: functools.partial(greedy, cache=cache) for cache in PEER_CACHES}
