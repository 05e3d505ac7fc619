"""The dispatch rule shared by every op, and `backends()`.

CUDA tensor -> the GPU implementation (Triton, or the CUDA library for the selector);
CPU tensor -> the C++ CPU library. When the chosen implementation is unavailable the op falls back
to its pure-torch reference and warns once, naming how to build the missing piece.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import NamedTuple

import torch

from . import _native

__all__ = ["Backend", "backends", "triton_status", "choose", "eager", "warn_once"]


class Backend(NamedTuple):
    available: bool
    detail: str  # version or path when available, the reason when not


@functools.lru_cache(maxsize=None)
def triton_status() -> Backend:
    try:
        import triton  # noqa: F401
    except Exception as error:  # ImportError, or a broken install
        return Backend(False, f"triton does not import: {error}; install it with `pip install triton`")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpret:
        return Backend(False, f"triton {triton.__version__} present but no CUDA device (TRITON_INTERPRET=1 runs it on CPU tensors)")
    mode = "interpreter" if interpret else "compiled"
    return Backend(True, f"triton {triton.__version__} ({mode})")


def _library_status(library: _native.NativeLibrary) -> Backend:
    if library.available:
        return Backend(True, str(library.path))
    return Backend(False, library.reason)


def backends() -> dict[str, Backend]:
    """What is available here, and why not where it is not.

    Keys: ``triton``, ``cpu_library``, ``cuda_library``, ``cpu_extension`` (aql_kernels._C, the C++
    eager route of the score ops for small CPU calls; optional), ``cuda_device``.
    """
    if torch.cuda.is_available():
        cuda_device = Backend(True, torch.cuda.get_device_name())
    else:
        cuda_device = Backend(False, "torch.cuda.is_available() is False")
    return {
        "triton": triton_status(),
        "cpu_library": _library_status(_native.CPU),
        "cuda_library": _library_status(_native.CUDA),
        "cpu_extension": (Backend(True, _native.EXTENSION.path) if _native.EXTENSION.module() is not None
                          else Backend(False, _native.EXTENSION.reason)),
        "cuda_device": cuda_device,
    }


_TRITON_HINT = ("Install Triton with `pip install triton` (or `pip install aql[triton]`), in the version that "
                "matches your torch build (torch's CUDA wheels bring it along).")

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def choose(op: str, device: torch.device, *, native_symbol: str, gpu: str = "triton", cuda_symbol: str | None = None) -> str:
    """Returns the IMPLEMENTATIONS key that runs `op` for tensors on `device`.

    gpu is "triton" (needs triton) or "cuda" (needs `cuda_symbol` in the CUDA library).
    """
    if device.type == "cuda":
        if gpu == "triton":
            status = triton_status()
            if status.available and torch.cuda.is_available():
                return "triton"
            reason = status.detail
        else:
            if _native.CUDA.has(cuda_symbol):
                return "cuda"
            reason = _native.CUDA.reason or f"the CUDA library lacks {cuda_symbol}"
        how = (_TRITON_HINT if gpu == "triton"
               else "Build the CUDA library with `make native` on a machine with nvcc (the CUDA toolkit).")
        warn_once(f"{op}:{device.type}", f"aql_kernels.{op}: {gpu} implementation unavailable ({reason}); "
                  f"falling back to the pure-torch reference. {how}")
        return "reference"
    if device.type == "cpu":
        if _native.CPU.has(native_symbol):
            return "native"
        reason = _native.CPU.reason or f"the CPU library lacks {native_symbol}"
        warn_once(f"{op}:cpu", f"aql_kernels.{op}: native CPU implementation unavailable ({reason}); "
                  "falling back to the pure-torch reference. Build it with `make native`.")
        return "reference"
    warn_once(f"{op}:{device.type}", f"aql_kernels.{op}: no kernel for device {device.type}; using the reference")
    return "reference"


# ---------------------------------------------------------------------------------------------------
# The eager predicate
# ---------------------------------------------------------------------------------------------------
# Dispatching through a torch.library op costs tens of microseconds of host time per call (schema
# parsing, the Python dispatcher, autograd wrappers): ~80 us for softmax_scores on the 2-core CI-class
# CPU, and ~0.15 ms more for fisher_ema_'s 148-tensor lists. In plain eager mode the public functions call
# the chosen implementation directly. Everything else goes through the registered ops so that it sees
# them: torch.compile / export (Dynamo), a TorchDispatchMode (FakeTensorMode, make_fx,
# functionalization, user modes), tensor subclasses (FakeTensor, FunctionalTensor, ...) and torch.func
# transforms (vmap, grad), whose wrapped tensors look like plain ones from Python.
_dispatch_stack_depth = getattr(torch._C, "_len_torch_dispatch_stack", None)
_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
_TENSOR = torch.Tensor


def eager(*tensors: torch.Tensor | None) -> bool:
    """Whether an op called on `tensors` (None entries are skipped) may bypass the torch.library
    dispatcher: not compiling or tracing, no dispatch mode active, and each tensor a plain
    ``torch.Tensor`` that no torch.func transform wraps. Without the private probes (another torch),
    always False: the registered ops are then the only path, never a wrong one."""
    if _dispatch_stack_depth is None or _functorch_wrapped is None:
        return False
    if torch.compiler.is_compiling() or _dispatch_stack_depth() != 0:
        return False
    for tensor in tensors:
        if tensor is not None and (type(tensor) is not _TENSOR or _functorch_wrapped(tensor)):
            return False
    return True
