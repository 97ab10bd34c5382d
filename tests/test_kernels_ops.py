"""How the kernels reach PyTorch (kernels/_ops.py): every operator passes torch.library.opcheck
(schema, fake implementation against the real output's shapes/dtypes/strides, autograd
registration, tracing through AOT dispatch); the eager autograd.Function, the opaque and the
inlined operators compute the same bits; eager calls never enter the operator machinery; under
torch.compile the inlined operators become the Triton kernels themselves in the graph (traced here
for an sm_90 target on fake CUDA tensors); torch.compile(fullgraph=True) through the public
functions and a whole SiT with `--kernels triton` equals eager. On CPU the kernels run
interpreted."""
from __future__ import annotations

import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
import train
from kernels import _ops, adaln, flash
from kernels import reference as R
from test_components import ALL_ON, digits_model
from train import Routing

pytestmark = pytest.mark.usefixtures("fixed_kernel_tiles")
DEVICE = torch.device("cuda" if kernels.triton_available() else "cpu")
# the operator pair torch.compile uses on this device (opaque: interpreted kernels on CPU)
COMPILED_KIND = "inlined" if DEVICE.type == "cuda" else "opaque"


def _t(*shape, grad=True, seed=0, device=None):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g).to(device or DEVICE).requires_grad_(grad)


def _rope(n_side=4, d=32, device=None):
    return tuple(t.to(device or DEVICE)
                 for t in R.rope_2d_table(n_side, n_side, d, num_prefix_tokens=1))


def _op_cases(device=None):
    """One call of each KernelOp: (op, inputs)."""
    cos, sin = _rope(device=device)

    def t(*shape, seed):
        return _t(*shape, seed=seed, device=device)
    q, k, v = t(1, 2, 17, 32, seed=1), t(1, 2, 17, 32, seed=2), t(1, 2, 17, 32, seed=3)
    qw, kw = 1 + t(32, seed=4).detach(), 1 + t(32, seed=5).detach()
    qw.requires_grad_(), kw.requires_grad_()
    qkv = t(2, 17, 3 * 2 * 32, seed=6)
    x, u = t(2, 5, 64, seed=7), t(2, 5, 64, seed=8)
    s, w = t(2, 64, seed=9), t(64, seed=10)
    f32 = torch.float32
    return {
        "attention, qk-norm + rope": (flash.ATTENTION, (q, k, v, cos, sin, qw, kw, 0.2, 1e-6, True, False)),
        "attention, plain": (flash.ATTENTION, (q, k, v, None, None, None, None, 0.2, 1e-6, True, False)),
        "attention packed": (flash.ATTENTION_PACKED, (qkv, 2, cos, sin, qw, kw, 0.2, 1e-6, False, False)),
        "qk_norm_rope, q-norm only": (flash.PROLOGUE, (q, k, cos, sin, qw, None, 1e-6, True)),
        "modulated_rmsnorm": (adaln.MODNORM, (x, s, s, w, 1e-6, f32)),
        "gated residual": (adaln.RESIDUAL, (x, u, s, s, s, None, 1e-6, torch.float16)),
    }


OP_CASES = list(_op_cases("cpu"))


@pytest.mark.parametrize("case", OP_CASES)
def test_custom_ops_pass_opcheck(case):
    op, args = _op_cases()[case]
    result = torch.library.opcheck(getattr(op, COMPILED_KIND), args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_backward_ops_pass_opcheck():
    """The backward ops on their own (what AOTAutograd puts in the compiled backward graph)."""
    cos, sin = _rope()
    q, k, v = (_t(1, 2, 17, 32, grad=False, seed=i) for i in range(3))
    qw = 1 + _t(32, grad=False, seed=4)
    o, lse = flash.ATTENTION.forward(q, k, v, cos, sin, qw, None, 0.2, 1e-6, True, False)
    do = _t(1, 2, 17, 32, grad=False, seed=11)
    x, s = _t(2, 5, 64, grad=False), _t(2, 64, grad=False)
    y, rstd = adaln.MODNORM.forward(x, s, s, None, 1e-6, torch.float32)
    h, _, rstd_h = adaln.RESIDUAL.forward(x, x, s, s, s, None, 1e-6, torch.float32)
    # a packed qkv whose last axis is not the unit-stride one (the real op copies it first)
    qkv = _t(1, 32 * 3 * 2, 17, grad=False, seed=12).transpose(1, 2)
    po, plse = flash.ATTENTION_PACKED.forward(qkv.contiguous(), 2, cos, sin, qw, None, 0.2, 1e-6,
                                              True, False)
    cases = [
        (flash.ATTENTION_PACKED, (qkv, po, plse, po, 2, cos, sin, qw, None, 0.2, 1e-6, True, False)),
        (flash.ATTENTION, (q, k, v, o, lse, do, cos, sin, qw, None, 0.2, 1e-6, True, False)),
        (flash.PROLOGUE, (q, k, do, do, cos, sin, None, qw, 1e-6, True)),
        (adaln.MODNORM, (x, y, s, None, rstd)),
        (adaln.RESIDUAL, (h, y, None, x, s, s, None, rstd_h)),
    ]
    for op, args in cases:
        result = torch.library.opcheck(getattr(op, COMPILED_KIND + "_backward"), args)
        assert set(result.values()) == {"SUCCESS"}, (op.name, result)


class _OpLog(TorchDispatchMode):
    """Names of the operators dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _run(fn, args):
    """Outputs of fn(*args) and the gradients of every input that requires them, for a fixed
    weighting of the outputs."""
    outs = fn(*args)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    loss = sum((o.float() * (1 + torch.arange(o.numel(), device=o.device).view(o.shape) % 3)).sum()
               for o in outs if o.dtype.is_floating_point and o.requires_grad)
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("case", OP_CASES)
def test_eager_function_and_both_operators_compute_the_same_bits(case):
    """The three wrappers share the launch functions: outputs and every gradient bitwise equal.
    The opaque and the inlined operator each dispatch their own backward operator; the eager
    Function dispatches none."""
    op, args = _op_cases()[case]
    results = {}
    for kind in ("eager", "opaque", "inlined"):
        fn = op.eager.apply if kind == "eager" else getattr(op, kind)
        with _OpLog() as log:
            results[kind] = _run(fn, args)
        ours = [n for n in log.names if n.startswith(_ops.NAMESPACE)]
        if kind == "eager":
            assert ours == [], ours
        else:
            suffix = "_inlined" if kind == "inlined" else ""
            assert ours == [f"{_ops.NAMESPACE}.{op.name}{suffix}.default",
                            f"{_ops.NAMESPACE}.{op.name}{suffix}_backward.default"], ours
    for kind in ("opaque", "inlined"):
        for a, b in zip(results[kind][0] + results[kind][1],
                        results["eager"][0] + results["eager"][1]):
            assert torch.equal(a, b), (kind, case)


def test_public_functions_call_the_launchers_without_operator_dispatch():
    """Eager (the training step without --compile): no torch.library operator on the way, the
    host cost measured on the GPU (benchmarks/RESULTS_GPU.md)."""
    q, k, v = (_t(1, 2, 17, 32, seed=i) for i in range(3))
    x, s = _t(2, 5, 64, seed=7), _t(2, 64, seed=9)
    with _OpLog() as log:
        out = kernels.attention(q, k, v, rope=_rope(), backend="triton").sum()
        out = out + kernels.modulated_rmsnorm(x, s, s, backend="triton").sum()
        torch.autograd.grad(out, (q, k, v, x, s))
    assert log.names and not [n for n in log.names if n.startswith(_ops.NAMESPACE)], log.names


def test_calls_without_gradients_record_nothing_and_fake_inputs_take_the_operators():
    """Sampling (no_grad, or inputs that need no gradient) runs the forward launchers alone: no
    autograd node, no operator. Fake tensors (make_fx, export, FakeTensorMode) go through the
    operators' fake implementations instead of launching kernels on them."""
    q, k, v = (_t(1, 2, 17, 32, seed=i) for i in range(3))
    with _OpLog() as log, torch.no_grad():
        out = kernels.attention(q, k, v, backend="triton")
    assert out.grad_fn is None and not [n for n in log.names if n.startswith(_ops.NAMESPACE)]
    torch.testing.assert_close(out, kernels.attention(q, k, v, backend="triton").detach())
    with _OpLog() as log:
        out = kernels.attention(q.detach(), k.detach(), v.detach(), backend="triton")
    assert out.grad_fn is None and not [n for n in log.names if n.startswith(_ops.NAMESPACE)]
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake = kernels.attention(fq, fk, fv, backend="triton")
    assert fake.shape == q.shape and fake.stride() == out.stride()


def test_double_backward_is_an_error():
    """Not a silent zero: a gradient penalty through the kernels would otherwise lose its term."""
    q, k, v = (_t(1, 2, 17, 32, seed=i) for i in range(3))
    out = kernels.attention(q, k, v, backend="triton").sum()
    with pytest.raises(RuntimeError, match="no derivative of its own"):
        torch.autograd.grad(out, q, create_graph=True)


def test_eager_functions_launch_compiled_kernels_without_the_traceable_wrapper():
    """On a GPU the eager Function launches the kernel objects themselves; elsewhere launch()
    hands out wrap_triton's wrapper (what torch.compile traces)."""
    from kernels import _loader
    mod = _loader.load("attention", interpret=False)
    wrapped = _ops.launch(mod, mod.attn_fwd_tuned)
    assert wrapped is not mod.attn_fwd_tuned and wrapped.kernel is mod.attn_fwd_tuned
    with _ops._direct_launches():
        assert _ops.launch(mod, mod.attn_fwd_tuned) is mod.attn_fwd_tuned
    assert _ops.launch(mod, mod.attn_fwd_tuned) is not mod.attn_fwd_tuned  # restored


def test_compiled_calls_take_the_inlined_operators_on_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(flash.ATTENTION, "inlined", lambda *a: calls.append("inlined"))
    monkeypatch.setattr(flash.ATTENTION, "opaque", lambda *a: calls.append("opaque"))
    with FakeTensorMode():
        flash.ATTENTION(torch.empty(1, 1, 4, 32, device="cuda"))
    flash.ATTENTION(torch.empty(1, 1, 4, 32))
    assert calls == ["inlined", "opaque"]


@pytest.fixture
def sm90_target(monkeypatch):
    """Triton's active driver answering "an sm_90 GPU" on this CPU machine, for PyTorch's TTIR
    analysis of which kernel arguments a launch writes (it compiles the kernel to TTIR only)."""
    import triton
    from triton.backends.compiler import GPUTarget
    target = GPUTarget("cuda", 90, 32)
    monkeypatch.setattr(triton.runtime.driver, "_active",
                        types.SimpleNamespace(get_current_target=lambda: target))


def _traced_kernels(fn, *args, tracing_mode="fake") -> list[tuple[str, bool, list[str]]]:
    """(kernel name, autotuned?, arguments it writes) for each Triton kernel call in the
    functionalised trace of fn(*args); fails on an opaque speedrun_kernels operator left in the
    graph, and with tracing_mode="symbolic" on shapes that did not stay symbolic."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from triton.runtime.jit import JITFunction
    gm = make_fx(dispatch_functionalize(fn), tracing_mode=tracing_mode)(*args)
    assert tracing_mode != "symbolic" or "sym_size" in gm.code, gm.code
    calls = []
    for node in gm.graph.nodes:
        assert _ops.NAMESPACE not in str(node.target), gm.code
        if node.op == "call_function" and "triton_kernel_wrapper" in str(node.target):
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            jit = kernel
            while not isinstance(jit, JITFunction):  # Autotuners wrap it (num_warps makes one)
                jit = jit.fn
            tuned = len(getattr(kernel, "configs", ())) > 1
            calls.append((jit.fn.__name__, tuned, sorted(node.kwargs["tensors_to_clone"])))
    return calls


@pytest.mark.parametrize("autotune", [False, True])
def test_inlined_operators_trace_to_the_kernels_for_a_gpu(sm90_target, autotune):
    """Under torch.compile on CUDA, inductor receives the kernels themselves (and launches them
    from its generated code). Traced with fake CUDA tensors: each forward and backward operator
    is its kernel calls (the attention backward recomputes P(q), P(k) first), each writing only
    its outputs (so inductor copies no input), with the autotuned kernels and with the fixed
    tile configs."""
    with FakeTensorMode():
        def t(*shape, dtype=torch.bfloat16):
            return torch.empty(*shape, device="cuda", dtype=dtype)
        q, k, v, do = (t(2, 3, 257, 64) for _ in range(4))
        qkv = t(2, 257, 3 * 3 * 64)
        qw, kw = t(64, dtype=torch.float32), t(64, dtype=torch.float32)
        cos, sin = t(257, 32, dtype=torch.float32), t(257, 32, dtype=torch.float32)
        x, dy = t(2, 257, 192), t(2, 257, 192)
        shift, scale, gate = (t(2, 192) for _ in range(3))
        o, lse = flash.ATTENTION.inlined(q, k, v, cos, sin, qw, kw, 0.125, 1e-6, True, autotune)
        po, plse = flash.ATTENTION_PACKED.inlined(qkv, 3, cos, sin, qw, kw, 0.125, 1e-6, True,
                                                  autotune)
        _, rstd = adaln.MODNORM.inlined(x, shift, scale, None, 1e-6, torch.bfloat16)
        h, _, rstd_h = adaln.RESIDUAL.inlined(x, x, gate, shift, scale, None, 1e-6,
                                              torch.bfloat16)
    f = dict(scale=0.125, eps=1e-6, interleaved=True, autotune=autotune)
    cases = [
        (lambda *a: flash.ATTENTION.inlined(*a, **f), (q, k, v, cos, sin, qw, kw),
         [("attn_fwd", autotune, ["LSE", "O"])]),
        (lambda *a: flash.ATTENTION.inlined_backward(*a, **f), (q, k, v, o, lse, do, cos, sin, qw, kw),
         [("qk_prologue_fwd", False, ["KO", "QO"]), ("attn_bwd", autotune, ["DK", "DQ", "DV", "DW"])]),
        (lambda *a: flash.ATTENTION_PACKED.inlined(*a, **f), (qkv, 3, cos, sin, qw, kw),
         [("attn_fwd", autotune, ["LSE", "O"])]),
        (lambda *a: flash.ATTENTION_PACKED.inlined_backward(*a, **f),
         (qkv, po, plse, po, 3, cos, sin, qw, kw),
         [("qk_prologue_fwd", False, ["KO", "QO"]), ("attn_bwd", autotune, ["DK", "DQ", "DV", "DW"])]),
        (lambda *a: flash.PROLOGUE.inlined(*a, 1e-6, True), (q, k, cos, sin, qw, kw),
         [("qk_prologue_fwd", False, ["KO", "QO"])]),
        (lambda *a: flash.PROLOGUE.inlined_backward(*a, 1e-6, True),
         (q, k, do, do, cos, sin, qw, kw), [("qk_prologue_bwd", False, ["DK", "DKW", "DQ", "DQW"])]),
        (lambda *a: adaln.MODNORM.inlined(*a, 1e-6, torch.bfloat16), (x, shift, scale, None),
         [("modnorm_fwd", False, ["RSTD", "Y"])]),  # H (no residual: x as a placeholder) is not written
        (lambda *a: adaln.MODNORM.inlined_backward(*a), (x, dy, scale, None, rstd),
         [("modnorm_bwd", False, ["DX", "PSCALE", "PSHIFT"])]),
        (lambda *a: adaln.RESIDUAL.inlined(*a, 1e-6, torch.bfloat16), (x, x, gate, shift, scale, None),
         [("modnorm_fwd", False, ["H", "RSTD", "Y"])]),
        (lambda *a: adaln.RESIDUAL.inlined_backward(*a), (h, dy, None, x, gate, scale, None, rstd_h),
         [("modnorm_bwd", False, ["DU", "DX", "PGATE", "PSCALE", "PSHIFT"])]),
    ]
    for fn, args, want in cases:
        assert _traced_kernels(fn, *args) == want


def test_inlined_operators_trace_with_symbolic_shapes(sm90_target, monkeypatch):
    """torch.compile turns to symbolic shapes when a shape changes between calls: the launch
    functions must trace with them (tile plans specialise on what they need) into kernel calls.
    The compiled kernel files are used on CPU tensors here, traced only, never launched."""
    from kernels import _loader
    load = _loader.load
    monkeypatch.setattr(_loader, "load", lambda name, interpret: load(name, False))
    q, k, v, do = (torch.randn(2, 3, 33, 64) for _ in range(4))
    qw, cos, sin = torch.randn(64), torch.randn(33, 32), torch.randn(33, 32)
    x, s = torch.randn(2, 33, 96), torch.randn(2, 96)
    o, lse = torch.randn(2, 3, 33, 64), torch.randn(6, 33)
    cases = [
        (lambda *a: flash._attention_forward(*a, None, 0.125, 1e-6, True, True),
         (q, k, v, cos, sin, qw), ["attn_fwd"]),
        (lambda *a: flash._attention_backward(*a, None, 0.125, 1e-6, True, True),
         (q, k, v, o, lse, do, cos, sin, qw), ["qk_prologue_fwd", "attn_bwd"]),
        (lambda *a: adaln._modnorm_forward(*a, None, 1e-6, torch.float32), (x, s, s),
         ["modnorm_fwd"]),
    ]
    for fn, args, want in cases:
        assert [c[0] for c in _traced_kernels(fn, *args, tracing_mode="symbolic")] == want


def test_compile_caches_are_keyed_by_the_kernel_sources():
    """AOTAutograd keys its cache by the kernels an inlined operator launches; they are loaded at
    run time, so kernels/_loader registers them (else an edited kernel could be served stale),
    also for an operator made after its kernel file was loaded."""
    from kernels import _loader
    from torch._library.triton import get_triton_kernels_for_op
    attention, norm = _loader.load("attention", interpret=False), _loader.load("norm", interpret=False)
    late = _ops.KernelOp("test_made_after_loading", "norm", adaln._modnorm_forward,
                         adaln._modnorm_forward_fake, adaln._modnorm_backward,
                         adaln._modnorm_backward_fake, adaln._modnorm_setup, adaln._modnorm_grads)
    for op, mod, kernel in ((flash.ATTENTION, attention, "attn_bwd_tuned"),
                            (flash.PROLOGUE, attention, "qk_prologue_fwd"),
                            (adaln.RESIDUAL, norm, "modnorm_bwd"), (late, norm, "modnorm_fwd")):
        for name in (op.inlined._qualname, op.inlined_backward._qualname):
            assert any(k is getattr(mod, kernel) for k in get_triton_kernels_for_op(name)), name


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_public_functions_compile_without_graph_breaks(compiler):
    """fullgraph=True, the eager results and gradients; with inductor, its generated code (forward
    and backward) launches our kernels itself on a GPU and calls the opaque operators on CPU."""
    from torch._inductor.utils import run_and_get_code
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
    compiled_f = torch.compile(f, backend=compiler, fullgraph=True)

    def forward_backward():
        out = compiled_f(*leaves)
        return out, torch.autograd.grad(out, leaves)
    if compiler == "inductor":
        (compiled, grads), code = run_and_get_code(forward_backward)
        code = "\n".join(code)
        for name in ("attn_fwd", "attn_bwd", "qk_prologue_fwd", "qk_prologue_bwd", "modnorm_fwd",
                     "modnorm_bwd"):
            assert (name in code) == (DEVICE.type == "cuda"), name
        assert ("speedrun_kernels" in code) == (DEVICE.type == "cpu")
    else:
        compiled, grads = forward_backward()
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(grads, torch.autograd.grad(eager, leaves)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("flash_attention", [False, True], ids=["prologue+sdpa", "flash"])
def test_whole_model_with_triton_kernels_compiles_in_one_graph(flash_attention):
    """--compile true --kernels triton: the SiT (every component on) compiles with fullgraph=True
    (any graph break raises) and gives the eager outputs and gradients. The graph holds the
    attention kernel; the modulated norms are left to the compiler (eager-only kernels)."""
    from torch._dynamo.backends.common import aot_autograd
    from functorch.compile import make_boxed_func
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)
    backend = aot_autograd(fw_compiler=keep_graph, bw_compiler=keep_graph)
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
        run = torch.compile(model, backend=backend, fullgraph=True) if compiled else model
        out = run(x, t, y, cls_t=cls_t, routing=Routing(keep=keep))
        (out["v"].pow(2).mean() + out["cls_v"].pow(2).mean()).backward()
        results.append((out["v"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, msg=name)
    forward, backward = graphs
    attention = "flash_attention" if flash_attention else "qk_norm_rope"
    assert f"speedrun_kernels.{attention}.default" in forward
    assert f"speedrun_kernels.{attention}_backward.default" in backward
    assert "modulated_rmsnorm" not in forward + backward


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


class OneAttentionLayer(torch.nn.Module):
    """The smallest model set_kernels reads: its options and one attention layer (2 heads)."""

    def __init__(self, width: int = 128, **opts):
        super().__init__()
        self.opts = train.ModelOptions(**opts)
        self.attn = train.Attention(width, 2, self.opts, mixes_values=False)


def test_trainer_chooses_kernels_the_model_can_use(monkeypatch):
    """SiT-XL's head_dim 72 has no attention kernel: --kernels triton says so up front; without
    RoPE/QK-norm the attention needs no kernel; a model with nothing to fuse runs and reports
    torch; a failed self-check (a GPU's build, or no Triton) and bf16 on the CPU interpreter
    refuse the run."""
    def OneLayer(**opts):
        return OneAttentionLayer(width=144, **opts)  # head_dim 72

    def backends(model):
        return {m.backend for m in model.modules() if hasattr(m, "backend")}
    with pytest.raises(train.ConfigError, match="head_dim 72 not in"):
        train.set_kernels(OneLayer(rope=True), "triton", torch.device("cpu"))
    model = OneLayer(norm="rmsnorm")
    assert train.set_kernels(model, "triton", torch.device("cpu")) == "triton" and backends(model) == {"triton"}
    for model, compiled in ((OneLayer(), False), (OneLayer(norm="rmsnorm"), True)):  # nothing a kernel fuses
        assert train.set_kernels(model, "triton", torch.device("cpu"), compiled=compiled) == "torch"
        assert backends(model) == {"torch"}
    with pytest.raises(train.ConfigError, match="the Triton interpreter, which has no bf16"):
        train.set_kernels(OneLayer(norm="rmsnorm"), "triton", torch.device("cpu"), autocast_dtype=torch.bfloat16)
    monkeypatch.setattr(kernels, "selfcheck", lambda device: (True, "ok"))  # as on a working GPU
    assert train.set_kernels(OneLayer(norm="rmsnorm"), "triton", torch.device("cuda")) == "triton"
    monkeypatch.setattr(kernels, "selfcheck", lambda device: (False, "ptxas failed"))
    with pytest.raises(train.ConfigError, match="self-check failed on cuda: ptxas failed"):
        train.set_kernels(OneLayer(norm="rmsnorm"), "triton", torch.device("cuda"))
    monkeypatch.setattr(kernels, "selfcheck", lambda device: (False, "triton is not importable"))
    with pytest.raises(train.ConfigError, match="self-check failed on cpu: triton is not importable"):
        train.set_kernels(OneLayer(norm="rmsnorm"), "triton", torch.device("cpu"))


def test_auto_chooses_the_kernels_only_where_they_were_measured_faster(monkeypatch):
    """--kernels auto: the kernels for a compiled step on a GPU with RoPE or QK-norm to fuse;
    torch eager, on CPU, with nothing to fuse in attention, or (with a warning saying why) where
    the kernels cannot serve the model or fail their self-check."""
    OneLayer = OneAttentionLayer  # width 128, head_dim 64: a shape the kernels serve
    checked = []
    monkeypatch.setattr(kernels, "selfcheck", lambda device: checked.append(device) or (True, "ok"))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert train.set_kernels(OneLayer(rope=True), "auto", cuda, compiled=True) == "triton"
    assert train.set_kernels(OneLayer(qk_norm=True), "auto", cuda, compiled=True) == "triton"
    assert checked == [cuda, cuda]
    assert train.set_kernels(OneLayer(rope=True), "auto", cuda, compiled=False) == "torch"
    assert train.set_kernels(OneLayer(rope=True), "auto", cpu, compiled=True) == "torch"
    assert train.set_kernels(OneLayer(norm="rmsnorm"), "auto", cuda, compiled=True) == "torch"
    assert len(checked) == 2  # the torch path never builds the kernels
    with pytest.warns(RuntimeWarning, match="torch path, since the kernels cannot run this model: head_dim 72"):
        assert train.set_kernels(OneLayer(width=144, rope=True), "auto", cuda, compiled=True) == "torch"
    monkeypatch.setattr(kernels, "selfcheck", lambda device: (False, "ptxas failed"))
    with pytest.warns(RuntimeWarning, match="self-check failed on cuda: ptxas failed"):
        model = OneLayer(rope=True)
        assert train.set_kernels(model, "auto", cuda, compiled=True) == "torch"
    assert model.attn.backend == "torch"


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
