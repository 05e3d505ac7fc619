"""Argument checks shared by every module of `aql`: one place for the rule and the message.

Each raises a TypeError / ValueError naming where (the class or function), the argument, what was
expected and what came: ``ValueError("aql.ScoreStore: query_budget must be in (0, 1.0], got 1.5")``.
`where` is the name after ``aql.`` (e.g. ``"selection.ScoreStore"``).
"""

from __future__ import annotations

import math

import torch

__all__ = ["check_number", "check_interval", "check_int", "check_tensor", "check_bool", "check_choice", "round_half_up"]


def check_number(where: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"aql.{where}: {name} must be a float, got {type(value).__name__} {value!r}")
    return float(value)


def check_interval(where: str, name: str, value, low: float, high: float, *, low_open: bool, high_open: bool) -> float:
    value = check_number(where, name, value)
    low_ok = value > low if low_open else value >= low
    high_ok = value < high if high_open else value <= high
    if not (low_ok and high_ok):  # NaN fails both
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"aql.{where}: {name} must be in {interval}, got {value}")
    return value


def check_int(where: str, name: str, value, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"aql.{where}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"aql.{where}: {name} must be >= {low}, got {value}")
    return value


def check_tensor(where: str, name: str, value, *, ndim: int | None = None, dtypes=None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"aql.{where}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"aql.{where}: {name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"aql.{where}: {name} must have dtype in ({names}), got {value.dtype}")
    return value


def check_bool(where: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"aql.{where}: {name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_choice(where: str, name: str, value, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"aql.{where}: {name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def round_half_up(x: float) -> int:
    """floor(x + 1/2), guarded against 0.2 * 10 == 2.0000000000000004 style representation error
    (Python's round() rounds halves to even, which would make subset sizes depend on parity)."""
    return int(math.floor(x + 0.5 + 1e-9))
