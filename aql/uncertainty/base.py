"""The estimator interface shared by every uncertainty method (argument checks: `aql._checks`)."""

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

    def _where(self, method: str) -> str:
        """The `where` of `aql._checks` for this estimator's method: "uncertainty.<name>.<method>"."""
        return f"uncertainty.{self.name}.{method}"
