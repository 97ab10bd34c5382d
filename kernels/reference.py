"""Plain-PyTorch definitions of everything the Triton kernels compute.

These functions are the specification (the tests compare the kernels with them in float64) and
the 'torch' backend (the fallback used without CUDA/Triton). Conventions:

RoPE (2D axial). A head vector x of size D holds D/2 rotation pairs (a_j, b_j), j < D/2:
    interleaved (default, the pairing train.py uses):  a_j = x[2j],  b_j = x[2j + 1]
    halves (rope_interleaved=False, GPT-NeoX style):   a_j = x[j],   b_j = x[j + D/2]
and pair j of token n is rotated by angle[n, j]:
    a_j' = a_j cos - b_j sin,   b_j' = b_j cos + a_j sin.
For a token at grid position (row, col), with F = D/4 and omega_f = theta ** (-f / F):
    angle[n, f]     = row * omega_f   for f < F   (the first half of the pairs: rows)
    angle[n, F + f] = col * omega_f               (the second half: columns)
Tokens are row-major. Leading "prefix" tokens (a class token) get angle 0: cos 1, sin 0, no
rotation. The tables are passed around as (cos, sin), float32, shape [N, D/2] (shared by the
batch) or [B, N, D/2] (per sample). The two pairings are the same rotation up to a fixed
permutation of head channels, which a model trained from scratch absorbs into its qkv weights.

QK-norm: RMSNorm over D with an affine weight (eps 1e-6), applied to q and k BEFORE RoPE.

Modulated RMSNorm (adaLN): y = rmsnorm(x) [* weight] * (1 + scale[b]) + shift[b] with per-sample
shift/scale [B, C] broadcast over the tokens of x [B, N, C].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Rope = tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# RoPE and QK-norm
# ---------------------------------------------------------------------------------------------
def rope_2d_angles(grid_h: int, grid_w: int, head_dim: int, theta: float = 10000.0,
                   num_prefix_tokens: int = 0) -> torch.Tensor:
    """Angles [num_prefix_tokens + grid_h * grid_w, head_dim // 2] in float64, tokens row-major."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    f = head_dim // 4
    omega = theta ** (-torch.arange(f, dtype=torch.float64) / f)
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)
    angles = torch.cat([rows[:, None] * omega, cols[:, None] * omega], dim=1)
    prefix = torch.zeros(num_prefix_tokens, 2 * f, dtype=torch.float64)
    return torch.cat([prefix, angles], dim=0)


def rope_2d_table(grid_h: int, grid_w: int, head_dim: int, theta: float = 10000.0,
                  num_prefix_tokens: int = 0, device=None) -> Rope:
    """(cos, sin), float32 [num_prefix_tokens + grid_h * grid_w, head_dim // 2]."""
    a = rope_2d_angles(grid_h, grid_w, head_dim, theta, num_prefix_tokens)
    return torch.cos(a).float().to(device), torch.sin(a).float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               interleaved: bool = True) -> torch.Tensor:
    """Rotate x [B, H, N, D] with tables [N, D/2] or [B, N, D/2]; computed in float32 (float64
    for float64 x) and returned in x's dtype."""
    ct = torch.promote_types(x.dtype, torch.float32)
    c, s = cos.to(ct), sin.to(ct)
    if c.dim() == 3:  # per-sample tables: broadcast over heads
        c, s = c[:, None], s[:, None]
    if interleaved:
        a, b = x.to(ct).unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2).to(x.dtype)
    a, b = x.to(ct).chunk(2, dim=-1)
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32 (float64 for float64 x), x's dtype out."""
    ct = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(ct)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(ct)
    return y.to(x.dtype)


def qk_prologue(x: torch.Tensor, norm_weight: torch.Tensor | None, rope: Rope | None,
                eps: float = 1e-6, interleaved: bool = True) -> torch.Tensor:
    """QK-norm (if a weight is given) then RoPE (if tables are given)."""
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    if rope is not None:
        x = apply_rope(x, *rope, interleaved=interleaved)
    return x


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------
def attention_reference(q, k, v, *, rope: Rope | None = None, q_norm_weight=None,
                        k_norm_weight=None, scale: float | None = None, eps: float = 1e-6,
                        rope_interleaved: bool = True):
    """Explicit softmax(q k^T * scale) v on [B, H, N, D] tensors, matmuls in the input dtype and
    the softmax in float32 (float64 for float64 input): the accuracy yardstick of the tests."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = qk_prologue(q, q_norm_weight, rope, eps, rope_interleaved)
    k = qk_prologue(k, k_norm_weight, rope, eps, rope_interleaved)
    ct = torch.promote_types(q.dtype, torch.float32)
    logits = torch.matmul(q, k.transpose(-1, -2)).to(ct) * scale
    p = torch.softmax(logits, dim=-1).to(v.dtype)
    return torch.matmul(p, v)


def attention_torch(q, k, v, *, rope: Rope | None = None, q_norm_weight=None, k_norm_weight=None,
                    scale: float | None = None, eps: float = 1e-6, rope_interleaved: bool = True):
    """The unfused PyTorch chain used as the fallback backend: norm, RoPE, then SDPA."""
    q = qk_prologue(q, q_norm_weight, rope, eps, rope_interleaved)
    k = qk_prologue(k, k_norm_weight, rope, eps, rope_interleaved)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# ---------------------------------------------------------------------------------------------
# adaLN modulation with RMSNorm
# ---------------------------------------------------------------------------------------------
def modulated_rmsnorm_reference(x, shift, scale, weight=None, eps: float = 1e-6, out_dtype=None):
    """rmsnorm(x) [* weight] * (1 + scale[:, None]) + shift[:, None]; x [B, N, C], shift/scale
    [B, C]. Computed in float32 (float64 for float64 x); returned in out_dtype (default x's)."""
    ct = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(ct)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(ct)
    y = y * (1 + scale.to(ct)[:, None]) + shift.to(ct)[:, None]
    return y.to(out_dtype or x.dtype)


def gated_residual_reference(x, y, gate):
    """x + gate[:, None] * y in x's dtype (gate [B, C], x and y [B, N, C])."""
    ct = torch.promote_types(x.dtype, torch.float32)
    return (x.to(ct) + gate.to(ct)[:, None] * y.to(ct)).to(x.dtype)


def gated_residual_modulated_rmsnorm_reference(x, y, gate, shift, scale, weight=None,
                                               eps: float = 1e-6, out_dtype=None):
    """h = x + gate * y (the residual stream) and modulated_rmsnorm(h, shift, scale)."""
    h = gated_residual_reference(x, y, gate)
    return h, modulated_rmsnorm_reference(h, shift, scale, weight, eps, out_dtype)
