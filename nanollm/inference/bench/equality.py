"""Whether the cached and the plain decoding path agree: tokens first, logits where they part.

Owns the check that makes the benchmark's speedup trustworthy, and its error. It replays
nanollm.inference.generate's two paths but times nothing; timing.py calls it after each round.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nanollm.errors import NanollmError
from nanollm.inference.generate import decode_step, prefill

__all__ = ["KVCacheMismatchError", "check_same", "first_difference", "rounding_tolerance"]


class KVCacheMismatchError(NanollmError):
    """Cached and uncached greedy decoding produced different tokens, and no near-tie explains it."""


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where two token lists of equal length differ, or None where they are the same."""
    return next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def rounding_tolerance(logits: torch.Tensor, dtype: torch.dtype) -> float:
    """How far two float evaluations of the same logits may drift apart: sqrt(eps) of `dtype` x their scale.

    The cached and the plain path compute the same function with differently shaped
    kernels (one query row against the cache, or the whole sequence), so their sums are
    added in other orders; that drift is a few eps per layer, far below sqrt(eps)
    (3.5e-4 relative in fp32, 0.031 in fp16, 0.088 in bf16): a 4-layer, 256-wide fp32 model
    after a 512-token prompt drifts by 2e-6 of its logits' scale, 170x inside the band. A
    bug moves logits by a sizeable share of their scale (a cache nudged at one position, a
    rope offset: more than 10x the band in tests/test_bench.py).
    The scale is the largest |logit| (at least 1), so a trained model's sharper logits
    (~10-20) get a proportionally wider band.
    """
    scale = max(1.0, logits.abs().max().item())
    return math.sqrt(torch.finfo(dtype).eps) * scale


@torch.inference_mode()
def _logits_of_both_paths(
    model: nn.Module, prompt: torch.Tensor, shared: list[int], new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits (V,) each path computes for the new token after prompt + shared: (plain forward, cached).

    Replays what generate runs: the uncached path's forward over the whole sequence, and
    the cached path's prefill of the prompt then one decode step per shared token, against
    a cache of the size generate allocates (prompt + new_tokens).
    """
    seq = torch.cat([prompt, prompt.new_tensor(shared)]).view(1, -1)  # (1, T + i)
    plain = model(seq, last_only=True)[0, -1]  # (V,)
    model.setup_cache(1, prompt.numel() + new_tokens)
    try:
        logits = prefill(model, prompt.view(1, -1))  # (1, V)
        for pos, token in enumerate(shared, start=prompt.numel()):
            logits = decode_step(model, prompt.new_tensor([[token]]), pos)  # (1, V)
    finally:
        model.clear_cache()
    return plain, logits[0]


def check_same(model: nn.Module, prompt: torch.Tensor, cached: list[int], uncached: list[int]) -> str | None:
    """None when the two greedy runs (equal lengths) agree; a note when they part on a near-tie; else raise.

    Tokens alone cannot tell a broken cache from float rounding: on a trained model two
    candidates can have logits equal to 1e-6, and the cached path (one query against the
    cache) and the plain one (the whole sequence) add their sums in other orders, so either
    may win. Comparing every step's logits would need generate to expose them (it yields
    ids only) and would cost a logits copy per step inside the timed loop. So the check
    stays on tokens, and only at the first new token i where the runs part does it replay
    both paths over their shared prefix (one plain forward and one cached decode, untimed)
    and compare their logits there. The difference is a near-tie, logged and accepted, when
    (a) the two logit vectors agree within rounding_tolerance: the paths compute the same
    function at that step, so the cache is not corrupt; and (b) each run's token is within
    2x that tolerance of the best logit of the other path's vector: the two candidates tie
    to rounding. Anything else (logits apart by more than rounding: a stale or corrupted
    cache, a wrong rope offset) raises KVCacheMismatchError naming the point. After a
    near-tie the sequences differ, so the rest of the run is not compared.
    """
    i = first_difference(cached, uncached)
    if i is None:
        return None
    plain, stepped = _logits_of_both_paths(model, prompt, cached[:i], len(cached))
    tolerance = rounding_tolerance(plain, next(model.parameters()).dtype)
    drift = (stepped - plain).abs().max().item()
    gap = max(plain.max().item() - plain[cached[i]].item(), stepped.max().item() - stepped[uncached[i]].item())
    where = (
        f"at prompt_len={prompt.numel()}, new_tokens={len(cached)}: greedy decoding first differs at new token {i} "
        f"(cached {cached[i]}, uncached {uncached[i]})"
    )
    if drift <= tolerance and gap <= 2 * tolerance:
        return (
            f"near-tie {where}: logits {plain[uncached[i]].item():.6g} and {plain[cached[i]].item():.6g}, "
            f"the two paths' logits within {drift:.2g} of each other (rounding allows {tolerance:.2g}); "
            "the rest of the run is not compared"
        )
    raise KVCacheMismatchError(
        f"KV cache mismatch {where}, where the two paths' logits differ by up to {drift:.3g} "
        f"(rounding allows {tolerance:.2g}); the model's cached attention path disagrees with its plain forward, "
        "fix nanollm/model before trusting any speedup"
    )
