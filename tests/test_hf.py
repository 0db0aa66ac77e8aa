"""Hugging Face interop: exported folders load in transformers' LlamaForCausalLM with equal logits, import
reverses export, unsupported configs fail naming their field, architecture options Llama cannot express are
refused in one line (export-hf and the bench's transformers peer alike); the exported tokenizer encodes and decodes
exactly as tiktoken does, pipeline("text-generation") continues a prompt as `nanollm generate` does, the
files get plain permissions; and the export-hf / import-hf commands."""

import json
import logging
import os
import stat

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
from nanollm.hf import (
    HF_CONFIG,
    HF_GENERATION_CONFIG,
    HF_WEIGHTS,
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
    export_hf(model, tmp_path / "hf")  # no tokenizer: the model alone
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [HF_CONFIG, HF_WEIGHTS]
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert hf.config.num_key_value_heads == model.cfg.kv_heads
    assert hf.config.eos_token_id is None
    tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert tied == model.cfg.tie_embeddings
    idx = torch.randint(0, VOCAB, (2, 24))  # 24 > block_size 16: RoPE past the trained length agrees too
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits.float(), model(idx), atol=1e-4, rtol=1e-4)


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


NO_LLAMA_FORM = [
    ({"mlp": "relu2"}, "model.mlp is 'relu2': Llama's MLP is gated SiLU (swiglu)"),
    ({"qk_norm": True}, "model.qk_norm: true has no Llama equivalent (Llama's attention normalises neither"),
    ({"logit_softcap": 15.0, "tie_embeddings": False}, "model.logit_softcap: 15.0 has no Llama equivalent ("),
    ({"value_residual": True}, "model.value_residual: true has no Llama equivalent (Llama's attention reads only"),
]


@pytest.mark.parametrize("overrides,start", NO_LLAMA_FORM, ids=["relu2", "qk_norm", "logit_softcap", "value_residual"])
def test_options_without_a_llama_form_are_refused_in_one_line(tmp_path, overrides, start):
    model = _model(**overrides)
    with pytest.raises(NanollmError) as err:
        export_hf(model, tmp_path / "hf")
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


def test_export_command_refuses_an_option_without_a_llama_form_in_one_line(project):
    save_checkpoint(
        project / "models" / "checkpoint",
        _model(value_residual=True),
        train_state={"step": 3, "tokens_seen": 0},
        info={"tokenizer_sha256": None, "corpus_sha256": None},
    )
    result = CliRunner().invoke(cli, ["export-hf", "--out", "hf"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: model.value_residual: true has no Llama equivalent (Llama's attention reads only its own "
        "layer's values); export a model trained without it"
    )
    assert not (project / "hf").exists()


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


@pytest.fixture
def generation_project(tmp_path, monkeypatch):
    """A project folder with a tokenizer, a random checkpoint that stops early on PROMPTS[0], and its HF export."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": {"enabled": False}}))
    cfg = TokenizerConfig(vocab_size=600, special_tokens=("<|endoftext|>",))
    tok = create_tokenizer(cfg, CORPUS * 3, tmp_path / "data" / "tokenizer", progress=False)
    torch.manual_seed(0)
    # untied, init_std 0.3: an untrained model whose greedy text varies instead of repeating one token
    model = Transformer(
        ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64, tie_embeddings=False, init_std=0.3),
        tok.vocab_size,
    ).eval()
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
    pipe = transformers.pipeline("text-generation", model=str(root / "hf"))
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
