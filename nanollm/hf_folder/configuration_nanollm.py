"""NanollmConfig: the transformers config of a nanollm model that no stock architecture computes.

Shipped inside an exported folder (copied there by nanollm.hf_folder.folder) and loaded by
AutoConfig through config.json's auto_map with trust_remote_code=True. It imports only
transformers, so the folder works where nanollm is not installed. The fields are Llama's
where Llama has one (hidden_size, num_key_value_heads, rms_norm_eps, rope_theta, ...) plus
nanollm's options: mlp, qk_norm, value_residual, value_embeddings, unet_skips, logit_softcap.
modeling_nanollm.py computes them.
"""

from transformers import PretrainedConfig


class NanollmConfig(PretrainedConfig):
    """A decoder-only Transformer: RoPE (rotate_half), RMSNorm, no biases, with nanollm's options.

    mlp: "swiglu" (down(silu(gate x) * up x)), "gelu" (down(gelu_tanh(up x))) or "relu2"
    (down(relu(up x)^2)). qk_norm: RMSNorm over each head's queries and keys (a learned gain
    of head_dim entries) before RoPE. value_residual: every layer after the first mixes its
    values with the first layer's, v = a v + b v_first (a, b learned per layer).
    value_embeddings: that many token-embedding tables (vocab x kv heads * head_dim), table j
    added to the values of layers j and num_hidden_layers-1-j as v + c ve (c learned per layer).
    unet_skips: layer i's output, times a learned weight, added to the input of layer
    num_hidden_layers-1-i for i < num_hidden_layers // 2.
    logit_softcap: logits squashed to cap * tanh(logits / cap); None is off.
    """

    model_type = "nanollm"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=None,
        head_dim=None,
        mlp="swiglu",
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        qk_norm=False,
        value_residual=False,
        value_embeddings=0,
        unet_skips=False,
        logit_softcap=None,
        initializer_range=0.02,
        tie_word_embeddings=True,
        use_cache=True,
        **kwargs,
    ):
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.mlp = mlp
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.qk_norm = qk_norm
        self.value_residual = value_residual
        self.value_embeddings = value_embeddings
        self.unet_skips = unet_skips
        self.logit_softcap = logit_softcap
        self.initializer_range = initializer_range
        self.tie_word_embeddings = tie_word_embeddings
        self.use_cache = use_cache
