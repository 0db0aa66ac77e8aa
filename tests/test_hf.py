"""Hugging Face interop: exported folders load in transformers' LlamaForCausalLM with equal logits, import
reverses export, unsupported configs fail naming their field, architecture options Llama cannot express are
refused in one line (export-hf and the bench's transformers peer alike); the exported tokenizer encodes and decodes
exactly as tiktoken does, pipeline("text-generation") continues a prompt as `nanollm generate` does, the
files get plain permissions; and the export-hf / import-hf commands."""

import ast
import dataclasses
import json
import logging
import os
import shutil
import stat
import subprocess
import sys

import pytest
import tiktoken
import torch
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from nanollm.checkpoint import load_model, read_checkpoint_info, save_checkpoint
from nanollm.config import ModelConfig, TokenizerConfig
from nanollm.errors import NanollmError
from nanollm.hf_folder import (
    HF_CONFIG,
    HF_GENERATION_CONFIG,
    HF_WEIGHTS,
    REMOTE_CODE_FILES,
    export_form,
    export_hf,
    from_hf_config,
    hf_key,
    llama_counterpart,
    llama_incompatibility,
    load_hf,
    our_key,
    to_hf_config,
)
from nanollm.inference.generate import generate
from nanollm.model import Transformer
from nanollm.tokenizer import create_tokenizer, gpt2, load_tokenizer
from nanollm.tokenizer.hf import HF_TOKENIZER_FILES, hf_tokenizer, oniguruma_pattern
from nanollm.tokenizer.patterns import SPLIT_PATTERNS
from stages.cli import cli

VOCAB = 89


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # the test machine's cores are shared


def _model(**overrides) -> Transformer:
    """A tiny random model whose norm gains and value mixes are random too: a gain or mix that an export
    drops, swaps or misnames changes the logits (at their initial ones and halves it might not)."""
    torch.manual_seed(0)
    cfg = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16, "init_std": 0.2, **overrides}
    model = Transformer(ModelConfig(**cfg), VOCAB).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.uniform_(0.5, 1.5)
    return model


def _load(folder, form: str):
    """transformers' AutoModelForCausalLM over an exported folder: remote code for the custom form only."""
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoModelForCausalLM
    return auto.from_pretrained(folder, local_files_only=True, trust_remote_code=form == "nanollm").eval()


# (form, architecture options): each form, with GQA, untied heads, another RoPE base and eps on the way
FORM_CASES = [
    ("llama", {"n_kv_head": 2, "tie_embeddings": True}),
    ("llama", {"tie_embeddings": False, "rope_theta": 500.0, "mlp_hidden": 48}),
    ("qwen3", {"qk_norm": True, "n_kv_head": 2}),
    ("qwen3", {"qk_norm": True, "tie_embeddings": False, "norm_eps": 0.5, "rope_theta": 500.0}),  # eps reaches q_norm
    ("nanollm", {"qk_norm": True, "value_residual": True, "value_embeddings": 1}),  # params.yaml's default options
    ("nanollm", {"value_residual": True, "n_kv_head": 1, "tie_embeddings": False}),
    ("nanollm", {"mlp": "relu2", "logit_softcap": 3.0, "tie_embeddings": False, "n_kv_head": 2}),
    ("nanollm", {"mlp": "gelu", "qk_norm": True, "norm_eps": 0.5}),
    ("nanollm", {"n_layer": 4, "value_embeddings": 2, "unet_skips": True, "qk_norm": True, "value_residual": True}),
    ("nanollm", {"n_layer": 5, "value_embeddings": 1, "unet_skips": True, "n_kv_head": 2}),  # a middle layer alone
]
CASE_IDS = [
    "llama-gqa-tied",
    "llama-untied-theta-hidden",
    "qwen3-gqa-tied",
    "qwen3-untied-eps",
    "custom-default",
    "custom-mqa-untied",
    "custom-relu2-softcap",
    "custom-gelu-qknorm",
    "custom-value-embeddings-unet",
    "custom-odd-depth-gqa",
]
ARCHITECTURE = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "nanollm": "NanollmForCausalLM"}


@pytest.mark.parametrize("form,overrides", FORM_CASES, ids=CASE_IDS)
def test_each_form_loads_in_transformers_with_equal_logits_and_imports_back(tmp_path, form, overrides):
    model = _model(**overrides)
    assert export_form(model.cfg).name == form
    export_hf(model, tmp_path / "hf")  # no tokenizer: the model alone
    code = list(REMOTE_CODE_FILES) if form == "nanollm" else []
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == sorted([HF_CONFIG, HF_WEIGHTS, *code])
    config = json.loads((tmp_path / "hf" / HF_CONFIG).read_text())
    assert config["architectures"] == [ARCHITECTURE[form]] and ("auto_map" in config) == (form == "nanollm")
    hf = _load(tmp_path / "hf", form)
    assert type(hf).__name__ == ARCHITECTURE[form]
    assert hf.config.num_key_value_heads == model.cfg.kv_heads and hf.config.eos_token_id is None
    tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert tied == model.cfg.tie_embeddings
    idx = torch.randint(0, VOCAB, (2, 24))  # 24 > block_size 16: RoPE past the trained length agrees too
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits.float(), model(idx), atol=1e-4, rtol=1e-4)

    back = load_hf(tmp_path / "hf")  # import-hf's reader: the same architecture and the same numbers
    assert back.cfg == model.cfg and back.vocab_size == VOCAB
    assert back.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_the_qwen3_form_is_transformers_own_class():
    """No remote code: the stock class computes it, so it loads without trust_remote_code (and in vLLM/llama.cpp)."""
    transformers = pytest.importorskip("transformers")
    cfg = to_hf_config(ModelConfig(n_layer=2, n_head=4, n_embd=32, qk_norm=True), VOCAB)
    qwen3 = transformers.Qwen3Config(**cfg)
    assert qwen3.head_dim == 8 and qwen3.rms_norm_eps == 1e-5 and not qwen3.attention_bias
    assert qwen3.use_sliding_window is False and set(qwen3.layer_types) == {"full_attention"}
    assert transformers.Qwen3ForCausalLM.__module__.startswith("transformers.models.qwen3")


@pytest.mark.parametrize(
    "form,overrides", [FORM_CASES[i] for i in (0, 2, 4, 6)], ids=["llama", "qwen3", "custom", "relu2"]
)
def test_generate_uses_the_kv_cache_and_equals_the_uncached_greedy(tmp_path, form, overrides):
    """With use_cache every forward after the prompt gets one token and the cache grows to hold every position;
    greedy tokens equal the uncached run's and nanollm's own greedy decoding."""
    model = _model(**{**overrides, "init_std": 0.3})
    export_hf(model, tmp_path / "hf")
    hf = _load(tmp_path / "hf", form)
    lengths = []
    hf.register_forward_pre_hook(lambda _, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    prompt, new = [5, 17, 3, 60, 2], 12
    ids = torch.tensor([prompt])
    greedy = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    cached = hf.generate(ids, **greedy, use_cache=True, return_dict_in_generate=True)
    assert lengths == [len(prompt)] + [1] * (new - 1)
    cache = cached.cache if "cache" in type(cached).__dataclass_fields__ else cached.past_key_values  # 5.x / 4.x
    assert cache.get_seq_length() == len(prompt) + new - 1  # the last token needs no forward
    lengths.clear()
    uncached = hf.generate(ids, **greedy, use_cache=False)
    assert lengths == list(range(len(prompt), len(prompt) + new))  # the whole sequence, every step
    assert cached.sequences.tolist() == uncached.tolist()
    model.pack_for_decode()  # as `nanollm generate` decodes
    assert list(generate(model, prompt, new, temperature=0.0)) == uncached[0, len(prompt) :].tolist()


def test_the_custom_form_generates_a_left_padded_batch_as_each_prompt_alone(tmp_path):
    """The 2-D padding mask hides the pads and positions count from each row's first real token."""
    export_hf(_model(qk_norm=True, value_residual=True, init_std=0.3), tmp_path / "hf")
    hf = _load(tmp_path / "hf", "nanollm")
    prompts = [[5, 17, 3, 60, 2, 8, 9], [40, 41]]
    greedy = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    alone = [hf.generate(torch.tensor([p]), **greedy)[0, len(p) :].tolist() for p in prompts]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch = hf.generate(ids, attention_mask=mask, **greedy)[:, width:].tolist()
    assert batch == alone


def test_the_custom_form_runs_where_nanollm_cannot_be_imported(tmp_path):
    """The remote code imports torch and transformers only; a fresh interpreter with nanollm blocked loads it."""
    model = _model(qk_norm=True, value_residual=True, mlp="relu2", logit_softcap=3.0, tie_embeddings=False)
    export_hf(model, tmp_path / "hf")
    for name in REMOTE_CODE_FILES:
        tree = ast.parse((tmp_path / "hf" / name).read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert imported <= {"__future__", "torch", "transformers"}, (name, imported)
    idx = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        torch.save({"idx": idx, "logits": model(idx)}, tmp_path / "expected.pt")
    script = (
        "import sys; sys.modules['nanollm'] = None\n"  # `import nanollm` now raises ImportError
        "import torch, transformers\n"
        f"folder = {str(tmp_path / 'hf')!r}\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()\n"
        f"e = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(m(e['idx']).logits, e['logits'], atol=1e-4, rtol=1e-4)\n"
        "assert 'nanollm' not in {k.split('.')[0] for k, v in sys.modules.items() if v is not None}\n"
        "print(type(m).__name__)\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "NanollmForCausalLM"


def test_greedy_generation_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from nanollm.inference.generate import generate

    model = _model(n_kv_head=2, init_std=0.3)
    export_hf(model, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    prompt = [5, 17, 3, 60]
    model.pack_for_decode()  # as `nanollm generate` decodes
    ours = list(generate(model, prompt, 12, temperature=0.0))
    ids = torch.tensor([prompt])
    theirs = hf.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert ours == theirs[0, len(prompt) :].tolist()


def test_names_round_trip():
    for overrides in [{"tie_embeddings": False, "qk_norm": True, "value_residual": True}, {"mlp": "gelu"}]:
        model = _model(**overrides)
        gated = model.cfg.mlp == "swiglu"
        for key in model.state_dict():
            assert our_key(hf_key(key, gated), gated) == key
    assert hf_key("layers.1.attention.value_mix") == "model.layers.1.self_attn.value_mix"
    assert hf_key("layers.0.feed_forward.w1.weight", gated=False) == "model.layers.0.mlp.up_proj.weight"
    assert our_key("model.layers.0.mlp.up_proj.weight", gated=False) == "layers.0.feed_forward.w1.weight"
    assert our_key("model.layers.0.self_attn.q_proj.bias") is None
    assert our_key("classifier.weight") is None


@pytest.mark.parametrize(
    "overrides,form,why",
    [
        ({}, "llama", "no option Llama lacks is on"),
        ({"zero_init_proj": True}, "llama", "no option Llama lacks is on"),
        ({"qk_norm": True}, "qwen3", "qk_norm without value_residual"),
        ({"qk_norm": True, "value_residual": True}, "nanollm", "value_residual: no stock architecture"),
        ({"value_residual": True}, "nanollm", "value_residual: no stock architecture"),
        ({"qk_norm": True, "logit_softcap": 15.0}, "nanollm", "logit_softcap: no stock architecture"),
        ({"mlp": "gelu"}, "nanollm", "mlp gelu: no stock architecture"),
        ({"mlp": "relu2", "qk_norm": True}, "nanollm", "mlp relu2: no stock architecture"),
        ({"qk_norm": True, "value_embeddings": 1}, "nanollm", "value_embeddings: no stock architecture"),
        ({"qk_norm": True, "unet_skips": True}, "nanollm", "unet_skips: no stock architecture"),
    ],
)
def test_the_form_is_chosen_by_architecture(overrides, form, why):
    chosen = export_form(ModelConfig(**overrides))
    assert chosen.name == form and chosen.why.startswith(why)
    assert to_hf_config(ModelConfig(**overrides), VOCAB)["model_type"] == form


def test_a_form_that_cannot_compute_the_model_is_a_one_line_error(tmp_path):
    model = _model(qk_norm=True, value_residual=True)
    for form, start in [("qwen3", "the qwen3 form needs qk_norm alone"), ("gguf", "unknown export form 'gguf'")]:
        with pytest.raises(NanollmError) as err:
            export_hf(model, tmp_path / "hf", form=form)
        assert str(err.value).startswith(start) and "\n" not in str(err.value)
    assert not (tmp_path / "hf").exists()
    export_hf(_model(), tmp_path / "hf", form="nanollm")  # the custom form computes any architecture
    assert json.loads((tmp_path / "hf" / HF_CONFIG).read_text())["model_type"] == "nanollm"


NO_LLAMA_FORM = [
    ({"mlp": "relu2"}, "model.mlp is 'relu2': Llama's MLP is gated SiLU (swiglu)"),
    ({"qk_norm": True}, "model.qk_norm: true has no Llama equivalent (Llama's attention normalises neither"),
    ({"logit_softcap": 15.0, "tie_embeddings": False}, "model.logit_softcap: 15.0 has no Llama equivalent ("),
    ({"value_residual": True}, "model.value_residual: true has no Llama equivalent (Llama's attention reads only"),
    ({"value_embeddings": 1}, "model.value_embeddings: 1 has no Llama equivalent (Llama's values come from"),
    ({"unet_skips": True}, "model.unet_skips: true has no Llama equivalent (Llama's layers read only"),
]


@pytest.mark.parametrize(
    "overrides,start",
    NO_LLAMA_FORM,
    ids=["relu2", "qk_norm", "logit_softcap", "value_residual", "value_embeddings", "unet_skips"],
)
def test_options_without_a_llama_form_are_refused_in_one_line(tmp_path, overrides, start):
    model = _model(**overrides)
    with pytest.raises(NanollmError) as err:
        export_hf(model, tmp_path / "hf", form="llama")  # as the bench's transformers peer asks
    message = str(err.value)
    assert message.startswith(start) and "\n" not in message
    assert message.endswith(("export a model trained without it", "train with model.mlp: swiglu to export it"))
    assert message == llama_incompatibility(model.cfg)
    assert not (tmp_path / "hf").exists()


def test_only_the_first_obstacle_is_named_and_zero_init_is_none():
    everything = ModelConfig(mlp="relu2", qk_norm=True, logit_softcap=15.0, value_residual=True)
    assert llama_incompatibility(everything).startswith("model.mlp is 'relu2'")
    assert llama_incompatibility(ModelConfig(qk_norm=True, value_residual=True)).startswith("model.qk_norm")
    assert llama_incompatibility(ModelConfig()) is None
    assert llama_incompatibility(ModelConfig(zero_init_proj=True)) is None  # only where training starts


def test_the_llama_counterpart_keeps_the_shape_and_drops_what_llama_cannot_express():
    cfg = ModelConfig(n_layer=3, n_embd=64, n_head=4, qk_norm=True, value_residual=True, logit_softcap=15.0)
    counterpart = llama_counterpart(cfg)
    assert llama_incompatibility(counterpart) is None
    assert (counterpart.n_layer, counterpart.n_embd, counterpart.head_dim, counterpart.hidden_dim) == (
        cfg.n_layer,
        cfg.n_embd,
        cfg.head_dim,
        cfg.hidden_dim,
    )
    assert llama_counterpart(ModelConfig(mlp="relu2")) is None  # other matrices: no counterpart


def test_a_model_trained_from_zero_projections_exports_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _model(zero_init_proj=True, tie_embeddings=False)
    with torch.no_grad():  # what training makes of the zeros: ordinary weights
        for layer in model.layers:
            for linear in (layer.attention.wo, layer.feed_forward.w2):
                linear.weight.normal_(0.0, 0.2)
    export_hf(model, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    idx = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits.float(), model(idx), atol=1e-4, rtol=1e-4)


def test_the_transformers_peer_refuses_with_the_same_line():
    pytest.importorskip("transformers")
    from nanollm.inference.peers import transformers_twin

    model = _model(qk_norm=True)
    with pytest.raises(NanollmError) as err:
        transformers_twin(model)
    assert str(err.value) == llama_incompatibility(model.cfg)


def _hf_config(**changes):
    cfg = to_hf_config(ModelConfig(n_layer=2, n_head=4, n_embd=32), VOCAB)
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"model_type": "bert"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters.rope_type"),
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
        ({"head_dim": 16}, "head_dim"),
        ({"hidden_act": "relu", "attention_bias": True}, "hidden_act"),  # the first one is named
        ({"model_type": "qwen3", "use_sliding_window": True}, "use_sliding_window"),
        ({"model_type": "qwen3", "layer_types": ["full_attention", "sliding_attention"]}, "use_sliding_window"),
        ({"model_type": "nanollm", "mlp": "geglu"}, "mlp"),
    ],
)
def test_unsupported_config_fields_are_named_in_one_line(changes, field):
    with pytest.raises(NanollmError) as err:
        from_hf_config(_hf_config(**changes), "x/config.json")
    message = str(err.value)
    assert f"unsupported config field {field!r}" in message and message.startswith("x/config.json")
    assert "\n" not in message


def test_config_translation_and_defaults():
    cfg, vocab = from_hf_config(_hf_config(num_key_value_heads=4, rope_theta=123.0, rope_parameters=None))
    assert vocab == VOCAB and cfg.n_kv_head is None and cfg.rope_theta == 123.0 and cfg.mlp_hidden is None
    minimal = {k: _hf_config()[k] for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size")}
    with pytest.raises(NanollmError, match="'num_hidden_layers' is missing"):
        from_hf_config(minimal)
    cfg, _ = from_hf_config({**minimal, "num_hidden_layers": 1, "num_attention_heads": 4})
    assert (cfg.norm_eps, cfg.tie_embeddings, cfg.block_size) == (1e-6, False, 2048)  # LlamaConfig's defaults
    with pytest.raises(NanollmError, match="n_kv_head"):
        from_hf_config(_hf_config(num_key_value_heads=3))


def test_missing_or_misshapen_weights_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    export_hf(_model(), tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / HF_WEIGHTS)
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "hf" / HF_WEIGHTS)
    with pytest.raises(NanollmError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        load_hf(tmp_path / "hf")
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(weights, tmp_path / "hf" / HF_WEIGHTS)
    with pytest.raises(NanollmError, match=r"up_proj.weight' has shape \(3, 3\)"):
        load_hf(tmp_path / "hf")
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.gate_proj.weight"].clone()
    weights["model.layers.1.mlp.up_proj.bias"] = torch.zeros(128)
    save_file(weights, tmp_path / "hf" / HF_WEIGHTS)
    with pytest.raises(NanollmError, match="'model.layers.1.mlp.up_proj.bias' has no place"):
        load_hf(tmp_path / "hf")
    del weights["model.layers.1.mlp.up_proj.bias"]
    weights["model.layers.2.mlp.up_proj.weight"] = weights["model.layers.1.mlp.gate_proj.weight"].clone()
    save_file(weights, tmp_path / "hf" / HF_WEIGHTS)
    with pytest.raises(NanollmError, match="'model.layers.2.mlp.up_proj.weight' has no place"):
        load_hf(tmp_path / "hf")
    with pytest.raises(NanollmError, match="config.json is missing"):
        load_hf(tmp_path)


# ---------------------------------------------------------------------------- commands


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": {"enabled": False}}))
    save_checkpoint(
        tmp_path / "models" / "checkpoint",
        _model(n_kv_head=2),
        train_state={"step": 3, "tokens_seen": 0},
        info={"tokenizer_sha256": None, "corpus_sha256": None},
    )
    return tmp_path


def test_export_then_import_commands_round_trip(project, caplog):
    runner = CliRunner()
    with caplog.at_level(logging.WARNING):
        result = runner.invoke(cli, ["export-hf", "--out", "hf"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    warning = [r.getMessage() for r in caplog.records if "without a tokenizer" in r.getMessage()]
    assert len(warning) == 1 and "pass --tokenizer" in warning[0] and "\n" not in warning[0]
    assert json.loads((project / "hf" / HF_CONFIG).read_text())["eos_token_id"] is None  # no data/tokenizer here
    assert sorted(p.name for p in (project / "hf").iterdir()) == [HF_CONFIG, HF_WEIGHTS]
    result = runner.invoke(cli, ["import-hf", "hf", "--out", "models/imported"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    original, imported = load_model(project / "models" / "checkpoint"), load_model(project / "models" / "imported")
    assert imported.cfg == original.cfg
    idx = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        assert torch.equal(imported(idx), original(idx))
    assert read_checkpoint_info(project / "models" / "imported")["imported_from"] == "hf"


@pytest.mark.parametrize(
    "overrides,said",
    [
        ({}, "Llama form (LlamaForCausalLM): no option Llama lacks is on"),
        ({"qk_norm": True}, "Qwen3 form (Qwen3ForCausalLM): qk_norm without value_residual"),
        (
            {"qk_norm": True, "value_residual": True},
            "custom form (NanollmForCausalLM): value_residual: no stock architecture; load with trust_remote_code",
        ),
    ],
    ids=["llama", "qwen3", "custom"],
)
def test_export_command_says_which_form_it_wrote_and_why(project, overrides, said):
    save_checkpoint(
        project / "models" / "checkpoint",
        _model(**overrides),
        train_state={"step": 3, "tokens_seen": 0},
        info={"tokenizer_sha256": None, "corpus_sha256": None},
    )
    result = CliRunner().invoke(cli, ["export-hf", "--out", "hf"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().endswith(f"; {said}")
    result = CliRunner().invoke(cli, ["import-hf", "hf", "--out", "models/imported"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert load_model(project / "models" / "imported").cfg == load_model(project / "models" / "checkpoint").cfg


def test_import_command_errors_are_one_line(project):
    runner = CliRunner()
    result = runner.invoke(cli, ["import-hf"])
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0 and "DIR" in result.output
    export_hf(_model(), project / "hf")
    cfg = json.loads((project / "hf" / HF_CONFIG).read_text())
    (project / "hf" / HF_CONFIG).write_text(json.dumps({**cfg, "mlp_bias": True}))
    result = runner.invoke(cli, ["import-hf", "hf"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: hf/config.json: unsupported config field 'mlp_bias': is true; nanollm's linear layers have no biases"
    )
    assert not (project / "models" / "imported").exists()


def test_export_with_the_tokenizer_is_complete_and_import_still_round_trips(project):
    tok = create_tokenizer(TokenizerConfig(vocab_size=260), ["abc abd abe"] * 4, project / "data" / "tokenizer")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=16), tok.vocab_size)
    _save(project / "models" / "checkpoint", model, tok)
    runner = CliRunner()
    result = runner.invoke(cli, ["export-hf", "--out", "hf"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (project / "hf").iterdir()) == sorted(
        [HF_CONFIG, HF_WEIGHTS, HF_GENERATION_CONFIG, *HF_TOKENIZER_FILES]
    )
    config = json.loads((project / "hf" / HF_CONFIG).read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == tok.eot_id
    generation = json.loads((project / "hf" / HF_GENERATION_CONFIG).read_text())
    assert generation["eos_token_id"] == generation["bos_token_id"] == tok.eot_id

    # import-hf reads config.json and the weights, and leaves the tokenizer files alone
    result = runner.invoke(cli, ["import-hf", "hf", "--out", "models/imported"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    imported = load_model(project / "models" / "imported")
    assert imported.cfg == model.cfg
    for key, value in model.state_dict().items():
        assert torch.equal(imported.state_dict()[key], value), key

    other = create_tokenizer(TokenizerConfig(vocab_size=258), ["xyz"] * 4, project / "other")
    result = runner.invoke(cli, ["export-hf", "--out", "hf2", "--tokenizer", "other"])
    assert result.exit_code == 1 and "pass the matching --tokenizer" in result.output
    assert not (project / "hf2").exists() and other.sha256 != tok.sha256


def _save(folder, model, tok):
    save_checkpoint(
        folder,
        model,
        train_state={"step": 1, "tokens_seen": 0},
        info={"tokenizer_sha256": tok.sha256, "corpus_sha256": None},
    )


def test_exported_files_get_the_permissions_of_a_plain_file(tmp_path):
    """safetensors writes a 0600 temporary and renames it; every output must look as open() would make it."""
    tok = create_tokenizer(TokenizerConfig(vocab_size=260), ["abc abd abe"] * 4, tmp_path / "tok", progress=False)
    old = os.umask(0o027)  # not the usual 022, so no mode matches by accident
    try:
        export_hf(
            Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=16), tok.vocab_size), tmp_path / "hf", tokenizer=tok
        )
        (tmp_path / "plain.txt").write_text("x")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    files = {p.name: _mode(p) for p in (tmp_path / "hf").iterdir()}
    assert sorted(files) == sorted([HF_CONFIG, HF_WEIGHTS, HF_GENERATION_CONFIG, *HF_TOKENIZER_FILES])
    assert files == dict.fromkeys(files, _mode(tmp_path / "plain.txt")) and _mode(tmp_path / "plain.txt") == 0o640
    assert _mode(tmp_path / "hf") == _mode(tmp_path / "plain") == 0o750


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------- the tokenizer

# Texts the split regexes and byte-level BPE find hard, in one place: scripts, emoji sequences,
# whitespace runs (trailing ones hit the `\s++$` branch), code, digit runs (gpt4 cuts them in
# threes), contractions in both cases, and special-token text, which is text.
TRICKY = [
    "",
    " ",
    "a",
    "\n\n\n",
    "   leading and trailing   ",
    "line\n  \n\tindented\n",
    "tabs\tand\r\nwindows\rlines\r\n",
    "\u00a0no-break\u3000ideographic\u2028line sep\x85nel ",
    "def add(a, b):\n    return a + b  # café\n\n\nclass Point:\n    pass\n",
    "if x<=10 and y!=0: print(f'{x!r:>8}')  # >>> [1, 2, 3]",
    "12345 678 9 1234567890 3.14159 -0.5e-10 ١٢٣٤٥ ²³",
    "it's IT'S they'll We'VE I'd you're ſ'S",
    "Les élèves étudient à l'école. Ça va? Naïve",
    "你好，世界！漢字かなカナ한국어 שָׁלוֹם مرحبا",
    "e\u0301 a\u0308 n\u0303 \u20dd",
    "🙂🙂👍🏽 👩‍👩‍👧 🏳️‍🌈 \U0010ffff \x00\x01\x7f \ufffd",
    "<|endoftext|> inside text <|endoftext|><|pad|>",
    "aaaaaaaaaaaaaaaaaaaaa ababababababab ========== ---------- ____",
]
CORPUS = [t for t in TRICKY if t] + [
    "for i in range(10):\n    print(i, i ** 2)  # squares\n",
    "The quick brown fox jumps over the lazy dog. 2024-01-01 12:34:56",
]


@pytest.fixture(scope="module", params=["gpt4", "gpt2"])
def tok(request, tmp_path_factory):
    cfg = TokenizerConfig(vocab_size=600, split_pattern=request.param, special_tokens=("<|endoftext|>", "<|pad|>"))
    return create_tokenizer(cfg, CORPUS * 3, tmp_path_factory.mktemp(request.param), progress=False)


@pytest.fixture(scope="module")
def auto(tok, tmp_path_factory):
    """AutoTokenizer over a complete exported folder (a small random model with it, as export-hf writes)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf") / "hf"
    torch.manual_seed(0)
    export_hf(Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=16), tok.vocab_size), folder, tokenizer=tok)
    return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


@pytest.mark.parametrize("text", TRICKY)
def test_auto_tokenizer_encodes_and_decodes_as_tiktoken(tok, auto, text):
    ids = auto(text)["input_ids"]
    assert ids == [tok.eot_id, *tok.encode(text)]  # <|endoftext|> first, as `nanollm generate` does
    assert auto(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert auto.decode(ids, skip_special_tokens=True) == text
    assert auto.decode(ids) == tok.decode(ids) == "<|endoftext|>" + text


def test_auto_tokenizer_names_endoftext_bos_and_eos(tok, auto):
    assert auto.bos_token == auto.eos_token == "<|endoftext|>"
    assert auto.bos_token_id == auto.eos_token_id == tok.eot_id
    assert auto.convert_tokens_to_ids("<|pad|>") == tok.special_tokens["<|pad|>"]
    assert len(auto) == tok.vocab_size
    pair = auto("ab", "cd")["input_ids"]  # two texts: two documents, each after its separator
    assert pair == [tok.eot_id, *tok.encode("ab"), tok.eot_id, *tok.encode("cd")]
    for cut in [b"\xc3", b"a\xe4\xbd b\xf0\x9f\x99", b"\xed\xa0\x80\xff"]:  # cut characters, a surrogate
        ids = tok.encode_bytes(cut)
        assert auto.decode(ids) == tok.decode(ids) == cut.decode("utf-8", errors="replace")


# any text, and text of a few repeating fragments: where two splits of one token could compete
# (tiktoken breaks such ties leftmost, tokenizers by merge order; see nanollm/tokenizer/hf.py)
_RUNS = st.lists(st.sampled_from(["a", "b", "ab", " ", "=", "\n", "é", "1"]), max_size=60).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=st.one_of(st.text(max_size=80), _RUNS))
def test_auto_tokenizer_equals_tiktoken_on_any_text(tok, auto, text):
    assert auto(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def _tiktoken_chunks(pattern: str, text: str) -> list[str]:
    """The chunks tiktoken's regex engine cuts `text` into: with every substring a token, each chunk is one token."""
    data = text.encode()
    pieces = {data[i:j] for i in range(len(data)) for j in range(i + 1, len(data) + 1)} - {bytes([b]) for b in data}
    ranks = {bytes([b]): b for b in range(256)} | {piece: 256 + k for k, piece in enumerate(sorted(pieces))}
    enc = tiktoken.Encoding("chunks", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    return [enc.decode_single_token_bytes(i).decode() for i in enc.encode_ordinary(text)]


@pytest.mark.parametrize("name", sorted(SPLIT_PATTERNS))
def test_split_regex_cuts_chunks_as_tiktoken(name):
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(oniguruma_pattern(SPLIT_PATTERNS[name])), behavior="isolated")
    for text in TRICKY:
        assert [chunk for chunk, _ in split.pre_tokenize_str(text)] == _tiktoken_chunks(SPLIT_PATTERNS[name], text)


def test_oniguruma_pattern_rewrites_what_ruby_syntax_reads_otherwise():
    # possessive bounded repeats become atomic groups, whatever the atom
    assert oniguruma_pattern(r"\p{N}{1,3}+") == r"(?>\p{N}{1,3})"
    assert oniguruma_pattern(r"[a-z}]{2}+x|(ab|c){1,}+") == r"(?>[a-z}]{2})x|(?>(ab|c){1,})"
    # anchors mean the text's ends; inside a class or escaped, $ is a character
    assert oniguruma_pattern(r"^\s++$|[$^]\$") == r"\A\s++\z|[$^]\$"
    # the rest is left as it is: possessive/lazy marks, (?i:), lookahead, nested classes
    for same in [r"'(?i:[sdmt]|ll)| ?\p{L}++|\s+(?!\S)|[^\r\n\p{L}\p{N}]?+", r"a{2}?[[:alpha:]&&[^x]]"]:
        assert oniguruma_pattern(same) == same
    assert oniguruma_pattern(SPLIT_PATTERNS["gpt2"]) == SPLIT_PATTERNS["gpt2"].replace("$", r"\z")
    with pytest.raises(ValueError, match=r"\(\?m\)"):
        oniguruma_pattern(r"(?m)^a$")


def test_special_token_that_is_also_a_regular_token_is_a_one_line_error(tmp_path):
    cfg = TokenizerConfig(vocab_size=300, special_tokens=("<|endoftext|>", "hello"))
    tok = create_tokenizer(cfg, ["hello hello hellos"] * 8, tmp_path, progress=False)
    with pytest.raises(NanollmError, match="special token 'hello' .* is also regular token") as err:
        hf_tokenizer(tok)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(not gpt2.is_cached(), reason="tiktoken's GPT-2 files are not in its local cache")
def test_gpt2_tokenizer_converts_too(tmp_path):
    from nanollm.tokenizer import save_gpt2

    save_gpt2(tmp_path / "tokenizer.json", ["<|endoftext|>"])
    tok = load_tokenizer(tmp_path)
    hf = hf_tokenizer(tok)
    for text in TRICKY:
        assert hf.encode(text).ids == [tok.eot_id, *tok.encode(text)]


# ---------------------------------------------------------------------------- generation


def _stops_early(model: Transformer, eot_id: int, prompt_ids: list[int]) -> Transformer:
    """`model` made to draw <|endoftext|> within a few tokens of greedily continuing `prompt_ids`.

    A random model almost never draws it. Its LM-head row becomes 1.1 times the row of the 4th
    token greedy decoding draws, so wherever that token would win (with a positive logit, as a
    maximum over hundreds of random logits is), <|endoftext|> wins instead: by the 4th token at
    the latest. Elsewhere it seldom wins, so other prompts still run the full length.
    """
    fourth = list(generate(model, prompt_ids, 4, temperature=0.0))[-1]
    with torch.no_grad():
        model.output.weight[eot_id] = 1.1 * model.output.weight[fourth]
    return model


@pytest.fixture(scope="module")
def generation_tokenizer(tmp_path_factory):
    """(folder, tokenizer): trained once for the module, copied into each project."""
    folder = tmp_path_factory.mktemp("tokenizer")
    cfg = TokenizerConfig(vocab_size=600, special_tokens=("<|endoftext|>",))
    return folder, create_tokenizer(cfg, CORPUS * 3, folder, progress=False)


# the options of each export form: Llama, Qwen3, the custom form at params.yaml's default, and with relu2 + softcap
GENERATION_FORMS = {
    "llama": {},
    "qwen3": {"qk_norm": True},
    "custom": {"qk_norm": True, "value_residual": True, "value_embeddings": 1},
    "custom-relu2-softcap": {"value_residual": True, "mlp": "relu2", "logit_softcap": 4.0},
}


@pytest.fixture(params=list(GENERATION_FORMS))
def generation_project(request, tmp_path, monkeypatch, generation_tokenizer):
    """A project folder with a tokenizer, a random checkpoint that stops early on PROMPTS[0], and its HF export."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": {"enabled": False}}))
    folder, tok = generation_tokenizer
    shutil.copytree(folder, tmp_path / "data" / "tokenizer")
    torch.manual_seed(0)
    # untied, init_std 0.3: an untrained model whose greedy text varies instead of repeating one token
    options = GENERATION_FORMS[request.param]
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64, tie_embeddings=False, init_std=0.3)
    model = Transformer(dataclasses.replace(cfg, **options), tok.vocab_size).eval()
    _stops_early(model, tok.eot_id, [tok.eot_id, *tok.encode(PROMPTS[0])])
    _save(tmp_path / "models" / "checkpoint", model, tok)
    result = CliRunner().invoke(cli, ["export-hf", "--out", "hf"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return tmp_path, tok


PROMPTS = ["def add(a, b):", "", "Les élèves 你好 🙂", "x = 12345\n"]
NEW_TOKENS = 24


def test_pipeline_greedy_equals_nanollm_generate(generation_project):
    """What is compared: the full text each prints, exactly, for prompts that stop early and that run the length.

    `nanollm generate --temperature 0` prints the prompt, then each drawn token's bytes
    (incrementally UTF-8 decoded, a cut character as U+FFFD), stops before printing
    <|endoftext|>, and ends with a newline. The pipeline returns prompt + the decoded new
    tokens (return_full_text, the default), stops at eos (generation_config.json) and skips
    special tokens in the text, so the <|endoftext|> it drew is not in it. The only special
    token here is <|endoftext|>, so skipping drops nothing nanollm would print. stdout is read
    as bytes: CliRunner's `result.stdout` turns "\r\n" into "\n", and random models draw "\r".
    """
    transformers = pytest.importorskip("transformers")
    root, tok = generation_project
    remote = json.loads((root / "hf" / HF_CONFIG).read_text())["model_type"] == "nanollm"
    pipe = transformers.pipeline("text-generation", model=str(root / "hf"), trust_remote_code=remote)
    new_counts = []
    for prompt in PROMPTS:
        args = ["generate", "--prompt", prompt, "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS)]
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        text = pipe(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0]["generated_text"]
        assert result.stdout_bytes.decode("utf-8") == text + "\n", prompt

        ids = pipe(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
        prompt_ids = [tok.eot_id, *tok.encode(prompt)]
        assert ids[: len(prompt_ids)] == prompt_ids  # the pipeline's input started with our BOS
        new = ids[len(prompt_ids) :]
        new_counts.append(len(new) - (new[-1:] == [tok.eot_id]))  # tokens printed: the eos is not
    assert new_counts[0] < NEW_TOKENS and NEW_TOKENS in new_counts  # an early stop and a full length were compared
