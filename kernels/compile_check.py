"""Compile the Triton kernels ahead of time for a GPU architecture, without a GPU.

    python -m kernels.compile_check                        # sm_90 (H100), representative cases
    python -m kernels.compile_check --arch 80 --level all  # sm_80, every dtype x head_dim x flags
    python -m kernels.compile_check --level configs --registers
                        # every autotuner config of the attention kernels at SiT-B/1's variant
                        # (bf16, D=64, with and without QK-norm + RoPE): registers and spills

The interpreter (the CPU tests) is more permissive than the GPU compiler: it accepts non-constexpr
globals, tl.dot with K < 16, and never checks shared memory. This runs the real front end and
backend (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas shipped in the triton wheel) on
CPU, so such errors show up on machines without a GPU. It does not check numerics or speed;
--registers adds what ptxas reports per kernel (registers per thread, bytes spilled to local
memory), a static sign of how a config will run: 255 registers with spills means few resident
programs per SM and slow local-memory traffic.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

POINTERS_ATTN_DATA = ("Q", "K", "QX", "KX", "V", "O", "DO", "DQ", "DK", "DV", "QO", "KO", "DQO",
                      "DKO")
POINTERS_FP32 = ("LSE", "COS", "SIN", "QW", "KW", "DW", "DKW", "DQW", "RSTD", "PSHIFT",
                 "PSCALE", "PW", "PGATE")
FLOATS = ("qk_scale", "eps", "sm_scale")


def _signature(fn, data_ptr: str, consts: dict, overrides: dict | None = None,
               floats: str = "fp32") -> dict:
    """Triton's own launcher types a Python float argument as fp32; inductor, launching a
    user-defined kernel inside a compiled graph, types the same argument as fp64."""
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif overrides and name in overrides:
            sig[name] = overrides[name]
        elif name in POINTERS_ATTN_DATA:
            sig[name] = data_ptr
        elif name in POINTERS_FP32:
            sig[name] = "*fp32"
        elif name in FLOATS:
            sig[name] = floats
        else:
            sig[name] = "i32"
    return sig


def _aligned(fn, sig) -> dict:
    """Divisibility hints as Triton derives them at launch: every pointer argument (tensors are
    16-byte aligned), every stride_* and the norm kernels' channel count C (multiples of 16 at
    the shapes the harness uses: head_dim >= 32, C = 384..1152) are specialised as multiples of
    16; the sequence length is not (257). Without the hints the compiler must assume unaligned
    rows, so bf16 tiles are loaded element by element and never pipelined with cp.async: the
    PTX would not be the one a GPU runs."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if sig[name] != "constexpr" and (sig[name].startswith("*") or name == "C" or
                                             name.startswith("stride_"))}


def _compile(fn, sig, consts, arch: int, num_warps: int, num_stages: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    src = ASTSource(fn, sig, constexprs={k: v for k, v in consts.items() if k in fn.arg_names},
                    attrs=_aligned(fn, sig))
    return triton_compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _fp64_arithmetic(ttir: str) -> list[str]:
    """TTIR lines that compute in fp64: anything naming f64 but the signature and the one
    truncation of each float argument to fp32 at the kernel's entry."""
    return [line.strip() for line in ttir.splitlines() if "f64" in line
            and "tt.func" not in line and not re.search(r"arith\.truncf %\w+ : f64 to f32", line)]


def _ptxas_info(kernel, arch: int) -> str:
    """'regs R spill S B' from ptxas -v on the kernel's PTX (the ptxas shipped with triton)."""
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", path, "-o",
                              os.devnull], capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return f"regs {regs.group(1) if regs else '?'} spill {spill.group(1) if spill else '?'} B"


def config_cases(mod):
    """Every autotuner config of attn_fwd and attn_bwd (FWD_CONFIGS, BWD_CONFIGS of the kernel
    file) for bf16, D=64, with QK-norm + interleaved RoPE and without any prologue."""
    for prologue in (True, False):
        flags = dict(HEAD_DIM=64, HAS_QNORM=prologue, HAS_KNORM=prologue, HAS_ROPE=prologue,
                     DOT_PREC="tf32", INTERLEAVED=prologue)
        for *blocks, warps, stages in mod.FWD_CONFIGS:
            label = f"bf16 D=64 prologue={int(prologue)} {tuple(blocks)} w{warps} s{stages}"
            yield label, "attn_fwd", "bf16", dict(flags, **dict(zip(mod.FWD_BLOCKS, blocks))), (
                warps, stages)
        for *blocks, warps, stages in mod.BWD_CONFIGS:
            label = f"bf16 D=64 prologue={int(prologue)} {tuple(blocks)} w{warps} s{stages}"
            yield label, "attn_bwd", "bf16", dict(flags, **dict(zip(mod.BWD_BLOCKS, blocks))), (
                warps, stages)


def cases(level: str):
    """(label, kernel name, data pointer type, constexprs, launch options) for a level:
    'smoke' (SiT-B/1 training: bf16, D=64, QK-norm + interleaved RoPE, and the norms),
    'default' (+ fp32 and the plain kernel), 'all' (every dtype, head_dim and flag mix)."""
    dtypes = {"smoke": ["bf16"], "default": ["bf16", "fp32"], "all": ["bf16", "fp16", "fp32"]}
    dims = [32, 64, 128] if level == "all" else [64]
    prologues = [(True, True, True, True)]  # qnorm, knorm, rope, interleaved
    if level != "smoke":
        prologues.append((False, False, False, False))
    if level == "all":
        prologues += [(True, True, True, False), (True, False, False, False),
                      (False, False, True, True)]
    for dt, d, (qn, kn, rope, il) in itertools.product(dtypes[level], dims, prologues):
        flags = dict(HEAD_DIM=d, HAS_QNORM=qn, HAS_KNORM=kn, HAS_ROPE=rope,
                     DOT_PREC="ieee" if dt == "fp32" else "tf32", INTERLEAVED=il)
        label = f"{dt} D={d} qnorm={int(qn)} knorm={int(kn)} rope={int(rope)} inter={int(il)}"
        yield label, "attn_fwd", dt, dict(flags, BLOCK_M=128, BLOCK_N=64), (4, 3)
        yield label, "attn_bwd", dt, dict(flags, BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64,
                                          BLOCK_N2=32), (4, 2)
        pro = {k: v for k, v in flags.items() if k != "DOT_PREC"}
        yield label, "qk_prologue_fwd", dt, dict(pro, BLOCK_N=64), (4, 1)
        yield label, "qk_prologue_bwd", dt, dict(pro, BLOCK_N=64), (4, 1)
    norm_cases = [("bf16", True, False), ("bf16", False, False)] if level == "smoke" else list(
        itertools.product(["bf16", "fp32"], [False, True], [False, True]))
    for dt, res, w in norm_cases:
        label = f"norm {dt} residual={int(res)} weight={int(w)}"
        consts = dict(BLOCK_R=4, BLOCK_C=1024, HAS_W=w, HAS_RES=res)
        yield label, "modnorm_fwd", dt, consts, (8, 1)
        yield label, "modnorm_bwd", dt, dict(consts, HAS_DH=res), (8, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="compile the kernels for a GPU arch on CPU")
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100)")
    p.add_argument("--level", choices=["smoke", "default", "all", "configs"], default="default",
                   help="smoke: what SiT-B/1 training uses; all: every dtype x head_dim x flags; "
                        "configs: every autotuner config of the attention kernels")
    p.add_argument("--registers", action="store_true",
                   help="also report registers per thread and spilled bytes (ptxas -v)")
    p.add_argument("--floats", choices=["fp32", "fp64", "both"], default="both",
                   help="how float scalars are typed: fp32 as Triton's launcher does, fp64 as "
                        "inductor does for a kernel launched inside a compiled graph")
    args = p.parse_args(argv)
    from . import _loader

    mods = {"attention": _loader.load("attention", interpret=False),
            "norm": _loader.load("norm", interpret=False)}
    failures = 0
    todo = config_cases(mods["attention"]) if args.level == "configs" else cases(args.level)
    floats = ["fp32", "fp64"] if args.floats == "both" else [args.floats]
    for (label, name, dt, consts, (warps, stages)), float_type in itertools.product(todo, floats):
        label = label if float_type == "fp32" else f"{label} floats=fp64"
        mod = mods["norm" if name.startswith("modnorm") else "attention"]
        fn = getattr(mod, name)
        overrides = None
        if name.startswith("modnorm"):  # data pointers of the norm kernels
            overrides = {n: f"*{dt}" for n in ("X", "U", "GATE", "SHIFT", "SCALE", "W", "H", "Y",
                                               "DY", "DH", "DX", "DU")}
        t0 = time.perf_counter()
        try:
            k = _compile(fn, _signature(fn, f"*{dt}", consts, overrides, float_type), consts,
                         args.arch, warps, stages)
            fp64 = _fp64_arithmetic(k.asm["ttir"])
            if fp64:
                raise TypeError(f"computes in fp64: {fp64[0][:200]}")
            regs = f"  {_ptxas_info(k, args.arch)}" if args.registers else ""
            print(f"ok    {name:15s} {label:48s} smem {k.metadata.shared:6d} B{regs}  "
                  f"{time.perf_counter() - t0:5.1f} s", flush=True)
        except Exception as e:
            failures += 1
            print(f"FAIL  {name:15s} {label:48s} {type(e).__name__}: {str(e)[:400]}", flush=True)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
