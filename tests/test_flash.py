"""FlashAttention from scratch: outputs and gradients equal SDPA's, and no (T, S) matrix ever exists."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nanollm.model.attention import causal_mask, naive_attention
from nanollm.model.flash import flash_attention


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # the test machine's cores are shared


def _qkv(B, H, T, D, start_pos, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = start_pos + T
    make = lambda n: torch.randn(B, H, n, D, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return make(T), make(S), make(S)


def _sdpa(q, k, v, start_pos):
    T, S = q.size(2), k.size(2)
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(start_pos, T, q.device))


SHAPES = [
    # B, H, T, hs, start_pos, block_q, block_k
    (2, 3, 37, 16, 0, 16, 16),  # T not a multiple of the tile: ragged last row and column of tiles
    (1, 2, 64, 32, 0, 32, 32),  # T an exact multiple
    (2, 2, 50, 8, 0, 16, 8),  # rectangular tiles
    (1, 2, 130, 16, 0, 128, 128),  # the default tile size, two tiles of which one is 2 rows
    (1, 4, 1, 16, 20, 16, 16),  # a decode step: one query after 20 cached keys
    (2, 2, 9, 8, 13, 4, 5),  # a chunk after a cached prefix, tiles that straddle the diagonal off-grid
]


@pytest.mark.parametrize("B,H,T,D,start_pos,bq,bk", SHAPES)
def test_outputs_and_gradients_match_sdpa(B, H, T, D, start_pos, bq, bk):
    q, k, v = _qkv(B, H, T, D, start_pos)
    out = flash_attention(q, k, v, start_pos, block_q=bq, block_k=bk)
    ref = _sdpa(q, k, v, start_pos)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, g, w in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")


def test_gradcheck_in_float64():
    q, k, v = _qkv(1, 2, 9, 4, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attention(q, k, v, 3, block_q=4, block_k=5), (q, k, v))


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


def test_no_score_matrix_is_ever_materialised():
    B, H, T, D, bq, bk = 1, 2, 256, 16, 32, 32
    q, k, v = _qkv(B, H, T, D, 0)
    with _LargestTensor() as probe:
        out = flash_attention(q, k, v, 0, block_q=bq, block_k=bk)
        out.sum().backward()
    # the biggest things alive are (B, H, T, hs) tensors (out, dq) and one (B, H, bq, bk) tile
    assert probe.largest <= max(B * H * T * D, B * H * bq * bk) < B * H * T * T
    with _LargestTensor() as naive:  # and the probe does see a score matrix where there is one
        naive_attention(q, k, v, 0).sum().backward()
    assert naive.largest >= B * H * T * T


def test_bf16_inputs_give_bf16_outputs_close_to_sdpa():
    q, k, v = (t.detach() for t in _qkv(2, 2, 40, 16, 0, dtype=torch.bfloat16))
    out = flash_attention(q, k, v, block_q=16, block_k=16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _sdpa(q.float(), k.float(), v.float(), 0), atol=3e-2, rtol=3e-2)


def test_runs_without_autograd_for_decoding():
    q, k, v = _qkv(1, 2, 1, 8, 7)
    with torch.inference_mode():
        out = flash_attention(q, k, v, 7)
    torch.testing.assert_close(out, _sdpa(q, k, v, 7).detach())
