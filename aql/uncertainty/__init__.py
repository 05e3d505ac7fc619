"""Uncertainty estimators in the design document's vocabulary.

- `LaplacianUncertainty`: statistics gathered from the training step (head Fisher EMA via
  `aql_kernels.fisher_ema_`, layer-input moments and class means from the training forward) and a
  one-pass epistemic score: a class-conditional feature density (default), the K-FAC or diagonal
  last-layer Laplace predictive variance, or the prior alone; or the predictive entropy.
- `MCDropoutUncertainty`: the v1.0 baseline, n stochastic passes (predictive entropy, BALD).
- `EnsembleUncertainty`: small students distilled from the main model; their disagreement.
"""

from .base import UncertaintyEstimator
from .ensemble import EnsembleUncertainty, config_student_factory, shrink_model, student_overrides
from .laplacian import METHODS as LAPLACE_METHODS, LaplacianUncertainty, Uncertainty
from .mc_dropout import MCDropoutEstimate, MCDropoutUncertainty

__all__ = [
    "EnsembleUncertainty",
    "LAPLACE_METHODS",
    "LaplacianUncertainty",
    "MCDropoutEstimate",
    "MCDropoutUncertainty",
    "Uncertainty",
    "UncertaintyEstimator",
    "config_student_factory",
    "shrink_model",
    "student_overrides",
]
