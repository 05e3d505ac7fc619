"""Uncertainty estimators in the design document's vocabulary.

- `LaplacianUncertainty`: diagonal Fisher EMA (`aql_kernels.fisher_ema_`) and a one-pass score: the
  predictive entropy, plus a last-layer Laplace epistemic score from `estimate`.
- `MCDropoutUncertainty`: the v1.0 baseline, n stochastic passes (predictive entropy, BALD).
- `EnsembleUncertainty`: small students distilled from the main model; their disagreement.
"""

from .base import UncertaintyEstimator
from .ensemble import EnsembleUncertainty, shrink_model
from .laplacian import LaplacianUncertainty, Uncertainty
from .mc_dropout import MCDropoutEstimate, MCDropoutUncertainty

__all__ = [
    "EnsembleUncertainty",
    "LaplacianUncertainty",
    "MCDropoutEstimate",
    "MCDropoutUncertainty",
    "Uncertainty",
    "UncertaintyEstimator",
    "shrink_model",
]
