"""Fused RMSNorm + adaLN modulation (+ gated residual add): launchers, autograd (kernels/_ops.py),
dispatch."""
from __future__ import annotations

import torch

from . import _loader, reference
from ._dispatch import resolve_backend, unit_last
from ._ops import KernelOp, launch

MAX_CHANNELS = 8192


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _Plan:
    """Tile sizes. Forward: BLOCK_R rows x the whole channel row per program. Backward: each
    program walks `rows_per_prog` rows of one sample, aiming at ~512 programs in all so the
    per-program partial sums stay small next to x."""

    def __init__(self, b: int, n: int, c: int, interpret: bool):
        self.block_c = _next_pow2(c)
        budget = 8192 if interpret else 4096
        self.block_r = max(1, min(16, budget // self.block_c))
        self.num_warps = 4 if self.block_r * self.block_c <= 2048 else 8
        target = 64 if interpret else 512
        steps = max(1, round(b * n / (target * self.block_r)))
        self.rows_per_prog = self.block_r * steps
        self.fwd_grid = (_cdiv(n, self.block_r), b)
        self.bwd_grid = (_cdiv(n, self.rows_per_prog), b)

    def launch_opts(self, interpret: bool) -> dict:
        return {} if interpret else {"num_warps": self.num_warps}


def _fwd(x, u, gate, shift, scale, weight, eps, out_dtype):
    b, n, c = x.shape
    mod = _loader.load("norm", interpret=x.device.type != "cuda")
    plan = _Plan(b, n, c, mod.INTERPRET)
    y = torch.empty(b, n, c, device=x.device, dtype=out_dtype)
    rstd = torch.empty(b, n, device=x.device, dtype=torch.float32)
    res = u is not None
    h = torch.empty(b, n, c, device=x.device, dtype=x.dtype) if res else x
    u_ = u if res else x
    g_ = gate if res else shift
    launch(mod, mod.modnorm_fwd)[plan.fwd_grid](
        x, u_, g_, shift, scale, x if weight is None else weight, h, y, rstd, n, c,
        x.stride(0), x.stride(1), u_.stride(0), u_.stride(1), g_.stride(0), shift.stride(0),
        scale.stride(0), h.stride(0), h.stride(1), y.stride(0), y.stride(1), eps,
        BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, HAS_W=weight is not None, HAS_RES=res,
        **plan.launch_opts(mod.INTERPRET))
    return h, y, rstd


def _bwd(h, dy, dh, u, gate, scale, weight, rstd, x_dtype):
    """Gradients of the (gated residual +) modulated norm. Returns dx, du, dgate, dshift, dscale,
    dw as fp32 partial sums reduced here (dgate/dshift/dscale [B, C], dw [C])."""
    b, n, c = h.shape
    mod = _loader.load("norm", interpret=h.device.type != "cuda")
    plan = _Plan(b, n, c, mod.INTERPRET)
    progs = plan.bwd_grid[0]
    dev = h.device
    res = u is not None
    dx = torch.empty(b, n, c, device=dev, dtype=x_dtype)
    du = torch.empty_like(u) if res else dx
    f32 = dict(device=dev, dtype=torch.float32)
    pshift = torch.empty(b, progs, c, **f32)
    pscale = torch.empty(b, progs, c, **f32)
    pw = torch.empty(b, progs, c, **f32) if weight is not None else pshift
    pgate = torch.empty(b, progs, c, **f32) if res else pshift
    u_ = u if res else h
    g_ = gate if res else scale
    dh_ = dh if dh is not None else h
    launch(mod, mod.modnorm_bwd)[plan.bwd_grid](
        h, dy, dh_, u_, g_, scale, h if weight is None else weight, rstd, dx, du,
        pshift, pscale, pw, pgate, n, c, plan.rows_per_prog,
        h.stride(0), h.stride(1), dy.stride(0), dy.stride(1), dh_.stride(0), dh_.stride(1),
        u_.stride(0), u_.stride(1), g_.stride(0), scale.stride(0), dx.stride(0), dx.stride(1),
        du.stride(0), du.stride(1),
        BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, HAS_W=weight is not None, HAS_RES=res,
        HAS_DH=dh is not None, **plan.launch_opts(mod.INTERPRET))
    dw = pw.sum((0, 1)) if weight is not None else None
    dgate = pgate.sum(1) if res else None
    return dx, (du if res else None), dgate, pshift.sum(1), pscale.sum(1), dw


# ---------------------------------------------------------------------------------------------
# Forward/backward functions with autograd, exposed through kernels/_ops.KernelOp (see
# kernels/flash.py). Gradients that do not exist (no norm weight) come back from the backward
# functions as empty tensors.
# ---------------------------------------------------------------------------------------------
Tensor = torch.Tensor


def _empty_grad(like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=torch.float32)


def _modnorm_forward(x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor | None, eps: float,
                     out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(normalised and modulated x, rstd per token)."""
    x, shift, scale = unit_last(x), unit_last(shift), unit_last(scale)
    _, y, rstd = _fwd(x, None, None, shift, scale, weight, eps, out_dtype)
    return y, rstd


def _modnorm_forward_fake(x, shift, scale, weight, eps, out_dtype):
    b, n, c = x.shape
    return x.new_empty(b, n, c, dtype=out_dtype), x.new_empty(b, n, dtype=torch.float32)


def _modnorm_backward(x: Tensor, dy: Tensor, scale: Tensor, weight: Tensor | None,
                      rstd: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, d shift, d scale, d weight) with the [B, C] / [C] sums in fp32."""
    dx, _, _, dshift, dscale, dw = _bwd(x, unit_last(dy), None, None, None, scale, weight, rstd,
                                        x.dtype)
    return dx, dshift, dscale, _empty_grad(x) if dw is None else dw


def _modnorm_backward_fake(x, dy, scale, weight, rstd):
    b, _, c = x.shape
    f32 = dict(dtype=torch.float32)
    return (x.new_empty(x.shape), x.new_empty(b, c, **f32),
            x.new_empty(b, c, **f32), _empty_grad(x) if weight is None else x.new_empty(c, **f32))


def _modnorm_setup(ctx, inputs, output):
    x, shift, scale, weight, eps, out_dtype = inputs
    ctx.save_for_backward(unit_last(x), unit_last(scale), weight, output[1])
    ctx.shift_dtype = shift.dtype


def _modnorm_grads(ctx, backward, dy, _drstd):
    x, scale, weight, rstd = ctx.saved_tensors
    dx, dshift, dscale, dw = backward(x, dy, scale, weight, rstd)
    return (dx, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype),
            None if weight is None else dw.to(weight.dtype), None, None)


MODNORM = KernelOp("modulated_rmsnorm", "norm", _modnorm_forward, _modnorm_forward_fake,
                   _modnorm_backward, _modnorm_backward_fake, _modnorm_setup, _modnorm_grads)


def _residual_forward(x: Tensor, u: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                      weight: Tensor | None, eps: float,
                      out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(h = x + gate * u, modulated rmsnorm of h, rstd per token)."""
    x, u = unit_last(x), unit_last(u)
    gate, shift, scale = unit_last(gate), unit_last(shift), unit_last(scale)
    return _fwd(x, u, gate, shift, scale, weight, eps, out_dtype)


def _residual_forward_fake(x, u, gate, shift, scale, weight, eps, out_dtype):
    b, n, c = x.shape
    return (x.new_empty(b, n, c), x.new_empty(b, n, c, dtype=out_dtype),
            x.new_empty(b, n, dtype=torch.float32))


def _residual_backward(h: Tensor, dy: Tensor, dh: Tensor | None, u: Tensor, gate: Tensor,
                       scale: Tensor, weight: Tensor | None,
                       rstd: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, du, d gate, d shift, d scale, d weight) with the [B, C] / [C] sums in fp32."""
    dx, du, dgate, dshift, dscale, dw = _bwd(h, unit_last(dy),
                                             None if dh is None else unit_last(dh), u, gate,
                                             scale, weight, rstd, h.dtype)
    return dx, du, dgate, dshift, dscale, _empty_grad(h) if dw is None else dw


def _residual_backward_fake(h, dy, dh, u, gate, scale, weight, rstd):
    b, _, c = h.shape
    f32 = dict(dtype=torch.float32)
    return (h.new_empty(h.shape), torch.empty_like(u),
            h.new_empty(b, c, **f32), h.new_empty(b, c, **f32), h.new_empty(b, c, **f32),
            _empty_grad(h) if weight is None else h.new_empty(c, **f32))


def _residual_setup(ctx, inputs, output):
    x, u, gate, shift, scale, weight, eps, out_dtype = inputs
    h, _, rstd = output
    ctx.save_for_backward(h, unit_last(u), unit_last(gate), unit_last(scale), weight, rstd)
    ctx.shift_dtype = shift.dtype


def _residual_grads(ctx, backward, dh, dy, _drstd):
    h, u, gate, scale, weight, rstd = ctx.saved_tensors
    if dy is None:  # the normalised output was not used: only the residual add remains
        dy = torch.zeros_like(h)
    dx, du, dgate, dshift, dscale, dw = backward(h, dy, dh, u, gate, scale, weight, rstd)
    return (dx, du, dgate.to(gate.dtype), dshift.to(ctx.shift_dtype), dscale.to(scale.dtype),
            None if weight is None else dw.to(weight.dtype), None, None)


RESIDUAL = KernelOp("gated_residual_modulated_rmsnorm", "norm", _residual_forward,
                    _residual_forward_fake, _residual_backward, _residual_backward_fake,
                    _residual_setup, _residual_grads)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def unsupported_reason(x, shift, scale, weight=None, out_dtype=None, u=None,
                       gate=None) -> str | None:
    if x.dim() != 3:
        return f"x must be [B, N, C], got {tuple(x.shape)}"
    b, n, c = x.shape
    if c > MAX_CHANNELS or n < 1:
        return f"C={c} > {MAX_CHANNELS} or empty sequence"
    vectors = [("shift", shift), ("scale", scale)] + ([("gate", gate)] if gate is not None else [])
    for name, t in vectors:
        if tuple(t.shape) != (b, c):
            return f"{name} must be [B, C] = [{b}, {c}], got {tuple(t.shape)}"
    if weight is not None and tuple(weight.shape) != (c,):
        return f"weight must be [{c}], got {tuple(weight.shape)}"
    if u is not None and u.shape != x.shape:
        return f"the branch output must be shaped like x, got {tuple(u.shape)}"
    tensors = [x, shift, scale] + [t for t in (weight, u, gate) if t is not None]
    if any(t.device != x.device for t in tensors):
        return "tensors on different devices"
    ok = (torch.float32, torch.float16) + ((torch.bfloat16,) if x.device.type == "cuda" else ())
    dtypes = [t.dtype for t in tensors] + [out_dtype or x.dtype]
    if any(d not in ok for d in dtypes):
        return f"dtypes {sorted(set(map(str, dtypes)))} not all in {[str(d) for d in ok]}"
    return None


def modulated_rmsnorm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                      weight: torch.Tensor | None = None, eps: float = 1e-6, *,
                      out_dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """rmsnorm(x) [* weight] * (1 + scale[:, None]) + shift[:, None] for x [B, N, C] and
    per-sample shift/scale [B, C]; maths in fp32; output in `out_dtype` (default x's dtype: pass
    the autocast dtype when a Linear consumes the result, to skip its input cast)."""
    weight = unit_last(weight)  # the kernels index it as W + c
    problem = unsupported_reason(x, shift, scale, weight, out_dtype)
    if resolve_backend(backend, x.device, problem) == "torch":
        return reference.modulated_rmsnorm_reference(x, shift, scale, weight, eps, out_dtype)
    return MODNORM(x, shift, scale, weight, eps, out_dtype or x.dtype)[0]


def gated_residual_modulated_rmsnorm(x: torch.Tensor, u: torch.Tensor, gate: torch.Tensor,
                                     shift: torch.Tensor, scale: torch.Tensor,
                                     weight: torch.Tensor | None = None, eps: float = 1e-6, *,
                                     out_dtype: torch.dtype | None = None,
                                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + gate[:, None] * u (the residual stream, x's dtype) and
    modulated_rmsnorm(h, shift, scale, weight) in one pass; returns (h, normalised h)."""
    weight = unit_last(weight)  # the kernels index it as W + c
    problem = unsupported_reason(x, shift, scale, weight, out_dtype, u=u, gate=gate)
    if resolve_backend(backend, x.device, problem) == "torch":
        return reference.gated_residual_modulated_rmsnorm_reference(x, u, gate, shift, scale,
                                                                    weight, eps, out_dtype)
    h, y, _ = RESIDUAL(x, u, gate, shift, scale, weight, eps, out_dtype or x.dtype)
    return h, y
