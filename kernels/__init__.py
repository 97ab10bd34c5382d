"""Fused Triton kernels for SiT/SR-DiT training, each with a plain-PyTorch twin.

    attention(q, k, v, *, rope=None, q_norm_weight=None, k_norm_weight=None, scale=None,
              eps=1e-6, backend='auto')                                  -> [B, H, N, D]
    attention_packed(qkv, heads, *, rope=..., ...)                       -> [B, N, C]
    qk_norm_rope(q, k, *, rope=None, q_norm_weight=None, k_norm_weight=None, eps=1e-6,
                 backend='auto')                                         -> (P(q), P(k))
    modulated_rmsnorm(x, shift, scale, weight=None, eps=1e-6, *, out_dtype=None, backend='auto')
    gated_residual_modulated_rmsnorm(x, u, gate, shift, scale, weight=None, eps=1e-6, *, ...)
                                                                         -> (x + gate*u, norm)
    rope_2d_table(grid_h, grid_w, head_dim, theta=10000., num_prefix_tokens=0, device=None)
                                                                         -> (cos, sin)
backend: 'torch' (reference ops), 'triton' (kernels; interpreted on CPU tensors), 'auto'
(Triton where CUDA + Triton work, or on CPU when TRITON_INTERPRET=1; else torch).
See kernels/README.md for conventions, numerics and the benchmark.
"""
from __future__ import annotations

import functools

import torch

from ._dispatch import BACKENDS, resolve_backend, triton_available, triton_status
from .flash import HEAD_DIMS, attention, attention_packed, qk_norm_rope
from .adaln import MAX_CHANNELS, gated_residual_modulated_rmsnorm, modulated_rmsnorm
from .reference import (apply_rope, attention_reference, attention_torch,
                        gated_residual_modulated_rmsnorm_reference, modulated_rmsnorm_reference,
                        qk_prologue, rms_norm, rope_2d_angles, rope_2d_table)

__all__ = [
    "BACKENDS", "apply_rope", "attention", "attention_packed", "attention_reference",
    "attention_torch", "gated_residual_modulated_rmsnorm",
    "gated_residual_modulated_rmsnorm_reference", "modulated_rmsnorm",
    "modulated_rmsnorm_reference", "qk_norm_rope", "qk_prologue", "resolve_backend", "rms_norm",
    "rope_2d_angles", "rope_2d_table", "selfcheck", "triton_available", "triton_status",
    "unsupported_model_shape",
]


def unsupported_model_shape(width: int, head_dim: int | None = None) -> str | None:
    """Why the kernels cannot serve a transformer of this width (and head_dim, when its attention
    goes through a kernel) -- None when they can -- so a trainer can choose before its first
    forward rather than fail in it."""
    if head_dim is not None and head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} not in {HEAD_DIMS}"
    if width > MAX_CHANNELS:
        return f"width {width} > {MAX_CHANNELS} channels"
    return None


@functools.lru_cache(maxsize=None)
def _selfcheck(device: str) -> tuple[bool, str]:
    dev = torch.device(device)
    ok, why = triton_status(dev) if dev.type == "cuda" else (True, "interpreted")
    if not ok:
        return False, why
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        b, h, n, d = 2, 2, 37, 64
        q, k, v = (torch.randn(b, h, n, d, generator=g).to(dev, dtype).requires_grad_()
                   for _ in range(3))
        # distinct q and k norm weights: a kernel that swapped their gradients must fail
        wq, wk = (torch.randn(d, generator=g).to(dev).requires_grad_() for _ in range(2))
        rope = rope_2d_table(6, 6, d, num_prefix_tokens=1, device=dev)
        outs = []
        for backend in ("triton", "torch"):
            o = attention(q, k, v, rope=rope, q_norm_weight=wq, k_norm_weight=wk, backend=backend)
            pq, pk = qk_norm_rope(q, k, rope=rope, q_norm_weight=wq, k_norm_weight=wk,
                                  backend=backend)
            loss = o.float().square().sum() + (pq.float() * pk.float()).sum()
            grads = torch.autograd.grad(loss, (q, k, v, wq, wk))
            outs.append([o, pq, pk, *grads])
        for a, r in zip(*outs):
            err = (a.float() - r.float()).abs().max().item()
            if not err <= 0.05 * max(1.0, r.float().abs().max().item()):
                return False, f"attention self-check mismatch (max error {err:.3g})"
        x, u = (torch.randn(b, n, 96, generator=g).to(dev, dtype).requires_grad_()
                for _ in range(2))
        sh, sc, ga = (torch.randn(b, 96, generator=g).to(dev, dtype).requires_grad_()
                      for _ in range(3))
        outs = []
        for backend in ("triton", "torch"):
            y = modulated_rmsnorm(x, sh, sc, backend=backend)
            h, z = gated_residual_modulated_rmsnorm(x, u, ga, sh, sc, backend=backend)
            loss = y.float().square().sum() + (h.float() * z.float()).sum()
            grads = torch.autograd.grad(loss, (x, u, sh, sc, ga))
            outs.append([y, h, z, *grads])
        for a, r in zip(*outs):
            err = (a.float() - r.float()).abs().max().item()
            if not err <= 0.05 * max(1.0, r.float().abs().max().item()):
                return False, f"modulated-norm self-check mismatch (max error {err:.3g})"
    except Exception as e:  # compilation or launch failure: fall back
        return False, f"{e.__class__.__name__}: {e}"
    return True, "ok"


def selfcheck(device: torch.device | str = "cuda") -> tuple[bool, str]:
    """Compile and run every kernel once on `device` against the torch backend (cached per
    device). train.set_kernels runs it for `--kernels triton` on a GPU and refuses to train when
    it returns (False, reason)."""
    return _selfcheck(str(torch.device(device)))
