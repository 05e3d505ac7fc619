"""Monte Carlo dropout: the v1.0 baseline of the design document (n stochastic forward passes)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from aql._checks import check_int

from .base import UncertaintyEstimator

__all__ = ["MCDropoutUncertainty", "MCDropoutEstimate"]

class MCDropoutEstimate(NamedTuple):
    entropy: torch.Tensor  # float32 [N]: H[mean_s p_s], the predictive entropy
    mutual_information: torch.Tensor  # float32 [N]: BALD, H[mean_s p_s] - mean_s H[p_s]


class MCDropoutUncertainty(UncertaintyEstimator):
    """n_samples forward passes with dropout active (Gal & Ghahramani 2016, "Dropout as a Bayesian
    Approximation"); scores: predictive entropy and the BALD mutual information (Houlsby et al. 2011).

    Only the dropout modules are put in training mode (batch norm and the rest stay in eval mode); every
    module's mode is restored afterwards. The batch is processed in chunks of at most `chunk_size`
    rows (None: the whole batch), and for each chunk the passes run one after another while the mean
    probabilities and the mean per-pass entropy are accumulated in place: memory is that of one forward
    of a chunk plus two accumulators, never n_samples times the batch. Cost: n_samples forward passes.

    `estimate_uncertainty` returns `score` ("entropy", the default, or "bald").
    """

    name = "MCDropoutUncertainty"

    def __init__(self, model: nn.Module, n_samples: int = 10, chunk_size: int | None = None, *, score: str = "entropy"):
        self.model = self._check_model("__init__", "model", model)
        self.n_samples = check_int(self._where("__init__"), "n_samples", n_samples, low=1)
        if chunk_size is not None:
            chunk_size = check_int(self._where("__init__"), "chunk_size", chunk_size, low=1)
        self.chunk_size = chunk_size
        if score not in ("entropy", "bald"):
            raise self._fail("__init__", f"score must be 'entropy' or 'bald', got {score!r}")
        self.score = score
        self._dropout = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        if not self._dropout:
            raise self._fail("__init__", f"model has no dropout module (nn.Dropout, nn.Dropout1d/2d/3d, nn.AlphaDropout); "
                             f"MC dropout needs one (got a {type(model).__name__})")
        if all(m.p == 0 for m in self._dropout):
            raise self._fail("__init__", "every dropout module of model has p = 0: the passes would all be identical")

    def estimate(self, data: torch.Tensor) -> MCDropoutEstimate:
        data = self._check_data("estimate", data)
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        for module in self._dropout:
            module.train()
        entropies, informations = [], []
        try:
            with torch.no_grad():
                chunks = data.split(self.chunk_size) if self.chunk_size is not None else (data,)
                for chunk in chunks:
                    mean_probs = None
                    mean_entropy = None
                    for _ in range(self.n_samples):
                        log_probs = torch.log_softmax(self._logits("estimate", self.model(chunk)).float(), dim=1)
                        probs = log_probs.exp()
                        # p log p with 0 log 0 = 0 (a logit of -inf gives p = 0 and log p = -inf)
                        entropy = -torch.where(probs > 0, probs * log_probs, 0.0).sum(dim=1)
                        if mean_probs is None:
                            mean_probs, mean_entropy = probs, entropy
                        else:
                            mean_probs.add_(probs)
                            mean_entropy.add_(entropy)
                    mean_probs.div_(self.n_samples)
                    mean_entropy.div_(self.n_samples)
                    predictive = -torch.special.xlogy(mean_probs, mean_probs).sum(dim=1)
                    entropies.append(predictive)
                    # Jensen: H[mean p] >= mean H[p]; rounding can leave tiny negatives.
                    informations.append((predictive - mean_entropy).clamp_min_(0.0))
        finally:
            for module, training in modes:
                module.training = training
        return MCDropoutEstimate(torch.cat(entropies), torch.cat(informations))

    def estimate_uncertainty(self, data: torch.Tensor, *, per_sample: str = "mean") -> torch.Tensor:
        """`score` of `estimate` per sample (token rows reduced by `per_sample`)."""
        per_sample = self._check_per_sample("estimate_uncertainty", per_sample)
        result = self.estimate(data)
        values = result.entropy if self.score == "entropy" else result.mutual_information
        return self._per_sample("estimate_uncertainty", values, data.shape[0], per_sample)

    def state_dict(self) -> dict[str, Any]:
        return {}  # nothing is learned: the model carries everything
