"""Checkpoint folders: a save/load round trip, atomic replacement, refusal of pickled code, resume decisions."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from nanollm.checkpoint import (
    architecture_differences,
    architecture_model,
    backup_path,
    check_tokenizer,
    code_digest,
    find_resumable,
    fingerprint,
    load_architecture,
    load_for_resume,
    load_model,
    load_train_state,
    read_checkpoint_info,
    resumable_state,
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
    )
    return optimizer


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=16, block_size=8, mlp="gelu"), 50)


def test_round_trip(tmp_path, model):
    ckpt = tmp_path / "ckpt"
    _save(ckpt, model)
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "architecture.json",
        "config.json",
        "model.pt",
        "train_state.pt",
    ]  # fmt: skip: no MLflow bookkeeping (nanollm.tracking keeps its own run record)
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


def test_the_checkpoint_module_knows_nothing_of_mlflow():
    from nanollm import checkpoint

    source = Path(checkpoint.__file__).read_text()
    code = source.replace(checkpoint.__doc__, "")  # the docstring says where the run record lives instead
    assert "mlflow" not in code.lower() and "tracking" not in code and "run_id" not in code and "run.json" not in code


class _Tok:
    def __init__(self, sha256, vocab_size):
        self.sha256, self.vocab_size, self.path = sha256, vocab_size, Path("tok/tokenizer.json")


def test_check_tokenizer_refuses_another_tokenizer_or_a_larger_vocab(tmp_path, model):
    info = {"tokenizer_sha256": "ab" * 32, "vocab_size": 50}
    check_tokenizer("ckpt", info, _Tok("ab" * 32, 50))  # its own tokenizer
    with pytest.raises(NanollmError, match=r"trained with tokenizer sha256 abababababab, but tok/tokenizer.json is "
                       r"cdcdcdcdcdcd; pass the matching tokenizer$"):  # fmt: skip
        check_tokenizer("ckpt", info, _Tok("cd" * 32, 50))
    with pytest.raises(NanollmError, match="has 51 tokens but ckpt only 50; re-run it"):
        check_tokenizer("ckpt", info, _Tok("ab" * 32, 51), fix="re-run it")
    check_tokenizer(
        "ckpt", {"tokenizer_sha256": None, "vocab_size": 50}, _Tok("cd" * 32, 40)
    )  # imported: any that fits


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, model):
    ckpt = tmp_path / "c"
    _save(ckpt, model)
    before = (ckpt / "model.pt").read_bytes()
    with pytest.raises(KeyError):
        save_checkpoint(ckpt, model, train_state={}, info={})  # no "step": fails midway
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
    assert architecture_differences(loaded.cfg, loaded.cfg, tmp_path / "ckpt") == []
    wanted = ModelConfig(n_layer=3, n_head=2, n_kv_head=1, n_embd=16, block_size=8, mlp="gelu")
    with caplog.at_level("WARNING"):
        diff = architecture_differences(loaded.cfg, wanted, tmp_path / "ckpt")
    assert diff == ["model.n_layer: 2 in checkpoint, 3 in params"]
    assert "using the checkpoint's" in caplog.text
    assert loaded.cfg.n_layer == 2


# ---------------------------------------------------------------------------- resuming


def _wanted(**train):
    from nanollm.config import TrainConfig

    meta = {"dtype": "uint16", "vocab_size": 50, "tokenizer_sha256": "ab" * 32, "corpus_sha256": "cd" * 32}
    return fingerprint(1, ModelConfig(n_layer=2), TrainConfig(**train), meta, "float32")


def _save_with(path, model, wanted, step=7):
    save_checkpoint(path, model, train_state={"step": step, "tokens_seen": 70}, info={"fingerprint": wanted})


def test_fingerprint_ignores_cadence_and_sees_what_changes_the_weights():
    base = _wanted()
    assert _wanted(log_interval=1, eval_interval=3, checkpoint_interval=9, activation_checkpointing=True) == base
    assert _wanted(device="cpu") == base  # the resolved dtype is in the fingerprint instead
    assert _wanted(lr=1e-3)["train"]["lr"] == 1e-3 != base["train"]["lr"]
    assert len(base["code"]) == 64 and base["code"] == code_digest()


def test_resumes_only_a_checkpoint_of_the_same_run(tmp_path, model, caplog):
    ckpt = tmp_path / "c"
    with caplog.at_level("INFO"):
        assert find_resumable(ckpt, _wanted()) is None
    assert "no checkpoint in" in caplog.text and "training from step 0" in caplog.text
    _save_with(ckpt, model, _wanted())
    assert find_resumable(ckpt, _wanted(log_interval=3)) == ckpt
    caplog.clear()
    with caplog.at_level("INFO"):
        assert find_resumable(ckpt, _wanted(lr=1e-3, grad_clip=0.5)) is None
    (line,) = [r.getMessage() for r in caplog.records if "other settings" in r.getMessage()]
    assert "(step 7)" in line and "train.grad_clip: 1.0 -> 0.5; train.lr: 0.003 -> 0.001" in line
    resumed = load_for_resume(ckpt)
    assert resumed["state"]["step"] == 7 and set(resumed["model"]) == set(model.state_dict())


def test_an_unreadable_checkpoint_means_a_fresh_start(tmp_path, model, caplog):
    ckpt = tmp_path / "c"
    _save_with(ckpt, model, _wanted())
    (ckpt / "config.json").write_text("{")
    with caplog.at_level("WARNING"):
        assert find_resumable(ckpt, _wanted()) is None
    assert "cannot resume" in caplog.text and "config.json is unreadable" in caplog.text


def test_a_save_killed_between_its_renames_leaves_the_previous_checkpoint(tmp_path, model):
    ckpt = tmp_path / "c"
    _save_with(ckpt, model, _wanted(), step=5)
    os.replace(ckpt, backup_path(ckpt))  # the state after the first rename of the next save
    stale = tmp_path / ".c.tmp-killed"  # and a half-written folder from a save killed earlier
    stale.mkdir()
    (stale / "model.pt").write_bytes(b"partial")
    assert find_resumable(ckpt, _wanted()) == backup_path(ckpt)
    assert load_for_resume(backup_path(ckpt))["state"]["step"] == 5

    _save_with(ckpt, model, _wanted(), step=10)  # the next save cleans up both
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert find_resumable(ckpt, _wanted()) == ckpt and read_checkpoint_info(ckpt)["step"] == 10


def test_a_checkpoint_that_cannot_be_loaded_means_a_fresh_start(tmp_path, model, caplog):
    ckpt = tmp_path / "c"
    _save_with(ckpt, model, _wanted())
    assert resumable_state(ckpt, _wanted())["state"]["step"] == 7
    (ckpt / "train_state.pt").write_bytes(b"truncated")
    with caplog.at_level("WARNING"):
        assert resumable_state(ckpt, _wanted()) is None
    assert "cannot resume" in caplog.text and "train_state.pt is corrupt" in caplog.text
    info = json.loads((ckpt / "config.json").read_text())
    del info["fingerprint"]  # as written before fingerprints existed
    (ckpt / "config.json").write_text(json.dumps(info))
    with caplog.at_level("WARNING"):
        assert find_resumable(ckpt, _wanted()) is None
    assert "has no run fingerprint" in caplog.text


def test_architecture_file_holds_the_shape_alone(tmp_path, model):
    """architecture.json changes only with the architecture: a later step or other weights leave it as it was."""
    ckpt = tmp_path / "ckpt"
    _save_with(ckpt, model, {}, step=9)
    assert load_architecture(ckpt / "architecture.json") == (model.cfg, 50)
    shaped = architecture_model(ckpt / "architecture.json", seed=3)
    assert shaped.cfg == model.cfg and not shaped.training
    assert not torch.equal(shaped.tok_embeddings.weight, model.tok_embeddings.weight)  # seeded, not trained
    before = (ckpt / "architecture.json").read_bytes()
    _save(ckpt, model)  # other weights (an optimizer step), another step, another fingerprint
    assert (ckpt / "architecture.json").read_bytes() == before
