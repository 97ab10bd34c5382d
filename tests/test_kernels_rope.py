"""The 2D RoPE convention of kernels.reference (used by the fused attention prologue)."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference as R

F64 = torch.float64


def rotate(x: torch.Tensor, angles: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """apply_rope on a bare [N, D] matrix with float64 angles [N, D/2]."""
    return R.apply_rope(x[None, None], torch.cos(angles), torch.sin(angles), interleaved)[0, 0]


def test_table_layout_and_class_token():
    d, gh, gw = 64, 3, 5
    a = R.rope_2d_angles(gh, gw, d, num_prefix_tokens=1)
    assert a.shape == (1 + gh * gw, d // 2)
    assert torch.all(a[0] == 0)  # class token: no rotation
    omega = 10000.0 ** (-torch.arange(d // 4, dtype=F64) / (d // 4))
    for t in range(gh * gw):
        row, col = divmod(t, gw)  # tokens are row-major
        torch.testing.assert_close(a[1 + t, : d // 4], row * omega, rtol=0, atol=0)
        torch.testing.assert_close(a[1 + t, d // 4:], col * omega, rtol=0, atol=0)
    cos, sin = kernels.rope_2d_table(gh, gw, d, num_prefix_tokens=1)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == a.shape
    assert torch.all(cos[0] == 1) and torch.all(sin[0] == 0)
    with pytest.raises(ValueError, match="divisible by 4"):
        R.rope_2d_angles(2, 2, 30)


@pytest.mark.parametrize("interleaved, first, second", [(True, 2, 3), (False, 1, 5)])
def test_pairing(interleaved, first, second):
    """Pair 1 of an 8-channel head is (x[2], x[3]) interleaved, (x[1], x[5]) in halves."""
    d = 8
    x = torch.zeros(1, 1, 1, d, dtype=F64)
    x[..., first] = 1.0
    angles = torch.zeros(1, d // 2, dtype=F64)
    angles[0, 1] = torch.pi / 2  # rotate pair 1 by 90 degrees, the others not at all
    y = R.apply_rope(x, torch.cos(angles), torch.sin(angles), interleaved)
    expected = torch.zeros(1, 1, 1, d, dtype=F64)
    expected[..., second] = 1.0  # all of the pair's first member moved into its second
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-15)


def test_rotation_is_orthogonal_and_inverted_by_the_negative_angle():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 64, generator=g, dtype=F64)
    angles = 5 * torch.randn(7, 32, generator=g, dtype=F64)
    y = rotate(x, angles)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rotate(y, -angles), x)
    assert (y - x).abs().max() > 0.1


@pytest.mark.parametrize("interleaved", [True, False])
def test_scores_depend_only_on_relative_position(interleaved):
    """RoPE's defining property on the patch tokens: q(p) . k(p') is a function of p - p'."""
    d, gh, gw = 64, 6, 7
    a = R.rope_2d_angles(gh, gw, d, num_prefix_tokens=1)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, d, generator=g, dtype=F64)

    def score(p, pk):  # p, pk: (row, col) grid positions
        i, j = 1 + p[0] * gw + p[1], 1 + pk[0] * gw + pk[1]
        qr = rotate(q[None], a[i:i + 1], interleaved)
        return (qr @ rotate(k[None], a[j:j + 1], interleaved).T).item()

    base = score((1, 2), (0, 0))
    for shift in [(1, 0), (0, 3), (4, 4), (2, 1)]:
        moved = score((1 + shift[0], 2 + shift[1]), (shift[0], shift[1]))
        assert moved == pytest.approx(base, rel=1e-12, abs=1e-12)
    # ... and it does depend on the offset, separately along each axis
    assert abs(score((2, 2), (0, 0)) - base) > 1e-3
    assert abs(score((1, 3), (0, 0)) - base) > 1e-3
    # the class token is not rotated
    torch.testing.assert_close(rotate(q[None], a[0:1], interleaved), q[None], rtol=0, atol=0)


def test_fused_prologue_order_and_pairing():
    """The kernel applies RMSNorm then RoPE (they do not commute once the norm has a weight), and
    honours the pairing flag (the two pairings give different attention for the same weights)."""
    g = torch.Generator().manual_seed(2)
    b, h, n, d = 1, 2, 17, 32
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    w = 1 + torch.randn(d, generator=g)
    rope = kernels.rope_2d_table(4, 4, d, num_prefix_tokens=1)
    common = dict(rope=rope, q_norm_weight=w, k_norm_weight=w)
    for interleaved in (True, False):
        out = kernels.attention(q, k, v, rope_interleaved=interleaved, backend="triton", **common)
        ref = R.attention_reference(q, k, v, rope_interleaved=interleaved, **common)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
        other = R.attention_reference(q, k, v, rope_interleaved=not interleaved, **common)
        assert (out - other).abs().max() > 1e-3
        swapped = R.attention_reference(R.rms_norm(R.apply_rope(q, *rope, interleaved), w),
                                        R.rms_norm(R.apply_rope(k, *rope, interleaved), w), v)
        assert (out - swapped).abs().max() > 1e-3
