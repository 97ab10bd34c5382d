"""Accuracy rule shared by the kernel tests and the benchmark's correctness column.

FlashAttention's rule: against a float64 reference, a kernel may err at most about twice as much
as the PyTorch implementation computing in the same dtype, plus a small floor of a few units in
the last place of the dtype, times max(1, largest reference magnitude): with unit-scale test
inputs it is an absolute floor, and it grows with gradients that sum over many elements. It lets
cases where PyTorch is exact by cancellation pass (e.g. d q = 0 for a one-token softmax).
"""
from __future__ import annotations

import math

from collections.abc import Callable, Sequence

import torch

FACTOR = 2.0
FLOOR = {torch.float32: 4e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def tolerance(same_dtype: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, terms: int = 1) -> float:
    """FACTOR x the same-dtype PyTorch error + a floor of a few ulp of the largest value; a tensor
    that is a sum of `terms` per-row contributions (a weight or modulation gradient) gets the
    floor times sqrt(terms), the usual growth of rounding error with summation order, which a
    GPU's parallel reduction does not share with PyTorch's."""
    scale = max(1.0, ref.double().abs().max().item()) if ref.numel() else 1.0
    return FACTOR * max_error(same_dtype, ref) + FLOOR[dtype] * scale * math.sqrt(max(1, terms))


def check(actual: Sequence[torch.Tensor], ref64: Sequence[torch.Tensor],
          same_dtype: Sequence[torch.Tensor], dtype: torch.dtype,
          names: Sequence[str], reduced_over: dict[str, int] | None = None) -> list[str]:
    """Messages for every tensor that breaks the rule (empty list: all pass). reduced_over:
    name -> number of summed rows, for the gradients that are reductions."""
    assert len(actual) == len(ref64) == len(same_dtype) == len(names)
    bad = []
    for a, r, s, name in zip(actual, ref64, same_dtype, names):
        if a.shape != r.shape:
            bad.append(f"{name}: shape {tuple(a.shape)} != {tuple(r.shape)}")
            continue
        if not torch.isfinite(a).all():
            bad.append(f"{name}: non-finite values")
            continue
        err, tol = max_error(a, r), tolerance(s, r, dtype, (reduced_over or {}).get(name, 1))
        if not err <= tol:
            bad.append(f"{name}: error {err:.3g} > tolerance {tol:.3g} "
                       f"(same-dtype torch error {max_error(s, r):.3g})")
    return bad


def outputs_and_grads(fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
                      inputs: Sequence[torch.Tensor | None], seed: int = 0) -> list[torch.Tensor]:
    """[outputs..., d(inputs)...] of fn(*inputs) for a fixed random output gradient; None
    inputs are passed through, inputs that require grad get a gradient in the list."""
    out = fn(*inputs)
    outs = list(out) if isinstance(out, tuple) else [out]
    g = torch.Generator(device="cpu").manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype)
           for o in outs]
    wrt = [t for t in inputs if t is not None and t.requires_grad]
    grads = torch.autograd.grad(outs, wrt, cot, materialize_grads=True)  # unused: zeros
    return [o.detach() for o in outs] + [d.detach() for d in grads]
