"""Benchmark the fused kernels against PyTorch at SiT-B/1 shapes and print markdown tables.

    python benchmarks/bench_kernels.py                 # on a GPU: B=32, H=12, N=257, D=64, bf16
    python benchmarks/bench_kernels.py --compile       # also torch.compile'd PyTorch chains
    python benchmarks/bench_kernels.py --device cpu --batch 1 --heads 1 --seq 17 --reps 1
                                       # smoke run on CPU (interpreter: the timings mean nothing)

Tables:
 1. attention forward and forward+backward: our Triton kernel (plain, and with the fused
    QK-RMSNorm + 2D-RoPE prologue) against every SDPA backend PyTorch offers (flash, cuDNN,
    efficient, math) and against the unfused PyTorch chain (RMSNorm, RoPE, SDPA); and the
    stand-alone Triton prologue (kernels.qk_norm_rope) feeding SDPA, as train.py runs it.
 2. adaLN modulated RMSNorm, and the gated residual add fused with it, against plain PyTorch.
 The end-to-end training step with the kernels on and off: benchmarks/bench_gpu_step.py.

Units. TFLOP/s counts the useful matmul FLOPs of attention, FlashAttention's convention:
4 B H N^2 D forward, 2.5x that backward (10 B H N^2 D), whatever an implementation recomputes.
GB/s counts compulsory HBM bytes: each input read once, each output written once (attention
forward q, k, v -> o; backward q, k, v, o, dO -> dq, dk, dv; the norm x -> y, backward x, dy ->
dx; small per-sample vectors and the logsumexp ignored). `err` is the max abs difference of the
output from a float64 evaluation of the same maths.

Timing. "ms" columns: one call between CUDA events, host work included (what an eager training
step pays; our kernels are launched from Python, SDPA from C++). "graphed" columns: 20 calls
captured in one CUDA graph and replayed, which removes host work for everyone alike: the
kernel-against-kernel comparison. CPU runs time the interpreter and mean nothing.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kernels  # noqa: E402
from kernels import reference as R  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def measure_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        import time
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    times.sort()
    return times[len(times) // 2]


def measure_graphed_ms(fn: Callable[[], object], device: torch.device, calls: int = 20,
                       replays: int = 10) -> float | None:
    """Device-bound time of fn() in milliseconds: `calls` calls captured in one CUDA graph, the
    median replay divided by `calls`. Replaying removes host work (Python, argument handling,
    autograd bookkeeping, launch latency) for every implementation alike, so this compares the
    kernels; measure_ms is what an eager caller pays. None off CUDA or when fn cannot be
    captured (a backend that synchronises, for example). fn must have run before (warm-up,
    autotuning)."""
    if device.type != "cuda":
        return None
    try:
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # allocations on the capture stream before capture
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except Exception:
        torch.cuda.synchronize()
        return None
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    times.sort()
    return times[len(times) // 2]


def fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
def sdpa_backends() -> dict[str, object]:
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # pragma: no cover
        return {}
    names = {"flash": "FLASH_ATTENTION", "cuDNN": "CUDNN_ATTENTION",
             "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def attention_impls(rope, qw, kw, heads: int, compile_chain: bool):
    """(name, uses_prologue, packed, fn) for every implementation benchmarked. Unpacked fns take
    (q, k, v) [B, H, N, D] and return [B, H, N, D]; packed fns take the qkv Linear's output
    [B, N, 3C] and return [B, N, C] ready for the projection (layout changes included). Rows run
    with PyTorch's determinism switch as the caller left it (off by default); our backward is the
    same either way."""
    from torch.nn.attention import sdpa_kernel

    pro = dict(rope=rope, q_norm_weight=qw, k_norm_weight=kw)

    def triton_attention(q, k, v):
        return kernels.attention(q, k, v, backend="triton")
    impls = [("triton", False, False, triton_attention),
             ("triton + qknorm + rope", True, False,
              lambda q, k, v: kernels.attention(q, k, v, backend="triton", **pro))]
    for name, backend in sdpa_backends().items():
        def run(q, k, v, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        impls.append((f"SDPA {name}", False, False, run))
    impls.append(("SDPA default choice", False, False, F.scaled_dot_product_attention))

    def prologue_sdpa(q, k, v, backends=None):
        q, k = kernels.qk_norm_rope(q, k, backend="triton", **pro)
        if backends is None:
            return F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v)
    impls.append(("triton qk_norm_rope + SDPA default", True, False, prologue_sdpa))
    for name in ("cuDNN", "flash"):
        if name in sdpa_backends():
            impls.append((f"triton qk_norm_rope + SDPA {name}", True, False,
                          lambda q, k, v, b=sdpa_backends()[name]: prologue_sdpa(q, k, v, [b])))
    impls.append(("PyTorch chain: rmsnorm, rope, SDPA", True, False,
                  lambda q, k, v: R.attention_torch(q, k, v, **pro)))
    if compile_chain:
        compiled = torch.compile(R.attention_torch)
        impls.append(("torch.compile(PyTorch chain)", True, False,
                      lambda q, k, v: compiled(q, k, v, **pro)))

    def chain_packed(qkv):
        b, n, c3 = qkv.shape
        q, k, v = qkv.view(b, n, 3, heads, c3 // (3 * heads)).permute(2, 0, 3, 1, 4)
        return R.attention_torch(q, k, v, **pro).transpose(1, 2).reshape(b, n, c3 // 3)
    impls.append(("from qkv: triton attention_packed + qknorm + rope", True, True,
                  lambda qkv: kernels.attention_packed(qkv, heads, backend="triton", **pro)))
    impls.append(("from qkv: PyTorch permute, chain, head merge", True, True, chain_packed))

    def prologue_sdpa_packed(qkv):  # what train.py runs with --kernels triton
        b, n, c3 = qkv.shape
        q, k, v = qkv.view(b, n, 3, heads, c3 // (3 * heads)).permute(2, 0, 3, 1, 4)
        return prologue_sdpa(q, k, v).transpose(1, 2).reshape(b, n, c3 // 3)
    impls.append(("from qkv: triton qk_norm_rope + SDPA default, head merge", True, True,
                  prologue_sdpa_packed))
    return impls


def bench_attention(args, device) -> None:
    dtype = DTYPES[args.dtype]
    b, h, n, d = args.batch, args.heads, args.seq, args.head_dim
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(device, dtype) for _ in range(3))
    qkv = torch.stack([q, k, v]).permute(1, 3, 0, 2, 4).reshape(b, n, 3 * h * d).contiguous()
    qw, kw = (1 + 0.1 * torch.randn(d, generator=g).to(device) for _ in range(2))
    side = math.isqrt(n - 1)
    rope = kernels.rope_2d_table(side, side, d, num_prefix_tokens=n - side * side, device=device)
    do = torch.randn(b, h, n, d, generator=g).to(device, dtype)
    do_packed = do.transpose(1, 2).reshape(b, n, h * d)

    refs = {}
    for pro in (False, True):
        extra = dict(rope=rope, q_norm_weight=qw, k_norm_weight=kw) if pro else {}
        refs[pro] = R.attention_reference(q.double(), k.double(), v.double(), **extra)

    flops_fwd = 4.0 * b * h * n * n * d
    elt = q.element_size()
    bytes_fwd = 4 * b * h * n * d * elt
    bytes_fwdbwd = bytes_fwd + 8 * b * h * n * d * elt
    rows = []
    for name, pro, packed, fn in attention_impls(rope, qw, kw, h, args.compile):
        inputs = (qkv,) if packed else (q, k, v)
        ref = refs[pro].transpose(1, 2).reshape(b, n, h * d) if packed else refs[pro]
        try:
            err = (fn(*inputs).double() - ref).abs().max().item()
            t_f = measure_ms(lambda: fn(*inputs), device, args.reps, args.warmup)
            leaves = [t.detach().requires_grad_() for t in inputs]

            def fwd_bwd():
                torch.autograd.grad(fn(*leaves), leaves, do_packed if packed else do)
            t_fb = measure_ms(fwd_bwd, device, args.reps, args.warmup)
            g_f = measure_graphed_ms(lambda: fn(*inputs), device)
            g_fb = measure_graphed_ms(fwd_bwd, device)
        except Exception as e:  # a backend that does not support this shape/dtype/GPU
            rows.append([name, "n/a", "", "", "n/a", "", "", "n/a", "", "n/a", "", "",
                         f"unsupported: {type(e).__name__}: {str(e)[:60]}"])
            continue
        rows.append([name, fmt(t_f, 3), fmt(flops_fwd / t_f / 1e9), fmt(bytes_fwd / t_f / 1e6, 0),
                     fmt(t_fb, 3), fmt(3.5 * flops_fwd / t_fb / 1e9),
                     fmt(bytes_fwdbwd / t_fb / 1e6, 0),
                     fmt(g_f, 3), fmt(g_f and flops_fwd / g_f / 1e9),
                     fmt(g_fb, 3), fmt(g_fb and 3.5 * flops_fwd / g_fb / 1e9),
                     fmt(g_fb and bytes_fwdbwd / g_fb / 1e6, 0), f"{err:.2e}"])
    print_table(f"attention B={b} H={h} N={n} D={d} {args.dtype} on {device_name(device)}",
                ["implementation", "fwd ms", "fwd TFLOP/s", "fwd GB/s", "fwd+bwd ms",
                 "fwd+bwd TFLOP/s", "fwd+bwd GB/s", "graphed fwd ms", "graphed fwd TFLOP/s",
                 "graphed fwd+bwd ms", "graphed fwd+bwd TFLOP/s", "graphed fwd+bwd GB/s",
                 "err vs fp64"], rows)


# ---------------------------------------------------------------------------------------------
# modulated RMSNorm and the gated residual
# ---------------------------------------------------------------------------------------------
def plain_modulated_rmsnorm(x, shift, scale):
    """What a SiT block does with plain ops (RMSNorm without affine, then adaLN modulate)."""
    return F.rms_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def plain_gated_residual_norm(x, u, gate, shift, scale):
    h = x + gate[:, None] * u
    return h, plain_modulated_rmsnorm(h, shift, scale)


def bench_modulation(args, device) -> None:
    dtype = DTYPES[args.dtype]
    b, n, c = args.batch, args.seq, args.width
    g = torch.Generator(device="cpu").manual_seed(1)
    x, u = (torch.randn(b, n, c, generator=g).to(device, dtype) for _ in range(2))
    shift, scale, gate = (0.1 * torch.randn(b, c, generator=g).to(device, dtype) for _ in range(3))
    ref = R.modulated_rmsnorm_reference(x.double(), shift.double(), scale.double())
    ref_h, ref_y = R.gated_residual_modulated_rmsnorm_reference(
        x.double(), u.double(), gate.double(), shift.double(), scale.double())
    elt = x.element_size()
    cases = [
        ("modnorm", "triton modulated_rmsnorm",
         lambda x, u, ga, sh, sc: kernels.modulated_rmsnorm(x, sh, sc, backend="triton")),
        ("modnorm", "PyTorch rms_norm + modulate",
         lambda x, u, ga, sh, sc: plain_modulated_rmsnorm(x, sh, sc)),
        ("residual", "triton gated_residual_modulated_rmsnorm",
         lambda x, u, ga, sh, sc: kernels.gated_residual_modulated_rmsnorm(x, u, ga, sh, sc,
                                                                          backend="triton")),
        ("residual", "PyTorch x + gate*u, rms_norm, modulate",
         lambda x, u, ga, sh, sc: plain_gated_residual_norm(x, u, ga, sh, sc)),
    ]
    if args.compile:
        cm = torch.compile(plain_modulated_rmsnorm)
        cr = torch.compile(plain_gated_residual_norm)
        cases.insert(2, ("modnorm", "torch.compile(rms_norm + modulate)",
                         lambda x, u, ga, sh, sc: cm(x, sh, sc)))
        cases.append(("residual", "torch.compile(residual + rms_norm + modulate)",
                      lambda x, u, ga, sh, sc: cr(x, u, ga, sh, sc)))
    # compulsory tensors of size B*N*C: fwd (reads + writes), fwd+bwd adds the backward's
    moved = {"modnorm": (2, 2 + 3), "residual": (4, 4 + 6)}
    rows = []
    for kind, name, fn in cases:
        inputs = (x, u, gate, shift, scale)
        try:
            out = fn(*inputs)
            outs = out if isinstance(out, tuple) else (out,)
            refs = (ref_h, ref_y) if kind == "residual" else (ref,)
            err = max((o.double() - r).abs().max().item() for o, r in zip(outs, refs))
            t_f = measure_ms(lambda: fn(*inputs), device, args.reps, args.warmup)
            leaves = [t.detach().requires_grad_() for t in inputs]
            used = leaves if kind == "residual" else [leaves[0], leaves[3], leaves[4]]
            grads = [torch.randn_like(o) for o in outs]

            def fwd_bwd():
                o = fn(*leaves)
                torch.autograd.grad(o if isinstance(o, tuple) else (o,), used, grads)
            t_fb = measure_ms(fwd_bwd, device, args.reps, args.warmup)
            g_f = measure_graphed_ms(lambda: fn(*inputs), device)
            g_fb = measure_graphed_ms(fwd_bwd, device)
        except Exception as e:
            rows.append([name, "n/a", "", "n/a", "", "n/a", "", "n/a", "",
                         f"unsupported: {str(e)[:60]}"])
            continue
        nbytes = b * n * c * elt
        rows.append([name, fmt(t_f, 4), fmt(moved[kind][0] * nbytes / t_f / 1e6, 0),
                     fmt(t_fb, 4), fmt(moved[kind][1] * nbytes / t_fb / 1e6, 0),
                     fmt(g_f, 4), fmt(g_f and moved[kind][0] * nbytes / g_f / 1e6, 0),
                     fmt(g_fb, 4), fmt(g_fb and moved[kind][1] * nbytes / g_fb / 1e6, 0),
                     f"{err:.2e}"])
    print_table(f"adaLN modulated RMSNorm x=[{b}, {n}, {c}] {args.dtype} on {device_name(device)}",
                ["implementation", "fwd ms", "fwd GB/s", "fwd+bwd ms", "fwd+bwd GB/s",
                 "graphed fwd ms", "graphed fwd GB/s", "graphed fwd+bwd ms",
                 "graphed fwd+bwd GB/s", "err vs fp64"], rows)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)"


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """--device, --dtype and the attention shape (SiT-B/1's by default), shared by the kernel
    benchmarks."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seq", type=int, default=257)
    p.add_argument("--head_dim", type=int, default=64)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(p)
    p.add_argument("--width", type=int, default=768, help="channels of the modulated norm")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="add torch.compile'd PyTorch chains")
    p.add_argument("--only", choices=["attention", "modulation"], default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.dtype is None:
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    if device.type != "cuda":
        args.warmup = min(args.warmup, 1)
        print("note: no GPU: the Triton kernels run in the interpreter; the timings mean nothing")
    if args.only in (None, "attention"):
        bench_attention(args, device)
    if args.only in (None, "modulation"):
        bench_modulation(args, device)


if __name__ == "__main__":
    main()
