"""Triton kernels: non-causal flash attention with an optional QK-RMSNorm + 2D-RoPE prologue.

Do not import this file directly: `kernels._loader` executes it twice, once with the Triton
interpreter switched on (for CPU tensors) and once without (for CUDA tensors), so both kinds of
kernel objects exist in one process whatever TRITON_INTERPRET said when the process started.

Layout: q, k, v, o are [B, H, N, D] views with unit stride on D (any other strides).
Every head vector is loaded as two [rows, D/2] tiles x1, x2 holding the two members of each RoPE
pair: (x[2j], x[2j+1]) when INTERLEAVED, else (x[j], x[j + D/2]). RoPE rotates (x1[j], x2[j]) by
the angle of table column j (cos/sin tables [N, D/2], optionally [B, N, D/2]); the QK-norm and
q.k = q1.k1 + q2.k2 do not care about the channel order, so each tile is one tl.dot operand and
no register shuffles are needed. Without RoPE the split-halves loads (contiguous) are used.
Prologue order (as in SR-DiT): RMSNorm over D with affine weight, then RoPE.
Softmax runs in base 2: the scale 1/sqrt(D) * log2(e) is folded into q, and LSE is stored in base 2.
"""
import triton
import triton.language as tl

from . import _loader

INTERPRET = bool(triton.knobs.runtime.interpret)
_common = _loader.load("common", INTERPRET)  # _sum / _max, decorated in this file's mode
_sum, _max = _common._sum, _common._max
LOG2E = tl.constexpr(1.4426950408889634)


# ---------------------------------------------------------------------------------------------
# Prologue: RMSNorm (affine) then RoPE, in fp32, on a [rows, D] tile held as two halves.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _prologue(x1, x2, w1, w2, c, s, eps, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr,
              HEAD_DIM: tl.constexpr):
    if HAS_NORM:
        ms = (_sum(x1 * x1, 1) + _sum(x2 * x2, 1)) / HEAD_DIM
        r = tl.rsqrt(ms + eps)
        x1 = x1 * r[:, None] * w1[None, :]
        x2 = x2 * r[:, None] * w2[None, :]
    if HAS_ROPE:
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
        x1 = y1
        x2 = y2
    return x1, x2


@triton.jit
def _prologue_bwd(g1, g2, x1, x2, w1, w2, c, s, eps, HAS_NORM: tl.constexpr,
                  HAS_ROPE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """g = dL/d(prologue output) -> (dL/dx halves, per-tile dL/dw halves summed over rows)."""
    if HAS_ROPE:  # the transpose of a rotation is the rotation by -angle
        t1 = g1 * c + g2 * s
        t2 = g2 * c - g1 * s
        g1 = t1
        g2 = t2
    dw1 = tl.full([HEAD_DIM // 2], 0.0, dtype=tl.float32)
    dw2 = tl.full([HEAD_DIM // 2], 0.0, dtype=tl.float32)
    if HAS_NORM:
        ms = (_sum(x1 * x1, 1) + _sum(x2 * x2, 1)) / HEAD_DIM
        r = tl.rsqrt(ms + eps)
        u1 = x1 * r[:, None]
        u2 = x2 * r[:, None]
        dw1 = _sum(g1 * u1, 0)
        dw2 = _sum(g2 * u2, 0)
        gu1 = g1 * w1[None, :]
        gu2 = g2 * w2[None, :]
        proj = (_sum(gu1 * u1, 1) + _sum(gu2 * u2, 1)) / HEAD_DIM
        g1 = r[:, None] * (gu1 - u1 * proj[:, None])
        g2 = r[:, None] * (gu2 - u2 * proj[:, None])
    return g1, g2, dw1, dw2


@triton.jit
def _pair_cols(HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Columns of the two members of each rotation pair: (2j, 2j+1) or (j, j + D/2)."""
    j = tl.arange(0, HALF)
    if INTERLEAVED:
        c1 = 2 * j
        c2 = 2 * j + 1
    else:
        c1 = j
        c2 = j + HALF
    return c1, c2


@triton.jit
def _load_halves(base, rows, mask, stride_row, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    c1, c2 = _pair_cols(HALF, INTERLEAVED)
    ptr = base + rows[:, None] * stride_row
    x1 = tl.load(ptr + c1[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(ptr + c2[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _load_rot(COS, SIN, rows, mask, stride_cn, HALF: tl.constexpr, HAS_ROPE: tl.constexpr):
    """cos/sin rows for the given tokens ([rows, HALF] fp32); placeholders without RoPE."""
    if HAS_ROPE:
        cols = tl.arange(0, HALF)
        off = rows[:, None] * stride_cn + cols[None, :]
        c = tl.load(COS + off, mask=mask[:, None], other=1.0).to(tl.float32)
        s = tl.load(SIN + off, mask=mask[:, None], other=0.0).to(tl.float32)
    else:
        c = 1.0
        s = 0.0
    return c, s


@triton.jit
def _load_weight(W, HALF: tl.constexpr, HAS_NORM: tl.constexpr, INTERLEAVED: tl.constexpr):
    if HAS_NORM:
        c1, c2 = _pair_cols(HALF, INTERLEAVED)
        w1 = tl.load(W + c1).to(tl.float32)
        w2 = tl.load(W + c2).to(tl.float32)
    else:
        w1 = 1.0
        w2 = 1.0
    return w1, w2


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _fwd_step(acc, m_i, l_i, q1, q2, K, V, COS, SIN, kw1, kw2, start_n, N, stride_kn, stride_vn,
              stride_cn, eps, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_KNORM: tl.constexpr, HAS_ROPE: tl.constexpr, MASK_N: tl.constexpr,
              DOT_PREC: tl.constexpr, INTERLEAVED: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k1, k2 = _load_halves(K, offs_n, n_ok, stride_kn, HALF, INTERLEAVED)
    c, s = _load_rot(COS, SIN, offs_n, n_ok, stride_cn, HALF, HAS_ROPE)
    k1, k2 = _prologue(k1, k2, kw1, kw2, c, s, eps, HAS_KNORM, HAS_ROPE, HEAD_DIM)
    k1 = k1.to(q1.dtype)
    k2 = k2.to(q1.dtype)
    qk = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
    qk += tl.dot(q2, tl.trans(k2), input_precision=DOT_PREC)
    if MASK_N:
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, _max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + _sum(p, 1)
    cols = tl.arange(0, HEAD_DIM)
    v = tl.load(V + offs_n[:, None] * stride_vn + cols[None, :], mask=n_ok[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def attn_fwd(Q, K, V, O, LSE, COS, SIN, QW, KW,
             stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
             stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
             stride_cb, stride_cn, H, N, qk_scale, eps,
             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             HAS_QNORM: tl.constexpr, HAS_KNORM: tl.constexpr, HAS_ROPE: tl.constexpr,
             DOT_PREC: tl.constexpr, INTERLEAVED: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = tl.cast(bh // H, tl.int64)
    h = tl.cast(bh % H, tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    COS += b * stride_cb
    SIN += b * stride_cb

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    q1, q2 = _load_halves(Q, offs_m, m_ok, stride_qn, HALF, INTERLEAVED)
    c, s = _load_rot(COS, SIN, offs_m, m_ok, stride_cn, HALF, HAS_ROPE)
    qw1, qw2 = _load_weight(QW, HALF, HAS_QNORM, INTERLEAVED)
    q1, q2 = _prologue(q1, q2, qw1, qw2, c, s, eps, HAS_QNORM, HAS_ROPE, HEAD_DIM)
    q1 = (q1 * qk_scale).to(Q.dtype.element_ty)
    q2 = (q2 * qk_scale).to(Q.dtype.element_ty)
    kw1, kw2 = _load_weight(KW, HALF, HAS_KNORM, INTERLEAVED)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q1, q2, K, V, COS, SIN, kw1, kw2, start_n, N,
                                  stride_kn, stride_vn, stride_cn, eps, HEAD_DIM, BLOCK_N,
                                  HAS_KNORM, HAS_ROPE, False, DOT_PREC, INTERLEAVED)
    if n_full < N:
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q1, q2, K, V, COS, SIN, kw1, kw2, n_full, N,
                                  stride_kn, stride_vn, stride_cn, eps, HEAD_DIM, BLOCK_N,
                                  HAS_KNORM, HAS_ROPE, True, DOT_PREC, INTERLEAVED)
    acc = acc / l_i[:, None]
    cols = tl.arange(0, HEAD_DIM)
    tl.store(O + offs_m[:, None] * stride_on + cols[None, :], acc.to(O.dtype.element_ty),
             mask=m_ok[:, None])
    tl.store(LSE + bh * N + offs_m, m_i + tl.log2(l_i), mask=m_ok)


# ---------------------------------------------------------------------------------------------
# Backward: delta = rowsum(dO * O); dK/dV kernel (one program per key block, loops over queries);
# dQ kernel (one program per query block, loops over keys). P is recomputed from the saved LSE and
# the prologue is recomputed from the raw q/k; its chain rule runs in each kernel's epilogue.
# ---------------------------------------------------------------------------------------------
@triton.jit
def attn_bwd_delta(O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_db, stride_dh, stride_dn,
                   H, N, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = tl.cast(bh // H, tl.int64)
    h = tl.cast(bh % H, tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    cols = tl.arange(0, HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + cols[None, :],
                mask=m_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dn + cols[None, :],
                 mask=m_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh * N + offs_m, _sum(o * do, 1), mask=m_ok)


@triton.jit
def _dkdv_step(dk1, dk2, dv, k1, k2, v, Q, DO, LSE, DELTA, COS, SIN, qw1, qw2, start_m, N,
               stride_qn, stride_don, stride_cn, qk_scale, eps, HEAD_DIM: tl.constexpr,
               BLOCK_M: tl.constexpr, HAS_QNORM: tl.constexpr, HAS_ROPE: tl.constexpr,
               MASK_M: tl.constexpr, DOT_PREC: tl.constexpr, INTERLEAVED: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    q1, q2 = _load_halves(Q, offs_m, m_ok, stride_qn, HALF, INTERLEAVED)
    c, s = _load_rot(COS, SIN, offs_m, m_ok, stride_cn, HALF, HAS_ROPE)
    q1, q2 = _prologue(q1, q2, qw1, qw2, c, s, eps, HAS_QNORM, HAS_ROPE, HEAD_DIM)
    q1 = (q1 * qk_scale).to(k1.dtype)
    q2 = (q2 * qk_scale).to(k1.dtype)
    cols = tl.arange(0, HEAD_DIM)
    do = tl.load(DO + offs_m[:, None] * stride_don + cols[None, :], mask=m_ok[:, None], other=0.0)
    lse = tl.load(LSE + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
    st = tl.dot(k1, tl.trans(q1), input_precision=DOT_PREC)
    st += tl.dot(k2, tl.trans(q2), input_precision=DOT_PREC)
    pt = tl.exp2(st - lse[None, :])
    if MASK_M:
        pt = tl.where(m_ok[None, :], pt, 0.0)
    dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dst = (pt * (dpt - delta[None, :])).to(k1.dtype)
    dk1 += tl.dot(dst, q1, input_precision=DOT_PREC)
    dk2 += tl.dot(dst, q2, input_precision=DOT_PREC)
    return dk1, dk2, dv


@triton.jit
def attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DKW, COS, SIN, QW, KW,
                  stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                  stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                  stride_cb, stride_cn, H, N, qk_scale, eps,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_QNORM: tl.constexpr, HAS_KNORM: tl.constexpr, HAS_ROPE: tl.constexpr,
                  DOT_PREC: tl.constexpr, INTERLEAVED: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = tl.cast(bh // H, tl.int64)
    h = tl.cast(bh % H, tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DK += b * stride_dkb + h * stride_dkh
    DV += b * stride_dvb + h * stride_dvh
    COS += b * stride_cb
    SIN += b * stride_cb
    LSE += bh * N
    DELTA += bh * N

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    kx1, kx2 = _load_halves(K, offs_n, n_ok, stride_kn, HALF, INTERLEAVED)
    kc, ks = _load_rot(COS, SIN, offs_n, n_ok, stride_cn, HALF, HAS_ROPE)
    kw1, kw2 = _load_weight(KW, HALF, HAS_KNORM, INTERLEAVED)
    k1, k2 = _prologue(kx1, kx2, kw1, kw2, kc, ks, eps, HAS_KNORM, HAS_ROPE, HEAD_DIM)
    k1 = k1.to(K.dtype.element_ty)
    k2 = k2.to(K.dtype.element_ty)
    cols = tl.arange(0, HEAD_DIM)
    v = tl.load(V + offs_n[:, None] * stride_vn + cols[None, :], mask=n_ok[:, None], other=0.0)
    qw1, qw2 = _load_weight(QW, HALF, HAS_QNORM, INTERLEAVED)

    dk1 = tl.full([BLOCK_N, HALF], 0.0, dtype=tl.float32)
    dk2 = tl.full([BLOCK_N, HALF], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, HEAD_DIM], 0.0, dtype=tl.float32)
    m_full = (N // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk1, dk2, dv = _dkdv_step(dk1, dk2, dv, k1, k2, v, Q, DO, LSE, DELTA, COS, SIN, qw1, qw2,
                                  start_m, N, stride_qn, stride_don, stride_cn, qk_scale, eps,
                                  HEAD_DIM, BLOCK_M, HAS_QNORM, HAS_ROPE, False, DOT_PREC,
                                  INTERLEAVED)
    if m_full < N:
        dk1, dk2, dv = _dkdv_step(dk1, dk2, dv, k1, k2, v, Q, DO, LSE, DELTA, COS, SIN, qw1, qw2,
                                  m_full, N, stride_qn, stride_don, stride_cn, qk_scale, eps,
                                  HEAD_DIM, BLOCK_M, HAS_QNORM, HAS_ROPE, True, DOT_PREC,
                                  INTERLEAVED)
    tl.store(DV + offs_n[:, None] * stride_dvn + cols[None, :], dv.to(DV.dtype.element_ty),
             mask=n_ok[:, None])
    # q was scaled by qk_scale = scale * log2(e); the logits' gradient needs scale only
    dk1 = dk1 * (1.0 / LOG2E)
    dk2 = dk2 * (1.0 / LOG2E)
    dk1, dk2, dw1, dw2 = _prologue_bwd(dk1, dk2, kx1, kx2, kw1, kw2, kc, ks, eps, HAS_KNORM,
                                       HAS_ROPE, HEAD_DIM)
    c1, c2 = _pair_cols(HALF, INTERLEAVED)
    dk_ptr = DK + offs_n[:, None] * stride_dkn
    tl.store(dk_ptr + c1[None, :], dk1.to(DK.dtype.element_ty), mask=n_ok[:, None])
    tl.store(dk_ptr + c2[None, :], dk2.to(DK.dtype.element_ty), mask=n_ok[:, None])
    if HAS_KNORM:  # one row of per-program partial sums; the host adds the rows
        row = DKW + (bh * tl.num_programs(0) + pid_n) * HEAD_DIM
        tl.store(row + c1, dw1)
        tl.store(row + c2, dw2)


@triton.jit
def _dq_step(dq1, dq2, q1, q2, do, lse, delta, K, V, COS, SIN, kw1, kw2, start_n, N, stride_kn,
             stride_vn, stride_cn, eps, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
             HAS_KNORM: tl.constexpr, HAS_ROPE: tl.constexpr, MASK_N: tl.constexpr,
             DOT_PREC: tl.constexpr, INTERLEAVED: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k1, k2 = _load_halves(K, offs_n, n_ok, stride_kn, HALF, INTERLEAVED)
    c, s = _load_rot(COS, SIN, offs_n, n_ok, stride_cn, HALF, HAS_ROPE)
    k1, k2 = _prologue(k1, k2, kw1, kw2, c, s, eps, HAS_KNORM, HAS_ROPE, HEAD_DIM)
    k1 = k1.to(q1.dtype)
    k2 = k2.to(q1.dtype)
    cols = tl.arange(0, HEAD_DIM)
    v = tl.load(V + offs_n[:, None] * stride_vn + cols[None, :], mask=n_ok[:, None], other=0.0)
    qk = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
    qk += tl.dot(q2, tl.trans(k2), input_precision=DOT_PREC)
    p = tl.exp2(qk - lse[:, None])
    if MASK_N:
        p = tl.where(n_ok[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = (p * (dp - delta[:, None])).to(q1.dtype)
    dq1 += tl.dot(ds, k1, input_precision=DOT_PREC)
    dq2 += tl.dot(ds, k2, input_precision=DOT_PREC)
    return dq1, dq2


@triton.jit
def attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, DQW, COS, SIN, QW, KW,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                stride_dqb, stride_dqh, stride_dqn, stride_cb, stride_cn, H, N, qk_scale, sm_scale,
                eps, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_QNORM: tl.constexpr, HAS_KNORM: tl.constexpr, HAS_ROPE: tl.constexpr,
                DOT_PREC: tl.constexpr, INTERLEAVED: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = tl.cast(bh // H, tl.int64)
    h = tl.cast(bh % H, tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DQ += b * stride_dqb + h * stride_dqh
    COS += b * stride_cb
    SIN += b * stride_cb

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    qx1, qx2 = _load_halves(Q, offs_m, m_ok, stride_qn, HALF, INTERLEAVED)
    qc, qs = _load_rot(COS, SIN, offs_m, m_ok, stride_cn, HALF, HAS_ROPE)
    qw1, qw2 = _load_weight(QW, HALF, HAS_QNORM, INTERLEAVED)
    q1, q2 = _prologue(qx1, qx2, qw1, qw2, qc, qs, eps, HAS_QNORM, HAS_ROPE, HEAD_DIM)
    q1 = (q1 * qk_scale).to(Q.dtype.element_ty)
    q2 = (q2 * qk_scale).to(Q.dtype.element_ty)
    cols = tl.arange(0, HEAD_DIM)
    do = tl.load(DO + offs_m[:, None] * stride_don + cols[None, :], mask=m_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh * N + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + bh * N + offs_m, mask=m_ok, other=0.0)
    kw1, kw2 = _load_weight(KW, HALF, HAS_KNORM, INTERLEAVED)

    dq1 = tl.full([BLOCK_M, HALF], 0.0, dtype=tl.float32)
    dq2 = tl.full([BLOCK_M, HALF], 0.0, dtype=tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq1, dq2 = _dq_step(dq1, dq2, q1, q2, do, lse, delta, K, V, COS, SIN, kw1, kw2, start_n, N,
                            stride_kn, stride_vn, stride_cn, eps, HEAD_DIM, BLOCK_N, HAS_KNORM,
                            HAS_ROPE, False, DOT_PREC, INTERLEAVED)
    if n_full < N:
        dq1, dq2 = _dq_step(dq1, dq2, q1, q2, do, lse, delta, K, V, COS, SIN, kw1, kw2, n_full, N,
                            stride_kn, stride_vn, stride_cn, eps, HEAD_DIM, BLOCK_N, HAS_KNORM,
                            HAS_ROPE, True, DOT_PREC, INTERLEAVED)
    dq1 = dq1 * sm_scale
    dq2 = dq2 * sm_scale
    dq1, dq2, dw1, dw2 = _prologue_bwd(dq1, dq2, qx1, qx2, qw1, qw2, qc, qs, eps, HAS_QNORM,
                                       HAS_ROPE, HEAD_DIM)
    c1, c2 = _pair_cols(HALF, INTERLEAVED)
    dq_ptr = DQ + offs_m[:, None] * stride_dqn
    tl.store(dq_ptr + c1[None, :], dq1.to(DQ.dtype.element_ty), mask=m_ok[:, None])
    tl.store(dq_ptr + c2[None, :], dq2.to(DQ.dtype.element_ty), mask=m_ok[:, None])
    if HAS_QNORM:
        row = DQW + (bh * tl.num_programs(0) + pid_m) * HEAD_DIM
        tl.store(row + c1, dw1)
        tl.store(row + c2, dw2)


# ---------------------------------------------------------------------------------------------
# Stand-alone prologue: P(q) and P(k) written out, for an attention implementation that has no
# prologue of its own (PyTorch SDPA's cuDNN/flash backends). One program per (token block,
# batch * head, q or k); the backward recomputes the prologue from the saved inputs.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _load_pairs(base, rows, mask, stride_row, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                INTERLEAVED: tl.constexpr):
    """A [ROWS, D] tile read row-contiguously (vectorised, coalesced), split into the two
    [ROWS, D/2] members of each rotation pair. The strided column loads of `_load_halves` are
    fine inside attention, where the matmuls dominate, but made this memory-bound pass ~20x
    slower than its bandwidth allows."""
    HALF: tl.constexpr = HEAD_DIM // 2
    cols = tl.arange(0, HEAD_DIM)
    x = tl.load(base + rows[:, None] * stride_row + cols[None, :], mask=mask[:, None], other=0.0)
    x = x.to(tl.float32)
    if INTERLEAVED:
        x1, x2 = tl.split(tl.reshape(x, [ROWS, HALF, 2]))
    else:
        x1, x2 = tl.split(tl.permute(tl.reshape(x, [ROWS, 2, HALF]), [0, 2, 1]))
    return x1, x2


@triton.jit
def _store_pairs(base, rows, mask, stride_row, x1, x2, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 INTERLEAVED: tl.constexpr):
    """The inverse of `_load_pairs`: one row-contiguous store of the re-interleaved tile."""
    if INTERLEAVED:
        x = tl.reshape(tl.join(x1, x2), [ROWS, HEAD_DIM])
    else:
        x = tl.reshape(tl.permute(tl.join(x1, x2), [0, 2, 1]), [ROWS, HEAD_DIM])
    cols = tl.arange(0, HEAD_DIM)
    tl.store(base + rows[:, None] * stride_row + cols[None, :], x.to(base.dtype.element_ty),
             mask=mask[:, None])


@triton.jit
def _prologue_tile_fwd(X, Y, W, COS, SIN, offs, ok, stride_xn, stride_yn, stride_cn, eps,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_NORM: tl.constexpr,
                       HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    x1, x2 = _load_pairs(X, offs, ok, stride_xn, BLOCK_N, HEAD_DIM, INTERLEAVED)
    c, s = _load_rot(COS, SIN, offs, ok, stride_cn, HALF, HAS_ROPE)
    w1, w2 = _load_weight(W, HALF, HAS_NORM, INTERLEAVED)
    y1, y2 = _prologue(x1, x2, w1, w2, c, s, eps, HAS_NORM, HAS_ROPE, HEAD_DIM)
    _store_pairs(Y, offs, ok, stride_yn, y1, y2, BLOCK_N, HEAD_DIM, INTERLEAVED)


@triton.jit
def _prologue_program(COS, SIN, stride_cb, H, N, BLOCK_N: tl.constexpr):
    """What program (token block, batch * head, q or k) works on: its token offsets and their
    mask, batch, head, which tensor (0: q, 1: k), and the RoPE tables of its sample."""
    bh = tl.program_id(1)
    b = tl.cast(bh // H, tl.int64)
    h = tl.cast(bh % H, tl.int64)
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs, offs < N, b, h, tl.program_id(2), COS + b * stride_cb, SIN + b * stride_cb


@triton.jit
def qk_prologue_fwd(Q, K, QO, KO, COS, SIN, QW, KW,
                    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                    stride_ob, stride_oh, stride_on, stride_cb, stride_cn, H, N, eps,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_QNORM: tl.constexpr,
                    HAS_KNORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr):
    offs, ok, b, h, which, COS, SIN = _prologue_program(COS, SIN, stride_cb, H, N, BLOCK_N)
    out_off = b * stride_ob + h * stride_oh
    if which == 0:
        _prologue_tile_fwd(Q + b * stride_qb + h * stride_qh, QO + out_off, QW, COS, SIN, offs, ok,
                           stride_qn, stride_on, stride_cn, eps, HEAD_DIM, BLOCK_N, HAS_QNORM,
                           HAS_ROPE, INTERLEAVED)
    else:
        _prologue_tile_fwd(K + b * stride_kb + h * stride_kh, KO + out_off, KW, COS, SIN, offs, ok,
                           stride_kn, stride_on, stride_cn, eps, HEAD_DIM, BLOCK_N, HAS_KNORM,
                           HAS_ROPE, INTERLEAVED)


@triton.jit
def _prologue_tile_bwd(X, G, DX, W, DW_ROW, COS, SIN, offs, ok, stride_xn, stride_gn, stride_dn,
                       stride_cn, eps, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                       HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    x1, x2 = _load_pairs(X, offs, ok, stride_xn, BLOCK_N, HEAD_DIM, INTERLEAVED)
    g1, g2 = _load_pairs(G, offs, ok, stride_gn, BLOCK_N, HEAD_DIM, INTERLEAVED)
    c, s = _load_rot(COS, SIN, offs, ok, stride_cn, HALF, HAS_ROPE)
    w1, w2 = _load_weight(W, HALF, HAS_NORM, INTERLEAVED)
    dx1, dx2, dw1, dw2 = _prologue_bwd(g1, g2, x1, x2, w1, w2, c, s, eps, HAS_NORM, HAS_ROPE,
                                       HEAD_DIM)
    _store_pairs(DX, offs, ok, stride_dn, dx1, dx2, BLOCK_N, HEAD_DIM, INTERLEAVED)
    if HAS_NORM:  # masked rows load as zeros and add nothing
        c1, c2 = _pair_cols(HALF, INTERLEAVED)
        tl.store(DW_ROW + c1, dw1)
        tl.store(DW_ROW + c2, dw2)


@triton.jit
def qk_prologue_bwd(Q, K, DQO, DKO, DQ, DK, DQW, DKW, COS, SIN, QW, KW,
                    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                    stride_gqb, stride_gqh, stride_gqn, stride_gkb, stride_gkh, stride_gkn,
                    stride_db, stride_dh, stride_dn, stride_cb, stride_cn, H, N, eps,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_QNORM: tl.constexpr,
                    HAS_KNORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr):
    """dq, dk into [B, H, N, D] buffers; per-program partial sums of the norm weights' gradients
    into row (bh * num_programs(0) + pid_n) of DQW / DKW."""
    offs, ok, b, h, which, COS, SIN = _prologue_program(COS, SIN, stride_cb, H, N, BLOCK_N)
    d_off = b * stride_db + h * stride_dh
    row = (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)).to(tl.int64) * HEAD_DIM
    if which == 0:
        _prologue_tile_bwd(Q + b * stride_qb + h * stride_qh, DQO + b * stride_gqb + h * stride_gqh,
                           DQ + d_off, QW, DQW + row, COS, SIN, offs, ok, stride_qn, stride_gqn,
                           stride_dn, stride_cn, eps, HEAD_DIM, BLOCK_N, HAS_QNORM, HAS_ROPE,
                           INTERLEAVED)
    else:
        _prologue_tile_bwd(K + b * stride_kb + h * stride_kh, DKO + b * stride_gkb + h * stride_gkh,
                           DK + d_off, KW, DKW + row, COS, SIN, offs, ok, stride_kn, stride_gkn,
                           stride_dn, stride_cn, eps, HEAD_DIM, BLOCK_N, HAS_KNORM, HAS_ROPE,
                           INTERLEAVED)


PROLOGUE_META = {"BLOCK_N": 64} if INTERPRET else {"BLOCK_N": 64, "num_warps": 4}


# ---------------------------------------------------------------------------------------------
# Launch configurations (BLOCK_M, BLOCK_N, num_warps, num_stages). Compiled kernels are autotuned
# over these per (N, head_dim, flags, dtypes); the partial-sum buffers are zeroed between tuning
# runs because the number of programs (hence the rows they write) depends on the config. With
# KERNELS_AUTOTUNE=0 at launch time, and always in the interpreter (autotuning needs a GPU),
# FIXED_META is used instead: the first config of each list (64 x 64 tiles when interpreted).
# ---------------------------------------------------------------------------------------------
FWD_CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3),
               (64, 32, 4, 3), (32, 64, 4, 2)]
DKDV_CONFIGS = [(32, 64, 4, 2), (64, 64, 4, 2), (64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 8, 3),
                (32, 32, 4, 2)]
DQ_CONFIGS = [(64, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 4, 2), (64, 64, 8, 3),
              (32, 32, 4, 2)]


def _meta(cfg):
    m, n, w, s = cfg
    return {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}


if INTERPRET:
    FIXED_META = {k: {"BLOCK_M": 64, "BLOCK_N": 64} for k in ("fwd", "dkdv", "dq")}
    attn_fwd_tuned = attn_bwd_dkdv_tuned = attn_bwd_dq_tuned = None
else:
    FIXED_META = {"fwd": _meta(FWD_CONFIGS[0]), "dkdv": _meta(DKDV_CONFIGS[0]),
                  "dq": _meta(DQ_CONFIGS[0])}

    def _configs(cfgs):
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for (m, n, w, s) in cfgs]

    _KEY = ["N", "HEAD_DIM", "HAS_QNORM", "HAS_KNORM", "HAS_ROPE", "DOT_PREC",
            "INTERLEAVED"]
    attn_fwd_tuned = triton.autotune(configs=_configs(FWD_CONFIGS), key=_KEY)(attn_fwd)
    attn_bwd_dkdv_tuned = triton.autotune(configs=_configs(DKDV_CONFIGS), key=_KEY,
                                          reset_to_zero=["DKW"])(attn_bwd_dkdv)
    attn_bwd_dq_tuned = triton.autotune(configs=_configs(DQ_CONFIGS), key=_KEY,
                                        reset_to_zero=["DQW"])(attn_bwd_dq)
# the smallest key tile of dK/dV and query tile of dQ among the tuned configs: sizes the
# partial-sum buffers of the norm weights' gradients
TUNED_MIN_TILE = min([c[1] for c in DKDV_CONFIGS] + [c[0] for c in DQ_CONFIGS])
