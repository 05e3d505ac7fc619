"""Loader of the compiled libraries (ctypes over the C ABI of ``csrc/c_api.h``).

``CPU`` and ``CUDA`` are always importable objects. When a library is missing, fails to load or
lacks a symbol, calling into it raises a ``RuntimeError`` that says how to build it; nothing fails
at import. Argument types are declared once, in ``_SIGNATURES``, for every exported function.
"""

from __future__ import annotations

import ctypes
import enum
import os
import threading
from pathlib import Path

__all__ = ["CPU", "CUDA", "EXTENSION", "NativeLibrary", "TorchExtension", "NativeError", "NativeMemoryError", "Status", "DType", "CpuIsa", "DTYPE_CODES",
           "raise_for_status"]


# The enums of csrc/c_api.h, once (tests/kernels/test_native.py checks every value against the header).
class Status(enum.IntEnum):
    """aql_status codes (AQL_OK, AQL_ERR_*)."""

    OK = 0
    INVALID_ARGUMENT = 1
    TARGET_OUT_OF_RANGE = 2
    CUDA = 3
    UNSUPPORTED = 4
    WORKSPACE_TOO_SMALL = 5
    OUT_OF_MEMORY = 6
    INTERNAL = 7


class DType(enum.IntEnum):
    """Element-type codes of floating inputs (AQL_DTYPE_*)."""

    F32 = 0
    BF16 = 1
    F16 = 2


class CpuIsa(enum.IntEnum):
    """Instruction-set variants of the CPU library's kernels (AQL_CPU_ISA_*)."""

    BASELINE = 0
    AVX2 = 1
    AVX512 = 2
    NATIVE = 3


# Element-type codes by torch dtype name.
DTYPE_CODES = {"float32": int(DType.F32), "bfloat16": int(DType.BF16), "float16": int(DType.F16)}

_ABI_VERSION = 1  # AQL_ABI_VERSION
_BUILD_HINT = (
    "build it with `make native` (or `pip install -e .`) from the repository root; "
    "AQL_NATIVE_LIB_DIR points the loader at another directory"
)

_p = ctypes.c_void_p
_i32 = ctypes.c_int32
_i64 = ctypes.c_int64
_u32 = ctypes.c_uint32
_f32 = ctypes.c_float
_size = ctypes.c_size_t

# name -> (restype, argtypes) of every function of the C ABI; a status-returning function returns
# an int32 aql_status (Status.OK == 0).
_SIGNATURES: dict[str, tuple] = {
    # both libraries
    "aql_abi_version": (_i32, []),
    "aql_last_error": (ctypes.c_char_p, []),
    "aql_num_threads": (_i32, []),
    # instruction set (CPU)
    "aql_cpu_isa": (_i32, []),
    "aql_cpu_set_isa": (_i32, [_i32]),
    # scores
    "aql_softmax_scores": (_i32, [_p, _i32, _i64, _i64, _i64, _p, _i64, _p, _p, _p, _p, _p, _p, _p]),
    "aql_softmax_scores_backward": (_i32, [_p, _i32, _i64, _i64, _i64, _p, _i64, _p, _p, _p, _i32, _i64]),
    # fisher
    "aql_fisher_ema": (_i32, [_i64, _p, _p, _p, _p, ctypes.c_double, ctypes.c_double]),
    # select (CPU)
    "aql_topk_select": (_i32, [_p, _i64, _i64, _p, _p, _p]),
    "aql_digit_histogram": (_i32, [_p, _i64, _u32, _i32, _i32, _p]),
    # select (CUDA)
    "aql_cuda_topk_workspace_size": (_i32, [_i64, _i64, ctypes.POINTER(_size)]),
    "aql_cuda_topk_select": (_i32, [_p, _i64, _i64, _p, _p, _p, _p, _size, _p]),
    "aql_cuda_digit_histogram": (_i32, [_p, _i64, _u32, _i32, _i32, _p, _p]),
}

_STATUS_NAMES = {status: status.name.lower().replace("_", " ") for status in Status if status != Status.OK}
_STATUS_NAMES[Status.CUDA] = "CUDA error"


class NativeError(RuntimeError):
    """A native function returned a non-zero status."""

    def __init__(self, function: str, status: int, message: str):
        self.function = function
        self.status = status
        self.message = message
        kind = _STATUS_NAMES.get(status, f"status {status}")
        super().__init__(f"{function} failed ({kind}): {message}")


class NativeMemoryError(NativeError, MemoryError):
    """A native function ran out of host memory (Status.OUT_OF_MEMORY): a MemoryError too."""


def raise_for_status(function: str, status: int, message: str, op: str | None = None) -> None:
    """Raises the exception that a non-zero `status` of `function` stands for.

    TARGET_OUT_OF_RANGE is the caller's data: a ValueError naming the public op `op`;
    OUT_OF_MEMORY a MemoryError (NativeMemoryError); anything else a NativeError (a RuntimeError):
    INTERNAL is a bug of the library, the others an argument that the Python layer let through.
    """
    if status == Status.TARGET_OUT_OF_RANGE:
        raise ValueError(f"aql_kernels.{op or function}: {message}")
    if status == Status.OUT_OF_MEMORY:
        raise NativeMemoryError(function, status, message)
    raise NativeError(function, status, message)


def _library_dirs() -> list[Path]:
    dirs = []
    override = os.environ.get("AQL_NATIVE_LIB_DIR")
    if override:
        dirs.append(Path(override))
    dirs.append(Path(__file__).resolve().parent)
    return dirs


class NativeLibrary:
    """One shared library of the C ABI, loaded lazily on first use.

    The first use loads it under a lock, and the outcome (the handle, or why there is none) is
    published only once it is complete: a second thread never sees a half-loaded library (which would
    look like one that lacks every function). A failed load is final for the process.
    """

    def __init__(self, kind: str, filename: str):
        self.kind = kind
        self.filename = filename
        self.path: Path | None = None
        self._handle: ctypes.CDLL | None = None
        self._error: str | None = None
        self._loaded = False
        self._lock = threading.Lock()

    def _load(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            self._handle, self._error, self.path = self._open()
            self._loaded = True  # after the outcome is in place

    def _open(self) -> tuple[ctypes.CDLL | None, str | None, Path | None]:
        """(handle, None, path) when the library loads and matches this package, else (None, reason, path)."""
        candidates = [d / self.filename for d in _library_dirs()]
        path = next((c for c in candidates if c.exists()), None)
        if path is None:
            return None, f"{self.filename} not found (looked in {', '.join(str(c.parent) for c in candidates)})", None
        try:
            handle = ctypes.CDLL(str(path))
        except OSError as error:
            return None, f"{path} failed to load: {error}", path
        try:
            version_function = handle.aql_abi_version
        except AttributeError:
            return None, f"{path} does not export aql_abi_version: not an aql library", path
        version_function.restype, version_function.argtypes = _SIGNATURES["aql_abi_version"]
        version = version_function()
        if version != _ABI_VERSION:
            return None, f"{path} has ABI version {version}, this package expects {_ABI_VERSION}: rebuild it", path
        for name, (restype, argtypes) in _SIGNATURES.items():
            function = getattr(handle, name, None) if hasattr(handle, name) else None
            if function is not None:
                function.restype = restype
                function.argtypes = argtypes
        return handle, None, path

    @property
    def available(self) -> bool:
        self._load()
        return self._handle is not None

    @property
    def reason(self) -> str:
        """Why the library is unavailable ('' when it is available)."""
        self._load()
        return self._error or ""

    def has(self, name: str) -> bool:
        """Whether the library is loaded and exports `name`."""
        return self.available and hasattr(self._handle, name)

    def call(self, name: str, *args, op: str | None = None) -> None:
        """Calls `name` and raises (``raise_for_status``) on a non-zero status."""
        function = self.function(name)
        status = function(*args)
        if status != 0:
            raise_for_status(name, status, self.last_error(), op)

    def last_error(self) -> str:
        """The message of the calling thread's last failed call."""
        return self._handle.aql_last_error().decode("utf-8", "replace")

    def function(self, name: str):
        self._load()
        if self._handle is None:
            raise RuntimeError(f"aql_kernels: the {self.kind} library is unavailable: {self._error}; {_BUILD_HINT}")
        if not hasattr(self._handle, name):
            raise RuntimeError(
                f"aql_kernels: {self.path} does not export {name} (built without that op?); {_BUILD_HINT}"
            )
        return getattr(self._handle, name)

    def num_threads(self) -> int:
        return int(self.function("aql_num_threads")())

    def cpu_isa(self) -> CpuIsa | None:
        """The instruction-set variant that the CPU library's kernels run (None where not reported)."""
        if not self.has("aql_cpu_isa"):
            return None
        isa = int(self.function("aql_cpu_isa")())
        return CpuIsa(isa) if isa >= 0 else None


CPU = NativeLibrary("cpu", "libaql_cpu.so")
CUDA = NativeLibrary("cuda", "libaql_cuda.so")


class TorchExtension:
    """aql_kernels._C (csrc/torch/extension.cpp), the C++ eager route of the score ops and
    fisher_ema_ for small CPU calls, imported lazily on first use with the CPU library's kernels handed over to it.

    Optional: it is compiled against the torch it was built with, and without it (not built, built
    for another torch, ``AQL_TORCH_EXTENSION=0``, or no CPU library) the ops take their Python route
    with the same results. ``module()`` returns it or None; ``reason`` says why not. A failed import
    is final for the process, and never raises.
    """

    # handed over in this order; a kernel that the library lacks goes as NULL (its op is then not covered)
    _KERNELS = ("aql_softmax_scores", "aql_softmax_scores_backward", "aql_fisher_ema", "aql_last_error")

    def __init__(self, name: str = "aql_kernels._C"):
        self.name = name
        self._module = None
        self._error: str | None = None
        self._loaded = False
        self._lock = threading.Lock()

    def _open(self):
        if os.environ.get("AQL_TORCH_EXTENSION", "1").strip().lower() in ("0", "off", "no", "false"):
            return None, "disabled by AQL_TORCH_EXTENSION=0"
        if not CPU.has("aql_last_error"):
            return None, f"the CPU library is unavailable ({CPU.reason or 'it lacks aql_last_error'})"
        try:
            import importlib

            module = importlib.import_module(self.name)
        except Exception as error:  # not built, or built against another torch (undefined symbols)
            return None, (f"{self.name} does not import ({type(error).__name__}: {error}); build it with `make native` "
                          "against the installed torch")
        try:
            module.set_kernels(*(ctypes.cast(CPU.function(name), ctypes.c_void_p).value if CPU.has(name) else 0
                                 for name in self._KERNELS))
        except Exception as error:
            return None, f"{self.name} refused the CPU library's kernels ({type(error).__name__}: {error})"
        return module, None

    def module(self):
        """The extension module, or None where it is unavailable (see ``reason``)."""
        if not self._loaded:
            with self._lock:
                if not self._loaded:
                    self._module, self._error = self._open()
                    self._loaded = True
        return self._module

    @property
    def path(self) -> str:
        module = self.module()
        return "" if module is None else str(getattr(module, "__file__", self.name))

    @property
    def reason(self) -> str:
        """Why the extension is unavailable ('' when it is available)."""
        self.module()
        return self._error or ""


EXTENSION = TorchExtension()


def pointer(tensor) -> ctypes.c_void_p:
    """Raw data pointer of a torch tensor (None -> NULL)."""
    if tensor is None:
        return ctypes.c_void_p(0)
    return ctypes.c_void_p(tensor.data_ptr())


def dtype_code(dtype) -> int:
    """C ABI code of a torch floating dtype."""
    name = str(dtype).replace("torch.", "")
    try:
        return DTYPE_CODES[name]
    except KeyError:
        raise TypeError(f"aql_kernels: no native element type for {dtype}") from None
