"""Host cost of launching the attention kernels from Python, against SDPA, and where it goes.

    python benchmarks/bench_host_overhead.py            # on a GPU: B=32, H=12, N=257, D=64, bf16
    python benchmarks/bench_host_overhead.py --device cpu --batch 1 --heads 1 --seq 17 --reps 2
                                                        # smoke run (interpreter; timings mean nothing)

An eager training step runs its calls back to back without waiting for the GPU, so a call costs
max(host time, device time). "us/call" is that: `reps` calls in a row, one synchronisation at the
end. "graphed us/call" replays the same calls from a CUDA graph (device time only). Where us/call
is well above the graphed figure, the host is the bottleneck. Rows:
  * SDPA (PyTorch's default backend choice): C++ from end to end;
  * kernels.attention: what train.py runs eagerly, a plain torch.autograd.Function around our
    launch functions (kernels/_ops.py; the forward under no_grad calls the launchers alone);
  * the opaque torch.library custom operators around the same launch functions (flash.ATTENTION
    .opaque; eager calls went through them before, and they are what torch.compile keeps of the
    kernels on CPU): what the operator machinery costs on top;
  * on a GPU, torch.compile(kernels.attention): the inlined operators, which inductor turns into
    launches of the kernels from its generated code;
  * on a GPU, empty Triton kernels with 1, 8 and 16 tensor arguments (Triton's own launch cost,
    which checks every pointer argument) and one small PyTorch op, for scale.
Kernels run with their first tile config (KERNELS_AUTOTUNE=0), the same for every row.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels  # noqa: E402
from bench_kernels import (DTYPES, add_shape_args, device_name, fmt,  # noqa: E402
                           measure_graphed_ms, print_table)
from kernels import flash  # noqa: E402


def per_call_us(fn, device: torch.device, reps: int, warmup: int) -> float:
    """Wall time per call of `reps` calls in a row with one synchronisation at the end."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e6


def attention_rows(args, device) -> list[list[str]]:
    dtype = DTYPES[args.dtype]
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    q, k, v = (torch.randn(shape, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    do = torch.randn(shape, generator=g).to(device, dtype)
    scale = args.head_dim ** -0.5
    impls = {
        "SDPA default choice": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        "kernels.attention (eager: autograd.Function)": lambda q, k, v: kernels.attention(
            q, k, v, backend="triton"),
        "same launchers, opaque custom operators": lambda q, k, v: flash.ATTENTION.opaque(
            q, k, v, None, None, None, None, scale, 1e-6, True, False)[0],
    }
    if device.type == "cuda":  # inductor cannot launch interpreted kernels
        impls["torch.compile(kernels.attention): inductor launches"] = torch.compile(
            lambda q, k, v: kernels.attention(q, k, v, backend="triton"), fullgraph=True)
    rows = []
    for name, fn in impls.items():
        def fwd(fn=fn):
            with torch.no_grad():
                fn(q, k, v)

        def fwd_bwd(fn=fn):
            torch.autograd.grad(fn(q, k, v), (q, k, v), do)
        try:
            timings = [per_call_us(f, device, args.reps, args.warmup) for f in (fwd, fwd_bwd)]
            graphed = [measure_graphed_ms(f, device) for f in (fwd, fwd_bwd)]
        except Exception as e:  # one broken row (a compile error) must not cost the others
            traceback.print_exc()
            rows.append([name, f"failed: {type(e).__name__}: {str(e)[:120]}", "", "", ""])
            continue
        rows.append([name, fmt(timings[0]), fmt(graphed[0] and 1e3 * graphed[0]),
                     fmt(timings[1]), fmt(graphed[1] and 1e3 * graphed[1])])
    return rows


def launch_rows(args, device) -> list[list[str]]:
    """Empty Triton kernels (compiled: a GPU only) and one small PyTorch op."""
    import triton

    @triton.jit
    def one(a, n):
        pass

    @triton.jit
    def eight(a, b, c, d, e, f, g, h, n):
        pass

    @triton.jit
    def sixteen(a, b, c, d, e, f, g, h, a2, b2, c2, d2, e2, f2, g2, h2, n):
        pass
    ts = [torch.zeros(1024, device=device) for _ in range(16)]
    cases = {"PyTorch x.add_(1)": lambda: ts[0].add_(1),
             "empty Triton kernel, 1 tensor argument": lambda: one[(1,)](ts[0], 5),
             "empty Triton kernel, 8 tensor arguments": lambda: eight[(1,)](*ts[:8], 5),
             "empty Triton kernel, 16 tensor arguments": lambda: sixteen[(1,)](*ts, 5)}
    return [[name, fmt(per_call_us(fn, device, 10 * args.reps, args.warmup)), "", "", ""]
            for name, fn in cases.items()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(p)
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    os.environ["KERNELS_AUTOTUNE"] = "0"  # one tile config for every row
    rows = attention_rows(args, device)
    if device.type == "cuda":
        rows += launch_rows(args, device)
    print_table(f"host cost per call, attention B={args.batch} H={args.heads} N={args.seq} "
                f"D={args.head_dim} {args.dtype} on {device_name(device)}",
                ["call", "fwd us/call", "graphed fwd us/call", "fwd+bwd us/call",
                 "graphed fwd+bwd us/call"], rows)


if __name__ == "__main__":
    main()
