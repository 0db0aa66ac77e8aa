"""A nanollm Transformer to and from a Hugging Face model folder (config.json + model.safetensors, and on
export, with a tokenizer, generation_config.json and the tokenizer files: a complete HF model).

Owns the parameter-name mapping and the folder's layout, in each of forms.py's three forms
(Llama, Qwen3, or the custom nanollm architecture, whose configuration_nanollm.py and
modeling_nanollm.py, this package's remote-code templates, are copied into the folder).
Which form, and the config.json in both directions, are forms.py's; the tokenizer files are
nanollm.tokenizer.hf's; checkpoint folders are nanollm.checkpoint's. `transformers` itself is
never imported here (the folder is plain JSON plus safetensors, imported lazily).

Our parameter names follow Meta's Llama and our RoPE uses HF's rotate_half layout, so every
form is a key rename with no weight permutation: Llama's names, plus self_attn.q_norm/k_norm
(as Qwen3 names them) and, in the custom form, self_attn.value_mix, self_attn.value_embed_mix,
model.value_embeds.j and model.skip_weights; a gelu or relu2 MLP's
input matrix is mlp.up_proj (it has no gate).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nanollm.atomic import atomic_path
from nanollm.errors import NanollmError, read_json_object
from nanollm.hf_folder.forms import NANOLLM, from_hf_config, to_hf_config
from nanollm.model import Transformer

if TYPE_CHECKING:
    from nanollm.tokenizer import Tokenizer

__all__ = [
    "HF_CONFIG",
    "HF_GENERATION_CONFIG",
    "HF_WEIGHTS",
    "REMOTE_CODE_FILES",
    "export_hf",
    "hf_key",
    "load_hf",
    "our_key",
    "read_hf_config",
]

log = logging.getLogger(__name__)

HF_CONFIG, HF_WEIGHTS, HF_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
HF_GENERATION_CONFIG = "generation_config.json"
REMOTE_CODE_FILES = ("configuration_nanollm.py", "modeling_nanollm.py")  # the custom form's code, in the folder

_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {  # a parameter of layer i, ours -> theirs
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention.value_mix": "self_attn.value_mix",
    "attention.value_embed_mix": "self_attn.value_embed_mix",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# gelu and relu2 have no gate: their input matrix w1 is the up projection, and there is no w3
_UNGATED = {k: v for k, v in _LAYER.items() if k != "feed_forward.w3.weight"} | {
    "feed_forward.w1.weight": "mlp.up_proj.weight"
}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_BACK = {True: {v: k for k, v in _LAYER.items()}, False: {v: k for k, v in _UNGATED.items()}}


# ---------------------------------------------------------------------------- names


def hf_key(key: str, gated: bool = True) -> str:
    """Our state_dict key -> HF's: "layers.0.attention.wq.weight" -> "model.layers.0.self_attn.q_proj.weight".

    gated: the MLP is swiglu (w1 is the gate); False for gelu and relu2 (w1 is the up projection).
    """
    if key in _TOP:
        return _TOP[key]
    if key == "skip_weights" or key.startswith("value_embeds."):  # the custom form's, under model.
        return f"model.{key}"
    _, i, rest = key.split(".", 2)  # "layers", "0", "attention.wq.weight"
    return f"model.layers.{i}.{(_LAYER if gated else _UNGATED)[rest]}"


def our_key(key: str, gated: bool = True) -> str | None:
    """The HF key -> ours, or None for a key we do not know (biases included: our layers have none)."""
    if key in _TOP_BACK:
        return _TOP_BACK[key]
    ours = key.removeprefix("model.")
    if ours == "skip_weights" or re.fullmatch(r"value_embeds\.\d+\.weight", ours):
        return ours
    parts = key.split(".", 3)  # "model", "layers", "0", "self_attn.q_proj.weight"
    if len(parts) < 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        return None
    ours = _BACK[gated].get(parts[3])
    return f"layers.{parts[2]}.{ours}" if ours else None


# ---------------------------------------------------------------------------- folders


def _safetensors_torch() -> Any:
    """safetensors.torch, imported on first use; a one-line error where it is not installed."""
    try:
        import safetensors.torch
    except ImportError:
        raise NanollmError("the Hugging Face format needs safetensors: pip install safetensors") from None
    return safetensors.torch


def export_hf(
    model: Transformer, out_dir: str | Path, *, tokenizer: Tokenizer | None = None, form: str | None = None
) -> Path:
    """Write `model` as a folder that transformers' AutoModelForCausalLM loads; atomic.

    The form (Llama, Qwen3 or the custom nanollm one) is forms.export_form's choice unless
    `form` names one (the bench's peer asks for "llama"); a form that cannot compute the model
    is a NanollmError. The custom form's folder carries its code (REMOTE_CODE_FILES) and an
    auto_map, so it loads with trust_remote_code=True.

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
    hf_cfg = to_hf_config(model.cfg, model.vocab_size, dtype=dtype, eos_token_id=eot, form=form)
    gated = model.cfg.mlp == "swiglu"
    state = {hf_key(k, gated): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        del state["lm_head.weight"]
    with atomic_path(out_dir, directory=True) as tmp:
        _write_json(tmp / HF_CONFIG, hf_cfg)
        save_file(state, str(tmp / HF_WEIGHTS), metadata={"format": "pt"})  # "pt": what transformers expects
        # safetensors renames its own 0600 temporary into place; give it config.json's mode (the umask's)
        shutil.copymode(tmp / HF_CONFIG, tmp / HF_WEIGHTS)
        if hf_cfg["model_type"] == NANOLLM:
            for template in (
                Path(__file__).with_name("configuration_nanollm.py"),
                Path(__file__).with_name("modeling_nanollm.py"),
            ):
                (tmp / template.name).write_bytes(template.read_bytes())
        if tokenizer is not None:
            from nanollm.tokenizer.hf import write_hf_tokenizer

            # pad: we have no pad token, and <|endoftext|> is what generate falls back to (with a warning)
            _write_json(tmp / HF_GENERATION_CONFIG, {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot})
            write_hf_tokenizer(tokenizer, tmp, model_max_length=model.cfg.block_size)
    with_tokenizer = " and the tokenizer" if tokenizer is not None else ""
    log.info("exported %d tensors%s to %s as %s", len(state), with_tokenizer, out_dir, hf_cfg["architectures"][0])
    return Path(out_dir)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """The parsed config.json of a Hugging Face model folder."""
    return read_json_object(Path(hf_dir) / HF_CONFIG, "pass a Hugging Face model folder (config.json + safetensors)")


def load_hf(hf_dir: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """Build our Transformer from a Llama, Qwen3 or nanollm folder (model.safetensors, or shards with their
    index); eval mode. The custom form's code files in the folder are not run: config.json says it all.

    Weights are cast to `dtype` (fp32 by default: what our training and evaluation run in).
    Any weight the architecture does not account for, or one it lacks, is a NanollmError
    naming the first such key.
    """
    hf_dir = Path(hf_dir)
    cfg, vocab = from_hf_config(read_hf_config(hf_dir), hf_dir / HF_CONFIG)
    model = Transformer(cfg, vocab)
    gated = cfg.mlp == "swiglu"
    state: dict[str, torch.Tensor] = {}
    for key, tensor in _read_safetensors(hf_dir).items():
        if key.endswith("rotary_emb.inv_freq"):  # old transformers saved RoPE tables; ours are computed
            continue
        ours = our_key(key, gated)
        if ours is None:
            raise NanollmError(f"{hf_dir}: weight {key!r} has no place in a nanollm model; unsupported architecture")
        state[ours] = tensor.to(dtype)
    if cfg.tie_embeddings:
        state.setdefault("output.weight", state.get("tok_embeddings.weight"))
    expected = model.state_dict()
    for key in state.keys() - expected.keys():  # e.g. a layer index past num_hidden_layers
        raise NanollmError(f"{hf_dir}: weight {hf_key(key, gated)!r} has no place in a model of this config.json")
    for key, ref in expected.items():
        got = state.get(key)
        if got is None:
            raise NanollmError(f"{hf_dir}: weight {hf_key(key, gated)!r} is missing from the safetensors files")
        if got.shape != ref.shape:
            raise NanollmError(
                f"{hf_dir}: weight {hf_key(key, gated)!r} has shape {tuple(got.shape)}, "
                f"config.json implies {tuple(ref.shape)}"
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
