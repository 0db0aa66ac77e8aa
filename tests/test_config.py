"""The params schema: defaults, the shipped params.yaml, and one-line errors for bad values."""

from pathlib import Path

import pytest
import yaml

from nanollm.config import Config, ConfigError, flatten
from stages.cli import read_params

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_validate_and_cover_every_schema_key():
    raw = read_params(ROOT / "params.yaml")
    config = Config.from_dict(raw)
    # every key of the schema is spelled out in params.yaml, so users can see and -S it
    assert set(flatten(raw)) == set(flatten(config.to_dict()))


def test_dvc_yaml_params_exist_in_params_and_schema():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    raw = read_params(ROOT / "params.yaml")
    schema = Config().to_dict()
    for name, stage in dvc["stages"].items():
        for key in stage.get("params", []):
            assert isinstance(key, str), name
            node_raw, node_schema = raw, schema
            for part in key.split("."):
                assert part in node_raw, f"{name}: {key} not in params.yaml"
                assert part in node_schema, f"{name}: {key} not in the schema"
                node_raw, node_schema = node_raw[part], node_schema[part]


def test_scientific_floats_without_dot_are_floats(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1e-3\n  min_lr: 1e-4\n")
    config = Config.from_dict(read_params(path))
    assert config.train.lr == pytest.approx(1e-3) and config.train.min_lr == pytest.approx(1e-4)


def test_int_is_accepted_for_float_but_not_bool_for_int():
    assert Config.from_dict({"train": {"lr": 1, "min_lr": 0}}).train.lr == 1.0
    with pytest.raises(ConfigError, match="model.n_layer"):
        Config.from_dict({"model": {"n_layer": True}})


@pytest.mark.parametrize(
    "raw, key, hint",
    [
        ({"train": {"lr": -0.1}}, "train.lr", "> 0.0"),
        ({"train": {"lr": 1e-3, "min_lr": 1e-2}}, "train.min_lr", "<= train.lr"),
        ({"train": {"max_steps": 10, "warmup_steps": 20}}, "train.warmup_steps", "<= train.max_steps"),
        ({"tokenizer": {"vocab_size": 200}}, "tokenizer.vocab_size", "256 bytes + 1 special"),
        ({"model": {"n_embd": 250, "n_head": 4}}, "model.n_embd", "divisible by model.n_head"),
        ({"model": {"n_embd": 12, "n_head": 4}}, "model.n_embd", "even for RoPE"),
        ({"model": {"n_head": 4, "n_kv_head": 3}}, "model.n_kv_head", "divide model.n_head"),
        ({"model": {"attention": "magic"}}, "model.attention", "one of sdpa"),
        ({"model": {"n_layer": "four"}}, "model.n_layer", "integer"),
        ({"model": {"nlayer": 4}}, "model.nlayer", "unknown key"),
        ({"modle": {}}, "modle", "unknown key"),
        ({"model": 4}, "model", "mapping"),
        ({"data": {"val_fraction": 0}}, "data.val_fraction", "> 0.0"),
        ({"data": {"paths": "a.txt"}}, "data.paths", "list of str"),
        ({"bench": {"prompt_lengths": []}}, "bench.prompt_lengths", "at least one"),
        ({"bench": {"prompt_lengths": [0]}}, "bench.prompt_lengths", ">= 1"),
        ({"tracking": {"enabled": "yes"}}, "tracking.enabled", "true or false"),
        ({"train": {"lr": float("nan")}}, "train.lr", "finite"),
        ({"tokenizer": {"special_tokens": []}}, "tokenizer.special_tokens", "endoftext"),
    ],
)
def test_bad_values_name_key_value_and_rule(raw, key, hint):
    with pytest.raises(ConfigError) as info:
        Config.from_dict(raw)
    message = str(info.value)
    assert message.startswith(f"{key}:")
    assert hint in message
    assert "\n" not in message


def test_flatten_keeps_lists_as_values():
    flat = flatten(Config().to_dict())
    assert flat["model.n_layer"] == 4
    assert flat["tokenizer.special_tokens"] == ["<|endoftext|>"]
    assert flat["seed"] == 1337


def test_model_derived_sizes():
    m = Config.from_dict({"model": {"n_embd": 384, "n_head": 6, "n_kv_head": 2}}).model
    assert (m.head_dim, m.kv_heads) == (64, 2)
    assert m.hidden_dim % 64 == 0 and m.hidden_dim >= 8 * 384 // 3
    assert Config.from_dict({"model": {"mlp": "gelu"}}).model.hidden_dim == 4 * 256
