"""The kernels as torch.library custom operators: torch.library.opcheck on every op (schema, fake
implementation against the real output's shapes/dtypes/strides, autograd registration, tracing
through AOT dispatch), and torch.compile(fullgraph=True) through the public functions and through
a whole SiT with `--kernels triton`, equal to eager. On CPU the kernels run interpreted."""
from __future__ import annotations

import pytest
import torch

import kernels
import train
from kernels import adaln, flash
from kernels import reference as R
from test_components import ALL_ON, digits_model
from train import Routing

pytestmark = pytest.mark.usefixtures("fixed_kernel_tiles")
DEVICE = torch.device("cuda" if kernels.triton_available() else "cpu")


def _t(*shape, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_(grad)


def _rope(n_side=4, d=32):
    return tuple(t.to(DEVICE) for t in R.rope_2d_table(n_side, n_side, d, num_prefix_tokens=1))


def _op_cases():
    cos, sin = _rope()
    q, k, v = _t(1, 2, 17, 32, seed=1), _t(1, 2, 17, 32, seed=2), _t(1, 2, 17, 32, seed=3)
    qw, kw = 1 + _t(32, seed=4).detach(), 1 + _t(32, seed=5).detach()
    qw.requires_grad_(), kw.requires_grad_()
    qkv = _t(2, 17, 3 * 2 * 32, seed=6)
    x, u = _t(2, 5, 64, seed=7), _t(2, 5, 64, seed=8)
    s, w = _t(2, 64, seed=9), _t(64, seed=10)
    f32 = torch.float32
    return {
        "attention, qk-norm + rope": (flash._attention_op, (q, k, v, cos, sin, qw, kw, 0.2, 1e-6, True)),
        "attention, plain": (flash._attention_op, (q, k, v, None, None, None, None, 0.2, 1e-6, True)),
        "attention packed": (flash._attention_packed_op, (qkv, 2, cos, sin, qw, kw, 0.2, 1e-6, False)),
        "qk_norm_rope, q-norm only": (flash._prologue_op, (q, k, cos, sin, qw, None, 1e-6, True)),
        "modulated_rmsnorm": (adaln._modnorm_op, (x, s, s, w, 1e-6, f32)),
        "gated residual": (adaln._residual_op, (x, u, s, s, s, None, 1e-6, torch.float16)),
    }


OP_CASES = list(_op_cases())


@pytest.mark.parametrize("case", OP_CASES)
def test_custom_ops_pass_opcheck(case):
    op, args = _op_cases()[case]
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_backward_ops_pass_opcheck():
    """The backward ops on their own (what AOTAutograd puts in the compiled backward graph)."""
    cos, sin = _rope()
    q, k, v = (_t(1, 2, 17, 32, grad=False, seed=i) for i in range(3))
    qw = 1 + _t(32, grad=False, seed=4)
    o, lse = flash._attention_op(q, k, v, cos, sin, qw, None, 0.2, 1e-6, True)
    do = _t(1, 2, 17, 32, grad=False, seed=11)
    x, s = _t(2, 5, 64, grad=False), _t(2, 64, grad=False)
    y, rstd = adaln._modnorm_op(x, s, s, None, 1e-6, torch.float32)
    h, _, rstd_h = adaln._residual_op(x, x, s, s, s, None, 1e-6, torch.float32)
    # a packed qkv whose last axis is not the unit-stride one (the real op copies it first)
    qkv = _t(1, 32 * 3 * 2, 17, grad=False, seed=12).transpose(1, 2)
    po, plse = flash._attention_packed_op(qkv.contiguous(), 2, cos, sin, qw, None, 0.2, 1e-6, True)
    cases = [
        (flash._attention_packed_backward_op, (qkv, po, plse, po, 2, cos, sin, qw, None, 0.2, 1e-6, True)),
        (flash._attention_backward_op, (q, k, v, o, lse, do, cos, sin, qw, None, 0.2, 1e-6, True)),
        (flash._prologue_backward_op, (q, k, do, do, cos, sin, None, qw, 1e-6, True)),
        (adaln._modnorm_backward_op, (x, y, s, None, rstd)),
        (adaln._residual_backward_op, (h, y, None, x, s, s, None, rstd_h)),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


def test_public_functions_compile_without_graph_breaks():
    rope = _rope()
    leaves = [_t(1, 2, 17, 32, seed=i) for i in range(3)] + [1 + _t(32, seed=4).detach(),
                                                              1 + _t(32, seed=5).detach()]
    leaves[3].requires_grad_(), leaves[4].requires_grad_()

    def f(q, k, v, qw, kw):
        pro = dict(rope=rope, q_norm_weight=qw, k_norm_weight=kw, backend="triton")
        a = kernels.attention(q, k, v, **pro)
        q2, k2 = kernels.qk_norm_rope(q, k, **pro)
        x = (a + torch.nn.functional.scaled_dot_product_attention(q2, k2, v))
        x = x.transpose(1, 2).reshape(1, 17, 64)
        s = x.mean(1)
        h, y = kernels.gated_residual_modulated_rmsnorm(x, 2 * x, s, s, s, backend="triton")
        return kernels.modulated_rmsnorm(y, s, s, backend="triton").square().sum() + h.sum()

    eager = f(*leaves)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled, leaves), torch.autograd.grad(eager, leaves)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("flash_attention", [False, True], ids=["prologue+sdpa", "flash"])
def test_whole_model_with_triton_kernels_compiles_in_one_graph(flash_attention):
    """--compile true --kernels triton: the SiT (every component on) compiles with fullgraph=True
    (any graph break raises) and gives the eager outputs and gradients."""
    opts = dict(ALL_ON, reg_dim=64)
    x, t, y, cls_t = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 10]), torch.randn(2, 64)
    keep = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i))[:4].sort().values
                        for i in range(2)])
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = digits_model(**opts)
        assert train.set_kernels(model, "triton", torch.device("cpu"),
                                 flash_attention=flash_attention) == "triton"
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        out = run(x, t, y, cls_t=cls_t, routing=Routing(keep=keep))
        (out["v"].pow(2).mean() + out["cls_v"].pow(2).mean()).backward()
        results.append((out["v"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, msg=name)


def test_strided_norm_weights_and_malformed_rope_tables():
    """A norm weight that is a strided view (a column of a matrix) is used by value, not read as
    if contiguous; a RoPE table of the wrong shape is an error on every backend, not a broadcast."""
    q, k, v = (_t(1, 2, 17, 32, seed=i) for i in range(3))
    columns = _t(32, 3, seed=20)
    w = columns[:, 1]  # stride 3
    rope = _rope()
    for fn in (kernels.attention, kernels.qk_norm_rope):
        want = fn(q, k, v, rope=rope, q_norm_weight=w, k_norm_weight=w, backend="torch") \
            if fn is kernels.attention else fn(q, k, rope=rope, q_norm_weight=w, backend="torch")
        got = fn(q, k, v, rope=rope, q_norm_weight=w, k_norm_weight=w, backend="triton") \
            if fn is kernels.attention else fn(q, k, rope=rope, q_norm_weight=w, backend="triton")
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    x, s = _t(2, 5, 32, seed=21), _t(2, 32, seed=22)
    torch.testing.assert_close(kernels.modulated_rmsnorm(x, s, s, w, backend="triton"),
                               kernels.modulated_rmsnorm(x, s, s, w, backend="torch"), rtol=1e-4, atol=1e-4)
    (grad_triton,) = torch.autograd.grad(kernels.modulated_rmsnorm(x, s, s, w, backend="triton").sum(), columns)
    (grad_torch,) = torch.autograd.grad(kernels.modulated_rmsnorm(x, s, s, w, backend="torch").sum(), columns)
    torch.testing.assert_close(grad_triton, grad_torch, rtol=1e-4, atol=1e-4)
    one_angle = tuple(t[:1] for t in rope)  # [1, D/2]: one angle for every token
    for backend in ("torch", "triton", "auto"):
        with pytest.raises(ValueError, match="RoPE tables must be"):
            kernels.attention(q, k, v, rope=one_angle, backend=backend)


def test_trainer_chooses_kernels_the_model_can_use(monkeypatch):
    """SiT-XL's head_dim 72 has no attention kernel: --kernels triton says so up front; without
    RoPE/QK-norm the attention needs no kernel; on a GPU a failed self-check refuses the run."""
    class OneLayer(torch.nn.Module):
        def __init__(self, **opts):
            super().__init__()
            self.opts = train.ModelOptions(**opts)
            self.attn = train.Attention(144, 2, self.opts, mixes_values=False)  # head_dim 72
    with pytest.raises(train.ConfigError, match="head_dim 72 not in"):
        train.set_kernels(OneLayer(rope=True), "triton", torch.device("cpu"))
    assert train.set_kernels(OneLayer(), "triton", torch.device("cpu")) == "triton"
    monkeypatch.setattr(kernels, "selfcheck", lambda device: (True, "ok"))  # as on a working GPU
    assert train.set_kernels(OneLayer(), "triton", torch.device("cuda")) == "triton"
    monkeypatch.setattr(kernels, "selfcheck", lambda device: (False, "ptxas failed"))
    with pytest.raises(train.ConfigError, match="self-check failed on cuda: ptxas failed"):
        train.set_kernels(OneLayer(), "triton", torch.device("cuda"))


def test_selfcheck_catches_swapped_norm_weight_gradients(monkeypatch):
    kernels._selfcheck.cache_clear()
    real = flash._launch_bwd

    def swapped(*args, **kw):
        dqw, dkw = real(*args, **kw)
        return dkw, dqw
    monkeypatch.setattr(flash, "_launch_bwd", swapped)
    try:
        ok, why = kernels.selfcheck("cpu")
    finally:
        kernels._selfcheck.cache_clear()
    assert not ok and "attention self-check mismatch" in why


def test_triton_backend_without_triton_is_a_runtime_error(monkeypatch):
    import sys
    from kernels._dispatch import resolve_backend
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(RuntimeError, match="triton is not importable"):
        resolve_backend("triton", torch.device("cpu"), None)
