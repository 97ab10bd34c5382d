"""Loads the Triton kernel files in compiled mode (CUDA tensors) or interpreted mode (CPU tensors).

`@triton.jit` decides at decoration time, from TRITON_INTERPRET, whether a function becomes a
compiled kernel or an interpreted one. Instead of depending on the environment at import time,
each kernel file is executed under its own module name with the variable forced on or off for the
duration of that import only, and the two module objects are cached. Consequences:
  * CPU tensors always run on the interpreter, CUDA tensors always on compiled kernels;
  * tests need no global environment variable and no import-order tricks;
  * nothing Triton-related is imported until a Triton backend is first used.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

_HERE = Path(__file__).resolve().parent
_CACHE: dict[tuple[str, bool], ModuleType] = {}
_LOCK = threading.RLock()  # reentrant: kernel files load kernels/_triton_common.py


def load(name: str, interpret: bool) -> ModuleType:
    """The kernel file `kernels/_triton_<name>.py`, decorated in the requested mode."""
    key = (name, interpret)
    with _LOCK:
        mod = _CACHE.get(key)
        if mod is not None:
            return mod
        import triton  # noqa: F401  (ImportError propagates: no Triton, no Triton backend)

        modname = f"{__package__}._triton_{name}_{'interpreted' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(modname, _HERE / f"_triton_{name}.py")
        mod = importlib.util.module_from_spec(spec)
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        sys.modules[modname] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(modname, None)
            raise
        finally:
            if previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = previous
        if bool(mod.INTERPRET) != interpret:  # e.g. triton.knobs.runtime.interpret set in code
            raise RuntimeError(f"could not load the Triton kernels with interpret={interpret}")
        if not interpret:
            from ._ops import register_kernel_sources
            register_kernel_sources(name, mod)
        _CACHE[key] = mod
        return mod
