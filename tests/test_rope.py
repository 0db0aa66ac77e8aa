"""RoPE: the rotation encodes relative position, tables grow on demand, and it matches HF's convention."""

import torch

from nanollm.model.rope import RotaryEmbedding, apply_rotary, rope_frequencies, rotate_half


def _rotate(x: torch.Tensor, rope: RotaryEmbedding, pos: int) -> torch.Tensor:
    cos, sin = rope(pos, 1)  # (1, hs)
    return apply_rotary(x.view(1, 1, 1, -1), cos, sin).view(-1)


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


def test_rotate_half_convention_matches_hf_llama():
    # HF LlamaRotaryEmbedding: inv_freq = 1 / base^(arange(0, d, 2) / d), emb = cat(freqs, freqs),
    # rotate_half(x) = cat(-x2, x1). Written out here so a switch to the interleaved form fails.
    d, theta = 8, 500.0
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    assert torch.allclose(rope_frequencies(d, theta), inv)
    x = torch.arange(d, dtype=torch.float32)
    assert torch.equal(rotate_half(x), torch.tensor([-4.0, -5, -6, -7, 0, 1, 2, 3]))
    rope = RotaryEmbedding(d, 8, theta)
    angles = 3 * inv
    assert torch.allclose(rope.cos[3], torch.cat([angles, angles]).cos())
