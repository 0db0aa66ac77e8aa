"""The Llama-style Transformer: `Transformer(cfg, vocab_size)` plus its building blocks.

Training, sampling and checkpoint files live elsewhere (nanollm.training.loop, nanollm.inference.generate,
nanollm.checkpoint); this package is the network, its KV cache and its attention backends
(PyTorch SDPA, the from-scratch FlashAttention in flash.py, the naive reference).
"""

from nanollm.model.attention import Attention, KVCache
from nanollm.model.flash import flash_attention
from nanollm.model.norm import RMSNorm
from nanollm.model.rope import RotaryEmbedding, apply_rotary
from nanollm.model.transformer import Block, FeedForward, Transformer

__all__ = [
    "Attention",
    "Block",
    "FeedForward",
    "KVCache",
    "RMSNorm",
    "RotaryEmbedding",
    "Transformer",
    "apply_rotary",
    "flash_attention",
]
