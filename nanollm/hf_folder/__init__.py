"""Hugging Face model folders: a nanollm Transformer exported for transformers, and such folders imported back.

forms.py chooses the architecture (LlamaForCausalLM, Qwen3ForCausalLM, or the custom
NanollmForCausalLM shipped as remote code) and translates config.json both ways; folder.py
owns the weight names and the files. configuration_nanollm.py and modeling_nanollm.py are
not part of the library's API: they are the custom form's code, copied into each such folder
and run by transformers (trust_remote_code=True), never imported by nanollm. docs/export.md
lists the forms. The tokenizer files are nanollm.tokenizer.hf's.
"""

from nanollm.hf_folder.folder import (
    HF_CONFIG,
    HF_GENERATION_CONFIG,
    HF_WEIGHTS,
    REMOTE_CODE_FILES,
    export_hf,
    hf_key,
    load_hf,
    our_key,
    read_hf_config,
)
from nanollm.hf_folder.forms import (
    FORMS,
    ExportForm,
    export_form,
    from_hf_config,
    llama_counterpart,
    llama_incompatibility,
    to_hf_config,
)

__all__ = [
    "FORMS",
    "HF_CONFIG",
    "HF_GENERATION_CONFIG",
    "HF_WEIGHTS",
    "REMOTE_CODE_FILES",
    "ExportForm",
    "export_form",
    "export_hf",
    "from_hf_config",
    "hf_key",
    "llama_counterpart",
    "llama_incompatibility",
    "load_hf",
    "our_key",
    "read_hf_config",
    "to_hf_config",
]
