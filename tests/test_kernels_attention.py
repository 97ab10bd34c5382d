"""Fused attention (kernels.attention): forward output and every gradient against a float64
reference, under FlashAttention's rule (error <= 2x the same-dtype PyTorch error + a small floor).

Without a GPU the Triton kernels run on CPU tensors through the Triton interpreter (the package
loads an interpreted copy of the kernels itself: no environment variable is needed); with a
usable GPU the same tests run the compiled kernels on CUDA and add bfloat16. Shapes stay tiny
because the interpreter costs milliseconds per tile step.
"""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import kernels
from kernels import flash as attention_mod
from kernels import reference as R
from kernels.testing import check, outputs_and_grads

pytestmark = pytest.mark.usefixtures("fixed_kernel_tiles")
DEVICE = torch.device("cuda" if kernels.triton_available() else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
F64 = torch.float64

# sequence length -> (grid_h, grid_w, leading unrotated tokens): SiT-B/1 is 1 + 16 x 16
GRIDS = {1: (1, 1, 0), 17: (4, 4, 1), 33: (4, 8, 1), 40: (3, 13, 1), 64: (8, 8, 0),
         100: (9, 11, 1), 257: (16, 16, 1)}
# odd batch and head counts, B * H small for the interpreter
BATCH_HEADS = {1: (3, 3), 17: (3, 1), 33: (1, 3), 40: (1, 1), 64: (1, 3), 100: (1, 1),
               257: (1, 1)}


def make_inputs(n: int, d: int = 64, *, norm: bool = True, rope: bool = True, seed: int = 0,
                batch_heads: tuple[int, int] | None = None, per_sample_rope: bool = False):
    b, h = batch_heads or BATCH_HEADS[n]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=F64) for _ in range(3))
    qw = 1 + 0.5 * torch.randn(d, generator=g, dtype=F64) if norm else None
    kw = 1 + 0.5 * torch.randn(d, generator=g, dtype=F64) if norm else None
    tables = None
    if rope and per_sample_rope:  # arbitrary per-sample positions, as after token dropping
        angles = 3.0 * torch.randn(b, n, d // 2, generator=g, dtype=F64)
        tables = (torch.cos(angles).float(), torch.sin(angles).float())
    elif rope:
        gh, gw, prefix = GRIDS[n]
        tables = R.rope_2d_table(gh, gw, d, num_prefix_tokens=prefix)
    return (q, k, v, qw, kw), tables


def run(impl: str, dtype: torch.dtype, tensors, tables, **kw):
    """[out, dq, dk, dv, (dq_w), (dk_w)] of one implementation in one dtype on DEVICE."""
    q, k, v, qw, kw_ = tensors
    wdtype = F64 if dtype == F64 else torch.float32
    args = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]
    args += [None if w is None else w.to(DEVICE, wdtype).requires_grad_() for w in (qw, kw_)]
    rope = None if tables is None else tuple(t.to(DEVICE) for t in tables)

    def fn(q, k, v, qw, kw_):
        common = dict(rope=rope, q_norm_weight=qw, k_norm_weight=kw_, **kw)
        if impl == "reference":
            return R.attention_reference(q, k, v, **common)
        return kernels.attention(q, k, v, backend=impl, **common)

    return outputs_and_grads(fn, args)


def names(tensors):
    out = ["out", "dq", "dk", "dv"]
    return out + [n for n, w in zip(("d q_norm_weight", "d k_norm_weight"), tensors[3:])
                  if w is not None]


def weight_rows(q: torch.Tensor) -> dict[str, int]:
    """The norm-weight gradients sum one contribution per (batch, head, token) row."""
    rows = q.shape[0] * q.shape[1] * q.shape[2]
    return {"d q_norm_weight": rows, "d k_norm_weight": rows}


def assert_kernel_accurate(tensors, tables, dtype, **kw):
    ref = run("reference", F64, tensors, tables, **kw)
    same = run("reference", dtype, tensors, tables, **kw)
    bad = check(run("triton", dtype, tensors, tables, **kw), ref, same, dtype, names(tensors),
                weight_rows(tensors[0]))
    assert not bad, bad
    return ref, same


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prologue", ["plain", "qknorm+rope"])
@pytest.mark.parametrize("n", [1, 17, 64, 257])
def test_attention_matches_fp64(n, prologue, dtype):
    with_prologue = prologue != "plain"
    tensors, tables = make_inputs(n, norm=with_prologue, rope=with_prologue, seed=n)
    ref, same = assert_kernel_accurate(tensors, tables, dtype)
    # the PyTorch fallback (norm, RoPE, SDPA) obeys the same rule
    bad = check(run("torch", dtype, tensors, tables), ref, same, dtype, names(tensors))
    assert not bad, bad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["q-norm only", "rope only", "per-sample rope",
                                     "scale 0.3", "rope halves"])
def test_attention_prologue_variants(variant, dtype):
    n = 33
    if variant == "q-norm only":
        tensors, tables = make_inputs(n, rope=False, seed=7)
        tensors = (*tensors[:4], None)
    elif variant == "rope only":
        tensors, tables = make_inputs(n, norm=False, seed=7)
    elif variant == "per-sample rope":  # tables [B, N, D/2]: each sample has its own positions
        tensors, tables = make_inputs(n, per_sample_rope=True, batch_heads=(3, 1), seed=7)
    else:
        tensors, tables = make_inputs(n, seed=8)
    kw = {"scale": 0.3} if variant == "scale 0.3" else {}
    if variant == "rope halves":
        kw = {"rope_interleaved": False}
    assert_kernel_accurate(tensors, tables, dtype, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [32, 128])
def test_attention_head_dims(d, dtype):
    tensors, tables = make_inputs(40, d, seed=d)
    assert_kernel_accurate(tensors, tables, dtype)


@contextmanager
def forced_meta(fwd: dict, bwd: dict):
    """Run the attention kernels with these launch parameters (FIXED_META entries updated for
    the block, restored after)."""
    mod = kernels._loader.load("attention", interpret=DEVICE.type != "cuda")
    saved = {k: dict(v) for k, v in mod.FIXED_META.items()}
    mod.FIXED_META["fwd"].update(fwd)
    mod.FIXED_META["bwd"].update(bwd)
    try:
        yield
    finally:
        for k, v in saved.items():
            mod.FIXED_META[k].clear()
            mod.FIXED_META[k].update(v)


def forced_tiles(block_m: int, block_n: int):
    """Run every attention kernel with one tile shape (interpreted or compiled)."""
    return forced_meta(dict(BLOCK_M=block_m, BLOCK_N=block_n),
                       dict(BLOCK_M1=block_m, BLOCK_N1=block_n, BLOCK_M2=block_m, BLOCK_N2=block_n))


@pytest.mark.parametrize("tiles", [(32, 64), (128, 32)], ids=str)
def test_attention_unequal_tiles(tiles):
    """Other tile shapes (the GPU autotuner picks among several): several query/key blocks,
    ragged tails, and a different number of partial-sum rows for the norm weights."""
    tensors, tables = make_inputs(100, seed=100)
    with forced_tiles(*tiles):
        assert_kernel_accurate(tensors, tables, torch.float32)


def forced_config(fwd: tuple, bwd: tuple):
    """Run the attention kernels with one forward and one backward entry of the autotuner's lists
    (tiles, and on a GPU warps and pipeline stages too; the interpreter has neither)."""
    mod = kernels._loader.load("attention", interpret=DEVICE.type != "cuda")
    metas = [mod._meta(fwd, mod.FWD_BLOCKS), mod._meta(bwd, mod.BWD_BLOCKS)]
    if DEVICE.type != "cuda":
        metas = [{k: v for k, v in m.items() if k.startswith("BLOCK_")} for m in metas]
    return forced_meta(*metas)


def _tuned_config_pairs():
    from kernels._triton_attention import BWD_CONFIGS, FWD_CONFIGS
    count = max(len(FWD_CONFIGS), len(BWD_CONFIGS))
    return [(FWD_CONFIGS[i % len(FWD_CONFIGS)], BWD_CONFIGS[i % len(BWD_CONFIGS)])
            for i in range(count)]


@pytest.mark.parametrize("fwd,bwd", _tuned_config_pairs(), ids=str)
def test_every_autotuned_config_is_accurate(fwd, bwd):
    """Each config the GPU autotuner may pick, at SiT-B/1's N = 257 with QK-norm and RoPE: the
    autotuner keeps the fastest, never checks its numbers (bf16 on a GPU, fp16 interpreted)."""
    batch_heads = (2, 3) if DEVICE.type == "cuda" else (1, 1)
    tensors, tables = make_inputs(257, seed=11, batch_heads=batch_heads)
    with forced_config(fwd, bwd):
        assert_kernel_accurate(tensors, tables, DTYPES[-1])


@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "qknorm+rope"])
def test_attention_never_reads_rows_past_the_sequence(prologue):
    """Full tiles are loaded without masks; the rows after the last token must never be read.
    q, k, v and the output gradient are views into buffers whose extra rows hold NaN: one
    unmasked read past N would poison the output or a gradient (checked against fp64)."""
    n, pad = 100, 64
    (q, k, v, qw, kw), tables = make_inputs(n, norm=prologue, rope=prologue, seed=5)

    def padded(t):
        buf = torch.full((*t.shape[:2], n + pad, t.shape[-1]), float("nan"), dtype=torch.float32,
                         device=DEVICE)
        buf[:, :, :n] = t.to(DEVICE, torch.float32)
        return buf[:, :, :n]

    ref = run("reference", F64, (q, k, v, qw, kw), tables)
    rope = None if tables is None else tuple(t.to(DEVICE) for t in tables)
    weights = [None if w is None else w.to(DEVICE, torch.float32).requires_grad_()
               for w in (qw, kw)]
    leaves = [padded(t).requires_grad_() for t in (q, k, v)]
    grad_out = padded(torch.randn(q.shape, generator=torch.Generator().manual_seed(0),
                                  dtype=F64))
    for tiles in ((64, 64), (32, 64), (128, 32)):
        with forced_tiles(*tiles):
            out = kernels.attention(*leaves, rope=rope, q_norm_weight=weights[0],
                                    k_norm_weight=weights[1], backend="triton")
            grads = torch.autograd.grad(out, leaves + [w for w in weights if w is not None],
                                        grad_out)
        for t in (out, *grads):
            assert torch.isfinite(t).all(), f"tiles {tiles}: a row past N was read"
        assert (out.double() - ref[0]).abs().max().item() < 1e-4

def test_backward_is_bitwise_repeatable_whatever_pytorch_determinism_says():
    """One backward scheme, without atomics: the gradients are the same bits run after run, and
    with PyTorch's deterministic algorithms on or off (an earlier scheme switched to fp32 atomics
    for dq when they were off, which changed the rounding)."""
    tensors, tables = make_inputs(33, seed=3)
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        results = []
        for on in (True, False, False):
            torch.use_deterministic_algorithms(on, warn_only=True)
            results.append(run("triton", torch.float32, tensors, tables))
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_check_rejects_a_wrong_prologue():
    """Negative control: the rule is tight enough to catch a kernel that skips the QK-norm."""
    tensors, tables = make_inputs(17, seed=1)
    dtype = torch.float32
    ref = run("reference", F64, tensors, tables)
    same = run("reference", dtype, tensors, tables)
    wrong = run("triton", dtype, (*tensors[:3], None, None), tables)
    assert check(wrong[:4], ref[:4], same[:4], dtype, ["out", "dq", "dk", "dv"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_attention_packed_qkv(dtype):
    """attention_packed reads q/k/v from one [B, N, 3C] tensor and returns one packed gradient."""
    b, n, heads, d = 3, 33, 3, 32
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(b, n, 3 * heads * d, generator=g, dtype=F64)
    qw, kw = (1 + 0.5 * torch.randn(d, generator=g, dtype=F64) for _ in range(2))
    tables = R.rope_2d_table(4, 8, d, num_prefix_tokens=1)

    def go(impl, dt):
        wdt = F64 if dt == F64 else torch.float32
        x = qkv.to(DEVICE, dt).requires_grad_()
        ws = [w.to(DEVICE, wdt).requires_grad_() for w in (qw, kw)]
        rope = tuple(t.to(DEVICE) for t in tables)

        def fn(x, qw, kw):
            if impl == "reference":
                q, k, v = x.view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
                o = R.attention_reference(q, k, v, rope=rope, q_norm_weight=qw, k_norm_weight=kw)
                return o.transpose(1, 2).reshape(b, n, heads * d)
            return kernels.attention_packed(x, heads, rope=rope, q_norm_weight=qw,
                                            k_norm_weight=kw, backend=impl)
        return outputs_and_grads(fn, [x, *ws])

    got = go("triton", dtype)
    assert got[0].shape == (b, n, heads * d) and got[1].shape == qkv.shape
    bad = check(got, go("reference", F64), go("reference", dtype), dtype,
                ["out", "dqkv", "d q_norm_weight", "d k_norm_weight"], weight_rows(torch.empty(b, heads, n)))
    assert not bad, bad


def test_attention_output_layout_makes_head_merge_free():
    tensors, tables = make_inputs(17, seed=2)
    q, k, v = (t.to(DEVICE, torch.float32) for t in tensors[:3])
    o = kernels.attention(q, k, v, rope=tuple(t.to(DEVICE) for t in tables), backend="triton")
    assert o.shape == q.shape
    assert o.transpose(1, 2).is_contiguous()  # [B, N, H, D] memory: the reshape is a view


# ---------------------------------------------------------------------------------------------
# the stand-alone prologue (kernels.qk_norm_rope), which feeds PyTorch SDPA in the trainer
# ---------------------------------------------------------------------------------------------
def run_prologue(impl: str, dtype: torch.dtype, tensors, tables, **kw):
    """[P(q), P(k), dq, dk, (dq_w), (dk_w)] of one implementation in one dtype on DEVICE."""
    q, k, _, qw, kw_ = tensors
    wdtype = F64 if dtype == F64 else torch.float32
    args = [q.to(DEVICE, dtype).requires_grad_(), k.to(DEVICE, dtype).requires_grad_()]
    args += [None if w is None else w.to(DEVICE, wdtype).requires_grad_() for w in (qw, kw_)]
    rope = None if tables is None else tuple(t.to(DEVICE) for t in tables)

    def fn(q, k, qw, kw_):
        if impl == "reference":  # the definition, written out here
            return (R.qk_prologue(q, qw, rope, interleaved=kw.get("rope_interleaved", True)),
                    R.qk_prologue(k, kw_, rope, interleaved=kw.get("rope_interleaved", True)))
        return kernels.qk_norm_rope(q, k, rope=rope, q_norm_weight=qw, k_norm_weight=kw_,
                                    backend=impl, **kw)

    return outputs_and_grads(fn, args)


def prologue_names(tensors):
    return ["P(q)", "P(k)", "dq", "dk"] + [n for n, w in zip(("d q_norm_weight", "d k_norm_weight"),
                                                             tensors[3:]) if w is not None]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["qknorm+rope", "q-norm only", "rope only", "per-sample rope",
                                     "rope halves"])
@pytest.mark.parametrize("n", [1, 17, 257])
def test_qk_norm_rope_matches_fp64(n, variant, dtype):
    if variant == "per-sample rope":
        tensors, tables = make_inputs(n, per_sample_rope=True, batch_heads=(3, 1), seed=n)
    else:
        tensors, tables = make_inputs(n, norm=variant != "rope only", rope=variant != "q-norm only",
                                      seed=n)
    if variant == "q-norm only":
        tensors = (*tensors[:4], None)
    kw = {"rope_interleaved": False} if variant == "rope halves" else {}
    got = run_prologue("triton", dtype, tensors, tables, **kw)
    ref = run_prologue("reference", F64, tensors, tables, **kw)
    same = run_prologue("reference", dtype, tensors, tables, **kw)
    bad = check(got, ref, same, dtype, prologue_names(tensors), weight_rows(tensors[0]))
    assert not bad, bad
    # the torch backend of the same function is the reference chain
    bad = check(run_prologue("torch", dtype, tensors, tables, **kw), ref, same, dtype,
                prologue_names(tensors))
    assert not bad, bad


def test_qk_norm_rope_then_sdpa_is_attention():
    """What the trainer runs with --kernels triton: the prologue kernel, then SDPA, equals the
    fused attention's definition; the outputs have the [B, N, H, D] memory SDPA reads."""
    tensors, tables = make_inputs(33, seed=4)
    q, k, v = (t.to(DEVICE, torch.float32) for t in tensors[:3])
    qw, kw_ = (w.to(DEVICE, torch.float32) for w in tensors[3:])
    rope = tuple(t.to(DEVICE) for t in tables)
    pq, pk = kernels.qk_norm_rope(q, k, rope=rope, q_norm_weight=qw, k_norm_weight=kw_,
                                  backend="triton")
    assert pq.transpose(1, 2).is_contiguous() and pk.transpose(1, 2).is_contiguous()
    out = torch.nn.functional.scaled_dot_product_attention(pq, pk, v)
    ref = R.attention_reference(q, k, v, rope=rope, q_norm_weight=qw, k_norm_weight=kw_)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    # nothing to do: the inputs come back untouched, without a kernel launch
    assert kernels.qk_norm_rope(q, k, backend="triton") == (q, k)


def test_qk_norm_rope_check_rejects_a_missing_norm():
    """Negative control for the prologue tests: skipping k's norm breaks the rule."""
    tensors, tables = make_inputs(17, seed=3)
    dtype = torch.float32
    ref = run_prologue("reference", F64, tensors, tables)
    same = run_prologue("reference", dtype, tensors, tables)
    wrong = run_prologue("triton", dtype, (*tensors[:4], None), tables)
    assert check(wrong[:4], ref[:4], same[:4], dtype, ["P(q)", "P(k)", "dq", "dk"])


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
def test_resolve_backend(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernels.resolve_backend("torch", cpu, None) == "torch"
    assert kernels.resolve_backend("auto", cpu, None) == "torch"
    assert kernels.resolve_backend("triton", cpu, None) == "triton"  # interpreted
    assert kernels.resolve_backend("auto", cpu, "head_dim 48") == "torch"
    with pytest.raises(ValueError, match="head_dim 48"):
        kernels.resolve_backend("triton", cpu, "head_dim 48")
    with pytest.raises(ValueError, match="backend must be"):
        kernels.resolve_backend("cuda", cpu, None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.resolve_backend("auto", cpu, None) == "triton"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="unavailable"):
            kernels.resolve_backend("triton", torch.device("cuda"), None)
        assert kernels.resolve_backend("auto", torch.device("cuda"), None) == "torch"


def _spy(monkeypatch):
    calls = []
    real = attention_mod._launch_fwd

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)
    monkeypatch.setattr(attention_mod, "_launch_fwd", spy)
    return calls


def test_auto_routes_by_environment_and_support(monkeypatch):
    calls = _spy(monkeypatch)
    q = torch.randn(1, 1, 5, 64)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels.attention(q, q, q)
    assert calls == []
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = kernels.attention(q, q, q)
    assert len(calls) == 1
    torch.testing.assert_close(out, R.attention_reference(q, q, q), atol=1e-5, rtol=1e-5)
    q48 = torch.randn(1, 1, 5, 48)  # unsupported head_dim: auto falls back to torch
    kernels.attention(q48, q48, q48)
    kernels.attention(q.bfloat16(), q.bfloat16(), q.bfloat16())  # no bf16 in the interpreter
    assert len(calls) == 1
    with pytest.raises(ValueError, match="head_dim 48"):
        kernels.attention(q48, q48, q48, backend="triton")


def test_mixed_dtypes_are_promoted():
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 2, 9, 32, generator=g).half() for _ in range(2))
    v = torch.randn(1, 2, 9, 32, generator=g)  # e.g. a value residual computed in fp32
    out = kernels.attention(q, k, v, backend="triton")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, R.attention_reference(q.float(), k.float(), v),
                               atol=1e-5, rtol=1e-5)


def test_autocast_casts_inputs_like_sdpa():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 9, 32, generator=g).to(DEVICE) for _ in range(3))
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        out = kernels.attention(q, k, v, backend="triton")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), R.attention_reference(q, k, v), atol=3e-3, rtol=3e-3)


def test_selfcheck_passes_on_this_machine():
    ok, why = kernels.selfcheck(DEVICE)
    assert ok, why
