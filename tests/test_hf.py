"""Hugging Face interop: exported folders load in transformers' LlamaForCausalLM with equal logits, import
reverses export, unsupported configs fail naming their field, and the export-hf / import-hf commands."""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from nanollm.checkpoint import load_model, read_checkpoint_info, save_checkpoint
from nanollm.config import ModelConfig
from nanollm.errors import NanollmError
from nanollm.hf import HF_CONFIG, HF_WEIGHTS, export_hf, from_hf_config, hf_key, load_hf, our_key, to_hf_config
from nanollm.model import Transformer
from stages.cli import cli

VOCAB = 89


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # the test machine's cores are shared


def _model(**overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16, "init_std": 0.2, **overrides}
    return Transformer(ModelConfig(**cfg), VOCAB).eval()


@pytest.mark.parametrize(
    "overrides",
    [{"n_kv_head": 2, "tie_embeddings": True}, {"tie_embeddings": False, "rope_theta": 500.0, "mlp_hidden": 48}],
    ids=["gqa-tied", "mha-untied-theta-hidden"],
)
def test_export_loads_in_transformers_with_equal_logits(tmp_path, overrides):
    transformers = pytest.importorskip("transformers")
    model = _model(**overrides)
    export_hf(model, tmp_path / "hf", eos_token_id=VOCAB - 1)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [HF_CONFIG, HF_WEIGHTS]
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert hf.config.num_key_value_heads == model.cfg.kv_heads
    assert hf.config.eos_token_id == VOCAB - 1
    tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert tied == model.cfg.tie_embeddings
    idx = torch.randint(0, VOCAB, (2, 24))  # 24 > block_size 16: RoPE past the trained length agrees too
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits.float(), model(idx), atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from nanollm.generate import generate

    model = _model(n_kv_head=2, init_std=0.3)
    export_hf(model, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    prompt = [5, 17, 3, 60]
    ours = list(generate(model, prompt, 12, temperature=0.0))
    ids = torch.tensor([prompt])
    theirs = hf.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert ours == theirs[0, len(prompt) :].tolist()


def test_import_reverses_export(tmp_path):
    model = _model(n_kv_head=1, tie_embeddings=False)
    export_hf(model, tmp_path / "hf")
    back = load_hf(tmp_path / "hf")
    assert back.cfg == model.cfg and back.vocab_size == VOCAB
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_names_round_trip():
    for key in _model(tie_embeddings=False).state_dict():
        assert our_key(hf_key(key)) == key
    assert our_key("model.layers.0.self_attn.q_proj.bias") is None
    assert our_key("classifier.weight") is None


def test_gelu_mlp_has_no_llama_form():
    with pytest.raises(NanollmError, match="model.mlp is 'gelu'"):
        to_hf_config(ModelConfig(mlp="gelu"), VOCAB)


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
        run={"run_id": None, "tracking_uri": None},
    )
    return tmp_path


def test_export_then_import_commands_round_trip(project):
    runner = CliRunner()
    result = runner.invoke(cli, ["export-hf", "--out", "hf"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads((project / "hf" / HF_CONFIG).read_text())["eos_token_id"] is None  # no data/tokenizer here
    result = runner.invoke(cli, ["import-hf", "hf", "--out", "models/imported"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    original, imported = load_model(project / "models" / "checkpoint"), load_model(project / "models" / "imported")
    assert imported.cfg == original.cfg
    idx = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        assert torch.equal(imported(idx), original(idx))
    assert read_checkpoint_info(project / "models" / "imported")["imported_from"] == "hf"


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


def test_export_records_the_tokenizers_endoftext_as_eos(project):
    from nanollm.config import TokenizerConfig
    from nanollm.tokenizer import create_tokenizer

    tok = create_tokenizer(TokenizerConfig(vocab_size=260), ["abc abd abe"] * 4, project / "data" / "tokenizer")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=16), tok.vocab_size)
    save_checkpoint(
        project / "models" / "checkpoint",
        model,
        train_state={"step": 1, "tokens_seen": 0},
        info={"tokenizer_sha256": tok.sha256, "corpus_sha256": None},
        run={"run_id": None, "tracking_uri": None},
    )
    result = CliRunner().invoke(cli, ["export-hf", "--out", "hf"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = json.loads((project / "hf" / HF_CONFIG).read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == tok.eot_id
    other = create_tokenizer(TokenizerConfig(vocab_size=258), ["xyz"] * 4, project / "other")
    result = CliRunner().invoke(cli, ["export-hf", "--out", "hf2", "--tokenizer", "other"])
    assert result.exit_code == 1 and "pass the matching --tokenizer" in result.output
    assert not (project / "hf2").exists() and other.sha256 != tok.sha256
