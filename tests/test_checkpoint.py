"""Checkpoint folders: a save/load round trip, atomic replacement, and refusal of pickled code."""

import json
import pickle

import pytest
import torch

from nanollm.checkpoint import (
    architecture_differences,
    load_model,
    load_train_state,
    read_checkpoint_info,
    read_run,
    read_run_id,
    save_checkpoint,
)
from nanollm.config import ModelConfig
from nanollm.errors import NanollmError
from nanollm.model import Transformer


def _save(path, model, **kw):
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    save_checkpoint(
        path,
        model,
        optimizer=optimizer,
        train_state={"step": 7, "tokens_seen": 700, "batch_rng": torch.Generator().manual_seed(3).get_state()},
        info={"tokenizer_sha256": "ab" * 32, "corpus_sha256": "cd" * 32},
        run=kw.get("run", {"run_id": "r123", "tracking_uri": "sqlite:///x.db"}),
    )
    return optimizer


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=16, block_size=8, mlp="gelu"), 50)


def test_round_trip(tmp_path, model):
    ckpt = tmp_path / "ckpt"
    _save(ckpt, model)
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.pt", "run.json", "train_state.pt"]
    info = read_checkpoint_info(ckpt)
    assert info["vocab_size"] == 50 and info["step"] == 7 and info["tokens_seen"] == 700
    assert info["model"]["n_kv_head"] == 1 and info["model"]["mlp"] == "gelu"
    assert info["tokenizer_sha256"] == "ab" * 32
    loaded = load_model(ckpt)
    assert not loaded.training and loaded.cfg == model.cfg
    assert loaded.output.weight.data_ptr() == loaded.tok_embeddings.weight.data_ptr()  # still tied
    idx = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model.eval()(idx))
    state = load_train_state(ckpt)
    assert state["step"] == 7 and "optimizer" in state and state["batch_rng"].dtype == torch.uint8
    assert read_run_id(ckpt) == "r123" and read_run(ckpt)["tracking_uri"] == "sqlite:///x.db"


def test_run_json_records_null_without_tracking(tmp_path, model):
    _save(tmp_path / "c", model, run={"run_id": None, "tracking_uri": None})
    assert json.loads((tmp_path / "c" / "run.json").read_text()) == {"run_id": None, "tracking_uri": None}
    assert read_run_id(tmp_path / "c") is None


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, model):
    ckpt = tmp_path / "c"
    _save(ckpt, model)
    before = (ckpt / "model.pt").read_bytes()
    with pytest.raises(KeyError):
        save_checkpoint(ckpt, model, train_state={}, info={}, run={})  # no "step": fails midway
    assert (ckpt / "model.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary folder left behind


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_payload_is_refused(tmp_path, model, capsys, writer):
    ckpt = tmp_path / "c"
    _save(ckpt, model)
    payload = {"tok_embeddings.weight": torch.zeros(1), "evil": _Payload()}
    if writer == "torch.save":
        torch.save(payload, ckpt / "model.pt")
    else:
        with open(ckpt / "model.pt", "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(NanollmError, match=r"model\.pt is corrupt or holds more than tensors") as err:
        load_model(ckpt)
    if writer == "torch.save":
        assert "Unsupported global" in str(err.value)  # names what was refused
    assert "pwned" not in capsys.readouterr().out  # the payload never ran


def test_corrupt_and_missing_files(tmp_path, model):
    ckpt = tmp_path / "c"
    _save(ckpt, model)
    (ckpt / "model.pt").write_bytes(b"\x00not a zip")
    with pytest.raises(NanollmError, match=r"model\.pt is corrupt"):
        load_model(ckpt)
    (ckpt / "train_state.pt").unlink()
    with pytest.raises(NanollmError, match=r"train_state\.pt is missing"):
        load_train_state(ckpt)
    (ckpt / "config.json").write_text("{")
    with pytest.raises(NanollmError, match=r"config\.json is unreadable"):
        read_checkpoint_info(ckpt)


def test_architecture_comes_from_config_json(tmp_path, model):
    ckpt = tmp_path / "c"
    _save(ckpt, model)
    info = json.loads((ckpt / "config.json").read_text())
    info["model"]["n_layer"] = 3  # weights for 2 layers no longer fit
    (ckpt / "config.json").write_text(json.dumps(info))
    with pytest.raises(NanollmError, match="does not match config.json"):
        load_model(ckpt)
    info["model"]["n_head"] = 5  # 16 % 5 != 0: invalid architecture, named
    (ckpt / "config.json").write_text(json.dumps(info))
    with pytest.raises(NanollmError, match="model.n_embd"):
        load_model(ckpt)


def test_architecture_differences_are_reported_and_the_checkpoint_wins(tmp_path, model, caplog):
    _save(tmp_path / "ckpt", model)
    loaded = load_model(tmp_path / "ckpt")
    assert architecture_differences(loaded, loaded.cfg, tmp_path / "ckpt") == []
    wanted = ModelConfig(n_layer=3, n_head=2, n_kv_head=1, n_embd=16, block_size=8, mlp="gelu")
    with caplog.at_level("WARNING"):
        diff = architecture_differences(loaded, wanted, tmp_path / "ckpt")
    assert diff == ["model.n_layer: 2 in checkpoint, 3 in params"]
    assert "using the checkpoint's" in caplog.text
    assert loaded.cfg.n_layer == 2
