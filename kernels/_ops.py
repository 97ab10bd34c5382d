"""How a kernel pair (forward, backward) reaches PyTorch: three wrappers around the same launch
functions, chosen per call by `KernelOp.__call__`.

  eager   a plain torch.autograd.Function that calls the launch functions directly. Outside
          torch.compile this is the cheapest host path: the torch.library operator machinery
          cost ~0.45 ms per attention forward+backward on an H200, more than the kernels' own
          device time (benchmarks/RESULTS_GPU.md, "Host cost per attention call").
  inlined torch.library.triton_op pair, used under torch.compile for CUDA tensors. The compiler
          traces the launch functions (they use only torch ops and `launch(kernel)`), so the
          graph holds the Triton kernels themselves and inductor launches them from its
          generated code, without a Python operator call per launch.
  opaque  torch.library.custom_op pair, used under torch.compile for CPU tensors, whose kernels
          run on Triton's interpreter and cannot be traced (tests only: nobody trains with
          interpreted kernels).

All three share the forward/backward functions, the autograd `setup` (what is saved) and the
`grads` mapping from the backward's outputs to the inputs' gradients, so they compute the same
thing; tests compare them bitwise.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable

import torch

NAMESPACE = "speedrun_kernels"
_BY_MODULE: dict[str, list["KernelOp"]] = {}  # kernel file name -> the ops launching its kernels
_KERNELS: dict[str, list] = {}  # kernel file name -> its kernels, once the compiled file is loaded
_STATE = threading.local()  # .direct: inside an eager Function, launch the kernels themselves


def launch(mod, kernel):
    """`kernel` (a @triton.jit or @triton.autotune object of the loaded kernel module `mod`) in
    the form the caller needs: the kernel itself when it is interpreted or launched directly
    (eager Function, opaque operator), else torch.library.wrap_triton's wrapper, which tracing
    records as a kernel call in the graph (and which, in triton_op's own eager path, passes the
    launch straight to the kernel)."""
    if mod.INTERPRET or getattr(_STATE, "direct", False):
        return kernel
    return torch.library.wrap_triton(kernel)


@contextlib.contextmanager
def _direct_launches():
    """No wrap_triton inside: its wrapper would route every eager launch through a higher-order
    operator, the slow path the eager Function exists to avoid."""
    previous = getattr(_STATE, "direct", False)
    _STATE.direct = True
    try:
        yield
    finally:
        _STATE.direct = previous


def register_kernel_sources(module: str, mod) -> None:
    """Tells PyTorch which Triton kernels the inlined operators of kernels/_triton_<module>.py
    launch (kernels/_loader.py calls it when the compiled-mode file is loaded; operators made
    later are registered as they are made). AOTAutograd's cache keys a compiled graph by the
    source of the kernels its triton_ops name; PyTorch finds them by reading the operator's
    source for `wrap_triton(<global kernel>)`, which cannot see kernels loaded at run time, so
    without this an edited kernel would be served from a stale cache entry. (Edits to the launch
    functions or the tile-config lists are not in that key: clear the compile caches after them,
    see kernels/README.md.)"""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    _KERNELS[module] = [k for k in vars(mod).values() if isinstance(k, (JITFunction, Autotuner))]
    for op in _BY_MODULE.get(module, []):
        op._register_kernels()


def _opaque_op(qualname: str, fn: Callable, fake: Callable):
    """A custom operator running `fn` with direct launches (its body is never traced), with the
    schema inferred from fn's annotations."""
    def run(*args):
        with _direct_launches():
            return fn(*args)
    schema = torch.library.infer_schema(fn, mutates_args=())
    op = torch.library.custom_op(qualname, run, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


class KernelOp:
    """A forward/backward pair of launch functions with autograd, as an eager Function and as two
    operator pairs named speedrun_kernels::<name>[_backward] (opaque) and
    speedrun_kernels::<name>_inlined[_backward]. `module` names the kernel file
    (kernels/_triton_<module>.py) whose kernels the launch functions use.

    forward(*inputs) -> tuple of tensors, annotated (the operator schema is inferred from it);
    forward_fake: the opaque operator's fake implementation (shapes only);
    backward(*args) -> tuple of tensors, annotated; backward_fake likewise;
    setup(ctx, inputs, output): saves what `grads` needs;
    grads(ctx, backward, *output_grads) -> one gradient (or None) per input, calling `backward`
    (whichever wrapper's backward matches the forward that ran)."""

    def __init__(self, name: str, module: str, forward: Callable, forward_fake: Callable,
                 backward: Callable, backward_fake: Callable, setup: Callable, grads: Callable):
        self.name, self.module = name, module
        self.forward, self.backward = forward, backward
        self.opaque = _opaque_op(f"{NAMESPACE}::{name}", forward, forward_fake)
        self.opaque_backward = _opaque_op(f"{NAMESPACE}::{name}_backward", backward,
                                          backward_fake)
        self.inlined = torch.library.triton_op(f"{NAMESPACE}::{name}_inlined", forward,
                                               mutates_args=())
        self.inlined_backward = torch.library.triton_op(f"{NAMESPACE}::{name}_inlined_backward",
                                                        backward, mutates_args=())
        for op, bwd in ((self.opaque, self.opaque_backward),
                        (self.inlined, self.inlined_backward)):
            op.register_autograd(lambda ctx, *g, bwd=bwd: grads(ctx, bwd, *g),
                                 setup_context=setup)

        def eager_forward(ctx, *inputs):
            with _direct_launches():
                output = forward(*inputs)
            setup(ctx, inputs, output)
            return output

        def eager_backward(ctx, *output_grads):
            if torch.is_grad_enabled():  # create_graph=True: the kernels' gradients would be
                raise RuntimeError(      # constants, and a second derivative silently zero
                    f"kernels: the Triton backward of {name} has no derivative of its own "
                    "(double backward / create_graph=True); use backend='torch'")
            with _direct_launches():
                return grads(ctx, backward, *output_grads)
        self.eager = type(f"{name}_function", (torch.autograd.Function,),
                          {"forward": staticmethod(eager_forward),
                           "backward": staticmethod(eager_backward)})
        _BY_MODULE.setdefault(module, []).append(self)
        self._register_kernels()

    def _register_kernels(self) -> None:
        import torch._library.triton
        table = getattr(torch._library.triton, "triton_ops_to_kernels", None)
        found = _KERNELS.get(self.module)
        if table is not None and found is not None:  # None: an older PyTorch; not loaded yet
            table[self.inlined._qualname] = table[self.inlined_backward._qualname] = found

    def __call__(self, *inputs):
        """Outside any tracing, the kernels themselves (through the eager Function when a
        gradient is wanted); under torch.compile, or for fake or subclassed tensors (fake or
        symbolic make_fx, export, FakeTensorMode), the inlined operators for CUDA tensors and the
        opaque ones for (interpreted) CPU tensors. (A dispatch mode over real tensors, e.g.
        FlopCounterMode, sees the launchers' torch ops only, not the kernels.)"""
        first = inputs[0]
        if torch.compiler.is_compiling() or type(first) not in (torch.Tensor, torch.nn.Parameter):
            return self.inlined(*inputs) if first.device.type == "cuda" else self.opaque(*inputs)
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in inputs):
            return self.eager.apply(*inputs)
        with _direct_launches():  # no graph to record (sampling, evaluation)
            return self.forward(*inputs)
