"""The Llama-style Transformer: `Transformer(cfg, vocab_size)` plus its building blocks.

Training, sampling and checkpoint files live elsewhere (nanollm.train, nanollm.generate,
nanollm.checkpoint); this package is the network and its KV cache only.
"""

from nanollm.model.attention import Attention, KVCache
from nanollm.model.rope import RotaryEmbedding, apply_rotary
from nanollm.model.transformer import Block, FeedForward, RMSNorm, Transformer

__all__ = ["Attention", "Block", "FeedForward", "KVCache", "RMSNorm", "RotaryEmbedding", "Transformer", "apply_rotary"]
