"""NanollmForCausalLM: nanollm's Transformer written against transformers, for folders no stock class computes.

Shipped inside an exported folder (copied there by nanollm.hf_folder.folder) next to
configuration_nanollm.py, and loaded by AutoModelForCausalLM / pipeline through config.json's
auto_map with trust_remote_code=True. It imports only torch and transformers (never nanollm),
so the folder works where nanollm is not installed. Weight names are Llama's (model.layers.i.
self_attn.q_proj, mlp.gate_proj, ...) plus q_norm/k_norm (as Qwen3), self_attn.value_mix and
self_attn.value_embed_mix, model.value_embeds.j and model.skip_weights.

The KV cache is transformers' own: generate hands the model a Cache (a DynamicCache by
default) and every layer writes its keys and values with cache.update(k, v, layer_idx).
Under value_residual the later layers mix in the first layer's values per position before
the cache (value embeddings too), so the cache holds mixed values and decoding needs no extra
state. Attention runs
in torch's scaled_dot_product_attention with an explicit boolean mask (causal, and the 2-D
padding mask when given). Tested against transformers 4.56 and 5.x (docs/export.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_nanollm import NanollmConfig

try:  # transformers 5: these leave alone the tensors from_pretrained has already loaded
    from transformers import initialization as init
except ImportError:  # 4.x initialises only what the checkpoint lacks
    from torch.nn import init

_V5 = int(transformers.__version__.split(".")[0]) >= 5
# transformers 5 names the output's and forward's cache `cache` (4.x: `past_key_values`)
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class NanollmRMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, in fp32 and cast back before the gain (as Llama's)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., C), unit RMS
        return self.weight * h.to(x.dtype)


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, 1, T, hs) in fp32 for position_ids (B, T): angle p * theta^(-2i/hs), repeated over both halves.

    Computed per call rather than kept in a buffer: a few hundred multiplies, and nothing for
    from_pretrained's meta-device loading to leave uninitialised.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # (hs/2,)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hs/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs)
    return angles.cos()[:, None], angles.sin()[:, None]  # (B, 1, T, hs) each


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hs) rotated by its positions' angles (rotate_half layout, as Llama)."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class NanollmAttention(nn.Module):
    """Causal self-attention with RoPE, grouped-query heads, optional QK-norm and value residual."""

    def __init__(self, config: NanollmConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.rope_theta = config.rope_theta
        width = config.hidden_size
        self.q_proj = nn.Linear(width, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, width, bias=False)
        if config.qk_norm:
            self.q_norm = NanollmRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = NanollmRMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        # value residual: (a, b) of v = a v + b v_first, in every layer but the first
        mixes = config.value_residual and layer_idx > 0
        self.value_mix = nn.Parameter(torch.full((2,), 0.5)) if mixes else None
        # value embeddings: c of v = v + c ve, in the layers a table feeds (j and L-1-j for table j)
        takes = min(layer_idx, config.num_hidden_layers - 1 - layer_idx) < config.value_embeddings
        self.value_embed_mix = nn.Parameter(torch.full((1,), 0.5)) if takes else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: Cache | None,
        v_first: torch.Tensor | None,
        value_embed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> (output (B, T, C), this layer's values at these positions (B, nkv, T, hs))."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # per head, over hs, before RoPE
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.value_mix is not None:
            v = self.value_mix[0] * v + self.value_mix[1] * v_first  # (B, nkv, T, hs)
        if self.value_embed_mix is not None:  # value_embed (B, T, nkv * hs): its table's rows for these tokens
            ve = value_embed.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
            v = v + (self.value_embed_mix[0] * ve).to(v.dtype)
        values = v
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nkv, S, hs): every position so far
        rep = self.n_head // self.n_kv_head
        if rep > 1:  # query head h reads kv head h // rep
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, S, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh * hs)
        return self.o_proj(y), values


class NanollmMLP(nn.Module):
    """swiglu: down(silu(gate x) * up x); gelu: down(gelu_tanh(up x)); relu2: down(relu(up x)^2)."""

    def __init__(self, config: NanollmConfig):
        super().__init__()
        self.kind = config.mlp
        if self.kind not in ("swiglu", "gelu", "relu2"):
            raise ValueError(f"NanollmConfig.mlp is {self.kind!r}; expected swiglu, gelu or relu2")
        width, hidden = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(width, hidden, bias=False) if self.kind == "swiglu" else None
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, H) -> (B, T, C)
        if self.kind == "relu2":
            return self.down_proj(F.relu(self.up_proj(x)).square())
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class NanollmDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: NanollmConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = NanollmRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = NanollmAttention(config, layer_idx)
        self.post_attention_layernorm = NanollmRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = NanollmMLP(config)

    def forward(self, x, cos, sin, mask, cache, v_first, value_embed=None):
        h, values = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, v_first, value_embed)
        x = x + h  # (B, T, C)
        return x + self.mlp(self.post_attention_layernorm(x)), values


class NanollmPreTrainedModel(PreTrainedModel):
    config_class = NanollmConfig
    base_model_prefix = "model"
    _no_split_modules = ["NanollmDecoderLayer"]
    _supports_cache_class = True  # transformers 4.x: generate may hand us a Cache object

    def _init_weights(self, module: nn.Module) -> None:
        """normal(0, initializer_range) matrices, unit norm gains, value mixes at 0.5 (what nanollm starts from)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, NanollmRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, NanollmAttention):
            for mix in (module.value_mix, module.value_embed_mix):
                if mix is not None:
                    init.constant_(mix, 0.5)
        elif isinstance(module, NanollmModel) and module.skip_weights is not None:
            init.ones_(module.skip_weights)


def _attention_mask(
    attention_mask: torch.Tensor | None, B: int, T: int, past: int, device: torch.device
) -> torch.Tensor:
    """Boolean (B, 1, T, S), S = past + T: query i (at slot past + i) may read key j where j <= past + i and
    the 2-D padding mask (B, S) has a 1. A query that may read nothing (a padding row) reads everything
    instead, so softmax stays finite; its output is never used."""
    S = past + T
    q_slot = torch.arange(past, S, device=device)[:, None]  # (T, 1)
    mask = (torch.arange(S, device=device)[None, :] <= q_slot)[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError("NanollmModel takes a 2-D (batch, keys) attention_mask")
        mask = mask & attention_mask[:, None, None, -S:].bool()  # (B, 1, T, S)
    mask = mask.expand(B, 1, T, S)
    return mask | ~mask.any(dim=-1, keepdim=True)


class NanollmModel(NanollmPreTrainedModel):
    """Embedding, blocks, final norm: ids (B, T) -> hidden states (B, T, C)."""

    def __init__(self, config: NanollmConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(NanollmDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = NanollmRMSNorm(config.hidden_size, config.rms_norm_eps)
        ve_width = config.num_key_value_heads * config.head_dim
        self.value_embeds = nn.ModuleList(
            nn.Embedding(config.vocab_size, ve_width) for _ in range(config.value_embeddings)
        )
        n_skips = config.num_hidden_layers // 2
        self.skip_weights = nn.Parameter(torch.ones(n_skips)) if config.unet_skips else None
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
    ) -> tuple[torch.Tensor, Cache | None]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                # left padding: each row counts positions from its first real token
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
            else:
                position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)  # (B, T)
        cos, sin = rope_tables(position_ids, self.config.head_dim, self.config.rope_theta)  # (B, 1, T, hs)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        mask = _attention_mask(attention_mask, B, T, past, x.device)
        if len(self.value_embeds) and input_ids is None:
            raise ValueError("this model adds value embeddings of its input tokens (value_embeddings): pass input_ids")
        value_embeds = [table(input_ids) for table in self.value_embeds]  # (B, T, nkv * hs) each
        n, skips = len(self.layers), []  # unet_skips: the outputs of the first n // 2 layers
        v_first = None  # value_residual: the first layer's values at these positions
        for i, layer in enumerate(self.layers):
            if self.skip_weights is not None and i >= n - n // 2:
                x = x + self.skip_weights[n - 1 - i] * skips[n - 1 - i]
            table = min(i, n - 1 - i)
            ve = value_embeds[table] if table < len(value_embeds) else None
            x, values = layer(x, cos, sin, mask, cache, v_first, ve)
            if v_first is None:
                v_first = values
            if self.skip_weights is not None and i < n // 2:
                skips.append(x)
        return self.norm(x), cache


class NanollmForCausalLM(NanollmPreTrainedModel, GenerationMixin):
    """NanollmModel plus the LM head (tied to the embedding under tie_word_embeddings) and logit soft-capping."""

    # transformers 5 takes {tied: source}; 4.x a list of tied names (tied back to the input embedding)
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if _V5 else ["lm_head.weight"]

    def __init__(self, config: NanollmConfig):
        super().__init__(config)
        self.model = NanollmModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (B, T, vocab) in fp32, the cache (when use_cache) and, with labels, the next-token loss.

        The cache arrives as `cache` (transformers 5) or `past_key_values` (4.x); other keyword
        arguments generate passes (cache_position, return_dict, ...) are not needed and ignored.
        """
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        hidden, cache = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]  # (B, k, C): generate needs only the last position's
        logits = self.lm_head(hidden).float()  # (B, T, vocab)
        cap = self.config.logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)  # each in (-cap, cap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
