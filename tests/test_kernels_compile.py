"""The compiled (GPU) path of the kernels builds for an H100 (sm_90) on this CPU-only machine:
the full Triton compiler and ptxas run ahead of time, catching what the permissive interpreter
lets through (non-constexpr globals, small dots, shared-memory overflows)."""
from __future__ import annotations

from kernels import compile_check


def test_kernels_compile_for_sm90(capsys):
    status = compile_check.main(["--arch", "90", "--level", "smoke"])
    out = capsys.readouterr().out
    assert status == 0, out
    compiled = [line for line in out.splitlines() if line.startswith("ok ")]
    names = {line.split()[1] for line in compiled}
    assert {"attn_fwd", "attn_bwd", "qk_prologue_fwd", "qk_prologue_bwd", "modnorm_fwd",
            "modnorm_bwd"} <= names, out
