"""The estimator interface shared by every uncertainty method (argument checks: `aql._checks`)."""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

__all__ = ["UncertaintyEstimator", "PER_SAMPLE"]

#: how token scores of a sequence model are reduced to one score per sequence
PER_SAMPLE = ("mean", "sum", "none")


class UncertaintyEstimator(abc.ABC):
    """Scores how uncertain a model is about each sample of a batch.

    `estimate_uncertainty(data, per_sample="mean")` returns a float32 tensor on the model's device
    (higher = more uncertain), without synchronising with the host: `[N]`, one score per sample of the
    batch. The model may return logits `[N, V]`, token logits of a sequence model (`[N, T, V]`, or
    flattened `[N * T, V]` as `aql.models.GPT2LM` returns them), or a Hugging Face output (`.logits`,
    a dict with "logits", a tuple starting with them). Token scores are reduced per sequence by
    `per_sample`: "mean" or "sum" over its T tokens, or "none" for `[N, T]`.
    `state_dict()` / `load_state_dict()` carry whatever the estimator learns during training (Fisher,
    students, counters) so that a trainer checkpoint restores it.
    """

    #: name used in error messages, e.g. "LaplacianUncertainty"
    name: str = "UncertaintyEstimator"

    @abc.abstractmethod
    def estimate_uncertainty(self, data: torch.Tensor, *, per_sample: str = "mean") -> torch.Tensor:
        """float32 [N] uncertainty scores for the batch `data` ([N, T] for token models with
        per_sample="none")."""

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

    def _logits(self, method: str, output) -> torch.Tensor:
        """The model output (a tensor or a Hugging Face output) as 2-D logits [rows, classes] (leading
        dimensions flattened)."""
        from aql.training.outputs import model_logits

        try:
            logits = model_logits(output)
        except TypeError as error:
            raise self._fail(method, f"the model must return logits (a tensor or an output with .logits), got "
                             f"{type(output).__name__}", TypeError) from error
        if logits.dim() < 2:
            raise self._fail(method, f"the model must return logits of shape [N, classes], got shape {tuple(logits.shape)}")
        return logits

    def _check_per_sample(self, method: str, per_sample: str) -> str:
        if per_sample not in PER_SAMPLE:
            raise self._fail(method, f"per_sample must be one of {PER_SAMPLE}, got {per_sample!r}")
        return per_sample

    def _per_sample(self, method: str, values: torch.Tensor, batch: int, per_sample: str) -> torch.Tensor:
        """Row scores `values` [rows] as per-sample scores: unchanged when there is one row per sample,
        else (rows = batch * T token rows) reduced over each sample's T rows by `per_sample`."""
        rows = values.shape[0]
        if rows == batch:
            return values
        if rows % batch:
            raise self._fail(method, f"the model returned {rows} logits rows for a batch of {batch} samples; expected a "
                             "multiple of it (one row per token)")
        tokens = values.view(batch, rows // batch)
        if per_sample == "none":
            return tokens
        return tokens.sum(dim=1) if per_sample == "sum" else tokens.mean(dim=1)

    def _where(self, method: str) -> str:
        """The `where` of `aql._checks` for this estimator's method: "uncertainty.<name>.<method>"."""
        return f"uncertainty.{self.name}.{method}"
