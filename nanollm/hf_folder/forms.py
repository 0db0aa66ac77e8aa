"""Which transformers architecture computes a nanollm model, and config.json in both directions.

Owns the choice of export form and the config translation: ModelConfig -> config.json dict
(to_hf_config) and back (from_hf_config), for the three forms:

- llama: every option off (swiglu, no qk_norm, value_residual, value_embeddings, unet_skips or
  logit_softcap) -> LlamaForCausalLM.
- qwen3: qk_norm alone (swiglu, none of the others) -> Qwen3ForCausalLM, whose attention
  RMSNorms each head's queries and keys over head_dim with a learned gain, before RoPE, as ours.
- nanollm: anything else (the value residual, value embeddings, U-net skips, a gelu/relu2 MLP,
  logit soft-capping) -> the
  NanollmForCausalLM shipped in the folder (configuration_nanollm.py, modeling_nanollm.py, auto_map).

Weights and files are folder.py's; `transformers` is never imported here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import torch

from nanollm.config import Config, ConfigError, ModelConfig
from nanollm.errors import NanollmError

LLAMA, QWEN3, NANOLLM = "llama", "qwen3", "nanollm"
FORMS = (LLAMA, QWEN3, NANOLLM)
ARCHITECTURES = {LLAMA: "LlamaForCausalLM", QWEN3: "Qwen3ForCausalLM", NANOLLM: "NanollmForCausalLM"}
# config.json's route to the remote code of the nanollm form: module.class, for files in the folder
AUTO_MAP = {
    "AutoConfig": "configuration_nanollm.NanollmConfig",
    "AutoModelForCausalLM": "modeling_nanollm.NanollmForCausalLM",
}

# The transformers config defaults for keys a config.json may leave out (4.x and 5.x agree).
_DEFAULTS = {
    LLAMA: {
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
    QWEN3: {
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "head_dim": 128,
    },
    NANOLLM: {"mlp": "swiglu", "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
}
_COMMON_DEFAULTS = {"rope_theta": 10000.0, "initializer_range": 0.02}


class ExportForm(NamedTuple):
    """One of FORMS, the transformers class that computes it, and why it was chosen (one line)."""

    name: str
    architecture: str
    why: str

    def describe(self) -> str:
        """E.g. "Qwen3 form (Qwen3ForCausalLM): qk_norm without value_residual"."""
        title = {LLAMA: "Llama form", QWEN3: "Qwen3 form", NANOLLM: "custom form"}[self.name]
        return f"{title} ({self.architecture}): {self.why}"


def llama_incompatibility(cfg: ModelConfig) -> str | None:
    """Why LlamaForCausalLM cannot compute this architecture (one line, naming the option and the fix), else None.

    zero_init_proj is no obstacle: it decides where training starts, and the trained weights
    are plain Llama weights.
    """
    if cfg.mlp != "swiglu":
        return (
            f"model.mlp is {cfg.mlp!r}: Llama's MLP is gated SiLU (swiglu), so this checkpoint has no Llama "
            "equivalent; train with model.mlp: swiglu to export it"
        )
    refused = [
        ("qk_norm", cfg.qk_norm, "Llama's attention normalises neither queries nor keys"),
        ("logit_softcap", cfg.logit_softcap, "Llama's LM head has no logit soft-capping"),
        ("value_residual", cfg.value_residual, "Llama's attention reads only its own layer's values"),
        ("value_embeddings", cfg.value_embeddings or None, "Llama's values come from its projection alone"),
        ("unet_skips", cfg.unet_skips, "Llama's layers read only the residual stream"),
    ]
    for key, value, why in refused:
        if value not in (None, False):
            shown = "true" if value is True else value
            return f"model.{key}: {shown} has no Llama equivalent ({why}); export a model trained without it"
    return None


def llama_counterpart(cfg: ModelConfig) -> ModelConfig | None:
    """The same shape as plain Llama (every option but the MLP's off), or None if the MLP differs.

    What transformers' LlamaForCausalLM can run in place of an architecture it cannot express:
    the bench compares the two engines on it (the options cost a few elementwise ops per layer,
    so the engines' ratio is the same within noise). A relu2 or gelu MLP has other matrices, so
    it has no counterpart.
    """
    if cfg.mlp != "swiglu":
        return None
    off = {"qk_norm": False, "logit_softcap": None, "value_residual": False, "zero_init_proj": False}
    return dataclasses.replace(cfg, **off, value_embeddings=0, unet_skips=False)


def export_form(cfg: ModelConfig) -> ExportForm:
    """The stock architecture that computes `cfg` (Llama, then Qwen3), else the custom nanollm one, with why."""
    if llama_incompatibility(cfg) is None:
        return ExportForm(LLAMA, ARCHITECTURES[LLAMA], "no option Llama lacks is on")
    if cfg.mlp == "swiglu" and cfg.qk_norm and _custom_only(cfg) is None and cfg.logit_softcap is None:
        return ExportForm(QWEN3, ARCHITECTURES[QWEN3], "qk_norm without value_residual")
    unmatched = [
        ("value_residual", cfg.value_residual),
        ("value_embeddings", cfg.value_embeddings > 0),
        ("unet_skips", cfg.unet_skips),
        (f"mlp {cfg.mlp}", cfg.mlp != "swiglu"),
        ("logit_softcap", cfg.logit_softcap is not None),
    ]
    names = " and ".join(name for name, on in unmatched if on)
    return ExportForm(NANOLLM, ARCHITECTURES[NANOLLM], f"{names}: no stock architecture; load with trust_remote_code")


def _custom_only(cfg: ModelConfig) -> str | None:
    """The first option on that only the custom form computes (beyond the MLP and softcap), else None."""
    on = [("value_residual", cfg.value_residual), ("value_embeddings", cfg.value_embeddings > 0),
          ("unet_skips", cfg.unet_skips)]  # fmt: skip
    return next((name for name, value in on if value), None)


def _form_for(cfg: ModelConfig, form: str | None) -> str:
    """The form to write: `form` if it can compute `cfg` (NanollmError naming the obstacle if not), else the choice."""
    chosen = export_form(cfg).name
    if form is None or form == chosen or form == NANOLLM:
        return form or chosen
    if form not in FORMS:
        raise NanollmError(f"unknown export form {form!r}; choose one of {', '.join(FORMS)}")
    if form == LLAMA:
        raise NanollmError(llama_incompatibility(cfg))
    raise NanollmError(
        "the qwen3 form needs qk_norm alone (no value_residual, value_embeddings, unet_skips, softcap or other MLP); "
        f"{chosen} fits"
    )


def to_hf_config(
    cfg: ModelConfig,
    vocab_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    eos_token_id: int | None = None,
    form: str | None = None,
) -> dict[str, Any]:
    """The config.json dict for our architecture in `form` (default: export_form's choice).

    RoPE's base is written both as transformers 4's `rope_theta` and as 5's `rope_parameters`,
    so either version loads the folder. eos_token_id (our <|endoftext|>) doubles as bos, since
    our documents are separated, not wrapped. A form that cannot compute `cfg` is a NanollmError.
    """
    form = _form_for(cfg, form)
    common = {
        "architectures": [ARCHITECTURES[form]],
        "model_type": form,
        "vocab_size": vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if form == NANOLLM:
        options = {"qk_norm": cfg.qk_norm, "value_residual": cfg.value_residual, "logit_softcap": cfg.logit_softcap,
                   "value_embeddings": cfg.value_embeddings, "unet_skips": cfg.unet_skips}  # fmt: skip
        return {**common, "auto_map": dict(AUTO_MAP), "mlp": cfg.mlp, **options}
    stock = {
        **common,
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
    }
    if form == LLAMA:
        return {**stock, "mlp_bias": False}
    # no sliding window: every layer attends to the whole context
    window = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layer}
    return {**stock, **window, "layer_types": ["full_attention"] * cfg.n_layer}


def _unsupported(hf: dict[str, Any]) -> tuple[str, str] | None:
    """(field, why) for the first config feature our model does not implement, else None."""
    kind = hf.get("model_type")
    if kind not in FORMS:
        return "model_type", f"is {kind!r}; only 'llama', 'qwen3' and 'nanollm' folders can be imported"
    if kind == NANOLLM:
        mlp = hf.get("mlp", "swiglu")
        if mlp not in ("swiglu", "gelu", "relu2"):
            return "mlp", f"is {mlp!r}; nanollm implements swiglu, gelu and relu2"
    else:
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            return "hidden_act", f"is {act!r}; only 'silu' (SwiGLU) is implemented"
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            return flag, "is true; nanollm's linear layers have no biases"
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or []):
        return "use_sliding_window", "sliding-window attention is not implemented; every layer must be full_attention"
    if hf.get("rope_scaling"):
        return "rope_scaling", f"is {hf['rope_scaling']!r}; only plain RoPE is implemented"
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        return "rope_parameters.rope_type", f"is {rope['rope_type']!r}; only 'default' RoPE is implemented"
    if hf.get("quantization_config"):
        return "quantization_config", "is set; only unquantized weights can be imported"
    heads, width = hf.get("num_attention_heads"), hf.get("hidden_size")
    head_dim = hf.get("head_dim", _DEFAULTS[kind].get("head_dim"))
    if head_dim is not None and isinstance(heads, int) and isinstance(width, int) and head_dim * heads != width:
        return "head_dim", f"is {head_dim}, not hidden_size / num_attention_heads; nanollm derives it from those"
    return None


def from_hf_config(hf: dict[str, Any], source: str | Path = "config.json") -> tuple[ModelConfig, int]:
    """(ModelConfig, vocab_size) for a Llama, Qwen3 or nanollm config dict; NanollmError naming the first
    unsupported field."""
    bad = _unsupported(hf)
    if bad is not None:
        field, why = bad
        raise NanollmError(f"{source}: unsupported config field {field!r}: {why}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise NanollmError(f"{source}: required field {key!r} is missing; is this a model's config.json?")
    kind = hf["model_type"]
    defaults = {**_COMMON_DEFAULTS, **_DEFAULTS[kind]}
    get = lambda key: hf[key] if hf.get(key) is not None else defaults.get(key)  # noqa: E731
    rope = hf.get("rope_parameters") or {}
    heads, kv_heads = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    model = {
        "n_layer": hf["num_hidden_layers"],
        "n_head": heads,
        "n_kv_head": None if kv_heads == heads else kv_heads,
        "n_embd": hf["hidden_size"],
        "block_size": get("max_position_embeddings"),
        "mlp": get("mlp") or "swiglu",
        "mlp_hidden": hf["intermediate_size"],
        "tie_embeddings": get("tie_word_embeddings"),
        "rope_theta": float(rope.get("rope_theta", get("rope_theta"))),
        "norm_eps": float(get("rms_norm_eps")),
        "init_std": float(get("initializer_range")),
        "qk_norm": kind == QWEN3 or bool(hf.get("qk_norm")),
        "value_residual": bool(hf.get("value_residual")),
        "value_embeddings": int(hf.get("value_embeddings") or 0),
        "unet_skips": bool(hf.get("unet_skips")),
        "logit_softcap": hf.get("logit_softcap"),
    }
    try:
        cfg = Config.from_dict({"model": model}).model
    except ConfigError as err:
        raise NanollmError(f"{source}: cannot be expressed as a nanollm model ({err})") from None
    if dataclasses.replace(cfg, mlp_hidden=None).hidden_dim == cfg.mlp_hidden:
        cfg = dataclasses.replace(cfg, mlp_hidden=None)  # our default width: record it as the default
    vocab = hf["vocab_size"]
    if not isinstance(vocab, int) or vocab < 1:
        raise NanollmError(f"{source}: vocab_size must be a positive integer, got {vocab!r}")
    return cfg, vocab
