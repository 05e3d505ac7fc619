"""Loader of the compiled libraries (ctypes over the C ABI of ``csrc/c_api.h``).

``CPU`` and ``CUDA`` are always importable objects. When a library is missing, fails to load or
lacks a symbol, calling into it raises a ``RuntimeError`` that says how to build it; nothing fails
at import. Argument types are declared once, in ``_SIGNATURES``, for every exported function.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

__all__ = ["CPU", "CUDA", "NativeLibrary", "NativeError", "DTYPE_CODES"]

# Element-type codes of the C ABI (AQL_DTYPE_*).
DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}

_ABI_VERSION = 1
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

# name -> argtypes; every function returns an int32 status (AQL_OK == 0).
_SIGNATURES: dict[str, list] = {
    # scores
    "aql_softmax_scores": [_p, _i32, _i64, _i64, _i64, _p, _i64, _p, _p, _p, _p, _p, _p, _p],
    "aql_softmax_scores_backward": [_p, _i32, _i64, _i64, _i64, _p, _i64, _p, _p, _p, _i32, _i64],
    # fisher
    "aql_fisher_ema": [_i64, _p, _p, _p, _p, ctypes.c_double, ctypes.c_double],
    # select (CPU)
    "aql_topk_select": [_p, _i64, _i64, _p, _p, _p],
    "aql_digit_histogram": [_p, _i64, _u32, _i32, _i32, _p],
    # select (CUDA)
    "aql_cuda_topk_workspace_size": [_i64, _i64, ctypes.POINTER(_size)],
    "aql_cuda_topk_select": [_p, _i64, _i64, _p, _p, _p, _p, _size, _p],
    "aql_cuda_digit_histogram": [_p, _i64, _u32, _i32, _i32, _p, _p],
}

_STATUS_NAMES = {
    1: "invalid argument",
    2: "target out of range",
    3: "CUDA error",
    4: "unsupported",
    5: "workspace too small",
}


class NativeError(RuntimeError):
    """A native function returned a non-zero status."""

    def __init__(self, function: str, status: int, message: str):
        self.function = function
        self.status = status
        self.message = message
        kind = _STATUS_NAMES.get(status, f"status {status}")
        super().__init__(f"{function} failed ({kind}): {message}")


def _library_dirs() -> list[Path]:
    dirs = []
    override = os.environ.get("AQL_NATIVE_LIB_DIR")
    if override:
        dirs.append(Path(override))
    dirs.append(Path(__file__).resolve().parent)
    return dirs


class NativeLibrary:
    """One shared library of the C ABI, loaded lazily on first use."""

    def __init__(self, kind: str, filename: str):
        self.kind = kind
        self.filename = filename
        self._handle: ctypes.CDLL | None = None
        self._error: str | None = None
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        candidates = [d / self.filename for d in _library_dirs()]
        path = next((c for c in candidates if c.exists()), None)
        if path is None:
            self._error = f"{self.filename} not found (looked in {', '.join(str(c.parent) for c in candidates)})"
            return
        try:
            handle = ctypes.CDLL(str(path))
        except OSError as error:
            self._error = f"{path} failed to load: {error}"
            return
        try:
            handle.aql_abi_version.restype = ctypes.c_int32
            version = handle.aql_abi_version()
        except AttributeError:
            self._error = f"{path} does not export aql_abi_version: not an aql library"
            return
        if version != _ABI_VERSION:
            self._error = f"{path} has ABI version {version}, this package expects {_ABI_VERSION}: rebuild it"
            return
        handle.aql_last_error.restype = ctypes.c_char_p
        handle.aql_last_error.argtypes = []
        for name, argtypes in _SIGNATURES.items():
            function = getattr(handle, name, None) if hasattr(handle, name) else None
            if function is not None:
                function.restype = ctypes.c_int32
                function.argtypes = argtypes
        self._handle = handle
        self.path = path

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

    def call(self, name: str, *args) -> None:
        """Calls `name` and raises NativeError on a non-zero status."""
        function = self.function(name)
        status = function(*args)
        if status != 0:
            message = self._handle.aql_last_error().decode("utf-8", "replace")
            raise NativeError(name, status, message)

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
        function = self.function("aql_num_threads")
        function.restype = ctypes.c_int32
        return int(function())


CPU = NativeLibrary("cpu", "libaql_cpu.so")
CUDA = NativeLibrary("cuda", "libaql_cuda.so")


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
