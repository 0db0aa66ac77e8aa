"""The Llama-style decoder-only Transformer: embedding, blocks, final norm, LM head.

This module owns the architecture, its initialisation, the KV-cache lifecycle, the decode
weight layout it offers (packing.py lays the weights out; callers ask for it) and the FLOP
estimate. Attention internals (with the qk_norm and value_residual options) live in
attention.py, RoPE in rope.py, RMSNorm in norm.py; training, sampling and checkpoint files
are other modules' business. The options of modded-nanogpt's record runs owned here are the
relu2 MLP, zero_init_proj, logit_softcap, the value_embeddings tables (their mixing is
attention.py's) and unet_skips; with every option off the model is Llama's.

Parameter names follow Meta's Llama checkpoints (tok_embeddings, layers.i.attention.wq,
layers.i.feed_forward.w1, attention_norm, ffn_norm, norm, output), so exporting to
Hugging Face `transformers` is a key rename with no weight permutation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from nanollm.config import ModelConfig
from nanollm.model.attention import VALUE_MIX_INIT, Attention, KVCache, RaggedStep
from nanollm.model.norm import RMSNorm
from nanollm.model.packing import PackedLinears, column_major, pack
from nanollm.model.rope import RotaryEmbedding

__all__ = ["LOSS_CHUNK", "Block", "FeedForward", "RMSNorm", "Transformer", "value_embed_layers", "value_embed_table"]

# Rows of logits the training loss makes at once (Transformer.forward with targets): 512 x a
# vocab of 4096 is 8 MB of fp32, which a CPU's last-level cache holds while the chunk is
# normalised and differentiated.
LOSS_CHUNK = 512


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); GELU: w2(gelu(w1 x)); ReLU squared: w2(relu(w1 x)^2). No biases.

    SwiGLU costs a third matrix; at hidden = 8/3 * C it matches the parameters and FLOPs of
    a 4C GELU MLP and trains to a lower loss at equal compute (Shazeer 2020, Llama). ReLU
    squared (So et al. 2021, "Primer"; modded-nanogpt, which measured it ~1-2% better than
    GELU) keeps GELU's two matrices and 4C width, so the same parameters and FLOPs again, with
    an activation that is two cheap elementwise ops and exactly zero for half its inputs.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu, self.relu2 = cfg.mlp == "swiglu", cfg.mlp == "relu2"
        self.w1 = nn.Linear(cfg.n_embd, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.n_embd, bias=False)
        self.w3 = nn.Linear(cfg.n_embd, cfg.hidden_dim, bias=False) if self.swiglu else None
        self.packed_in: PackedLinears | None = None  # SwiGLU's w1 and w3, set by pack_for_decode

    def pack_for_decode(self) -> None:
        """Move the weights to the decode layout (packing.py): SwiGLU's w1 and w3 as one matmul."""
        if self.swiglu:
            self.packed_in = pack(self.w1, self.w3, current=self.packed_in)
        else:
            column_major(self.w1)
        column_major(self.w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            if self.packed_in is not None and self.packed_in.usable():
                gate, up = self.packed_in(x)  # (B, T, H) each
            else:
                gate, up = self.w1(x), self.w3(x)
            return self.w2(F.silu(gate) * up)  # (B, T, H) -> (B, T, C)
        if self.relu2:
            return self.w2(F.relu(self.w1(x)).square())  # (B, T, H) -> (B, T, C)
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))  # tanh GELU, as GPT-2


def value_embed_table(cfg: ModelConfig, index: int) -> int | None:
    """Which of the value_embeddings tables feeds layer `index` (table j: layers j and n_layer-1-j), or None."""
    mirrored = min(index, cfg.n_layer - 1 - index)
    return mirrored if mirrored < cfg.value_embeddings else None


def value_embed_layers(cfg: ModelConfig) -> int:
    """How many layers add a value embedding."""
    return sum(value_embed_table(cfg, i) is not None for i in range(cfg.n_layer))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). `index` counts from 0."""

    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attention = Attention(
            cfg,
            mixes_values=cfg.value_residual and index > 0,
            takes_value_embed=value_embed_table(cfg, index) is not None,
        )
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start_pos: int | None,
        v_first: torch.Tensor | None = None,
        value_embed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> (x (B, T, C), the attention's values (B, nkv, T, hs)); v_first, value_embed as in Attention.

        Every argument is positional in Transformer.forward, as nanollm.training.memory's activation
        checkpointing passes them on.
        """
        h, values = self.attention(self.attention_norm(x), cos, sin, start_pos, v_first, value_embed)  # (B, T, C)
        x = x + h  # (B, T, C)
        return x + self.feed_forward(self.ffn_norm(x)), values  # (B, T, C), (B, nkv, T, hs)


class Transformer(nn.Module):
    """token ids (B, T) -> fp32 logits (B, T, vocab).

    forward(idx) is the plain causal pass used in training. forward(idx, start_pos=t) is the
    cached pass: it writes K/V for positions [t, t+T) into the cache made by setup_cache()
    and attends to [0, t+T); prefill is forward(prompt, 0), decode is forward(tok, t).
    pack_for_decode() moves the weights to the layout batch-1 decoding reads fastest; it is
    a step the caller takes (nanollm.inference's callers do), never a side effect.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.tok_embeddings = nn.Embedding(vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.output = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.block_size, cfg.rope_theta)
        # Registered after the rest and built without a draw (reset_parameters draws them), so the init
        # draws every other weight as it would without them.
        ve_shape = (vocab_size, cfg.kv_heads * cfg.head_dim)
        self.value_embeds = (
            nn.ModuleList(nn.Embedding(*ve_shape, _weight=torch.empty(ve_shape)) for _ in range(cfg.value_embeddings))
            if cfg.value_embeddings
            else None
        )
        # unet_skips: the weight of layer i's output in the input of layer n_layer-1-i, i < n_layer // 2
        self.skip_weights = nn.Parameter(torch.ones(cfg.n_layer // 2)) if cfg.unet_skips else None
        self.reset_parameters()
        if cfg.tie_embeddings:
            # One tensor serves as input embedding and LM head: vocab * C fewer parameters
            # (1M of a 4096 x 256 model's ~4.2M) at no measurable loss for small models.
            self.output.weight = self.tok_embeddings.weight

    def reset_parameters(self) -> None:
        """normal(0, init_std) for every matrix; the residual projections (wo, w2) scaled by 1/sqrt(2 n_layer).

        Each block adds two outputs to the residual stream, so without the scaling its
        variance grows with depth (GPT-2, section 2.3). Norm weights (qk_norm's gains too)
        start at one, value_residual's mixes at VALUE_MIX_INIT.

        zero_init_proj starts wo and w2 at zero instead (modded-nanogpt): every block is then
        the identity, the first logits come from the embedding alone, and the first step's
        gradient reaches only wo, w2, the embedding and the head; the blocks grow in from
        there. The normal draw still happens first, so the random stream, and with it every
        other weight, is the same as without the option: each option changes only what it names.
        """
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith(("attention.value_mix", "attention.value_embed_mix")):
                nn.init.constant_(p, VALUE_MIX_INIT)
            elif p.dim() < 2:
                nn.init.ones_(p)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layer))
                if self.cfg.zero_init_proj:
                    nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(
        self,
        idx: torch.Tensor,
        start_pos: int | RaggedStep | None = None,
        *,
        last_only: bool = False,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx (B, T) int64 -> logits (B, T, vocab) in fp32; (B, 1, vocab) for the last position with last_only;
        with targets (B, T) int64, the mean next-token cross-entropy instead (a 0-dim fp32 tensor).

        The loss never holds all B*T x vocab logits at once: LOSS_CHUNK rows at a time, each
        chunk's logits are made, normalised and (in backward) differentiated while they are still
        in the CPU's cache. The same sums as F.cross_entropy over the whole batch, in another
        order. On 2 CPU cores a default micro-batch's forward and backward is ~12% faster so
        (benchmarks/loss_chunks.py, docs/speedrun.md).

        start_pos: None for the plain pass, an int for the cached pass, or a RaggedStep (idx
        (B, 1), one token per cache row at that row's own position) for a batched decode step.

        last_only is what sampling needs after a prefill: it skips T - 1 rows of the LM head,
        a quarter of a 512-token prefill's FLOPs for the default model (vocab 4096, C 256).

        logit_softcap squashes every logit into (-cap, cap) as cap * tanh(logits / cap) (Gemma 2;
        modded-nanogpt), in fp32, here and so for training, evaluation and every decode step
        alike. Near zero it is the identity (within a relative (x/cap)^2 / 3), while a
        confident logit can no longer grow without bound, so an untied head, which nothing
        else ties to the embedding's scale, cannot buy lower loss by inflating its weights.
        """
        _, T = idx.shape
        if isinstance(start_pos, RaggedStep):
            cos, sin = self.rope.at(start_pos.positions, start_pos.span)  # (B, 1, 1, hs) each
        else:
            cos, sin = self.rope(start_pos or 0, T)  # (T, hs) each
        x = self.tok_embeddings(idx)  # (B, T, C)
        value_embeds = [table(idx) for table in self.value_embeds] if self.value_embeds is not None else []
        v_first = None  # value_residual: the first layer's values, mixed into every later layer's
        n, skips = self.cfg.n_layer, []  # unet_skips: outputs of the first n // 2 layers
        for i, layer in enumerate(self.layers):
            if self.skip_weights is not None and i >= n - n // 2:
                x = x + self.skip_weights[n - 1 - i] * skips[n - 1 - i]  # layer n-1-i's output
            table = value_embed_table(self.cfg, i)
            ve = value_embeds[table] if table is not None else None  # (B, T, nkv * hs)
            x, values = layer(x, cos, sin, start_pos, v_first, ve)  # (B, T, C), (B, nkv, T, hs)
            if self.cfg.value_residual and v_first is None:
                v_first = values
            if self.skip_weights is not None and i < n // 2:
                skips.append(x)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        x = self.norm(x)
        if targets is None:
            return self._logits(x)  # (B, T, vocab)
        x, targets = x.flatten(0, 1), targets.reshape(-1)  # (B*T, C), (B*T,)
        total = torch.zeros((), device=x.device)
        for i in range(0, x.size(0), LOSS_CHUNK):
            rows = slice(i, i + LOSS_CHUNK)
            total = total + F.cross_entropy(self._logits(x[rows]), targets[rows], reduction="sum")
        return total / targets.numel()

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised hidden states (..., C) -> logits (..., vocab) in fp32, soft-capped when the model caps them."""
        logits = self.output(x)
        if logits.dtype != torch.float32:
            logits = logits.float()
        cap = self.cfg.logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)  # each in (-cap, cap)
        return logits

    # ------------------------------------------------------------------ KV cache

    def setup_cache(self, batch_size: int, max_seq_len: int) -> None:
        """Preallocate K/V buffers for batch_size sequences of up to max_seq_len positions.

        Lives on the model's device in the model's dtype; replaces any previous cache.
        max_seq_len may exceed cfg.block_size (RoPE tables grow to match). The weights stay
        as they are: their decode layout is pack_for_decode's, for the caller to ask for.
        """
        weight = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.cache = KVCache(
                batch_size, self.cfg.kv_heads, max_seq_len, self.cfg.head_dim, dtype=weight.dtype, device=weight.device
            )
        self.rope(0, max_seq_len)  # grow the tables now rather than inside the decode loop

    def pack_for_decode(self) -> None:
        """On the CPU, move every linear weight to the decode layout of packing.py; values and shapes stay.

        Batch-1 decoding reads every weight once per token, so its speed is the speed at
        which the weights stream from memory. Column-major weights, with q/k/v and SwiGLU's
        w1/w3 packed side by side, stream ~1.6x faster on the CPU than nn.Linear's row-major
        ones (benchmarks/decode_vs_transformers.py). Larger matmuls (prefill, training) run
        at the same speed in either layout, and the parameters still train (packing.py). On
        another device or in another dtype the weights stay as they are: the layout was measured
        on fp32 CPU BLAS only.
        Idempotent; after model.to(...) call it again, as the packs then go stale (and unused).
        """
        weight = self.tok_embeddings.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            # measured on fp32 CPU BLAS only; bf16 weights in this layout decoded 20x slower (2 vs 41 tok/s)
            return
        for layer in self.layers:
            layer.attention.pack_for_decode()
            layer.feed_forward.pack_for_decode()
        column_major(self.output)

    @contextmanager
    def cache_rows(self, start: int, stop: int) -> Iterator[None]:
        """Within the block, the cache is rows [start, stop) of the one set up: a prefill there fills those rows.

        How the batching engine prefills a newcomer into its slot while the other rows keep
        their sequences: the rows are views, so nothing is copied.
        """
        caches = [layer.attention.cache for layer in self.layers]
        if any(cache is None for cache in caches):
            raise RuntimeError("cache_rows needs setup_cache() first")
        try:
            for layer, cache in zip(self.layers, caches, strict=True):
                layer.attention.cache = cache.rows(start, stop)
            yield
        finally:
            for layer, cache in zip(self.layers, caches, strict=True):
                layer.attention.cache = cache

    def move_cache_row(self, src: int, dst: int, length: int) -> None:
        """Copy cache row src's first `length` positions into row dst, in every layer."""
        for layer in self.layers:
            layer.attention.cache.move_row(src, dst, length)

    def clear_cache(self) -> None:
        """Free the K/V buffers."""
        for layer in self.layers:
            layer.attention.cache = None

    def cache_bytes(self) -> int:
        """Bytes held by the KV cache now (0 without one)."""
        total = 0
        for layer in self.layers:
            cache = layer.attention.cache
            if cache is not None:
                total += sum(b.numel() * b.element_size() for b in (cache.k, cache.v))
        return total

    # ------------------------------------------------------------------ accounting

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters, counting a tied embedding/LM head once.

        exclude_embeddings drops the token-embedding tables (value_embeddings' too; Kaplan et al.'s "non-embedding"
        count); with tied embeddings that table is also the LM head.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel()
            n -= sum(t.weight.numel() for t in self.value_embeds or [])  # lookups too, no matmul
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at context seq_len: 6N + 12 L C T.

        6N: each matmul weight costs 2 FLOPs per token forward and 4 backward (PaLM, app. B;
        nanoGPT's estimate_mfu). N counts the LM head but not the embedding lookup, which is
        no matmul. 12 L C T: the q k^T and att v products, uncounted by N, with C = nh * hs.
        """
        n = self.num_params(exclude_embeddings=True)
        if self.cfg.tie_embeddings:
            n += self.tok_embeddings.weight.numel()  # the tied table is still the LM head matmul
        return 6.0 * n + 12.0 * self.cfg.n_layer * self.cfg.n_head * self.cfg.head_dim * seq_len
