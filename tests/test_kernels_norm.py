"""Fused RMSNorm + adaLN modulation (and the gated residual add fused in front of it): outputs
and every gradient against float64, under the same rule as the attention kernels. CPU runs use
the Triton interpreter; a GPU run uses the compiled kernels and adds bfloat16."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import adaln
from kernels import reference as R
from kernels.testing import check, outputs_and_grads

DEVICE = torch.device("cuda" if kernels.triton_available() else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
F64 = torch.float64
SHAPES = [(3, 1, 64), (3, 17, 96), (1, 257, 64)]  # C=96: channels not a power of two


def make(b, n, c, seed, weight):
    g = torch.Generator().manual_seed(seed)
    x, u = (torch.randn(b, n, c, generator=g, dtype=F64) for _ in range(2))
    shift, scale, gate = (0.5 * torch.randn(b, c, generator=g, dtype=F64) for _ in range(3))
    w = 1 + 0.3 * torch.randn(c, generator=g, dtype=F64) if weight else None
    return x, u, shift, scale, gate, w


def prepare(tensors, dtype):
    x, u, shift, scale, gate, w = tensors
    wdtype = F64 if dtype == F64 else torch.float32
    out = [t.to(DEVICE, dtype).requires_grad_() for t in (x, u, shift, scale, gate)]
    return out + [None if w is None else w.to(DEVICE, wdtype).requires_grad_()]


def run_norm(impl, dtype, tensors, **kw):
    x, _, shift, scale, _, w = prepare(tensors, dtype)

    def fn(x, shift, scale, w):
        if impl == "reference":
            return R.modulated_rmsnorm_reference(x, shift, scale, w, **kw)
        return kernels.modulated_rmsnorm(x, shift, scale, w, backend=impl, **kw)
    return outputs_and_grads(fn, [x, shift, scale, w])


def run_fused(impl, dtype, tensors, use=("h", "y")):
    x, u, shift, scale, gate, w = prepare(tensors, dtype)

    def fn(x, u, gate, shift, scale, w):
        if impl == "reference":
            h, y = R.gated_residual_modulated_rmsnorm_reference(x, u, gate, shift, scale, w)
        else:
            h, y = kernels.gated_residual_modulated_rmsnorm(x, u, gate, shift, scale, w,
                                                            backend=impl)
        return tuple(t for name, t in (("h", h), ("y", y)) if name in use)
    return outputs_and_grads(fn, [x, u, gate, shift, scale, w])


def summed_rows(shape) -> dict[str, int]:
    """Per-sample modulation gradients sum over the N tokens, the weight gradient over B x N."""
    b, n, _ = shape
    return {"dshift": n, "dscale": n, "dgate": n, "dweight": b * n}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight", [False, True], ids=["no-affine", "affine"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_modulated_rmsnorm_matches_fp64(shape, weight, dtype):
    tensors = make(*shape, seed=sum(shape), weight=weight)
    names = ["y", "dx", "dshift", "dscale"] + (["dweight"] if weight else [])
    ref, same = run_norm("reference", F64, tensors), run_norm("reference", dtype, tensors)
    bad = check(run_norm("triton", dtype, tensors), ref, same, dtype, names, summed_rows(shape))
    assert not bad, bad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("use", [("h", "y"), ("y",), ("h",)], ids="+".join)
def test_gated_residual_modulated_rmsnorm_matches_fp64(use, dtype):
    """h = x + gate * u and its modulated norm; gradients reach x, u, gate, shift, scale, w
    whichever outputs are used downstream (zeros for the norm's inputs when only h is)."""
    tensors = make(3, 17, 96, seed=4, weight=True)
    names = list(use) + ["dx", "du", "dgate", "dshift", "dscale", "dweight"]
    ref = run_fused("reference", F64, tensors, use)
    same = run_fused("reference", dtype, tensors, use)
    got = run_fused("triton", dtype, tensors, use)
    bad = check(got, ref, same, dtype, names, summed_rows((3, 17, 96)))
    assert not bad, bad


def test_out_dtype_and_mixed_input_dtypes():
    """fp32 residual stream with half-precision modulation vectors, output straight in half (what
    a Linear under autocast consumes); gradients come back in each input's dtype."""
    tensors = make(3, 17, 64, seed=9, weight=False)
    x = tensors[0].float().requires_grad_()
    shift, scale = (t.half().requires_grad_() for t in tensors[2:4])
    y = kernels.modulated_rmsnorm(x, shift, scale, out_dtype=torch.float16, backend="triton")
    assert y.dtype == torch.float16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and shift.grad.dtype == scale.grad.dtype == torch.float16
    ref = R.modulated_rmsnorm_reference(tensors[0], tensors[2].half().double(),
                                        tensors[3].half().double())
    torch.testing.assert_close(y.double(), ref, atol=2e-3, rtol=2e-3)


def test_chunked_modulation_vectors_and_their_gradients():
    """shift/scale as chunks of one adaLN output [B, 6C] (strided views), as in a SiT block."""
    g = torch.Generator().manual_seed(3)
    b, n, c = 2, 9, 64
    x = torch.randn(b, n, c, generator=g, requires_grad=True)
    ada = torch.randn(b, 6 * c, generator=g, requires_grad=True)
    grads = []
    for backend in ("triton", "torch"):
        shift, scale = ada.chunk(6, dim=1)[:2]
        y = kernels.modulated_rmsnorm(x, shift, scale, backend=backend)
        grads.append(torch.autograd.grad((y * torch.arange(c)).sum(), (x, ada)))
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
    assert grads[0][1][:, 2 * c:].abs().max() == 0 and grads[0][1][:, :2 * c].abs().max() > 0


def test_dispatch(monkeypatch):
    x = torch.randn(2, 3, 64)
    s = torch.zeros(2, 64)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []
    real = adaln._fwd
    monkeypatch.setattr(adaln, "_fwd", lambda *a: calls.append(1) or real(*a))
    kernels.modulated_rmsnorm(x, s, s)
    assert calls == []
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels.modulated_rmsnorm(x, s, s)
    assert calls == [1]
    kernels.modulated_rmsnorm(x.bfloat16(), s, s)  # bf16 is not interpretable: torch
    assert calls == [1]
    with pytest.raises(ValueError, match=r"shift must be \[B, C\]"):
        kernels.modulated_rmsnorm(x, s[:1], s, backend="triton")
