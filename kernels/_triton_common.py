"""Triton helpers shared by the kernel files, loaded like them through `kernels._loader` (a
compiled and an interpreted copy), never imported directly."""
import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)


# triton.language's own jit-implemented helpers (tl.sum, tl.max, tl.zeros, ...) are decorated when
# triton is first imported, normally in compiled mode, and then cannot run inside the interpreter.
# The kernels therefore reduce through `_sum`/`_max` and build constants with tl.full: compiled,
# these call tl.sum/tl.max; interpreted, tl.reduce with the standard combine functions, which the
# interpreter maps onto numpy reductions.
if INTERPRET:
    _SUM_COMBINE = tl.standard._sum_combine
    _MAX_COMBINE = tl.standard._elementwise_max

    @triton.jit
    def _sum(x, axis: tl.constexpr):
        return tl.reduce(x, axis, _SUM_COMBINE)

    @triton.jit
    def _max(x, axis: tl.constexpr):
        return tl.reduce(x, axis, _MAX_COMBINE)
else:
    if not isinstance(tl.sum, triton.runtime.JITFunction):
        raise ImportError("triton was imported with TRITON_INTERPRET=1: "
                          "compiled kernels unavailable")
    # Wrappers of our own, not aliases: under torch.compile, inductor copies the source of every
    # JITFunction a kernel names into its generated module, and tl.sum's own source refers to
    # triton.language.core by a name that module lacks (NameError: 'core', seen on an H100).
    @triton.jit
    def _sum(x, axis: tl.constexpr):
        return tl.sum(x, axis)

    @triton.jit
    def _max(x, axis: tl.constexpr):
        return tl.max(x, axis)
