"""The compiled (GPU) path of the kernels builds for an H100 (sm_90) on this CPU-only machine:
the full Triton compiler and ptxas run ahead of time, catching what the permissive interpreter
lets through (non-constexpr globals, small dots, shared-memory overflows)."""
from __future__ import annotations

import re

from kernels import compile_check


def test_kernels_compile_for_sm90(capsys):
    """Every smoke-level kernel builds for sm_90; ptxas reports its registers and spills. Each
    builds twice: with its float scalars typed fp32 (Triton's launcher) and fp64 (inductor's, in
    a compiled graph: an H100 once failed there on a loop-carried fp32 turned fp64), and neither
    build may compute in fp64."""
    status = compile_check.main(["--arch", "90", "--level", "smoke", "--registers"])
    out = capsys.readouterr().out
    assert status == 0, out
    compiled = [line for line in out.splitlines() if line.startswith("ok ")]
    names = {line.split()[1] for line in compiled}
    assert {"attn_fwd", "attn_bwd", "qk_prologue_fwd", "qk_prologue_bwd", "modnorm_fwd",
            "modnorm_bwd"} <= names, out
    inductor_typed = [line for line in compiled if "floats=fp64" in line]
    assert len(inductor_typed) * 2 == len(compiled), out
    for line in compiled:
        regs = re.search(r"regs (\d+) spill (\d+) B", line)
        assert regs and 16 <= int(regs.group(1)) <= 255, line


def test_every_attention_config_is_listed_for_the_register_report():
    from kernels import _loader
    mod = _loader.load("attention", interpret=False)
    listed = list(compile_check.config_cases(mod))
    assert len(listed) == 2 * (len(mod.FWD_CONFIGS) + len(mod.BWD_CONFIGS))
    label, name, dtype, consts, launch = listed[-1]
    assert name == "attn_bwd" and launch == tuple(mod.BWD_CONFIGS[-1][-2:])
    assert {k: consts[k] for k in mod.BWD_BLOCKS} == dict(zip(mod.BWD_BLOCKS, mod.BWD_CONFIGS[-1]))


def test_inductor_can_rebuild_every_kernel_from_its_copied_source(tmp_path):
    """Under torch.compile the inlined operators' kernels are re-created by inductor from a copy
    of their source plus every JITFunction and constant they name (transitively), in a module of
    its own. Anything the copy leaves undefined fails only there, on the GPU, at compile time
    (an alias of tl.sum once pulled in Triton's own source: NameError 'core'). Here each copy is
    written and imported as inductor would, with its header."""
    import importlib.util
    import triton
    from torch._inductor.codegen.triton import TritonKernel
    from torch._inductor.codegen.wrapper import (
        user_defined_triton_kernel_transitive_closure_source_code as copied_source)
    from triton.runtime.autotuner import Autotuner

    from kernels import _loader
    checked = []
    for name in ("attention", "norm"):
        mod = _loader.load(name, interpret=False)
        for attr, obj in vars(mod).items():
            if not isinstance(obj, (triton.JITFunction, Autotuner)):
                continue
            kernel = obj.fn if isinstance(obj, Autotuner) else obj
            src = copied_source(kernel)
            assert "'''" not in src, attr  # inductor embeds the source in a '''-quoted literal
            path = tmp_path / f"{name}_{attr}.py"
            path.write_text(TritonKernel.gen_common_triton_imports() + "\n@triton.jit\n" + src)
            spec = importlib.util.spec_from_file_location(f"inductor_copy_{name}_{attr}", path)
            copy = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(copy)
            except Exception as exc:  # the module must define everything the kernel names
                raise AssertionError(f"{name}.{attr}: {type(exc).__name__}: {exc}") from exc
            assert isinstance(getattr(copy, kernel.__name__), triton.JITFunction), attr
            checked.append(attr)
    assert {"attn_fwd", "attn_bwd", "qk_prologue_fwd", "modnorm_fwd", "modnorm_bwd"} <= set(checked)


def test_fp64_arithmetic_is_found_beside_the_entry_truncations():
    ttir = "\n".join([
        "tt.func public @k(%eps: f64 loc(\"eps\"))",
        "%eps_1 = arith.truncf %eps : f64 to f32 loc(#loc3)",
        "%r = arith.addf %a, %eps_1 : tensor<64xf32> loc(#loc4)",
        "%r2 = arith.extf %ms : tensor<64xf32> to tensor<64xf64> loc(#loc5)",
    ])
    assert compile_check._fp64_arithmetic(ttir) == [
        "%r2 = arith.extf %ms : tensor<64xf32> to tensor<64xf64> loc(#loc5)"]
