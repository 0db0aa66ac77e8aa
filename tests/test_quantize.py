"""int8 weight-only quantization (nanollm.inference.quantize): the format, both matmul paths, the converted model."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanollm.config import ModelConfig
from nanollm.evaluate import evaluate_lm
from nanollm.inference.generate import generate
from nanollm.inference.native import int8_gemm
from nanollm.inference.quantize import (
    Int8Linear,
    Int8Transformer,
    int8_kernel_rows,
    int8_native_kernel,
    quantize_int8,
    quantize_rows,
)
from nanollm.model import Transformer
from nanollm.model.attention import RaggedStep

VOCAB = 300
ALWAYS, NEVER = 10**9, 0  # int8_kernel_rows: the int8 kernel for every call / for none (dequantize, then matmul)


def tiny(**options) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, **options)
    return Transformer(cfg, VOCAB).eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())  # callers pass no-grad tensors


def test_quantize_rows_is_symmetric_per_channel_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(48, 40) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different ranges
    w[5] = 0.0
    q, scales = quantize_rows(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scales.dtype == torch.float32 and scales.shape == (48,)
    assert torch.equal(scales.bfloat16().float(), scales)  # exact in bf16, the kernel's scale dtype
    assert int(q.abs().max()) <= 127 and torch.equal(q[5], torch.zeros_like(q[5]))
    assert bool((q.abs().amax(dim=1)[w.abs().amax(dim=1) > 0] >= 126).all())  # each row uses its range
    error = (q.float() * scales[:, None] - w).abs()
    assert bool((error <= scales[:, None] / 2 + 1e-12).all())


@pytest.mark.parametrize("native", [True, False], ids=["nanollm-kernel", "aten-kernel"])
@pytest.mark.parametrize("in_features", [64, 36])  # 36: not a multiple of 8, never aten's kernel
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int8_linear_matches_its_dequantized_weight_on_every_path(in_features, rows, native):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 24, bias=False)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(2, rows, in_features)
    linear.requires_grad_(False)
    reference = F.linear(x, layer.weight.float() * layer.scales[:, None])  # (2, rows, 24)
    with int8_kernel_rows(layer, NEVER):
        dequantized = layer(x)
    with int8_kernel_rows(layer, ALWAYS), int8_native_kernel(layer, native):
        kernel = layer(x)
    assert dequantized.shape == kernel.shape == (2, rows, 24) and kernel.dtype == torch.float32
    torch.testing.assert_close(dequantized, reference, rtol=1e-5, atol=1e-5)
    if native and int8_gemm() is not None:  # fp32 activations throughout: summation order apart, the same
        torch.testing.assert_close(kernel, reference, rtol=1e-5, atol=1e-5)
    assert relative_error(kernel, reference) < 1e-2  # aten's: bf16 activations and outputs inside the kernel
    assert relative_error(layer(x), linear(x)) < 2e-2  # and the int8 weights themselves


def test_int8_linear_falls_back_for_dtypes_without_a_kernel():
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(32, 8, bias=False))
    x = torch.randn(3, 32, dtype=torch.float64)
    y = layer(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, x @ (layer.weight.double() * layer.scales.double()[:, None]).t())


def test_quantized_state_is_int8_weights_with_one_scale_per_output_channel():
    model = quantize_int8(tiny())
    assert isinstance(model, Int8Transformer) and isinstance(model, Transformer)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(int8) == 2 * 7 + 1  # wq wk wv wo w1 w2 w3 per layer, the head
    for m in int8:
        assert m.weight.dtype == torch.int8 and m.weight.shape == (m.out_features, m.in_features)
        assert m.weight.is_contiguous() and m.scales.shape == (m.out_features,)
    attn = model.layers[0].attention
    assert attn.packed_qkv.usable()  # q, k, v: one fused int8 matmul over the layers' own bytes
    assert attn.wk.weight.data_ptr() == attn.packed_qkv.weight[64:].data_ptr()
    # the embedding stays fp32; the head, tied to it before, is its own int8 copy now
    assert model.tok_embeddings.weight.dtype == torch.float32 and model.output.weight.shape == (VOCAB, 64)
    assert not any(p.requires_grad for p in model.parameters())
    state = model.state_dict()
    assert state["layers.1.feed_forward.w2.weight"].dtype == torch.int8
    assert "layers.1.feed_forward.w2.scales_bf16" not in state  # the kernel's copy of the scales


def test_quantized_model_is_for_inference_only_and_pack_for_decode_is_a_no_op():
    model = quantize_int8(tiny())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.pack_for_decode()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="inference only"):
        model.train()
    assert model.eval() is model and quantize_int8(model) is model
    with pytest.raises(TypeError, match="Transformer"):
        quantize_int8(nn.Linear(2, 2))


@pytest.mark.parametrize(
    "options",
    [{}, {"qk_norm": False, "value_residual": False}, {"tie_embeddings": False, "n_kv_head": 2}, {"mlp": "gelu"}],
    ids=["default", "llama", "untied-gqa", "gelu"],
)
def test_quantized_logits_are_close_to_fp32(options):
    model = tiny(**options)
    idx = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = model(idx)
        model.pack_for_decode()  # the fp32 decode layout is converted like any other
        quantize_int8(model)
        for rows in (NEVER, ALWAYS):
            with int8_kernel_rows(model, rows):
                assert relative_error(model(idx), reference) < 0.03


def test_greedy_decoding_runs_on_the_quantized_model():
    model = quantize_int8(tiny())
    ids = list(generate(model, [1, 2, 3], 10, temperature=0.0))
    assert len(ids) == 10 and all(0 <= i < VOCAB for i in ids)
    assert ids == list(generate(model, [1, 2, 3], 10, temperature=0.0))
    assert len(list(generate(model, [1, 2, 3], 5, temperature=1.0, top_k=20))) == 5


def _cached_logits(model: Transformer, idx: torch.Tensor) -> list[torch.Tensor]:
    """Logits of a prefill of 6 tokens, two single-token steps, then a 3-token chunk: (B, T, V) each."""
    model.setup_cache(idx.size(0), idx.size(1))
    try:
        return [model(idx[:, 0:6], 0), model(idx[:, 6:7], 6), model(idx[:, 7:8], 7), model(idx[:, 8:11], 8)]
    finally:
        model.clear_cache()


MIXED = 8  # kernel for one row's 6-token prefill and every decode step, dequantize for the batch's 24 rows


@pytest.mark.parametrize("native", [True, False], ids=["nanollm-kernel", "aten-kernel"])
@pytest.mark.parametrize("rows", [MIXED, NEVER, ALWAYS], ids=["mixed-paths", "dequantize", "kernel"])
def test_a_batch_of_4_matches_each_row_decoded_alone(rows, native):
    model = quantize_int8(tiny())
    idx = torch.randint(0, VOCAB, (4, 11), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode(), int8_kernel_rows(model, rows), int8_native_kernel(model, native):
        batched = _cached_logits(model, idx)
        alone = [_cached_logits(model, idx[b : b + 1]) for b in range(4)]
        plain = model(idx)  # no cache: the same positions, all at once
    fp32 = rows == NEVER or (native and int8_gemm() is not None)  # fp32 activations in every matmul
    # one path throughout, or fp32 everywhere: equal up to summation order; else aten's bf16 rounding
    tol = 2e-2 if rows == MIXED and not fp32 else 1e-4
    for step, logits in enumerate(batched):
        per_row = torch.cat([a[step] for a in alone])  # (4, T, V)
        torch.testing.assert_close(logits, per_row, rtol=tol, atol=tol * float(per_row.abs().max()))
    cached = torch.cat(batched, dim=1)  # (4, 11, V)
    assert relative_error(cached, plain) < (1e-4 if fp32 else 2e-2)


def test_a_ragged_batch_of_4_at_mixed_positions_matches_each_row_decoded_alone():
    """The batching engine's step: rows prefilled to different lengths, then one token each at its own position."""
    model = quantize_int8(tiny())
    lengths = [3, 7, 5, 1]
    prompts = [torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n)) for n in lengths]
    nxt = torch.randint(0, VOCAB, (4, 1), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        model.setup_cache(4, 16)
        for b, prompt in enumerate(prompts):
            with model.cache_rows(b, b + 1):
                model(prompt, 0)
        ragged = model(nxt, RaggedStep.at(lengths, nxt.device))[:, -1]  # (4, V)
        model.clear_cache()
        alone = []
        for b, prompt in enumerate(prompts):
            model.setup_cache(1, 16)
            model(prompt, 0)
            alone.append(model(nxt[b : b + 1], lengths[b])[:, -1])
            model.clear_cache()
    torch.testing.assert_close(ragged, torch.cat(alone), rtol=1e-4, atol=1e-4 * float(ragged.abs().max()))


def test_int8_bits_per_byte_scores_fp32_and_int8_on_the_same_tokens():
    model = tiny()
    tokens = np.random.default_rng(0).integers(0, VOCAB, 400).astype(np.uint16)
    token_bytes = np.full(VOCAB, 2)
    args = {"block_size": 32, "batch_size": 4, "token_bytes": token_bytes}
    # as the evaluate stage scores int8 (eval.int8), and through each kernel decoding may use
    int8 = quantize_int8(copy.deepcopy(model))
    result = {"fp32": evaluate_lm(model, tokens, **args), "int8": evaluate_lm(int8, tokens, **args)}
    with int8_kernel_rows(int8, max_rows=args["batch_size"] * args["block_size"]):
        result["int8_kernel"] = evaluate_lm(int8, tokens, **args)
        with int8_native_kernel(int8, False):
            result["int8_aten_kernel"] = evaluate_lm(int8, tokens, **args)
    assert result["fp32"] == evaluate_lm(model, tokens, **args)  # the model itself is left fp32
    assert all(r["tokens"] == 399 for r in result.values())
    assert abs(result["int8"]["bits_per_byte"] - result["fp32"]["bits_per_byte"]) < 0.01
    for kernel in ("int8_kernel", "int8_aten_kernel"):
        assert abs(result[kernel]["bits_per_byte"] - result["fp32"]["bits_per_byte"]) < 0.01
