"""Triton kernels: RMSNorm + adaLN modulation, optionally fused with the gated residual add.

Loaded through `kernels._loader` (compiled and interpreted copies), never imported directly.

Forward, per row of x [B, N, C] (all maths in fp32):
    h    = x + gate[b] * u                   (only with HAS_RES; h is stored, rounded to x's dtype)
    rstd = 1 / sqrt(mean(h^2) + eps)         (stored, fp32 [B, N], for the backward)
    y    = h * rstd [* w] * (1 + scale[b]) + shift[b]
Backward, per program a run of rows of one sample; the reductions over tokens (d shift, d scale,
d w, d gate) are written as per-program partial rows and summed on the host.
"""
import triton
import triton.language as tl

from . import _loader

INTERPRET = bool(triton.knobs.runtime.interpret)
_common = _loader.load("common", INTERPRET)  # _sum / _max, decorated in this file's mode
_sum, _max = _common._sum, _common._max


@triton.jit
def modnorm_fwd(X, U, GATE, SHIFT, SCALE, W, H, Y, RSTD, N, C,
                stride_xb, stride_xn, stride_ub, stride_un, stride_gb, stride_shb, stride_scb,
                stride_hb, stride_hn, stride_yb, stride_yn, eps,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_W: tl.constexpr,
                HAS_RES: tl.constexpr):
    # inductor types Python float arguments as fp64 inside a compiled graph (Triton: fp32)
    eps = tl.cast(eps, tl.float32)
    pid = tl.program_id(0)
    b = tl.cast(tl.program_id(1), tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    r_ok = rows < N
    c_ok = cols < C
    mask = r_ok[:, None] & c_ok[None, :]
    x = tl.load(X + b * stride_xb + rows[:, None] * stride_xn + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    if HAS_RES:
        u = tl.load(U + b * stride_ub + rows[:, None] * stride_un + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        g = tl.load(GATE + b * stride_gb + cols, mask=c_ok, other=0.0).to(tl.float32)
        x = (x + g[None, :] * u).to(H.dtype.element_ty)
        tl.store(H + b * stride_hb + rows[:, None] * stride_hn + cols[None, :], x, mask=mask)
        x = x.to(tl.float32)
    rstd = tl.rsqrt(_sum(x * x, 1) / C + eps)
    xh = x * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
        xh = xh * w[None, :]
    sc = tl.load(SCALE + b * stride_scb + cols, mask=c_ok, other=0.0).to(tl.float32)
    sh = tl.load(SHIFT + b * stride_shb + cols, mask=c_ok, other=0.0).to(tl.float32)
    y = xh * (1.0 + sc[None, :]) + sh[None, :]
    tl.store(Y + b * stride_yb + rows[:, None] * stride_yn + cols[None, :],
             y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + b * N + rows, rstd, mask=r_ok)


@triton.jit
def modnorm_bwd(H, DY, DH, U, GATE, SCALE, W, RSTD, DX, DU, PSHIFT, PSCALE, PW, PGATE, N, C,
                rows_per_prog, stride_hb, stride_hn, stride_dyb, stride_dyn, stride_dhb,
                stride_dhn, stride_ub, stride_un, stride_gb, stride_scb, stride_dxb, stride_dxn,
                stride_dub, stride_dun,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_W: tl.constexpr,
                HAS_RES: tl.constexpr, HAS_DH: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.cast(tl.program_id(1), tl.int64)
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    sc1 = 1.0 + tl.load(SCALE + b * stride_scb + cols, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_W:
        w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_RES:
        gate = tl.load(GATE + b * stride_gb + cols, mask=c_ok, other=0.0).to(tl.float32)
    acc_shift = tl.full([BLOCK_C], 0.0, dtype=tl.float32)
    acc_scale = tl.full([BLOCK_C], 0.0, dtype=tl.float32)
    acc_w = tl.full([BLOCK_C], 0.0, dtype=tl.float32)
    acc_gate = tl.full([BLOCK_C], 0.0, dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, N)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r_ok = rows < row_end
        mask = r_ok[:, None] & c_ok[None, :]
        x = tl.load(H + b * stride_hb + rows[:, None] * stride_hn + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        dy = tl.load(DY + b * stride_dyb + rows[:, None] * stride_dyn + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + b * N + rows, mask=r_ok, other=0.0)
        xh = x * rstd[:, None]
        acc_shift += _sum(dy, 0)
        g = dy * sc1[None, :]
        if HAS_W:
            acc_scale += _sum(dy * xh * w[None, :], 0)
            acc_w += _sum(g * xh, 0)
            g = g * w[None, :]
        else:
            acc_scale += _sum(dy * xh, 0)
        proj = _sum(g * xh, 1) / C
        dx = rstd[:, None] * (g - xh * proj[:, None])
        if HAS_DH:
            dx += tl.load(DH + b * stride_dhb + rows[:, None] * stride_dhn + cols[None, :],
                          mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + b * stride_dxb + rows[:, None] * stride_dxn + cols[None, :],
                 dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_RES:
            u = tl.load(U + b * stride_ub + rows[:, None] * stride_un + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            acc_gate += _sum(dx * u, 0)
            tl.store(DU + b * stride_dub + rows[:, None] * stride_dun + cols[None, :],
                     (dx * gate[None, :]).to(DU.dtype.element_ty), mask=mask)
    part = (b * tl.num_programs(0) + pid) * C + cols
    tl.store(PSHIFT + part, acc_shift, mask=c_ok)
    tl.store(PSCALE + part, acc_scale, mask=c_ok)
    if HAS_W:
        tl.store(PW + part, acc_w, mask=c_ok)
    if HAS_RES:
        tl.store(PGATE + part, acc_gate, mask=c_ok)
