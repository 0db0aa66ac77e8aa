"""The decode layout (nanollm/model/packing.py): same values and results, still trainable, never stale."""

import pytest
import torch

from nanollm.checkpoint import load_model, save_checkpoint
from nanollm.config import ModelConfig, TrainConfig
from nanollm.hf_folder import export_hf, load_hf
from nanollm.inference.generate import generate
from nanollm.model import Transformer
from nanollm.training.optim import make_optimizer

VOCAB = 97


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16)
    return Transformer(ModelConfig(**{**cfg, **overrides}), VOCAB).eval()


def packed(**overrides) -> Transformer:
    model = tiny(**overrides)
    model.pack_for_decode()
    return model


@pytest.mark.parametrize("overrides", [{}, {"mlp": "gelu", "tie_embeddings": False}], ids=["swiglu-tied", "gelu"])
def test_layout_keeps_every_value_shape_and_logit(overrides):
    model, idx = tiny(**overrides), torch.randint(0, VOCAB, (2, 12))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(idx)
        model.pack_for_decode()
        after = model(idx)  # no grad: the fused q/k/v and w1/w3 matmuls
    state = model.state_dict()
    assert state.keys() == before.keys()
    for key, value in before.items():
        assert state[key].shape == value.shape and torch.equal(state[key], value), key
    torch.testing.assert_close(after, logits, rtol=1e-5, atol=1e-5)


def test_weights_become_column_major_views_of_one_buffer():
    model = packed()
    attn, ffn = model.layers[0].attention, model.layers[0].feed_forward
    for linear in (attn.wq, attn.wk, attn.wv, attn.wo, ffn.w1, ffn.w2, ffn.w3, model.output):
        assert linear.weight.stride()[0] == 1, "each weight is stored column-major"
    qkv = attn.wq.weight.untyped_storage().data_ptr()
    assert attn.wk.weight.untyped_storage().data_ptr() == qkv == attn.wv.weight.untyped_storage().data_ptr()
    assert ffn.w1.weight.untyped_storage().data_ptr() == ffn.w3.weight.untyped_storage().data_ptr()
    assert model.output.weight is model.tok_embeddings.weight, "the tied head stays tied"


def test_layout_is_idempotent():
    model = packed()
    pointers = [p.data_ptr() for p in model.parameters()]
    model.pack_for_decode()
    assert [p.data_ptr() for p in model.parameters()] == pointers


def test_the_layout_is_a_step_the_caller_asks_for_never_a_side_effect():
    model = tiny()
    strides = [p.stride() for p in model.parameters()]
    model.setup_cache(1, 8)
    assert list(generate(model, [1, 2, 3], 4, temperature=0.0))
    assert [p.stride() for p in model.parameters()] == strides, "allocating a cache or decoding moved the weights"
    assert model.layers[0].attention.packed_qkv is None and model.layers[0].feed_forward.packed_in is None


def test_off_the_cpu_the_weights_stay_as_they_are():
    """The layout was measured on CPU BLAS only; on another device pack_for_decode leaves nn.Linear's."""
    model = tiny().to("meta")
    model.pack_for_decode()
    assert model.layers[0].attention.packed_qkv is None
    assert model.layers[0].attention.wo.weight.is_contiguous()


def test_packed_model_still_trains_and_the_fused_path_follows_the_update():
    """Packed inside inference mode, then used by generate(), the parameters train as before."""
    model, idx = tiny(), torch.randint(0, VOCAB, (2, 12))
    with torch.inference_mode():
        model.pack_for_decode()
    list(generate(model, [1, 2, 3], 4, temperature=0.0))
    model.train()
    loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()  # an inference-mode parameter would raise here
    attn = model.layers[0].attention
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in (attn.wq.weight, attn.wk.weight, attn.wv.weight))
    optimizer = make_optimizer(model, TrainConfig(lr=0.1), torch.device("cpu"))  # the fused AdamW of pretrain
    optimizer.step()  # writes through the views into the buffer
    model.eval()
    with torch.no_grad():
        assert attn.packed_qkv is not None and attn.packed_qkv.usable()
        fused = model(idx)
    with torch.enable_grad():
        separate = model(idx)  # grad on: the layers one by one
    torch.testing.assert_close(fused, separate.detach(), rtol=1e-5, atol=1e-5)


def test_moving_the_model_makes_the_pack_stale_not_wrong():
    model, idx = packed(), torch.randint(0, VOCAB, (1, 8))
    model.double().float()  # new storage for every parameter: the packs no longer hold the weights
    attn = model.layers[0].attention
    with torch.no_grad():
        assert not attn.packed_qkv.usable()
        stale_safe = model(idx)
        model.pack_for_decode()  # re-packs the new storage
        assert attn.packed_qkv.usable()
        repacked = model(idx)
    torch.testing.assert_close(repacked, stale_safe)


def test_packed_checkpoint_round_trips(tmp_path):
    model = packed()
    save_checkpoint(tmp_path / "ckpt", model, train_state={"step": 0, "tokens_seen": 0}, info={})
    loaded = load_model(tmp_path / "ckpt")
    for (key, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), key


def test_packed_model_exports_to_safetensors(tmp_path):
    """safetensors refuses views into a shared buffer unless export copies them out; it must."""
    model = packed()
    loaded = load_hf(export_hf(model, tmp_path / "hf"))
    for (key, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), key


def test_weights_in_another_dtype_keep_their_layout():
    """The decode layout was measured on fp32 BLAS; a bf16 model in it decoded 20x slower, so it is not packed."""
    model = Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=8), VOCAB).to(torch.bfloat16)
    model.pack_for_decode()
    assert model.layers[0].attention.packed_qkv is None
    assert model.output.weight.is_contiguous()
