"""Fused attention: launchers, autograd (kernels/_ops.py) and the public dispatch functions."""
from __future__ import annotations

import os

import torch

from . import _loader, reference
from ._dispatch import autocast_inputs, resolve_backend, unit_last
from ._ops import KernelOp, launch

LOG2E = 1.4426950408889634
HEAD_DIMS = (32, 64, 128)


def _kernels(device: torch.device):
    return _loader.load("attention", interpret=device.type != "cuda")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _bhnd_buffer(like: torch.Tensor) -> torch.Tensor:
    """An empty [B, H, N, D] view whose memory is [B, N, H, D]: `.transpose(1, 2).reshape(B, N,
    H * D)` of it is free, which is what the projection after attention needs."""
    b, h, n, d = like.shape
    return torch.empty(b, n, h, d, device=like.device, dtype=like.dtype).transpose(1, 2)


def _check_rope(rope, q: torch.Tensor) -> None:
    """RoPE tables [N, D/2] or [B, N, D/2], whatever the backend (the torch path would broadcast
    a [1, D/2] table silently; the kernels would refuse it)."""
    if rope is None:
        return
    b, _, n, d = q.shape
    cos, sin = rope
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin shapes differ: {tuple(cos.shape)} vs {tuple(sin.shape)}")
    if cos.dim() not in (2, 3) or tuple(cos.shape[-2:]) != (n, d // 2) or (
            cos.dim() == 3 and cos.shape[0] not in (1, b)):
        raise ValueError(f"RoPE tables must be [N, D/2] or [B, N, D/2] = [{n}, {d // 2}] or "
                         f"[{b}, {n}, {d // 2}], got {tuple(cos.shape)}")


def _rope_args(rope, q: torch.Tensor):
    """(cos, sin, stride_b, stride_n) for the kernels (shapes checked by _check_rope)."""
    if rope is None:
        return q, q, 0, 0
    cos, sin = rope
    cos = cos.to(device=q.device, dtype=torch.float32).contiguous()
    sin = sin.to(device=q.device, dtype=torch.float32).contiguous()
    stride_b = cos.stride(0) if cos.dim() == 3 and cos.shape[0] > 1 else 0
    return cos, sin, stride_b, cos.stride(-2)


def autotune_requested() -> bool:
    """Compiled attention kernels are autotuned unless KERNELS_AUTOTUNE=0. Read by the public
    functions at every call and passed to the operators as an argument, so that under
    torch.compile the choice is a constant of the graph and part of its on-disk cache key. Dynamo
    installs no guard on the environment: a function already compiled in this process keeps the
    value it was traced with (set it before compiling, or torch._dynamo.reset())."""
    return os.environ.get("KERNELS_AUTOTUNE", "1") != "0"


def _flags(q, rope, qw, kw, interleaved: bool) -> dict:
    return dict(HEAD_DIM=q.shape[-1], HAS_QNORM=qw is not None, HAS_KNORM=kw is not None,
                HAS_ROPE=rope is not None, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
                INTERLEAVED=rope is not None and interleaved)


def _launch_fwd(q, k, v, o, rope, qw, kw, scale, eps, interleaved, autotune):
    b, h, n, d = q.shape
    mod = _kernels(q.device)
    lse = torch.empty(b * h, n, device=q.device, dtype=torch.float32)
    cos, sin, scb, scn = _rope_args(rope, q)
    args = (q, k, v, o, lse, cos, sin, q if qw is None else qw, q if kw is None else kw,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            scb, scn, h, n, scale * LOG2E, eps)
    flags = _flags(q, rope, qw, kw, interleaved)
    if autotune and not mod.INTERPRET:  # autotuning needs a GPU
        launch(mod, mod.attn_fwd_tuned)[lambda m: (_cdiv(n, m["BLOCK_M"]), b * h)](*args, **flags)
    else:
        meta = mod.FIXED_META["fwd"]
        launch(mod, mod.attn_fwd)[(_cdiv(n, meta["BLOCK_M"]), b * h)](*args, **flags, **meta)
    return lse


def _launch_bwd(q, k, v, o, lse, do, dq, dk, dv, rope, qw, kw, scale, eps, interleaved,
                autotune):
    """Writes dq, dk, dv (preallocated, any strides with unit last stride); returns (dqw, dkw).
    One attention launch: the dK/dV programs and the dQ programs share the grid, without
    atomics, so the gradients do not depend on scheduling. (Adding dq with fp32 atomics from the
    dK/dV programs, five matmuls per tile pair instead of seven, was 1.6x slower at SiT-B/1
    shapes on an H200: benchmarks/RESULTS_GPU.md.) With a prologue, P(q) and P(k) are
    recomputed first into temporary buffers (the prologue kernel's launch), so the attention
    kernel's loops are plain attention's and only its epilogue applies the prologue's chain
    rule (see the backward section of kernels/_triton_attention.py)."""
    b, h, n, d = q.shape
    dev = q.device
    mod = _kernels(dev)
    cos, sin, scb, scn = _rope_args(rope, q)
    flags = _flags(q, rope, qw, kw, interleaved)
    pq, pk = q, k
    if rope is not None or qw is not None or kw is not None:
        pq, pk = _bhnd_buffer(q), _bhnd_buffer(k)
        # the tables as prepared above: the prologue's own preparation is then a no-op, not a copy
        _launch_prologue_fwd(q, k, pq, pk, None if rope is None else (cos, sin), qw, kw, eps, interleaved)
    # per-program partial sums of the norm weights' gradients, [B * H, (k, q), rows, D]; rows
    # sized for the smallest tile and zeroed (also between autotuning runs) so rows a config does
    # not write add nothing. Without a norm, a 1-element placeholder (autotuning zeroes it).
    tuned = autotune and not mod.INTERPRET
    meta = mod.FIXED_META["bwd"]
    min_tile = mod.TUNED_MIN_TILE if tuned else min(meta["BLOCK_N1"], meta["BLOCK_M2"])
    rows = _cdiv(n, min_tile)
    has_norm = qw is not None or kw is not None
    dw_part = torch.zeros((b * h, 2, rows, d) if has_norm else (1,), device=dev,
                          dtype=torch.float32)
    args = (pq, pk, q, k, v, o, do, lse, dq, dk, dv, dw_part, cos, sin, q if qw is None else qw,
            q if kw is None else kw, *pq.stride()[:3], *pk.stride()[:3], *q.stride()[:3],
            *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *do.stride()[:3],
            *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], scb, scn, h, n, rows,
            scale * LOG2E, scale, eps)

    def grid(m):
        return (_cdiv(n, m["BLOCK_N1"]) + _cdiv(n, m["BLOCK_M2"]), b * h)
    if tuned:
        launch(mod, mod.attn_bwd_tuned)[grid](*args, **flags)
    else:
        launch(mod, mod.attn_bwd)[grid(meta)](*args, **flags, **meta)
    dkw = dw_part[:, 0].sum((0, 1)).to(kw.dtype) if kw is not None else None
    dqw = dw_part[:, 1].sum((0, 1)).to(qw.dtype) if qw is not None else None
    return dqw, dkw


def _launch_prologue_fwd(q, k, qo, ko, rope, qw, kw, eps, interleaved):
    """P(q), P(k) into qo, ko (one launch; the outputs share their strides)."""
    b, h, n, d = q.shape
    mod = _kernels(q.device)
    c, s, scb, scn = _rope_args(rope, q)
    meta = mod.PROLOGUE_META
    launch(mod, mod.qk_prologue_fwd)[(_cdiv(n, meta["BLOCK_N"]), b * h, 2)](
        q, k, qo, ko, c, s, q if qw is None else qw, q if kw is None else kw,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), scb, scn, h, n, eps,
        **_prologue_flags(q, rope, qw, kw, interleaved), **meta)


def _launch_prologue_bwd(q, k, dqo, dko, dq, dk, rope, qw, kw, eps, interleaved):
    """The stand-alone prologue's backward: dq, dk from the gradients dqo, dko of P(q), P(k).
    Returns the norm weights' gradients (dqw, dkw)."""
    b, h, n, d = q.shape
    mod = _kernels(q.device)
    c, s, scb, scn = _rope_args(rope, q)
    dqo, dko = unit_last(dqo), unit_last(dko)
    meta = mod.PROLOGUE_META
    blocks = _cdiv(n, meta["BLOCK_N"])
    # per-program partial sums of the weight gradients (every row is written)
    dqw_part = torch.empty(b * h * blocks if qw is not None else 1, d, device=q.device,
                           dtype=torch.float32)
    dkw_part = torch.empty(b * h * blocks if kw is not None else 1, d, device=q.device,
                           dtype=torch.float32)
    launch(mod, mod.qk_prologue_bwd)[(blocks, b * h, 2)](
        q, k, dqo, dko, dq, dk, dqw_part, dkw_part, c, s, q if qw is None else qw,
        q if kw is None else kw,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        dqo.stride(0), dqo.stride(1), dqo.stride(2), dko.stride(0), dko.stride(1),
        dko.stride(2), dq.stride(0), dq.stride(1), dq.stride(2), scb, scn, h, n, eps,
        **_prologue_flags(q, rope, qw, kw, interleaved), **meta)
    dqw = dqw_part.sum(0).to(qw.dtype) if qw is not None else None
    dkw = dkw_part.sum(0).to(kw.dtype) if kw is not None else None
    return dqw, dkw


# ---------------------------------------------------------------------------------------------
# Forward/backward functions with autograd, exposed through kernels/_ops.KernelOp (an eager
# autograd.Function, and operators for torch.compile). Norm weights the caller does not pass come
# back as empty gradients from the backward functions (an operator cannot return None).
# ---------------------------------------------------------------------------------------------
Tensor = torch.Tensor


def _weight_grad(w: Tensor | None, like: Tensor) -> Tensor:
    """Fake/placeholder gradient of an optional [D] norm weight."""
    return like.new_empty(0, dtype=torch.float32) if w is None else torch.empty_like(w)


def _or_none(g: Tensor) -> Tensor | None:
    return None if g.numel() == 0 else g


def _or_empty(g: Tensor | None, like: Tensor) -> Tensor:
    """The inverse of `_or_none`: what a backward returns for a weight that is absent."""
    return _weight_grad(None, like) if g is None else g


def _attention_forward(q: Tensor, k: Tensor, v: Tensor, cos: Tensor | None, sin: Tensor | None,
                       q_norm_weight: Tensor | None, k_norm_weight: Tensor | None, scale: float,
                       eps: float, interleaved: bool, autotune: bool) -> tuple[Tensor, Tensor]:
    """(o, base-2 logsumexp) of softmax(scale P(q) P(k)^T) v on [B, H, N, D] tensors."""
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    rope = None if cos is None else (cos, sin)
    o = _bhnd_buffer(q)
    lse = _launch_fwd(q, k, v, o, rope, q_norm_weight, k_norm_weight, scale, eps, interleaved,
                      autotune)
    return o, lse


def _attention_forward_fake(q, k, v, cos, sin, q_norm_weight, k_norm_weight, scale, eps,
                            interleaved, autotune):
    b, h, n, _ = q.shape
    return _bhnd_buffer(q), q.new_empty(b * h, n, dtype=torch.float32)


def _attention_backward(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor,
                        cos: Tensor | None, sin: Tensor | None, q_norm_weight: Tensor | None,
                        k_norm_weight: Tensor | None, scale: float, eps: float,
                        interleaved: bool,
                        autotune: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d q_norm_weight, d k_norm_weight); absent weights get empty gradients."""
    q, k, v, o = unit_last(q), unit_last(k), unit_last(v), unit_last(o)
    rope = None if cos is None else (cos, sin)
    dq, dk, dv = _bhnd_buffer(q), _bhnd_buffer(k), _bhnd_buffer(v)
    dqw, dkw = _launch_bwd(q, k, v, o, lse, unit_last(do), dq, dk, dv, rope, q_norm_weight,
                           k_norm_weight, scale, eps, interleaved, autotune)
    return dq, dk, dv, _or_empty(dqw, q), _or_empty(dkw, q)


def _attention_backward_fake(q, k, v, o, lse, do, cos, sin, q_norm_weight, k_norm_weight, scale,
                             eps, interleaved, autotune):
    return (_bhnd_buffer(q), _bhnd_buffer(k), _bhnd_buffer(v), _weight_grad(q_norm_weight, q),
            _weight_grad(k_norm_weight, q))


def _attention_setup(ctx, inputs, output):
    q, k, v, cos, sin, qw, kw, scale, eps, interleaved, autotune = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cos, sin, qw, kw)
    ctx.scale, ctx.eps, ctx.interleaved, ctx.autotune = scale, eps, interleaved, autotune


def _attention_grads(ctx, backward, do, _dlse):
    q, k, v, o, lse, cos, sin, qw, kw = ctx.saved_tensors
    dq, dk, dv, dqw, dkw = backward(q, k, v, o, lse, do, cos, sin, qw, kw, ctx.scale, ctx.eps,
                                    ctx.interleaved, ctx.autotune)
    return dq, dk, dv, None, None, _or_none(dqw), _or_none(dkw), None, None, None, None


ATTENTION = KernelOp("flash_attention", "attention", _attention_forward,
                     _attention_forward_fake, _attention_backward, _attention_backward_fake,
                     _attention_setup, _attention_grads)


def _unpack(qkv: Tensor, heads: int):
    """q, k, v as [B, H, N, D] views of a packed [B, N, 3 * H * D] tensor."""
    b, n, c3 = qkv.shape
    return qkv.view(b, n, 3, heads, c3 // (3 * heads)).permute(2, 0, 3, 1, 4)


def _attention_packed_forward(qkv: Tensor, heads: int, cos: Tensor | None, sin: Tensor | None,
                              q_norm_weight: Tensor | None, k_norm_weight: Tensor | None,
                              scale: float, eps: float, interleaved: bool,
                              autotune: bool) -> tuple[Tensor, Tensor]:
    """The attention of a packed qkv [B, N, 3 * H * D] (the output of one Linear), read through
    strides; returns ([B, N, H * D] output, logsumexp) with no permute/contiguous copies."""
    qkv = unit_last(qkv)
    b, n, c3 = qkv.shape
    q, k, v = _unpack(qkv, heads)
    rope = None if cos is None else (cos, sin)
    o = _bhnd_buffer(q)
    lse = _launch_fwd(q, k, v, o, rope, q_norm_weight, k_norm_weight, scale, eps, interleaved,
                      autotune)
    return o.transpose(1, 2).reshape(b, n, c3 // 3), lse


def _attention_packed_forward_fake(qkv, heads, cos, sin, q_norm_weight, k_norm_weight, scale,
                                   eps, interleaved, autotune):
    b, n, c3 = qkv.shape
    return qkv.new_empty(b, n, c3 // 3), qkv.new_empty(b * heads, n, dtype=torch.float32)


def _attention_packed_backward(qkv: Tensor, out: Tensor, lse: Tensor, dout: Tensor, heads: int,
                               cos: Tensor | None, sin: Tensor | None,
                               q_norm_weight: Tensor | None, k_norm_weight: Tensor | None,
                               scale: float, eps: float, interleaved: bool,
                               autotune: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(d qkv as one packed tensor, d q_norm_weight, d k_norm_weight)."""
    qkv = unit_last(qkv)
    b, n, c3 = qkv.shape
    d = c3 // (3 * heads)
    q, k, v = _unpack(qkv, heads)
    o = unit_last(out).view(b, n, heads, d).transpose(1, 2)
    do = unit_last(dout.reshape(b, n, heads, d).transpose(1, 2))
    dqkv = torch.empty_like(qkv)
    dq, dk, dv = _unpack(dqkv, heads)
    rope = None if cos is None else (cos, sin)
    dqw, dkw = _launch_bwd(q, k, v, o, lse, do, dq, dk, dv, rope, q_norm_weight, k_norm_weight,
                           scale, eps, interleaved, autotune)
    return dqkv, _or_empty(dqw, q), _or_empty(dkw, q)


def _attention_packed_backward_fake(qkv, out, lse, dout, heads, cos, sin, q_norm_weight,
                                    k_norm_weight, scale, eps, interleaved, autotune):
    return (torch.empty_like(unit_last(qkv)), _weight_grad(q_norm_weight, qkv),
            _weight_grad(k_norm_weight, qkv))


def _attention_packed_setup(ctx, inputs, output):
    qkv, heads, cos, sin, qw, kw, scale, eps, interleaved, autotune = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, cos, sin, qw, kw)
    ctx.heads, ctx.scale, ctx.eps = heads, scale, eps
    ctx.interleaved, ctx.autotune = interleaved, autotune


def _attention_packed_grads(ctx, backward, dout, _dlse):
    qkv, out, lse, cos, sin, qw, kw = ctx.saved_tensors
    dqkv, dqw, dkw = backward(qkv, out, lse, dout, ctx.heads, cos, sin, qw, kw, ctx.scale,
                              ctx.eps, ctx.interleaved, ctx.autotune)
    return dqkv, None, None, None, _or_none(dqw), _or_none(dkw), None, None, None, None


ATTENTION_PACKED = KernelOp("flash_attention_packed", "attention",
                            _attention_packed_forward, _attention_packed_forward_fake,
                            _attention_packed_backward, _attention_packed_backward_fake,
                            _attention_packed_setup, _attention_packed_grads)


def _prologue_forward(q: Tensor, k: Tensor, cos: Tensor | None, sin: Tensor | None,
                      q_norm_weight: Tensor | None, k_norm_weight: Tensor | None, eps: float,
                      interleaved: bool) -> tuple[Tensor, Tensor]:
    """(P(q), P(k)) with P = RoPE(RMSNorm(.)) (each optional) on [B, H, N, D] tensors, in one
    launch, for an attention implementation without a prologue (SDPA). Outputs are [B, H, N, D]
    views of [B, N, H, D] memory; the backward recomputes P from the inputs."""
    q, k = unit_last(q), unit_last(k)
    rope = None if cos is None else (cos, sin)
    qo, ko = _bhnd_buffer(q), _bhnd_buffer(k)
    _launch_prologue_fwd(q, k, qo, ko, rope, q_norm_weight, k_norm_weight, eps, interleaved)
    return qo, ko


def _prologue_forward_fake(q, k, cos, sin, q_norm_weight, k_norm_weight, eps, interleaved):
    return _bhnd_buffer(q), _bhnd_buffer(k)


def _prologue_backward(q: Tensor, k: Tensor, dqo: Tensor, dko: Tensor, cos: Tensor | None,
                       sin: Tensor | None, q_norm_weight: Tensor | None,
                       k_norm_weight: Tensor | None, eps: float,
                       interleaved: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, d q_norm_weight, d k_norm_weight); absent weights get empty gradients."""
    q, k = unit_last(q), unit_last(k)
    dq, dk = _bhnd_buffer(q), _bhnd_buffer(k)
    rope = None if cos is None else (cos, sin)
    dqw, dkw = _launch_prologue_bwd(q, k, dqo, dko, dq, dk, rope, q_norm_weight, k_norm_weight,
                                    eps, interleaved)
    return dq, dk, _or_empty(dqw, q), _or_empty(dkw, q)


def _prologue_backward_fake(q, k, dqo, dko, cos, sin, q_norm_weight, k_norm_weight, eps,
                            interleaved):
    return (_bhnd_buffer(q), _bhnd_buffer(k), _weight_grad(q_norm_weight, q),
            _weight_grad(k_norm_weight, q))


def _prologue_setup(ctx, inputs, output):
    q, k, cos, sin, qw, kw, eps, interleaved = inputs
    ctx.save_for_backward(q, k, cos, sin, qw, kw)
    ctx.eps, ctx.interleaved = eps, interleaved


def _prologue_grads(ctx, backward, dqo, dko):
    q, k, cos, sin, qw, kw = ctx.saved_tensors
    if dqo is None:
        dqo = torch.zeros_like(q)
    if dko is None:
        dko = torch.zeros_like(k)
    dq, dk, dqw, dkw = backward(q, k, dqo, dko, cos, sin, qw, kw, ctx.eps, ctx.interleaved)
    return dq, dk, None, None, _or_none(dqw), _or_none(dkw), None, None


PROLOGUE = KernelOp("qk_norm_rope", "attention", _prologue_forward, _prologue_forward_fake,
                    _prologue_backward, _prologue_backward_fake, _prologue_setup, _prologue_grads)


def _prologue_flags(q, rope, qw, kw, interleaved: bool) -> dict:
    flags = _flags(q, rope, qw, kw, interleaved)
    del flags["DOT_PREC"]  # no matmul in the prologue
    return flags


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def unsupported_reason(q, k, v, rope=None, q_norm_weight=None, k_norm_weight=None) -> str | None:
    """None when the Triton attention kernels support these inputs, else why not."""
    if not (q.dim() == k.dim() == v.dim() == 4):
        return "q, k, v must be 4-D [B, H, N, D]"
    if not (q.shape == k.shape == v.shape):
        return f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    _check_rope(rope, q)  # a malformed table is an error on every backend
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]} not in {HEAD_DIMS}"
    if q.shape[2] < 1:
        return "empty sequence"
    if not (q.dtype == k.dtype == v.dtype):
        return "q, k, v dtypes differ"
    allowed = (torch.float32, torch.float16) if q.device.type == "cpu" else (
        torch.float32, torch.float16, torch.bfloat16)
    if q.dtype not in allowed:
        why = " (the Triton interpreter has no bf16)" if q.dtype == torch.bfloat16 else ""
        return f"dtype {q.dtype} unsupported on {q.device.type}{why}"
    if not (q.device == k.device == v.device):
        return "q, k, v on different devices"
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None and (w.shape != (q.shape[-1],) or w.device != q.device):
            return f"{name} must be a [{q.shape[-1]}] tensor on {q.device}"
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              rope: tuple[torch.Tensor, torch.Tensor] | None = None,
              q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
              scale: float | None = None, eps: float = 1e-6, rope_interleaved: bool = True,
              backend: str = "auto") -> torch.Tensor:
    """Non-causal attention on [B, H, N, D] tensors with an optional QK-RMSNorm (affine, applied
    first) and 2D RoPE (tables from `rope_2d_table`; pairs (2j, 2j+1), or (j, j + D/2) with
    rope_interleaved=False) on q and k. Returns [B, H, N, D]; with the Triton backend its memory
    is [B, N, H, D], so `.transpose(1, 2).reshape(B, N, H * D)` is free.
    """
    q, k, v = autocast_inputs(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q_norm_weight, k_norm_weight = unit_last(q_norm_weight), unit_last(k_norm_weight)  # read as W + j
    problem = unsupported_reason(q, k, v, rope, q_norm_weight, k_norm_weight)
    if resolve_backend(backend, q.device, problem) == "torch":
        return reference.attention_torch(q, k, v, rope=rope, q_norm_weight=q_norm_weight,
                                         k_norm_weight=k_norm_weight, scale=scale, eps=eps,
                                         rope_interleaved=rope_interleaved)
    cos, sin = (None, None) if rope is None else rope
    return ATTENTION(q, k, v, cos, sin, q_norm_weight, k_norm_weight, scale, eps,
                     rope_interleaved, autotune_requested())[0]


def attention_packed(qkv: torch.Tensor, heads: int, *,
                     rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                     q_norm_weight: torch.Tensor | None = None,
                     k_norm_weight: torch.Tensor | None = None, scale: float | None = None,
                     eps: float = 1e-6, rope_interleaved: bool = True,
                     backend: str = "auto") -> torch.Tensor:
    """`attention` on the packed output of a qkv Linear, qkv [B, N, 3 * C] laid out as
    (3, heads, head_dim) on the last axis; returns [B, N, C] ready for the output projection."""
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * heads):
        raise ValueError(f"qkv must be [B, N, 3 * heads * head_dim], got {tuple(qkv.shape)}")
    (qkv,) = autocast_inputs(qkv)
    b, n, c3 = qkv.shape
    d = c3 // (3 * heads)
    scale = d ** -0.5 if scale is None else float(scale)
    q, k, v = qkv.view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    q_norm_weight, k_norm_weight = unit_last(q_norm_weight), unit_last(k_norm_weight)  # read as W + j
    problem = unsupported_reason(q, k, v, rope, q_norm_weight, k_norm_weight)
    if resolve_backend(backend, qkv.device, problem) == "torch":
        o = reference.attention_torch(q, k, v, rope=rope, q_norm_weight=q_norm_weight,
                                      k_norm_weight=k_norm_weight, scale=scale, eps=eps,
                                      rope_interleaved=rope_interleaved)
        return o.transpose(1, 2).reshape(b, n, c3 // 3)
    cos, sin = (None, None) if rope is None else rope
    return ATTENTION_PACKED(qkv, heads, cos, sin, q_norm_weight, k_norm_weight, scale, eps,
                            rope_interleaved, autotune_requested())[0]


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, *,
                 rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                 q_norm_weight: torch.Tensor | None = None,
                 k_norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                 rope_interleaved: bool = True,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The attention prologue on its own: (P(q), P(k)), P = RoPE(RMSNorm(.)) with the same
    conventions as `attention`, for feeding `F.scaled_dot_product_attention` (whose cuDNN and
    flash backends have no prologue). One kernel forward and one backward for both tensors
    instead of PyTorch's chain of elementwise ops; the Triton outputs are [B, H, N, D] views of
    [B, N, H, D] memory, the layout SDPA's fused backends read directly."""
    if rope is None and q_norm_weight is None and k_norm_weight is None:
        return q, k
    q_norm_weight, k_norm_weight = unit_last(q_norm_weight), unit_last(k_norm_weight)  # read as W + j
    problem = unsupported_reason(q, k, k, rope, q_norm_weight, k_norm_weight)
    if resolve_backend(backend, q.device, problem) == "torch":
        return (reference.qk_prologue(q, q_norm_weight, rope, eps, rope_interleaved),
                reference.qk_prologue(k, k_norm_weight, rope, eps, rope_interleaved))
    cos, sin = (None, None) if rope is None else rope
    return PROLOGUE(q, k, cos, sin, q_norm_weight, k_norm_weight, eps, rope_interleaved)
