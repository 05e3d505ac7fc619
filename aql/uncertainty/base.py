"""The estimator interface shared by every uncertainty method, and checks they share."""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

__all__ = ["UncertaintyEstimator"]


class UncertaintyEstimator(abc.ABC):
    """Scores how uncertain a model is about each sample of a batch.

    `estimate_uncertainty(data)` returns a float32 tensor `[N]` on the model's device, one score per
    row of the model's 2-D logits (higher = more uncertain), without synchronising with the host.
    `state_dict()` / `load_state_dict()` carry whatever the estimator learns during training (Fisher,
    students, counters) so that a trainer checkpoint restores it.
    """

    #: name used in error messages, e.g. "LaplacianUncertainty"
    name: str = "UncertaintyEstimator"

    @abc.abstractmethod
    def estimate_uncertainty(self, data: torch.Tensor) -> torch.Tensor:
        """float32 [N] uncertainty scores for the batch `data`."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"aql.uncertainty.{self.name}.load_state_dict: state must be a dict, got {type(state).__name__}")

    # ---- helpers shared by the estimators -------------------------------------------------------
    def _fail(self, method: str, message: str, error: type[Exception] = ValueError) -> Exception:
        return error(f"aql.uncertainty.{self.name}.{method}: {message}")

    def _check_model(self, method: str, argument: str, model) -> nn.Module:
        if not isinstance(model, nn.Module):
            raise self._fail(method, f"{argument} must be a torch.nn.Module, got {type(model).__name__}", TypeError)
        return model

    def _check_data(self, method: str, data) -> torch.Tensor:
        if not isinstance(data, torch.Tensor):
            raise self._fail(method, f"data must be a torch.Tensor, got {type(data).__name__}", TypeError)
        if data.dim() == 0 or data.shape[0] == 0:
            raise self._fail(method, f"data must have a non-empty first (batch) dimension, got shape {tuple(data.shape)}")
        return data

    def _logits(self, method: str, logits) -> torch.Tensor:
        """The model output as 2-D logits [rows, classes] (leading dimensions flattened)."""
        if not isinstance(logits, torch.Tensor):
            raise self._fail(method, f"the model must return a logits tensor, got {type(logits).__name__}", TypeError)
        if logits.dim() < 2:
            raise self._fail(method, f"the model must return logits of shape [N, classes], got shape {tuple(logits.shape)}")
        return logits.reshape(-1, logits.shape[-1])

    @staticmethod
    def _check_positive_int(owner: "UncertaintyEstimator | str", method: str, argument: str, value, *, low: int = 1) -> int:
        name = owner if isinstance(owner, str) else owner.name
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"aql.uncertainty.{name}.{method}: {argument} must be an int, got {type(value).__name__} {value!r}")
        if value < low:
            raise ValueError(f"aql.uncertainty.{name}.{method}: {argument} must be >= {low}, got {value}")
        return value

    @staticmethod
    def _check_positive_float(name: str, method: str, argument: str, value, *, allow_zero: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"aql.uncertainty.{name}.{method}: {argument} must be a float, got {type(value).__name__} {value!r}")
        value = float(value)
        ok = value >= 0.0 if allow_zero else value > 0.0
        if not (ok and value < float("inf")):
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"aql.uncertainty.{name}.{method}: {argument} must be finite and {bound}, got {value}")
        return value
