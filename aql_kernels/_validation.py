"""Input checks shared by the public ops. Each raises a TypeError / ValueError that names the op,
the argument, what was expected and what came."""

from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(op: str, name: str, value, *, ndim: int | None = None, dtypes=None, device: torch.device | None = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"aql_kernels.{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"aql_kernels.{op}: {name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"aql_kernels.{op}: {name} must have dtype in ({_dtype_names(dtypes)}), got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"aql_kernels.{op}: {name} must be on {device} (like the other inputs), got {value.device}")


def check_int(op: str, name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"aql_kernels.{op}: {name} must be an int, got {type(value).__name__} {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"aql_kernels.{op}: {name} must be in [{low}, {high}], got {value}")
    return value


def check_float(op: str, name: str, value, *, low: float, high: float, high_inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"aql_kernels.{op}: {name} must be a float, got {type(value).__name__} {value!r}")
    value = float(value)
    upper_ok = value <= high if high_inclusive else value < high
    if not (low <= value and upper_ok):
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"aql_kernels.{op}: {name} must be in [{low}, {high}{bracket}, got {value}")
    return value
