"""Hugging Face interop: our Transformer to and from a Llama-format folder (config.json + model.safetensors,
and on export, with a tokenizer, generation_config.json and the tokenizer files: a complete HF model).

Owns the parameter-name mapping, the config translation in both directions and the folder's
layout. The tokenizer files are nanollm.tokenizer.hf's; checkpoint folders are nanollm.checkpoint's.
`transformers` itself is never imported here (the folder format is plain JSON plus safetensors,
which is imported lazily inside the functions).

Our parameter names follow Meta's Llama and our RoPE uses HF's rotate_half layout, so the
conversion is a key rename with no weight permutation. What Llama cannot express is
refused: on export, a GELU or ReLU-squared MLP, QK-norm, logit soft-capping and the value
residual (llama_incompatibility names the first); on import, every config feature we do not
implement (biases, RoPE scaling, other activations, ...) with an error naming the first such field.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nanollm.atomic import atomic_path
from nanollm.config import Config, ConfigError, ModelConfig
from nanollm.errors import NanollmError, read_json_object
from nanollm.model import Transformer

if TYPE_CHECKING:
    from nanollm.tokenizer import Tokenizer

__all__ = [
    "HF_CONFIG",
    "HF_GENERATION_CONFIG",
    "HF_WEIGHTS",
    "export_hf",
    "from_hf_config",
    "hf_key",
    "llama_incompatibility",
    "load_hf",
    "our_key",
    "to_hf_config",
]

log = logging.getLogger(__name__)

HF_CONFIG, HF_WEIGHTS, HF_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
HF_GENERATION_CONFIG = "generation_config.json"

_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}

# HF LlamaConfig defaults for keys a config.json may leave out (transformers 4.x and 5.x agree).
_DEFAULTS = {
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}


# ---------------------------------------------------------------------------- names


def hf_key(key: str) -> str:
    """Our state_dict key -> Llama's: "layers.0.attention.wq.weight" -> "model.layers.0.self_attn.q_proj.weight"."""
    if key in _TOP:
        return _TOP[key]
    _, i, rest = key.split(".", 2)  # "layers", "0", "attention.wq.weight"
    module, param = rest.rsplit(".", 1)
    return f"model.layers.{i}.{_LAYER[module]}.{param}"


def our_key(key: str) -> str | None:
    """The Llama key -> ours, or None for a key we do not know."""
    if key in _TOP_BACK:
        return _TOP_BACK[key]
    parts = key.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit() or parts[-1] != "weight":
        return None  # not a Llama layer weight (biases included: our layers have none)
    module = _LAYER_BACK.get(".".join(parts[3:-1]))
    return f"layers.{parts[2]}.{module}.{parts[-1]}" if module else None


# ---------------------------------------------------------------------------- configs


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
    ]
    for key, value, why in refused:
        if value not in (None, False):
            shown = "true" if value is True else value
            return f"model.{key}: {shown} has no Llama equivalent ({why}); export a model trained without it"
    return None


def llama_counterpart(cfg: ModelConfig) -> ModelConfig | None:
    """The same shape as plain Llama (qk_norm, logit_softcap, value_residual off), or None if the MLP differs.

    What transformers' LlamaForCausalLM can run in place of an architecture it cannot express:
    the bench compares the two engines on it (the options cost a few elementwise ops per layer,
    so the engines' ratio is the same within noise). A relu2 or gelu MLP has other matrices, so
    it has no counterpart.
    """
    if cfg.mlp != "swiglu":
        return None
    return dataclasses.replace(cfg, qk_norm=False, logit_softcap=None, value_residual=False, zero_init_proj=False)


def to_hf_config(
    cfg: ModelConfig, vocab_size: int, *, dtype: torch.dtype = torch.float32, eos_token_id: int | None = None
) -> dict[str, Any]:
    """The LlamaConfig dict for our architecture (NanollmError for one Llama cannot express: llama_incompatibility).

    RoPE's base is written both as transformers 4's `rope_theta` and as 5's `rope_parameters`,
    so either version loads the folder. eos_token_id (our <|endoftext|>) doubles as bos, since
    our documents are separated, not wrapped.
    """
    why_not = llama_incompatibility(cfg)
    if why_not is not None:
        raise NanollmError(why_not)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def _unsupported(hf: dict[str, Any]) -> tuple[str, str] | None:
    """(field, why) for the first config feature our model does not implement, else None."""
    if hf.get("model_type") != "llama":
        return "model_type", f"is {hf.get('model_type')!r}; only Llama-format models ('llama') can be imported"
    act = hf.get("hidden_act", _DEFAULTS["hidden_act"])
    if act != "silu":
        return "hidden_act", f"is {act!r}; only 'silu' (SwiGLU) is implemented"
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            return flag, "is true; nanollm's linear layers have no biases"
    if hf.get("rope_scaling"):
        return "rope_scaling", f"is {hf['rope_scaling']!r}; only plain RoPE is implemented"
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        return "rope_parameters.rope_type", f"is {rope['rope_type']!r}; only 'default' RoPE is implemented"
    if hf.get("quantization_config"):
        return "quantization_config", "is set; only unquantized weights can be imported"
    heads, width = hf.get("num_attention_heads"), hf.get("hidden_size")
    head_dim = hf.get("head_dim")
    if head_dim is not None and isinstance(heads, int) and isinstance(width, int) and head_dim * heads != width:
        return "head_dim", f"is {head_dim}, not hidden_size / num_attention_heads; nanollm derives it from those"
    return None


def from_hf_config(hf: dict[str, Any], source: str | Path = HF_CONFIG) -> tuple[ModelConfig, int]:
    """(ModelConfig, vocab_size) for a Llama config dict; NanollmError naming the first unsupported field."""
    bad = _unsupported(hf)
    if bad is not None:
        field, why = bad
        raise NanollmError(f"{source}: unsupported config field {field!r}: {why}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise NanollmError(f"{source}: required field {key!r} is missing; is this a Llama config.json?")
    get = lambda key: hf.get(key, _DEFAULTS.get(key))  # noqa: E731
    rope = hf.get("rope_parameters") or {}
    heads, kv_heads = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    model = {
        "n_layer": hf["num_hidden_layers"],
        "n_head": heads,
        "n_kv_head": None if kv_heads == heads else kv_heads,
        "n_embd": hf["hidden_size"],
        "block_size": get("max_position_embeddings"),
        "mlp": "swiglu",
        "mlp_hidden": hf["intermediate_size"],
        "tie_embeddings": get("tie_word_embeddings"),
        "rope_theta": float(rope.get("rope_theta", get("rope_theta"))),
        "norm_eps": float(get("rms_norm_eps")),
        "init_std": float(get("initializer_range")),
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


# ---------------------------------------------------------------------------- folders


def _safetensors_torch() -> Any:
    """safetensors.torch, imported on first use; a one-line error where it is not installed."""
    try:
        import safetensors.torch
    except ImportError:
        raise NanollmError("the Hugging Face format needs safetensors: pip install safetensors") from None
    return safetensors.torch


def export_hf(model: Transformer, out_dir: str | Path, *, tokenizer: Tokenizer | None = None) -> Path:
    """Write `model` as a Llama folder that `LlamaForCausalLM.from_pretrained(out_dir)` loads; atomic.

    With `tokenizer` the folder is a complete HF model: AutoTokenizer and
    pipeline("text-generation") load it, the tokenizer starts every text with <|endoftext|> as
    `nanollm generate` does, and config.json and generation_config.json name that token as bos and
    eos (generation stops at it, as ours does). Without, the folder holds the model alone: ids in,
    logits out.

    Weights keep the model's dtype. A tied LM head is stored once (as the embedding;
    safetensors refuses shared tensors) and `tie_word_embeddings` tells HF to tie it back.
    Every file gets the permissions a plain open() gives under the umask.
    """
    save_file = _safetensors_torch().save_file
    eot = tokenizer.eot_id if tokenizer is not None else None
    dtype = model.tok_embeddings.weight.dtype
    hf_cfg = to_hf_config(model.cfg, model.vocab_size, dtype=dtype, eos_token_id=eot)
    state = {hf_key(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        del state["lm_head.weight"]
    with atomic_path(out_dir, directory=True) as tmp:
        _write_json(tmp / HF_CONFIG, hf_cfg)
        save_file(state, str(tmp / HF_WEIGHTS), metadata={"format": "pt"})  # "pt": what transformers expects
        # safetensors renames its own 0600 temporary into place; give it config.json's mode (the umask's)
        shutil.copymode(tmp / HF_CONFIG, tmp / HF_WEIGHTS)
        if tokenizer is not None:
            from nanollm.tokenizer.hf import write_hf_tokenizer

            # pad: we have no pad token, and <|endoftext|> is what generate falls back to (with a warning)
            _write_json(tmp / HF_GENERATION_CONFIG, {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot})
            write_hf_tokenizer(tokenizer, tmp, model_max_length=model.cfg.block_size)
    with_tokenizer = " and the tokenizer" if tokenizer is not None else ""
    log.info("exported %d tensors%s to %s", len(state), with_tokenizer, out_dir)
    return Path(out_dir)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """The parsed config.json of a Hugging Face model folder."""
    return read_json_object(Path(hf_dir) / HF_CONFIG, "pass a Hugging Face model folder (config.json + safetensors)")


def load_hf(hf_dir: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """Build our Transformer from a Llama folder (model.safetensors, or shards with their index); eval mode.

    Weights are cast to `dtype` (fp32 by default: what our training and evaluation run in).
    Any weight the architecture does not account for, or one it lacks, is a NanollmError
    naming the first such key.
    """
    hf_dir = Path(hf_dir)
    cfg, vocab = from_hf_config(read_hf_config(hf_dir), hf_dir / HF_CONFIG)
    model = Transformer(cfg, vocab)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in _read_safetensors(hf_dir).items():
        if key.endswith("rotary_emb.inv_freq"):  # old transformers saved RoPE tables; ours are computed
            continue
        ours = our_key(key)
        if ours is None:
            raise NanollmError(f"{hf_dir}: weight {key!r} has no place in a nanollm model; unsupported architecture")
        state[ours] = tensor.to(dtype)
    if cfg.tie_embeddings:
        state.setdefault("output.weight", state.get("tok_embeddings.weight"))
    expected = model.state_dict()
    for key in state.keys() - expected.keys():  # e.g. a layer index past num_hidden_layers
        raise NanollmError(f"{hf_dir}: weight {hf_key(key)!r} has no place in a model of this config.json")
    for key, ref in expected.items():
        got = state.get(key)
        if got is None:
            raise NanollmError(f"{hf_dir}: weight {hf_key(key)!r} is missing from the safetensors files")
        if got.shape != ref.shape:
            raise NanollmError(
                f"{hf_dir}: weight {hf_key(key)!r} has shape {tuple(got.shape)}, config.json implies {tuple(ref.shape)}"
            )
    model.load_state_dict(state)
    return model.to(dtype).eval()


def _read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    load_file = _safetensors_torch().load_file
    from safetensors import SafetensorError

    index = hf_dir / HF_INDEX
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError) as err:
            raise NanollmError(f"{index} is unreadable ({err})") from None
    elif (hf_dir / HF_WEIGHTS).is_file():
        files = [HF_WEIGHTS]
    else:
        raise NanollmError(f"{hf_dir} has neither {HF_WEIGHTS} nor {HF_INDEX}; export the weights as safetensors")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            state.update(load_file(str(hf_dir / name)))
        except (OSError, SafetensorError) as err:
            raise NanollmError(f"{hf_dir / name} is unreadable ({err})") from None
    return state
