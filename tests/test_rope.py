"""RoPE: the rotation encodes relative position, tables grow on demand, and it matches HF's convention."""

import pytest
import torch

from nanollm.model.rope import RotaryEmbedding, apply_rotary, rope_frequencies


def _rotate(x: torch.Tensor, rope: RotaryEmbedding, pos: int) -> torch.Tensor:
    cos, sin = rope(pos, 1)  # (1, hs)
    return apply_rotary(x.view(1, 1, 1, -1), cos, sin).view(-1)


def _hf_rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """HF LlamaRotaryEmbedding + apply_rotary_pos_emb, written out: x (..., T, d), positions (T,)."""
    d = x.size(-1)
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    freqs = positions.float()[:, None] * inv[None, :]  # (T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, d)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotate_half = torch.cat((-x2, x1), dim=-1)
    return x * emb.cos() + rotate_half * emb.sin()


def test_dot_product_depends_only_on_relative_position():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=16, max_seq_len=64)
    q, k = torch.randn(16), torch.randn(16)
    scores = [torch.dot(_rotate(q, rope, m + 5), _rotate(k, rope, m)).item() for m in (0, 3, 17, 40)]
    for s in scores[1:]:
        assert abs(s - scores[0]) < 1e-5
    # and it does depend on the offset, or the test above would pass for an identity "rotation"
    other = torch.dot(_rotate(q, rope, 6), _rotate(k, rope, 0)).item()
    assert abs(other - scores[0]) > 1e-3


def test_rotation_preserves_norm_and_position_zero_is_identity():
    rope = RotaryEmbedding(head_dim=8, max_seq_len=16)
    x = torch.randn(8)
    assert torch.allclose(_rotate(x, rope, 0), x)
    assert torch.allclose(_rotate(x, rope, 11).norm(), x.norm(), atol=1e-6)


def test_tables_grow_past_max_seq_len_and_agree_with_the_prefix():
    rope = RotaryEmbedding(head_dim=8, max_seq_len=16)
    before = rope.cos.clone()
    cos, sin = rope(14, 10)  # positions 14..23, past the 16 precomputed
    assert cos.shape == sin.shape == (10, 8)
    assert rope.max_seq_len == 32  # the next power of two
    assert torch.equal(rope.cos[:16], before)
    big = RotaryEmbedding(head_dim=8, max_seq_len=64)
    assert torch.allclose(cos, big.cos[14:24]) and torch.allclose(sin, big.sin[14:24])


def test_tables_are_not_persistent():
    assert RotaryEmbedding(head_dim=8, max_seq_len=16).state_dict() == {}


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rotation_equals_hf_llama_rotate_half_form(theta):
    # Written out from HF so that a switch to the interleaved (Meta complex) form, a wrong sign in
    # the folded sin table or a different frequency schedule fails here. Positions run past the
    # table length, so a regrown table is checked too.
    d, T = 16, 40
    assert torch.allclose(rope_frequencies(d, theta), 1.0 / theta ** (torch.arange(0, d, 2).float() / d))
    rope = RotaryEmbedding(d, 8, theta)
    x = torch.randn(2, 3, T, d)
    got = apply_rotary(x, *rope(0, T))
    torch.testing.assert_close(got, _hf_rotate(x, torch.arange(T), theta), atol=1e-5, rtol=1e-5)
    later = apply_rotary(x[:, :, :5], *rope(30, 5))  # a chunk at positions 30..34, as in decoding
    torch.testing.assert_close(later, _hf_rotate(x[:, :, :5], torch.arange(30, 35), theta), atol=1e-5, rtol=1e-5)


def test_tables_follow_the_model_dtype_and_bf16_inputs_stay_bf16():
    rope = RotaryEmbedding(8, 16)
    x = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16)
    assert apply_rotary(x, *rope(0, 4)).dtype == torch.bfloat16  # fp32 tables (autocast) are cast down
    rope = rope.to(torch.bfloat16)
    assert rope.cos.dtype == torch.bfloat16
    cos, sin = rope(20, 4)  # regrown past 16 in the tables' own dtype
    assert cos.dtype == sin.dtype == torch.bfloat16
    torch.testing.assert_close(cos, RotaryEmbedding(8, 32).cos[20:24].to(torch.bfloat16))
