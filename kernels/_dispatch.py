"""Backend selection: 'torch' (plain PyTorch), 'triton' (fused kernels) or 'auto'."""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=None)
def _cuda_status(index: int) -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - triton ships with torch's CUDA wheels
        return False, f"triton is not importable ({e.__class__.__name__}: {e})"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return False, f"GPU compute capability {major}.{minor} < 8.0 (bf16 tensor cores needed)"
    return True, "ok"


def triton_status(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(usable, reason): can the compiled Triton kernels run on `device` (default: current CUDA
    device)? A cheap static check; `kernels.selfcheck` additionally runs the kernels once."""
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        return False, f"device {device} is not a CUDA device"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    return _cuda_status(device.index if device.index is not None else torch.cuda.current_device())


def triton_available(device: torch.device | str | None = None) -> bool:
    return triton_status(device)[0]


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device, problem: str | None) -> str:
    """'triton' or 'torch' for one call. `problem` is None when the inputs are supported by the
    Triton kernels, else a description of why not.

    'torch'  : always the plain-PyTorch path.
    'triton' : the Triton kernels, compiled on CUDA tensors, interpreted (slow; tests) on CPU
               tensors; raises if the inputs are not supported.
    'auto'   : 'triton' for supported inputs on a CUDA device where `triton_available()`, or on
               CPU when TRITON_INTERPRET=1 is set in the environment; 'torch' otherwise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if problem is not None:
            raise ValueError(f"backend='triton' does not support these inputs: {problem}")
        if device.type == "cuda":
            ok, why = triton_status(device)
            if not ok:
                raise RuntimeError(f"backend='triton' is unavailable: {why}")
        elif device.type == "cpu":
            try:
                import triton  # noqa: F401  (interpreted on CPU, but still Triton)
            except Exception as e:
                raise RuntimeError(f"backend='triton' is unavailable: triton is not importable ({e})") from e
        else:
            raise RuntimeError(f"backend='triton' supports CUDA and (interpreted) CPU tensors, "
                               f"not {device.type}")
        return "triton"
    if problem is not None:
        return "torch"
    if device.type == "cuda":
        return "triton" if triton_available(device) else "torch"
    if device.type == "cpu" and interpreter_requested():
        try:
            import triton  # noqa: F401
        except Exception:
            return "torch"
        return "triton"
    return "torch"


def unit_last(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` with unit stride on its last axis (the kernels index rows as base + column), copied only
    when it is not; None stays None (absent norm weights)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def autocast_inputs(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Cast floating inputs to the autocast dtype when autocast is on for their device (the
    kernels act like the matmul-class ops autocast lowers), else to their common dtype."""
    dev = tensors[0].device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]
