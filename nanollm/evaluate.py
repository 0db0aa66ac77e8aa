"""Held-out metrics for a language model: loss, perplexity, accuracy, bits per byte, compressor baselines.

Owns the arithmetic over a token memmap and raw bytes. Loading the model, the tokenizer and
the data, and deciding which bytes to compare against, is the caller's job.
"""

from __future__ import annotations

import bz2
import collections
import gzip
import logging
import lzma
import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

__all__ = ["evaluate_lm", "compressor_bits_per_byte", "windows"]

log = logging.getLogger(__name__)


def windows(n_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """Non-overlapping (start, length) input windows so that tokens 1..n-1 are each predicted once.

    A window of length L reads inputs [start, start+L) and targets [start+1, start+L+1);
    the last one may be shorter. Each window starts without context, so its first few
    predictions are harder than in a sliding-window evaluation: the loss is slightly
    pessimistic (for T=256 most tokens see plenty of context) but costs one forward per
    token instead of T/stride.
    """
    predicted = max(n_tokens - 1, 0)
    return [(s, min(block_size, predicted - s)) for s in range(0, predicted, block_size)]


@torch.inference_mode()
def evaluate_lm(
    model: nn.Module,
    tokens: np.ndarray,
    *,
    block_size: int,
    batch_size: int,
    token_bytes: np.ndarray,
    max_tokens: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Score every token of `tokens` (a flat memmap) given the ones before it in its window.

    Returns loss (mean nats per predicted token), perplexity (exp of it), accuracy (top-1
    next-token), tokens (predicted), bytes and bits_per_byte. Bits per byte sums the nats of
    the predicted tokens that stand for text (token_bytes > 0) and divides by ln 2 and their
    bytes: special tokens such as <|endoftext|> have no bytes and are left out of both sums,
    so the figure compares with a compressor run on the documents' text alone. loss and
    accuracy count every predicted token, the separators included.
    `token_bytes[i]` is the UTF-8 byte length of token i. The model is expected in eval mode.
    """
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    if n < 2:
        raise ValueError(f"need at least 2 tokens to evaluate, got {n}")
    device = torch.device(device)
    nbytes = torch.as_tensor(np.asarray(token_bytes, dtype=np.int64), device=device)  # (V,)
    spans = windows(n, block_size)
    full = [s for s, length in spans if length == block_size]
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[s] for s, length in spans if length < block_size]  # the short tail window, alone

    nats = nats_text = 0.0
    count = correct = text_bytes = 0
    for starts in tqdm(batches, desc="evaluate", unit="batch", disable=None):
        length = min(block_size, n - 1 - starts[0])
        chunk = np.stack([np.asarray(tokens[s : s + length + 1], dtype=np.int64) for s in starts])  # (B, L+1)
        chunk = torch.from_numpy(chunk).to(device)
        x, y = chunk[:, :-1], chunk[:, 1:]  # (B, L) inputs and next-token targets
        logits = model(x).float()  # (B, L, V)
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")  # (B*L,)
        y_bytes = nbytes[y.flatten()]  # (B*L,)
        nll64 = nll.to("cpu", torch.float64)  # sums in fp64 on the host: MPS has no float64
        nats += nll64.sum().item()
        nats_text += nll64[(y_bytes > 0).cpu()].sum().item()
        text_bytes += int(y_bytes.sum().item())
        correct += int((logits.argmax(dim=-1) == y).sum().item())
        count += y.numel()

    loss = nats / count
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": nats_text / math.log(2) / text_bytes if text_bytes else float("nan"),
        "accuracy": correct / count,
        "tokens": count,
        "bytes": text_bytes,
    }


def compressor_bits_per_byte(data: bytes) -> dict[str, float]:
    """Bits per byte that gzip -9, bzip2 -9 and xz -9e spend on `data`: 8 * compressed / original.

    These are the baselines a language model's bits_per_byte must beat to have learnt more
    than repeated substrings. Callers should pass exactly the text the model was scored on:
    for a corpus split that is its documents' UTF-8 text concatenated in order with nothing
    between them, i.e. the bytes of its non-special tokens (the model additionally skips the
    first token, which it never predicts: a few bytes in hundreds of thousands). xz -9e is
    the slowest (~1 MB/s), which is fine for a held-out split of a few MB.
    """
    if not data:
        raise ValueError("cannot compute bits per byte of empty data")
    sizes = {
        "gzip": len(gzip.compress(data, compresslevel=9, mtime=0)),
        "bz2": len(bz2.compress(data, compresslevel=9)),
        "lzma": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
    }
    return {name: 8 * size / len(data) for name, size in sizes.items()}


# xz -9e's dictionary (64 MiB): it cannot refer further back than this, so context beyond it is
# work that changes nothing.
LZMA_WINDOW = 64 * 2**20


def text_tail(texts: Iterable[str], n: int = LZMA_WINDOW) -> bytes:
    """The last `n` bytes of the texts' UTF-8 concatenation, holding no more than ~n bytes at a time.

    The same bytes as "".join(texts).encode()[-n:], for a corpus of any size: a 38 GB
    OpenWebText train split gives xz its 64 MiB window without being read into memory.
    """
    chunks: collections.deque[bytes] = collections.deque()
    held = 0
    for text in texts:
        chunks.append(text.encode("utf-8"))
        held += len(chunks[-1])
        while chunks and held - len(chunks[0]) >= n:  # the oldest chunk lies wholly before the tail
            held -= len(chunks.popleft())
    return b"".join(chunks)[-n:] if n else b""


def lzma_with_context_bits_per_byte(data: bytes, context: bytes) -> float:
    """Bits per byte that xz -9e spends on `data` when it has already seen `context`.

    8 * (|xz(context + data)| - |xz(context)|) / |data|: the compressor given the model's own
    training text, so it may copy from it as the model may have learnt from it; the bar a
    model must clear to have learnt more than where to copy from. Only the last LZMA_WINDOW
    bytes (less `data`) of the context are used: xz -9e sees no further back. The two
    compressions run in two threads (lzma releases the GIL): ~2x the time of xz on `context`.
    """
    from concurrent.futures import ThreadPoolExecutor

    if not data:
        raise ValueError("cannot compute bits per byte of empty data")
    context = context[-max(0, LZMA_WINDOW - len(data)) :] if len(context) + len(data) > LZMA_WINDOW else context

    def size(blob: bytes) -> int:
        return len(lzma.compress(blob, preset=9 | lzma.PRESET_EXTREME))

    with ThreadPoolExecutor(max_workers=2) as pool:
        both, alone = pool.map(size, [context + data, context])
    return 8 * (both - alone) / len(data)
