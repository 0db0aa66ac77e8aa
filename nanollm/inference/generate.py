"""Autoregressive sampling over token ids: temperature, top-k, top-p, with or without the KV cache.

Owns the decoding loop only. It knows nothing of text (the tokenizer turns prompts into ids
and ids back into text), nothing of how attention caches K/V (the model owns its cache) and
leaves the weights' layout to its caller (Transformer.pack_for_decode).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from nanollm.inference.compiled import CompiledDecoder

__all__ = ["sample_next", "prefill", "decode_step", "generate"]


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row of `logits` (B, V); returns (B,) int64 on the logits' device.

    temperature 0 is greedy (argmax; top_k/top_p are then irrelevant). top_k keeps the k
    largest logits (ties at the k-th value are all kept). top_p keeps the smallest set of
    most likely tokens whose probability reaches p, and never fewer than one. Filters apply
    in that order, after temperature. The draw uses `generator` (on whatever device it lives:
    a CPU generator gives the same samples on every device at the cost of one small copy).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature  # (B, V); float32 so softmax of bf16 logits stays exact enough
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    if top_p is not None and top_p < 1.0:
        probs = _nucleus(probs, top_p)
    device = generator.device if generator is not None else probs.device
    choice = torch.multinomial(probs.to(device), num_samples=1, generator=generator)  # (B, 1)
    return choice.squeeze(-1).to(logits.device)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest most-likely set with mass >= top_p; (B, V) -> (B, V)."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)  # (B, V)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # (B, V) mass of strictly likelier tokens
    # A token is kept while the likelier ones have not yet reached p; the first always is (mass 0).
    keep_sorted = mass_before < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # back to vocabulary order
    return probs * keep  # multinomial renormalises


def prefill(model: nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    """Run the whole prompt (B, T) through the model, filling its KV cache; returns last logits (B, V)."""
    return model(prompt, start_pos=0, last_only=True)[:, -1, :]


def decode_step(model: nn.Module, token: torch.Tensor, pos: int) -> torch.Tensor:
    """Feed one token per row (B, 1) at position `pos` against the cache; returns its logits (B, V).

    This is the hot loop of generation: one call per token, where the model's work (reading
    every weight once) takes ~1 ms for the default model on a CPU core, so each Python-level
    op costs a visible share. The model keeps it lean (no masks, no casts, no cache copies).
    """
    return model(token, start_pos=pos)[:, -1, :]


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
    decoder: CompiledDecoder | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` token ids continuing `prompt_ids`, one at a time as they are drawn.

    With use_cache the prompt is prefilled once and each new token costs one single-token
    forward against a cache sized for prompt + max_new_tokens; without it every step
    re-runs the full growing sequence (O(T^2) work per token; the baseline of the KV-cache
    benchmark). Neither path crops the context, so both see exactly the same tokens and,
    greedy, produce the same ids up to floating-point ties. Generation stops early after
    drawing `stop_id`, which is not yielded. The cache is released when the iterator ends
    or is closed. Grad mode is untouched for the caller between yields.

    The weights are read in whatever layout they have: call model.pack_for_decode() first
    for the one batch-1 decoding streams fastest on a CPU (~1.6x; the stages and the
    benchmark do). generate never moves them itself.

    With a `decoder` (nanollm.inference.compiled.CompiledDecoder over this model) the prompt is
    prefilled eagerly into the decoder's static cache and every decode step is its compiled
    step; the cache stays the decoder's (sized once, for every call), so prompt +
    max_new_tokens must fit its max_seq_len. use_cache=False ignores it.
    """
    device = next(model.parameters()).device
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).view(1, -1)  # (1, T)
    if prompt.size(1) == 0:
        raise ValueError("generate needs at least one prompt token (prefix a document separator for none)")
    if max_new_tokens <= 0:
        return

    def draw(logits: torch.Tensor) -> torch.Tensor:
        return sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    if not use_cache:
        seq = prompt
        for _ in range(max_new_tokens):
            token = draw(model(seq, last_only=True)[:, -1, :])  # (1,)
            token_id = int(token)  # the one host sync per step
            if token_id == stop_id:
                return
            yield token_id
            seq = torch.cat([seq, token.view(1, 1)], dim=1)  # (1, T+1)
        return

    need = prompt.size(1) + max_new_tokens
    if decoder is not None and need > decoder.max_seq_len:
        raise ValueError(
            f"prompt + max_new_tokens is {need} positions; the compiled decoder holds {decoder.max_seq_len}"
        )
    if decoder is None:
        model.setup_cache(1, need)
    else:
        decoder.attach()
    try:
        logits = prefill(model, prompt)
        pos = prompt.size(1)
        for i in range(max_new_tokens):
            token = draw(logits)  # (1,)
            token_id = int(token)  # the one host sync per step
            if token_id == stop_id:
                return
            yield token_id
            if i + 1 < max_new_tokens:  # the last token needs no forward of its own
                if decoder is None:
                    logits = decode_step(model, token.view(1, 1), pos)
                else:
                    logits = decoder(token.view(1, 1), [pos])
                pos += 1
    finally:
        if decoder is None:
            model.clear_cache()
