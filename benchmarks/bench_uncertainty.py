"""Cost of each uncertainty estimator relative to one plain forward pass of the same model: the
overhead column of the design document's Experiment 1 (Laplace should be ~1.0x, 10-pass MC dropout
~10x; DESIGN.md asks `LaplacianUncertainty.estimate` <= 1.2x). The Laplace cases: the default epistemic
score, `estimate` (that score, the entropy and every softmax statistic), the K-FAC option and the
entropy alone.

MNIST-1D-sized models (input 40, 10 classes), batch 512, evaluation mode, no gradient. Each case
records `relative_to_forward`: its median over the median of a plain forward of the same model timed
alternately with it inside the same test, so that load on a shared machine cancels out of the ratio.

    python -m pytest benchmarks/bench_uncertainty.py --benchmark-only --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from torch import nn

from aql.models import MNIST1DCNN
from aql.uncertainty import EnsembleUncertainty, LaplacianUncertainty, MCDropoutUncertainty
from benchmarks.conftest import QUICK

BATCH = 512
CASES = ["forward", "laplace.estimate_uncertainty", "laplace.estimate", "laplace kfac", "laplace entropy", "mc_dropout x10",
         "ensemble x3"]


def _alternating_ratio(run, forward, device: str, rounds: int = 15) -> float:
    """Median over rounds of time(run) / time(forward), the two timed back to back each round."""
    def timed(fn):
        start = time.perf_counter()
        for _ in range(5):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return statistics.median(timed(run) / timed(forward) for _ in range(rounds))


def _model(name: str) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 10))
    return MNIST1DCNN(channels=(32, 32, 32), dropout=0.1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                      reason="needs a CUDA device (none here)"))])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("case", CASES)
def test_estimator_cost(bench, case, model_name, device):
    bench.benchmark.group = f"uncertainty {model_name} batch {BATCH} {device} (x of one forward)"
    model = _model(model_name).to(device).eval()
    data = torch.randn(BATCH, 40, device=device)
    targets = torch.randint(0, 10, (BATCH,), device=device)
    if case == "forward":
        def run():
            with torch.no_grad():
                return model(data)
    elif case.startswith("laplace"):
        # the default (class-conditional density of the first Linear's input), the K-FAC posterior's
        # predictive variance, the predictive entropy alone
        options = {"laplace kfac": {"method": "kfac"}, "laplace entropy": {"score": "entropy"}}.get(case, {})
        estimator = LaplacianUncertainty(model, **options)
        for _ in range(3):
            estimator.update_fisher(data, targets)
        run = estimator.estimate if case == "laplace.estimate" else estimator.estimate_uncertainty
        run = (lambda method: lambda: method(data))(run)
    elif case.startswith("mc_dropout"):
        estimator = MCDropoutUncertainty(model, n_samples=10)
        run = lambda: estimator.estimate_uncertainty(data)  # noqa: E731
    else:
        estimator = EnsembleUncertainty(model, n_ensemble=3)
        estimator.train_ensemble(data, targets)
        run = lambda: estimator.estimate_uncertainty(data)  # noqa: E731
    run()  # warm-up outside the timed rounds
    bench(run, device=device, rounds=10 if QUICK else 30)

    def forward():
        with torch.no_grad():
            return model(data)

    bench.benchmark.extra_info.update(peer=case, relative_to_forward=round(_alternating_ratio(run, forward, device, 5 if QUICK else 15), 3))
