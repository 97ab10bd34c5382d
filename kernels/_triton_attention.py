"""Triton kernels: non-causal flash attention with an optional QK-RMSNorm + 2D-RoPE prologue.

Do not import this file directly: `kernels._loader` executes it twice, once with the Triton
interpreter switched on (for CPU tensors) and once without (for CUDA tensors), so both kinds of
kernel objects exist in one process whatever TRITON_INTERPRET said when the process started.

Layout: q, k, v, o are [B, H, N, D] views with unit stride on D (any other strides).
Every tile is loaded row-contiguously as [rows, D] in its storage dtype and used whole as a
tl.dot operand (K = D). Where the prologue applies, the tile is split in registers into the two
[rows, D/2] members x1, x2 of each RoPE pair -- (x[2j], x[2j+1]) when INTERLEAVED, else
(x[j], x[j + D/2]) -- which RoPE rotates by the angle of table column j (cos/sin tables
[N, D/2], optionally [B, N, D/2]), and joined back. Prologue order (as in SR-DiT): RMSNorm over
D with affine weight, then RoPE, in fp32.
Softmax runs in base 2: logits are scaled by 1/sqrt(D) * log2(e) in fp32 after the dot, and the
logsumexp is stored in base 2.
"""
import triton
import triton.language as tl

from . import _loader

INTERPRET = bool(triton.knobs.runtime.interpret)
_common = _loader.load("common", INTERPRET)  # _sum / _max, decorated in this file's mode
_sum, _max = _common._sum, _common._max


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
def _load_tile(base, rows, mask, stride_row, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """A [rows, D] tile in its storage dtype, one row-contiguous (vectorised) load; rows past the
    end read as zeros when MASKED (full tiles skip the mask so the loads can be pipelined)."""
    cols = tl.arange(0, HEAD_DIM)
    ptr = base + rows[:, None] * stride_row + cols[None, :]
    if MASKED:
        x = tl.load(ptr, mask=mask[:, None], other=0.0)
    else:
        x = tl.load(ptr)
    return x


@triton.jit
def _store_tile(base, rows, mask, stride_row, x, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    cols = tl.arange(0, HEAD_DIM)
    ptr = base + rows[:, None] * stride_row + cols[None, :]
    if MASKED:
        tl.store(ptr, x.to(base.dtype.element_ty), mask=mask[:, None])
    else:
        tl.store(ptr, x.to(base.dtype.element_ty))


@triton.jit
def _split_pairs(x, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """[ROWS, D] -> the two [ROWS, D/2] members of each rotation pair, in registers."""
    HALF: tl.constexpr = HEAD_DIM // 2
    if INTERLEAVED:
        x1, x2 = tl.split(tl.reshape(x, [ROWS, HALF, 2]))
    else:
        x1, x2 = tl.split(tl.permute(tl.reshape(x, [ROWS, 2, HALF]), [0, 2, 1]))
    return x1, x2


@triton.jit
def _join_pairs(x1, x2, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The inverse of `_split_pairs`."""
    if INTERLEAVED:
        x = tl.reshape(tl.join(x1, x2), [ROWS, HEAD_DIM])
    else:
        x = tl.reshape(tl.permute(tl.join(x1, x2), [0, 2, 1]), [ROWS, HEAD_DIM])
    return x


@triton.jit
def _prologue_tile(x, w1, w2, c, s, eps, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr,
                   ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """P(x) of a [ROWS, D] tile, in fp32; x itself (storage dtype) when there is no prologue."""
    if HAS_NORM or HAS_ROPE:
        x1, x2 = _split_pairs(x.to(tl.float32), ROWS, HEAD_DIM, INTERLEAVED)
        x1, x2 = _prologue(x1, x2, w1, w2, c, s, eps, HAS_NORM, HAS_ROPE, HEAD_DIM)
        x = _join_pairs(x1, x2, ROWS, HEAD_DIM, INTERLEAVED)
    return x


@triton.jit
def _prologue_tile_grad(g, x, w1, w2, c, s, eps, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr,
                        ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """dL/dx of a [ROWS, D] tile from g = dL/dP(x) (fp32), and the tile's dL/dw halves."""
    HALF: tl.constexpr = HEAD_DIM // 2
    if HAS_NORM or HAS_ROPE:
        g1, g2 = _split_pairs(g, ROWS, HEAD_DIM, INTERLEAVED)
        x1, x2 = _split_pairs(x.to(tl.float32), ROWS, HEAD_DIM, INTERLEAVED)
        g1, g2, dw1, dw2 = _prologue_bwd(g1, g2, x1, x2, w1, w2, c, s, eps, HAS_NORM, HAS_ROPE,
                                         HEAD_DIM)
        g = _join_pairs(g1, g2, ROWS, HEAD_DIM, INTERLEAVED)
    else:
        dw1 = tl.full([HALF], 0.0, dtype=tl.float32)
        dw2 = tl.full([HALF], 0.0, dtype=tl.float32)
    return g, dw1, dw2
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




@triton.jit
def _store_weight_grad(DW, row, dw1, dw2, HEAD_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """One row of per-program partial sums of a norm weight's gradient (the host adds the rows)."""
    c1, c2 = _pair_cols(HEAD_DIM // 2, INTERLEAVED)
    base = DW + tl.cast(row, tl.int64) * HEAD_DIM
    tl.store(base + c1, dw1)
    tl.store(base + c2, dw2)


@triton.jit
def _load_qk_tile(X, W_1, W_2, COS, SIN, offs, ok, stride_xn, stride_cn, eps,
                  HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, MASKED: tl.constexpr,
                  HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr):
    """P(x) for a tile of q or k rows, in the storage dtype (the tl.dot operand)."""
    x = _load_tile(X, offs, ok, stride_xn, HEAD_DIM, MASKED)
    c, s = _load_rot(COS, SIN, offs, ok, stride_cn, HEAD_DIM // 2, HAS_ROPE)
    return _prologue_tile(x, W_1, W_2, c, s, eps, HAS_NORM, HAS_ROPE, ROWS, HEAD_DIM,
                          INTERLEAVED).to(X.dtype.element_ty)


# ---------------------------------------------------------------------------------------------
# Forward. Each program owns BLOCK_M query rows and loops over the keys: full BLOCK_N tiles
# without masks, then the ragged end in TAIL-wide steps (N = 257 = 4 x 64 + 1 would otherwise
# spend a fifth of every program on one key). A program whose query block runs past N works in
# TAIL-row steps for the same reason. Logits are scaled in fp32 after the dot (base 2).
# ---------------------------------------------------------------------------------------------
TAIL = tl.constexpr(16)  # the smallest tl.dot dimension


@triton.jit
def _fwd_step(acc, m_i, l_i, q, K, V, COS, SIN, kw1, kw2, start_n, N, stride_kn, stride_vn,
              stride_cn, qk_scale, eps, HEAD_DIM: tl.constexpr, COLS: tl.constexpr,
              MASKED: tl.constexpr, HAS_KNORM: tl.constexpr, HAS_ROPE: tl.constexpr,
              DOT_PREC: tl.constexpr, INTERLEAVED: tl.constexpr):
    offs_n = start_n + tl.arange(0, COLS)
    n_ok = offs_n < N
    k = _load_qk_tile(K, kw1, kw2, COS, SIN, offs_n, n_ok, stride_kn, stride_cn, eps, HEAD_DIM,
                      COLS, MASKED, HAS_KNORM, HAS_ROPE, INTERLEAVED)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASKED:
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, _max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + _sum(p, 1)
    v = _load_tile(V, offs_n, n_ok, stride_vn, HEAD_DIM, MASKED)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _fwd_rows(Q, K, V, O, LSE, COS, SIN, qw1, qw2, kw1, kw2, start_m, N, stride_qn, stride_kn,
              stride_vn, stride_on, stride_cn, qk_scale, eps, HEAD_DIM: tl.constexpr,
              ROWS: tl.constexpr, BLOCK_N: tl.constexpr, MASK_M: tl.constexpr,
              HAS_QNORM: tl.constexpr, HAS_KNORM: tl.constexpr, HAS_ROPE: tl.constexpr,
              DOT_PREC: tl.constexpr, INTERLEAVED: tl.constexpr):
    offs_m = start_m + tl.arange(0, ROWS)
    m_ok = offs_m < N
    q = _load_qk_tile(Q, qw1, qw2, COS, SIN, offs_m, m_ok, stride_qn, stride_cn, eps, HEAD_DIM,
                      ROWS, MASK_M, HAS_QNORM, HAS_ROPE, INTERLEAVED)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.full([ROWS], 0.0, dtype=tl.float32)
    acc = tl.full([ROWS, HEAD_DIM], 0.0, dtype=tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K, V, COS, SIN, kw1, kw2, start_n, N,
                                  stride_kn, stride_vn, stride_cn, qk_scale, eps, HEAD_DIM,
                                  BLOCK_N, False, HAS_KNORM, HAS_ROPE, DOT_PREC, INTERLEAVED)
    for start_n in range(n_full, N, TAIL):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K, V, COS, SIN, kw1, kw2, start_n, N,
                                  stride_kn, stride_vn, stride_cn, qk_scale, eps, HEAD_DIM,
                                  TAIL, True, HAS_KNORM, HAS_ROPE, DOT_PREC, INTERLEAVED)
    _store_tile(O, offs_m, m_ok, stride_on, acc / l_i[:, None], HEAD_DIM, MASK_M)
    if MASK_M:
        tl.store(LSE + offs_m, m_i + tl.log2(l_i), mask=m_ok)
    else:
        tl.store(LSE + offs_m, m_i + tl.log2(l_i))


@triton.jit
def attn_fwd(Q, K, V, O, LSE, COS, SIN, QW, KW,
             stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
             stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
             stride_cb, stride_cn, H, N, qk_scale, eps,
             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             HAS_QNORM: tl.constexpr, HAS_KNORM: tl.constexpr, HAS_ROPE: tl.constexpr,
             DOT_PREC: tl.constexpr, INTERLEAVED: tl.constexpr):
    # inductor types Python float arguments as fp64 when it launches a kernel inside a compiled
    # graph (Triton's own launcher: fp32); fp64 would leak into the loop-carried fp32 state
    qk_scale, eps = tl.cast(qk_scale, tl.float32), tl.cast(eps, tl.float32)
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = tl.cast(bh // H, tl.int64)
    h = tl.cast(bh % H, tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    LSE += tl.cast(bh, tl.int64) * N
    COS += b * stride_cb
    SIN += b * stride_cb
    qw1, qw2 = _load_weight(QW, HALF, HAS_QNORM, INTERLEAVED)
    kw1, kw2 = _load_weight(KW, HALF, HAS_KNORM, INTERLEAVED)
    start_m = pid_m * BLOCK_M
    if start_m + BLOCK_M <= N:
        _fwd_rows(Q, K, V, O, LSE, COS, SIN, qw1, qw2, kw1, kw2, start_m, N, stride_qn, stride_kn,
                  stride_vn, stride_on, stride_cn, qk_scale, eps, HEAD_DIM, BLOCK_M, BLOCK_N,
                  False, HAS_QNORM, HAS_KNORM, HAS_ROPE, DOT_PREC, INTERLEAVED)
    else:
        for start in range(start_m, N, TAIL):
            _fwd_rows(Q, K, V, O, LSE, COS, SIN, qw1, qw2, kw1, kw2, start, N, stride_qn,
                      stride_kn, stride_vn, stride_on, stride_cn, qk_scale, eps, HEAD_DIM, TAIL,
                      BLOCK_N, True, HAS_QNORM, HAS_KNORM, HAS_ROPE, DOT_PREC, INTERLEAVED)


# ---------------------------------------------------------------------------------------------
# Backward: one launch (after the prologue kernel's, with a prologue). Programs
# [0, cdiv(N, BLOCK_N1)) each own BLOCK_N1 keys and accumulate
# dK, dV over the queries (BLOCK_M1 per step); the programs after them each own BLOCK_M2 queries
# and accumulate dQ over the keys (BLOCK_N2 per step). P is recomputed from the saved LSE,
# delta = rowsum(dO * O) from the O and dO tiles at hand (no separate pass). Q and K hold
# P(q), P(k): with a prologue the host recomputes them first with the stand-alone prologue
# kernel below, so the loops are those of plain attention; the prologue's chain rule runs in
# each program's epilogue on its own rows, from the raw QX/KX. (Recomputing the prologue inside
# the loops, for every tile pair, took 252-255 registers per thread at every tile config for
# sm_90, with spills at six of nine; now 157-255, one spilling: kernels/README.md.) Ragged ends
# are handled in TAIL-sized steps as in the forward. No atomics: the result does not depend on
# scheduling.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _query_stats(O, DO, LSE, offs_m, m_ok, stride_on, stride_don, HEAD_DIM: tl.constexpr,
                 MASKED: tl.constexpr):
    """dO, the logsumexp and delta = rowsum(dO * O) of some query rows."""
    do = _load_tile(DO, offs_m, m_ok, stride_don, HEAD_DIM, MASKED)
    o = _load_tile(O, offs_m, m_ok, stride_on, HEAD_DIM, MASKED)
    if MASKED:
        lse = tl.load(LSE + offs_m, mask=m_ok, other=0.0)
    else:
        lse = tl.load(LSE + offs_m)
    return do, lse, _sum(o.to(tl.float32) * do.to(tl.float32), 1)


@triton.jit
def _prologue_grad_rows(g, X, W_1, W_2, COS, SIN, offs, ok, stride_xn, stride_cn, eps,
                        HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, MASKED: tl.constexpr,
                        HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr,
                        INTERLEAVED: tl.constexpr):
    """dL/dx of some rows of the raw q or k from g = dL/dP(x) (fp32), and their dL/dw halves:
    the epilogue of a backward program (the raw rows and RoPE rows are loaded only here)."""
    if HAS_NORM or HAS_ROPE:
        x = _load_tile(X, offs, ok, stride_xn, HEAD_DIM, MASKED)
        c, s = _load_rot(COS, SIN, offs, ok, stride_cn, HEAD_DIM // 2, HAS_ROPE)
    else:
        x, c, s = g, 1.0, 0.0  # unused: no prologue
    return _prologue_tile_grad(g, x, W_1, W_2, c, s, eps, HAS_NORM, HAS_ROPE, ROWS, HEAD_DIM,
                               INTERLEAVED)


@triton.jit
def _dkdv_step(dk, dv, k, v, Q, O, DO, LSE, start_m, N, stride_qn, stride_on, stride_don,
               qk_scale, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, MASKED: tl.constexpr,
               DOT_PREC: tl.constexpr):
    offs_m = start_m + tl.arange(0, ROWS)
    m_ok = offs_m < N
    q = _load_tile(Q, offs_m, m_ok, stride_qn, HEAD_DIM, MASKED)
    do, lse, delta = _query_stats(O, DO, LSE, offs_m, m_ok, stride_on, stride_don, HEAD_DIM,
                                  MASKED)
    st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
    pt = tl.exp2(st - lse[None, :])
    if MASKED:
        pt = tl.where(m_ok[None, :], pt, 0.0)
    dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dst = (pt * (dpt - delta[None, :])).to(q.dtype)
    dk += tl.dot(dst, q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _dkdv_rows(Q, K, KX, V, O, DO, DK, DV, LSE, COS, SIN, kw1, kw2, start_n, N, stride_qn,
               stride_kn, stride_kxn, stride_vn, stride_on, stride_don, stride_dkn, stride_dvn,
               stride_cn, qk_scale, sm_scale, eps, HEAD_DIM: tl.constexpr, COLS: tl.constexpr,
               BLOCK_M: tl.constexpr, MASK_N: tl.constexpr, HAS_KNORM: tl.constexpr,
               HAS_ROPE: tl.constexpr, DOT_PREC: tl.constexpr, INTERLEAVED: tl.constexpr):
    """dK, dV of COLS keys from start_n; returns this tile's dL/d k_norm_weight halves."""
    offs_n = start_n + tl.arange(0, COLS)
    n_ok = offs_n < N
    k = _load_tile(K, offs_n, n_ok, stride_kn, HEAD_DIM, MASK_N)
    v = _load_tile(V, offs_n, n_ok, stride_vn, HEAD_DIM, MASK_N)
    dk = tl.full([COLS, HEAD_DIM], 0.0, dtype=tl.float32)
    dv = tl.full([COLS, HEAD_DIM], 0.0, dtype=tl.float32)
    m_full = (N // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, Q, O, DO, LSE, start_m, N, stride_qn, stride_on,
                            stride_don, qk_scale, HEAD_DIM, BLOCK_M, False, DOT_PREC)
    for start_m in range(m_full, N, TAIL):
        dk, dv = _dkdv_step(dk, dv, k, v, Q, O, DO, LSE, start_m, N, stride_qn, stride_on,
                            stride_don, qk_scale, HEAD_DIM, TAIL, True, DOT_PREC)
    _store_tile(DV, offs_n, n_ok, stride_dvn, dv, HEAD_DIM, MASK_N)
    dk, dw1, dw2 = _prologue_grad_rows(dk * sm_scale, KX, kw1, kw2, COS, SIN, offs_n, n_ok,
                                       stride_kxn, stride_cn, eps, HEAD_DIM, COLS, MASK_N,
                                       HAS_KNORM, HAS_ROPE, INTERLEAVED)
    _store_tile(DK, offs_n, n_ok, stride_dkn, dk, HEAD_DIM, MASK_N)
    return dw1, dw2


@triton.jit
def _dq_step(dq, q, do, lse, delta, K, V, start_n, N, stride_kn, stride_vn, qk_scale,
             HEAD_DIM: tl.constexpr, COLS: tl.constexpr, MASKED: tl.constexpr,
             DOT_PREC: tl.constexpr):
    offs_n = start_n + tl.arange(0, COLS)
    n_ok = offs_n < N
    k = _load_tile(K, offs_n, n_ok, stride_kn, HEAD_DIM, MASKED)
    v = _load_tile(V, offs_n, n_ok, stride_vn, HEAD_DIM, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(n_ok[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = (p * (dp - delta[:, None])).to(k.dtype)
    dq += tl.dot(ds, k, input_precision=DOT_PREC)
    return dq


@triton.jit
def _dq_rows(Q, QX, K, V, O, DO, DQ, LSE, COS, SIN, qw1, qw2, start_m, N, stride_qn, stride_qxn,
             stride_kn, stride_vn, stride_on, stride_don, stride_dqn, stride_cn, qk_scale,
             sm_scale, eps, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
             MASK_M: tl.constexpr, HAS_QNORM: tl.constexpr, HAS_ROPE: tl.constexpr,
             DOT_PREC: tl.constexpr, INTERLEAVED: tl.constexpr):
    """dQ of ROWS queries from start_m; returns this tile's dL/d q_norm_weight halves."""
    offs_m = start_m + tl.arange(0, ROWS)
    m_ok = offs_m < N
    q = _load_tile(Q, offs_m, m_ok, stride_qn, HEAD_DIM, MASK_M)
    do, lse, delta = _query_stats(O, DO, LSE, offs_m, m_ok, stride_on, stride_don, HEAD_DIM,
                                  MASK_M)
    dq = tl.full([ROWS, HEAD_DIM], 0.0, dtype=tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, K, V, start_n, N, stride_kn, stride_vn, qk_scale,
                      HEAD_DIM, BLOCK_N, False, DOT_PREC)
    for start_n in range(n_full, N, TAIL):
        dq = _dq_step(dq, q, do, lse, delta, K, V, start_n, N, stride_kn, stride_vn, qk_scale,
                      HEAD_DIM, TAIL, True, DOT_PREC)
    dq, dw1, dw2 = _prologue_grad_rows(dq * sm_scale, QX, qw1, qw2, COS, SIN, offs_m, m_ok,
                                       stride_qxn, stride_cn, eps, HEAD_DIM, ROWS, MASK_M,
                                       HAS_QNORM, HAS_ROPE, INTERLEAVED)
    _store_tile(DQ, offs_m, m_ok, stride_dqn, dq, HEAD_DIM, MASK_M)
    return dw1, dw2


@triton.jit
def attn_bwd(Q, K, QX, KX, V, O, DO, LSE, DQ, DK, DV, DW, COS, SIN, QW, KW,
             stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
             stride_qxb, stride_qxh, stride_qxn, stride_kxb, stride_kxh, stride_kxn,
             stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
             stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
             stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
             stride_cb, stride_cn, H, N, DW_ROWS, qk_scale, sm_scale, eps,
             HEAD_DIM: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
             BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr, HAS_QNORM: tl.constexpr,
             HAS_KNORM: tl.constexpr, HAS_ROPE: tl.constexpr, DOT_PREC: tl.constexpr,
             INTERLEAVED: tl.constexpr):
    """Q, K: P(q), P(k) (the raw q, k themselves without a prologue); QX, KX: the raw q, k.
    DW: [B * H, 2, DW_ROWS, D] fp32 partial sums of the norm weights' gradients (k at 0, q at
    1), one row per program, zeroed by the host (a config with fewer programs leaves rows 0)."""
    # fp32 scalars whoever launches (see attn_fwd)
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)
    eps = tl.cast(eps, tl.float32)
    HALF: tl.constexpr = HEAD_DIM // 2
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = tl.cast(bh // H, tl.int64)
    h = tl.cast(bh % H, tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    DO += b * stride_dob + h * stride_doh
    LSE += tl.cast(bh, tl.int64) * N
    COS += b * stride_cb
    SIN += b * stride_cb
    n_kv = (N + BLOCK_N1 - 1) // BLOCK_N1
    if pid < n_kv:
        KX += b * stride_kxb + h * stride_kxh
        DK += b * stride_dkb + h * stride_dkh
        DV += b * stride_dvb + h * stride_dvh
        kw1, kw2 = _load_weight(KW, HALF, HAS_KNORM, INTERLEAVED)
        start_n = pid * BLOCK_N1
        if start_n + BLOCK_N1 <= N:
            dw1, dw2 = _dkdv_rows(Q, K, KX, V, O, DO, DK, DV, LSE, COS, SIN, kw1, kw2, start_n, N,
                                  stride_qn, stride_kn, stride_kxn, stride_vn, stride_on,
                                  stride_don, stride_dkn, stride_dvn, stride_cn, qk_scale,
                                  sm_scale, eps, HEAD_DIM, BLOCK_N1, BLOCK_M1, False, HAS_KNORM,
                                  HAS_ROPE, DOT_PREC, INTERLEAVED)
        else:
            dw1 = tl.full([HALF], 0.0, dtype=tl.float32)
            dw2 = tl.full([HALF], 0.0, dtype=tl.float32)
            for start in range(start_n, N, TAIL):
                t1, t2 = _dkdv_rows(Q, K, KX, V, O, DO, DK, DV, LSE, COS, SIN, kw1, kw2, start,
                                    N, stride_qn, stride_kn, stride_kxn, stride_vn, stride_on,
                                    stride_don, stride_dkn, stride_dvn, stride_cn, qk_scale,
                                    sm_scale, eps, HEAD_DIM, TAIL, BLOCK_M1, True, HAS_KNORM,
                                    HAS_ROPE, DOT_PREC, INTERLEAVED)
                dw1 += t1
                dw2 += t2
        if HAS_KNORM:
            _store_weight_grad(DW, (bh * 2) * DW_ROWS + pid, dw1, dw2, HEAD_DIM, INTERLEAVED)
    else:
        QX += b * stride_qxb + h * stride_qxh
        DQ += b * stride_dqb + h * stride_dqh
        qw1, qw2 = _load_weight(QW, HALF, HAS_QNORM, INTERLEAVED)
        pid_m = pid - n_kv
        start_m = pid_m * BLOCK_M2
        if start_m + BLOCK_M2 <= N:
            dw1, dw2 = _dq_rows(Q, QX, K, V, O, DO, DQ, LSE, COS, SIN, qw1, qw2, start_m, N,
                                stride_qn, stride_qxn, stride_kn, stride_vn, stride_on,
                                stride_don, stride_dqn, stride_cn, qk_scale, sm_scale, eps,
                                HEAD_DIM, BLOCK_M2, BLOCK_N2, False, HAS_QNORM, HAS_ROPE,
                                DOT_PREC, INTERLEAVED)
        else:
            dw1 = tl.full([HALF], 0.0, dtype=tl.float32)
            dw2 = tl.full([HALF], 0.0, dtype=tl.float32)
            for start in range(start_m, N, TAIL):
                t1, t2 = _dq_rows(Q, QX, K, V, O, DO, DQ, LSE, COS, SIN, qw1, qw2, start, N,
                                  stride_qn, stride_qxn, stride_kn, stride_vn, stride_on,
                                  stride_don, stride_dqn, stride_cn, qk_scale, sm_scale, eps,
                                  HEAD_DIM, TAIL, BLOCK_N2, True, HAS_QNORM, HAS_ROPE, DOT_PREC,
                                  INTERLEAVED)
                dw1 += t1
                dw2 += t2
        if HAS_QNORM:
            _store_weight_grad(DW, (bh * 2 + 1) * DW_ROWS + pid_m, dw1, dw2, HEAD_DIM,
                               INTERLEAVED)


# ---------------------------------------------------------------------------------------------
# Stand-alone prologue: P(q) and P(k) written out, for an attention implementation that has no
# prologue of its own (PyTorch SDPA's cuDNN/flash backends). One program per (token block,
# batch * head, q or k); the backward recomputes the prologue from the saved inputs.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _prologue_tile_fwd(X, Y, W, COS, SIN, offs, ok, stride_xn, stride_yn, stride_cn, eps,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_NORM: tl.constexpr,
                       HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr):
    w1, w2 = _load_weight(W, HEAD_DIM // 2, HAS_NORM, INTERLEAVED)
    y = _load_qk_tile(X, w1, w2, COS, SIN, offs, ok, stride_xn, stride_cn, eps, HEAD_DIM, BLOCK_N,
                      True, HAS_NORM, HAS_ROPE, INTERLEAVED)
    _store_tile(Y, offs, ok, stride_yn, y, HEAD_DIM, True)


@triton.jit
def _prologue_program(H, N, BLOCK_N: tl.constexpr):
    """What program (token block, batch * head, q or k) works on: its token offsets and their
    mask, batch, head and which tensor (0: q, 1: k). (No pointers returned: PyTorch's analysis of
    which arguments a kernel writes takes a pointer returned from a call as written.)"""
    bh = tl.program_id(1)
    b = tl.cast(bh // H, tl.int64)
    h = tl.cast(bh % H, tl.int64)
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs, offs < N, b, h, tl.program_id(2)


@triton.jit
def qk_prologue_fwd(Q, K, QO, KO, COS, SIN, QW, KW,
                    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                    stride_ob, stride_oh, stride_on, stride_cb, stride_cn, H, N, eps,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_QNORM: tl.constexpr,
                    HAS_KNORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr):
    eps = tl.cast(eps, tl.float32)  # fp32 whoever launches (see attn_fwd)
    offs, ok, b, h, which = _prologue_program(H, N, BLOCK_N)
    COS, SIN = COS + b * stride_cb, SIN + b * stride_cb  # this sample's RoPE tables
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
def _prologue_tile_bwd(X, G, DX, W, DW, dw_row, COS, SIN, offs, ok, stride_xn, stride_gn,
                       stride_dn, stride_cn, eps, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                       HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr):
    x = _load_tile(X, offs, ok, stride_xn, HEAD_DIM, True)
    g = _load_tile(G, offs, ok, stride_gn, HEAD_DIM, True).to(tl.float32)
    c, s = _load_rot(COS, SIN, offs, ok, stride_cn, HEAD_DIM // 2, HAS_ROPE)
    w1, w2 = _load_weight(W, HEAD_DIM // 2, HAS_NORM, INTERLEAVED)
    dx, dw1, dw2 = _prologue_tile_grad(g, x, w1, w2, c, s, eps, HAS_NORM, HAS_ROPE, BLOCK_N,
                                       HEAD_DIM, INTERLEAVED)
    _store_tile(DX, offs, ok, stride_dn, dx, HEAD_DIM, True)
    if HAS_NORM:  # masked rows load as zeros and add nothing
        _store_weight_grad(DW, dw_row, dw1, dw2, HEAD_DIM, INTERLEAVED)


@triton.jit
def qk_prologue_bwd(Q, K, DQO, DKO, DQ, DK, DQW, DKW, COS, SIN, QW, KW,
                    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                    stride_gqb, stride_gqh, stride_gqn, stride_gkb, stride_gkh, stride_gkn,
                    stride_db, stride_dh, stride_dn, stride_cb, stride_cn, H, N, eps,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_QNORM: tl.constexpr,
                    HAS_KNORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr):
    """dq, dk into [B, H, N, D] buffers; per-program partial sums of the norm weights' gradients
    into row (bh * num_programs(0) + pid_n) of DQW / DKW."""
    eps = tl.cast(eps, tl.float32)  # fp32 whoever launches (see attn_fwd)
    offs, ok, b, h, which = _prologue_program(H, N, BLOCK_N)
    COS, SIN = COS + b * stride_cb, SIN + b * stride_cb
    d_off = b * stride_db + h * stride_dh
    row = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    if which == 0:
        _prologue_tile_bwd(Q + b * stride_qb + h * stride_qh, DQO + b * stride_gqb + h * stride_gqh,
                           DQ + d_off, QW, DQW, row, COS, SIN, offs, ok, stride_qn, stride_gqn,
                           stride_dn, stride_cn, eps, HEAD_DIM, BLOCK_N, HAS_QNORM, HAS_ROPE,
                           INTERLEAVED)
    else:
        _prologue_tile_bwd(K + b * stride_kb + h * stride_kh, DKO + b * stride_gkb + h * stride_gkh,
                           DK + d_off, KW, DKW, row, COS, SIN, offs, ok, stride_kn, stride_gkn,
                           stride_dn, stride_cn, eps, HEAD_DIM, BLOCK_N, HAS_KNORM, HAS_ROPE,
                           INTERLEAVED)


PROLOGUE_META = {"BLOCK_N": 64} if INTERPRET else {"BLOCK_N": 64, "num_warps": 4}


# ---------------------------------------------------------------------------------------------
# Launch configurations. Compiled kernels are autotuned over these per (N, head_dim, flags,
# dtypes); the partial-sum buffer of the norm weights' gradients is zeroed between tuning runs
# because the number of programs (hence the rows they write) depends on the config. With
# KERNELS_AUTOTUNE=0 (read by the public functions), and always in the interpreter (autotuning
# needs a GPU), FIXED_META is used instead: the first config of each list (64 x 64 tiles when
# interpreted).
# Forward: (BLOCK_M, BLOCK_N, num_warps, num_stages); backward: (BLOCK_M1, BLOCK_N1, BLOCK_M2,
# BLOCK_N2, num_warps, num_stages) -- the dK/dV programs like many keys and few queries per
# step, the dQ programs the opposite (FlashAttention-2's split).
# ---------------------------------------------------------------------------------------------
FWD_CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3),
               (64, 32, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 8, 2)]
BWD_CONFIGS = [(32, 64, 64, 32, 4, 2), (64, 64, 64, 64, 4, 2), (32, 128, 128, 32, 8, 2),
               (64, 128, 128, 64, 8, 2), (32, 64, 64, 32, 4, 3), (16, 64, 64, 16, 4, 2),
               (64, 64, 64, 64, 8, 3), (16, 128, 128, 16, 4, 3), (32, 64, 64, 32, 4, 4)]
FWD_BLOCKS = ("BLOCK_M", "BLOCK_N")
BWD_BLOCKS = ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")


def _meta(cfg, names):
    *blocks, warps, stages = cfg
    return {**dict(zip(names, blocks)), "num_warps": warps, "num_stages": stages}


if INTERPRET:
    FIXED_META = {"fwd": dict(zip(FWD_BLOCKS, (64, 64))), "bwd": dict(zip(BWD_BLOCKS, (64,) * 4))}
    attn_fwd_tuned = attn_bwd_tuned = None
else:
    FIXED_META = {"fwd": _meta(FWD_CONFIGS[0], FWD_BLOCKS),
                  "bwd": _meta(BWD_CONFIGS[0], BWD_BLOCKS)}

    def _configs(cfgs, names):
        return [triton.Config(dict(zip(names, c[:-2])), num_warps=c[-2], num_stages=c[-1])
                for c in cfgs]

    _KEY = ["N", "HEAD_DIM", "HAS_QNORM", "HAS_KNORM", "HAS_ROPE", "DOT_PREC", "INTERLEAVED"]
    attn_fwd_tuned = triton.autotune(configs=_configs(FWD_CONFIGS, FWD_BLOCKS),
                                     key=_KEY)(attn_fwd)
    attn_bwd_tuned = triton.autotune(configs=_configs(BWD_CONFIGS, BWD_BLOCKS), key=_KEY,
                                     reset_to_zero=["DW"])(attn_bwd)
# the smallest key tile of the dK/dV programs and query tile of the dQ programs among the tuned
# configs: sizes the partial-sum buffer of the norm weights' gradients (rows per role)
TUNED_MIN_TILE = min(min(c[1], c[2]) for c in BWD_CONFIGS)
