"""aql.uncertainty on toy problems whose truth is known, against independent float64 computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aql.uncertainty import (EnsembleUncertainty, LaplacianUncertainty, MCDropoutUncertainty, UncertaintyEstimator,
                             shrink_model)



@pytest.fixture(autouse=True)
def _one_thread():
    """The toy models are tiny: with two OpenMP threads on a busy 2-core machine, 200 Adam steps of
    a 2-32-32-3 MLP took 9.8 s against 0.2 s with one thread (measured on the CI-class machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- toy problems ---------------------------------------------------------------------------------
CENTRES = torch.tensor([[0.0, 2.0], [-2.0, -1.0], [2.0, -1.0]])


def blobs(n_per_class: int, std: float = 0.5, centres: torch.Tensor = CENTRES):
    x = torch.cat([c + std * torch.randn(n_per_class, 2) for c in centres])
    y = torch.arange(len(centres)).repeat_interleave(n_per_class)
    return x, y


def far_points(n: int, radius: tuple[float, float] = (8.0, 12.0)):
    """Points far outside the training data (out of distribution)."""
    angle = torch.rand(n) * 2 * math.pi
    r = radius[0] + (radius[1] - radius[0]) * torch.rand(n)
    return torch.stack([r * angle.cos(), r * angle.sin()], dim=1)


def mlp(width: int = 32, classes: int = 3, dropout: float = 0.0) -> nn.Sequential:
    layers = [nn.Linear(2, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(width, classes))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 200, lr: float = 1e-2) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U), ties counted as half."""
    values = torch.cat([positive, negative]).double()
    unique, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    last_rank = counts.cumsum(0).double()
    average_rank = last_rank - (counts.double() - 1) / 2  # 1-based mean rank of each tie group
    ranks = average_rank[inverse]
    n_pos, n_neg = positive.numel(), negative.numel()
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def test_auroc_helper_on_known_cases():
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])) == 0.5
    assert auroc(torch.tensor([1.0, 3.0]), torch.tensor([2.0])) == 0.5


# ---- Laplace ----------------------------------------------------------------------------------------
def _fit_laplace(model, x, y, updates=20, batch=64, decay=0.9, **options):
    options = {"method": "diagonal", "params": "all", **options}
    estimator = LaplacianUncertainty(model, ema_decay=decay, prior_precision=1.0, **options)
    for _ in range(updates):
        index = torch.randint(0, x.shape[0], (batch,))
        estimator.update_fisher(x[index], y[index])
    return estimator


def test_the_fisher_not_the_prior_separates_points_off_the_data():
    # The head sees the inputs themselves: training data span the first two dimensions, the far
    # points are the same points moved to the last two (same norms). With the prior alone the
    # epistemic score is a function of the input's norm, so it cannot tell the two sets apart (AUROC
    # exactly 0.5: equal scores pair by pair); only a Fisher accumulated from the data's gradients,
    # which shrinks the variance of the weights the data excite and of no others, separates them.
    x2, y = blobs(200)
    x = torch.cat([x2, torch.zeros(x2.shape[0], 2)], dim=1)
    model = nn.Linear(4, 3)
    fitted = _fit_laplace(model, x, y)
    prior_only = LaplacianUncertainty(model, ema_decay=0.9, prior_precision=1.0, method="diagonal")
    inside2, _ = blobs(100)
    inside = torch.cat([inside2, torch.zeros(300, 2)], dim=1)
    outside = torch.cat([torch.zeros(300, 2), inside2], dim=1)
    result_inside = fitted.estimate(inside)
    assert result_inside.epistemic.dtype == torch.float32 and result_inside.epistemic.shape == (300,)
    assert auroc(prior_only.estimate(outside).epistemic, prior_only.estimate(inside).epistemic) == pytest.approx(0.5, abs=1e-3)
    score = auroc(fitted.estimate(outside).epistemic, result_inside.epistemic)
    assert score > 0.95, f"AUROC of the Fisher-informed epistemic score, off-data vs inside: {score:.3f}"


def test_entropy_peaks_at_the_decision_boundary():
    centres = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])  # the Bayes boundary is x = 0
    x, y = blobs(300, std=0.8, centres=centres)
    model = train(mlp(classes=2), x, y)
    estimator = LaplacianUncertainty(model, score="entropy")
    line = torch.stack([torch.linspace(-3, 3, 601), torch.zeros(601)], dim=1)
    entropy = estimator.estimate_uncertainty(line)
    peak = line[entropy.argmax(), 0].item()
    assert abs(peak) <= 0.5, f"entropy peaks at x = {peak}, the boundary is at 0"
    assert entropy.max() > 0.6 and entropy[0] < 0.2 and entropy[-1] < 0.2  # ln 2 = 0.693 at the boundary
    # estimate() yields the same entropy from the same single pass
    torch.testing.assert_close(estimator.estimate(line).entropy, entropy)


def _reference_ema(fisher64, grads, decay, scale):
    return [f if g is None else decay * f + (1 - decay) * (scale * g.double()) ** 2 for f, g in zip(fisher64, grads)]


def test_update_fisher_equals_a_foreach_ema_and_leaves_grad_alone():
    x, y = blobs(50)
    model = mlp()
    estimator = LaplacianUncertainty(model, ema_decay=0.8, params="all")
    params = [p for p in model.parameters()]
    sentinels = [torch.full_like(p, 7.0) for p in params]
    for p, s in zip(params, sentinels):
        p.grad = s
    expected = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    for batch in (17, 64, 5, 150, 33):
        index = torch.randint(0, x.shape[0], (batch,))
        grads = torch.autograd.grad(F.cross_entropy(model(x[index]), y[index]), params)
        expected = [e.clone() for e in expected]
        torch._foreach_mul_(expected, 0.8)
        scaled = [math.sqrt(batch) * g.double() for g in grads]
        torch._foreach_addcmul_(expected, scaled, scaled, value=0.2)
        estimator.update_fisher(x[index], y[index])
    for actual, wanted in zip(estimator.fisher, expected):
        torch.testing.assert_close(actual.double(), wanted, rtol=1e-5, atol=1e-9)
    for p, s in zip(params, sentinels):
        assert p.grad is s and torch.all(s == 7.0)
    assert estimator.updates == 5 and estimator.samples_seen == 17 + 64 + 5 + 150 + 33


def test_update_from_grads_reads_grad_and_counts_accumulated_rows():
    x, y = blobs(40)
    model = mlp()
    estimator = LaplacianUncertainty(model, ema_decay=0.5, params="all")
    params = list(model.parameters())
    expected = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    for step in range(3):
        model.zero_grad(set_to_none=True)
        first, second = torch.randint(0, 120, (24,)), torch.randint(0, 120, (8,))
        # gradient accumulation of two micro-batches, as a trainer does it: mean over 32 rows overall
        (F.cross_entropy(model(x[first]), y[first], reduction="sum") / 32).backward()
        (F.cross_entropy(model(x[second]), y[second], reduction="sum") / 32).backward()
        with torch.no_grad():
            model(x[:5])  # an evaluation forward does not count
        expected = _reference_ema(expected, [p.grad for p in params], 0.5, math.sqrt(32))
        estimator.update_from_grads()
    for actual, wanted in zip(estimator.fisher, expected):
        torch.testing.assert_close(actual.double(), wanted, rtol=1e-5, atol=1e-9)
    # rows of a step whose gradients were dropped by zero_grad(set_to_none=True) do not count
    model(x[:50]).sum().backward()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x[:12]), y[:12]).backward()
    expected = _reference_ema(expected, [p.grad for p in params], 0.5, math.sqrt(12))
    estimator.update_from_grads()
    # explicit batch size and a sum-reduced, loss-scaled backward
    model.zero_grad(set_to_none=True)
    (F.cross_entropy(model(x[:10]), y[:10], reduction="sum") * 128.0).backward()
    expected = _reference_ema(expected, [p.grad for p in params], 0.5, 1 / math.sqrt(10) / 128.0)
    estimator.update_from_grads(10, reduction="sum", loss_scale=128.0)
    for actual, wanted in zip(estimator.fisher, expected):
        torch.testing.assert_close(actual.double(), wanted, rtol=1e-5, atol=1e-9)


def test_per_step_update_path_matches_the_public_one_and_follows_a_dtype_change():
    # update_from_grads(check=False), a training loop's per-step path, skips the argument checks; the
    # Fisher must be the same, and a changed parameter layout must still reach fisher_ema_'s checks.
    x, y = blobs(30)
    model = mlp()
    lean, public = (LaplacianUncertainty(model, ema_decay=0.8, params="all"),
                    LaplacianUncertainty(model, ema_decay=0.8, params="all"))
    params = list(model.parameters())
    expected = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    for step in range(4):
        model.zero_grad(set_to_none=True)
        rows = torch.randint(0, 90, (int(torch.randint(5, 40, ())),))
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        expected = _reference_ema(expected, [p.grad for p in params], 0.8, math.sqrt(rows.numel()))
        lean.update_from_grads(rows.numel(), check=False)
        public.update_from_grads(rows.numel())
    for mine, theirs, wanted in zip(lean.fisher, public.fisher, expected):
        torch.testing.assert_close(mine.double(), wanted, rtol=1e-5, atol=1e-9)
        assert torch.equal(mine, theirs)
    assert lean.updates == 4 and lean.samples_seen == public.samples_seen
    # half precision parameters: the Fisher stays float32 and keeps following the squared gradients
    model.to(torch.bfloat16)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x[:8].bfloat16()).float(), y[:8]).backward()
    expected = _reference_ema(expected, [p.grad.double() for p in params], 0.8, math.sqrt(8))
    lean.update_from_grads(8, check=False)
    for mine, wanted in zip(lean.fisher, expected):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine.double(), wanted, rtol=1e-5, atol=1e-9)
    # float64 parameters: fisher_ema_ rejects their gradients, naming the argument
    model.double()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x[:8].double()), y[:8]).backward()
    with pytest.raises(TypeError, match=r"fisher_ema_: grads\[0\] must have dtype"):
        lean.update_from_grads(8, check=False)
    assert lean.updates == 5


def test_epistemic_matches_the_float64_formula_with_bias():
    x, y = blobs(60)
    model = train(mlp(width=16), x, y, steps=50)
    estimator = _fit_laplace(model, x, y, updates=4, batch=32, decay=0.7)
    estimator.prior_precision = 0.5
    estimator._cache = None  # the prior changed: drop the cached factors
    data = torch.cat([blobs(10)[0], far_points(10)])
    result = estimator.estimate(data)
    with torch.no_grad():
        h = model[:-1](data).double()
    weight = estimator.samples_seen / (1 - 0.7 ** 4)
    fisher_w, fisher_b = estimator.fisher[-2].double(), estimator.fisher[-1].double()
    s = (1 / (weight * fisher_w + 0.5)).sum(dim=0)
    s_b = (1 / (weight * fisher_b + 0.5)).sum()
    torch.testing.assert_close(result.epistemic.double(), (h * h) @ s + s_b, rtol=1e-5, atol=1e-6)
    # the scores are those of one pass: softmax statistics of the model's logits
    with torch.no_grad():
        probs = torch.softmax(model(data).double(), dim=1)
    torch.testing.assert_close(result.entropy.double(), -(probs * probs.log()).sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.scores.maxprob.double(), probs.max(1).values, rtol=1e-5, atol=1e-6)


def test_epistemic_before_any_update_is_the_prior():
    model = mlp(width=8)
    estimator = LaplacianUncertainty(model, prior_precision=2.0, method="diagonal")
    data = torch.randn(5, 2)
    with torch.no_grad():
        h = model[:-1](data).double()
    expected = (h * h).sum(1) * 3 / 2.0 + 3 / 2.0
    torch.testing.assert_close(estimator.estimate(data).epistemic.double(), expected, rtol=1e-5, atol=1e-6)


def test_laplace_state_dict_round_trip():
    x, y = blobs(30)
    model = train(mlp(), x, y, steps=30)
    estimator = _fit_laplace(model, x, y, updates=3, batch=16, method="mahalanobis", params="head", layers="all")
    restored = LaplacianUncertainty(model, ema_decay=0.9, layers="all")
    restored.load_state_dict(estimator.state_dict())
    data = far_points(7)
    torch.testing.assert_close(restored.estimate(data).epistemic, estimator.estimate(data).epistemic)
    assert restored.updates == 3 and restored.samples_seen == 48


def test_default_head_is_the_last_linear_and_a_head_can_be_given():
    model = mlp()
    assert LaplacianUncertainty(model).head is model[-1]
    assert LaplacianUncertainty(model, head=model[2]).head is model[2]


# ---- the statistics of the training forward and the scores read from them ---------------------------
def _train_with_statistics(model, estimators, x, y, steps=60, batch=64, lr=1e-2):
    """A plain training loop: each estimator reads the step's own forward and gradients."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        index = torch.randint(0, x.shape[0], (batch,))
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[index]), y[index]).backward()
        for estimator in estimators:
            estimator.update_from_grads()
        optimizer.step()
    return model


def test_the_default_score_beats_the_prior_alone_where_the_norm_cannot_tell():
    # Training inputs span the first two dimensions; the out-of-distribution points are the same points
    # moved to the last two (same norms). The prior alone (identity curvature: the squared feature
    # norm) is blind here (AUROC 0.5); the statistics of the training forward know that the data never
    # move along the last two dimensions.
    torch.manual_seed(0)
    x2, y = blobs(200)
    x = torch.cat([x2, torch.zeros(x2.shape[0], 2)], dim=1)
    model = nn.Linear(4, 3)
    shipped, kfac = LaplacianUncertainty(model), LaplacianUncertainty(model, method="kfac")
    prior_only = LaplacianUncertainty(model, method="prior")
    _train_with_statistics(model, [shipped, kfac, prior_only], x, y)
    inside2, _ = blobs(100)
    inside = torch.cat([inside2, torch.zeros(300, 2)], dim=1)
    outside = torch.cat([torch.zeros(300, 2), inside2], dim=1)
    assert auroc(prior_only.estimate_uncertainty(outside), prior_only.estimate_uncertainty(inside)) == pytest.approx(0.5, abs=1e-3)
    for estimator, wanted in ((shipped, 0.95), (kfac, 0.85)):  # measured: 1.000 and 0.923
        scores = estimator.estimate_uncertainty(inside)
        assert scores.dtype == torch.float32 and scores.shape == (300,)
        value = auroc(estimator.estimate_uncertainty(outside), scores)
        assert value > wanted, f"{estimator.method}: AUROC off-data vs inside {value:.3f}"


def _exact_statistics(model, layer, x):
    """float64 A = E[h~ h~^T], E[p h~^T] of `layer`'s input and G = E[diag p - p p^T] of the model's output."""
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        p = torch.softmax(model(x).double(), 1)
    handle.remove()
    h1 = torch.cat([seen[0].double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    rows = x.shape[0]
    return h1.T @ h1 / rows, p.T @ h1 / rows, torch.diag(p.mean(0)) - p.T @ p / rows


@pytest.mark.parametrize("rank", [None, 5])
def test_density_score_equals_a_float64_brute_force(rank):
    torch.manual_seed(1)
    x, y = blobs(80)
    model = train(mlp(width=12), x, y, steps=40)
    # feature_decay=0: the statistics are those of the last update's batch exactly
    estimator = LaplacianUncertainty(model, layers="all", rank=rank, feature_decay=0.0, shrinkage=1e-2)
    estimator.update_fisher(x, y)
    data = torch.cat([blobs(5)[0], far_points(6)])
    total = torch.zeros(data.shape[0], dtype=torch.float64)
    for layer in (model[0], model[2], model[4]):
        moment, sums, _ = _exact_statistics(model, layer, x)
        d = layer.in_features
        mass = sums[:, d]
        means = sums[:, :d] / mass[:, None]
        covariance = moment[:d, :d] - (means.T * mass) @ means
        lam, u = torch.linalg.eigh(covariance)
        lam, u = lam.flip(0).clamp_min(0), u.flip(1)
        w = 1 / (lam + 1e-2 * lam.mean())
        if rank is not None and rank < d:
            w = torch.cat([w[:rank], w[rank:].mean().expand(d - rank)])  # the documented isotropic rest
        precision = u @ torch.diag(w) @ u.T
        seen = []
        handle = layer.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().double()))
        with torch.no_grad():
            model(data)
        handle.remove()
        centred = seen[0][:, None, :] - means[None]  # [N, K, d]
        distances = torch.einsum("nkd,de,nke->nk", centred, precision, centred).min(1).values
        total += distances / d
    # float32 against float64: the truncated form adds and subtracts terms weighted by the large tail
    # weight (1e-3 relative measured); a wrong sign or weight is off by O(1)
    tolerance = 2e-4 if rank is None else 5e-3
    torch.testing.assert_close(estimator.estimate_uncertainty(data).double(), total, rtol=tolerance, atol=1e-4)


def test_kfac_variance_equals_the_kronecker_posterior_in_float64():
    torch.manual_seed(2)
    x, y = blobs(40)
    model = train(mlp(width=6), x, y, steps=40)
    estimator = LaplacianUncertainty(model, method="kfac", rank=None, feature_decay=0.0, prior_precision=0.7,
                                     dataset_size=500)
    estimator.update_fisher(x, y)
    head = model[-1]
    moment, _, curvature = _exact_statistics(model, head, x)
    torch.testing.assert_close(estimator.feature_moments[-1].double(), moment, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(estimator.output_curvature.double(), curvature, rtol=1e-5, atol=1e-6)
    # the Gaussian posterior over the head's [K, d+1] weights (bias as the last column), row-major:
    # precision = n G (x) A + tau I, and f = W~ h~ has Cov f = (I (x) h~^T) Sigma (I (x) h~)
    precision = 500 * torch.kron(curvature, moment) + 0.7 * torch.eye(3 * 7, dtype=torch.float64)
    sigma = torch.linalg.inv(precision)
    data = torch.cat([blobs(4)[0], far_points(4)])
    with torch.no_grad():
        h = model[:-1](data).double()
    h1 = torch.cat([h, torch.ones(h.shape[0], 1, dtype=torch.float64)], 1)
    jacobians = torch.stack([torch.kron(torch.eye(3, dtype=torch.float64), row[None]) for row in h1])  # [N, K, K(d+1)]
    expected = torch.einsum("nka,ab,nkb->n", jacobians, sigma, jacobians)
    torch.testing.assert_close(estimator.estimate_uncertainty(data).double(), expected, rtol=1e-4, atol=1e-6)
    # the fitted prior is MacKay's fixed point tau = gamma(tau) / |theta|^2 of the same curvature
    estimator.prior_precision = "auto"
    estimator._cache = None
    tau = estimator.prior().double()
    eigenvalues = 500 * torch.kron(torch.linalg.eigvalsh(curvature).clamp_min(0), torch.linalg.eigvalsh(moment).clamp_min(0))
    theta = head.weight.detach().double().square().sum() + head.bias.detach().double().square().sum()
    torch.testing.assert_close(tau, (eigenvalues / (eigenvalues + tau)).sum() / theta, rtol=1e-3, atol=0)


def test_statistics_of_a_dropout_forward_are_those_of_the_evaluation_forward():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    x = torch.randn(20000, 2)
    estimator = LaplacianUncertainty(model, layers="head", feature_decay=0.0)
    model.train()
    F.cross_entropy(model(x), torch.zeros(20000, dtype=torch.long)).backward()
    estimator.update_from_grads()
    model.eval()
    moment, _, _ = _exact_statistics(model, model[-1], x)
    # without the correction the diagonal comes out 1 / (1 - 0.5) = 2x too large
    torch.testing.assert_close(estimator.feature_moments[-1].double().diagonal(), moment.diagonal(), rtol=0.03, atol=1e-3)


def test_a_non_finite_step_leaves_the_statistics_alone():
    model = mlp(width=8)
    estimator = LaplacianUncertainty(model, layers="all")
    x, y = blobs(10)
    F.cross_entropy(model(x), y).backward()
    estimator.update_from_grads()
    before = [t.clone() for t in (*estimator.feature_moments, *estimator.class_sums, estimator.output_curvature)]
    model.zero_grad(set_to_none=True)
    bad = x.clone()
    bad[3, 0] = float("nan")
    F.cross_entropy(model(bad), y).backward()
    estimator.update_from_grads()
    after = (*estimator.feature_moments, *estimator.class_sums, estimator.output_curvature)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert torch.isfinite(estimator.estimate_uncertainty(x)).all()


def test_without_classes_the_density_is_one_gaussian():
    torch.manual_seed(4)
    x, y = blobs(60)
    model = train(mlp(width=6), x, y, steps=30)
    estimator = LaplacianUncertainty(model, layers="head", rank=None, feature_decay=0.0, class_conditional=False,
                                     shrinkage=1e-2)
    assert LaplacianUncertainty(model).class_conditional  # 3 classes: per-class means by default
    estimator.update_fisher(x, y)
    assert estimator.class_sums[0].shape == (1, 7)
    with torch.no_grad():
        h = model[:-1](x).double()
        data = torch.cat([blobs(3)[0], far_points(3)])
        g = model[:-1](data).double()
    mean = h.mean(0)
    covariance = (h - mean).T @ (h - mean) / h.shape[0]
    precision = torch.linalg.inv(covariance + 1e-2 * torch.linalg.eigvalsh(covariance).clamp_min(0).mean() * torch.eye(6, dtype=torch.float64))
    expected = torch.einsum("nd,de,ne->n", g - mean, precision, g - mean) / 6
    torch.testing.assert_close(estimator.estimate_uncertainty(data).double(), expected, rtol=2e-4, atol=1e-4)


def test_head_params_keep_the_fisher_of_the_head_only_and_outputs_with_logits_are_read():
    class Output:
        def __init__(self, logits):
            self.logits = logits

    class Wrapped(nn.Module):  # a Hugging Face style model: returns an object with .logits
        def __init__(self):
            super().__init__()
            self.body = mlp(width=8)

        def forward(self, x):
            return Output(self.body(x))

    model = Wrapped()
    estimator = LaplacianUncertainty(model)
    assert [f.shape for f in estimator.fisher] == [(3, 8), (3,)]
    assert LaplacianUncertainty(model, params="all").fisher[0].shape == (8, 2)
    x, y = blobs(10)
    estimator.update_fisher(x, y)
    result = estimator.estimate(x)
    assert result.epistemic.shape == (30,) and torch.isfinite(result.epistemic).all()


# ---- MC dropout -------------------------------------------------------------------------------------
def _dropout_model():
    return nn.Sequential(nn.Linear(2, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 32), nn.ReLU(),
                         nn.Dropout(0.3), nn.Linear(32, 4))


def _naive_mc(model, data, n, chunk):
    """The design document's loop, in float64, chunk by chunk with the passes in the same order."""
    for module in model.modules():
        module.training = isinstance(module, nn.Dropout)
    entropies, informations = [], []
    for part in data.split(chunk):
        probs = [torch.softmax(model(part).double(), dim=1) for _ in range(n)]
        mean = torch.stack(probs).mean(0)
        predictive = -(mean * mean.log()).sum(1)
        expected_entropy = torch.stack([-(p * p.log()).sum(1) for p in probs]).mean(0)
        entropies.append(predictive)
        informations.append(predictive - expected_entropy)
    return torch.cat(entropies), torch.cat(informations)


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_mc_dropout_equals_a_naive_loop_and_restores_modes(chunk_size):
    model = _dropout_model()
    model.train()
    model[4].eval()  # a mix of modes that must come back as it was
    modes = [m.training for m in model.modules()]
    running_mean = model[1].running_mean.clone()
    data = torch.randn(23, 2) * 3
    estimator = MCDropoutUncertainty(model, n_samples=6, chunk_size=chunk_size, score="bald")
    torch.manual_seed(1234)
    result = estimator.estimate(data)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[1].running_mean, running_mean), "batch norm ran in training mode"
    torch.manual_seed(1234)
    with torch.no_grad():
        entropy, information = _naive_mc(model, data, 6, chunk_size or data.shape[0])
    torch.testing.assert_close(result.entropy.double(), entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.mutual_information.double(), information.clamp_min(0), rtol=1e-4, atol=1e-6)
    assert result.mutual_information.max() > 1e-3  # the passes do differ
    torch.manual_seed(1234)
    torch.testing.assert_close(estimator.estimate_uncertainty(data), result.mutual_information)


# ---- ensemble ---------------------------------------------------------------------------------------
def test_distillation_lowers_the_students_kl():
    x, y = blobs(100)
    teacher = train(mlp(width=64), x, y, steps=100)
    ensemble = EnsembleUncertainty(teacher, n_ensemble=3, temperature=2.0, lr=1e-2)
    before = ensemble.distillation_loss(x)
    losses = [ensemble.train_ensemble(x, y) for _ in range(60)]
    after = ensemble.distillation_loss(x)
    assert after < 0.3 * before, f"KL {before.item():.4f} -> {after.item():.4f}"
    # the loss is T^2 * KL(teacher || student), checked in float64 for one student
    with torch.no_grad():
        t = torch.log_softmax(teacher(x).double() / 2, 1)
        kls = [(t.exp() * (t - torch.log_softmax(s(x).double() / 2, 1))).sum(1).mean() * 4 for s in ensemble.students]
    torch.testing.assert_close(after.double(), torch.stack(kls).mean(), rtol=1e-4, atol=1e-6)
    assert losses[-1] < losses[0]


def test_ensemble_score_is_the_variance_of_student_probabilities():
    teacher = mlp(width=64)
    ensemble = EnsembleUncertainty(teacher, n_ensemble=4)
    data = torch.randn(9, 2) * 4
    scores = ensemble.estimate_uncertainty(data)
    with torch.no_grad():
        probs = torch.stack([torch.softmax(s(data).double(), 1) for s in ensemble.students])
    torch.testing.assert_close(scores.double(), probs.var(0, correction=0).sum(1), rtol=1e-4, atol=1e-6)
    assert scores.dtype == torch.float32 and scores.shape == (9,)


def test_ensemble_state_dict_round_trip():
    teacher = mlp()
    ensemble = EnsembleUncertainty(teacher, n_ensemble=2)
    ensemble.train_ensemble(torch.randn(16, 2))
    restored = EnsembleUncertainty(teacher, n_ensemble=2)
    restored.load_state_dict(ensemble.state_dict())
    data = torch.randn(5, 2)
    torch.testing.assert_close(restored.estimate_uncertainty(data), ensemble.estimate_uncertainty(data))
    assert restored.steps == 1


def _widths(model):
    return [(m.in_features, m.out_features) if isinstance(m, nn.Linear) else (m.in_channels, m.out_channels)
            for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


def test_default_student_shrinks_hidden_widths_by_four():
    nested = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.LayerNorm(128)),
                           nn.Dropout(0.1), nn.Linear(128, 10))
    before = {name: p.clone() for name, p in nested.named_parameters()}
    student = shrink_model(nested)
    assert _widths(student) == [(40, 64), (64, 32), (32, 10)]
    assert student(torch.randn(3, 40)).shape == (3, 10)
    # the model itself is untouched and shares no module or tensor with the student
    assert _widths(nested) == [(40, 256), (256, 128), (128, 10)]
    assert all(torch.equal(p, before[name]) for name, p in nested.named_parameters())
    assert not {id(m) for m in nested.modules()} & {id(m) for m in student.modules()}
    assert not {p.data_ptr() for p in nested.parameters()} & {p.data_ptr() for p in student.parameters()}
    cnn = nn.Sequential(nn.Conv1d(1, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(), nn.Conv1d(32, 32, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(32 * 20, 10))
    student = shrink_model(cnn)
    assert _widths(student) == [(1, 8), (8, 8), (8 * 20, 10)]
    assert student(torch.randn(2, 1, 40)).shape == (2, 10)
    cnn2d = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    assert _widths(shrink_model(cnn2d)) == [(3, 4), (4, 5)]
    # fresh weights: the students differ from each other and from the teacher
    ensemble = EnsembleUncertainty(nested, n_ensemble=2)
    assert not torch.equal(ensemble.students[0][0].weight, ensemble.students[1][0].weight)


def test_unsupported_models_ask_for_a_factory():
    with pytest.raises(ValueError, match=r"cannot shrink 0 \(GRU\).*pass student_factory="):
        shrink_model(nn.Sequential(nn.GRU(4, 8), nn.Linear(8, 2)))
    with pytest.raises(ValueError, match=r"has no nn.Linear / nn.Conv1d / nn.Conv2d layer"):
        EnsembleUncertainty(nn.Sequential(nn.ReLU()))
    ensemble = EnsembleUncertainty(mlp(), n_ensemble=2, student_factory=lambda: mlp(width=4))
    assert _widths(ensemble.students[0])[0] == (2, 4)


# ---- bad arguments --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: LaplacianUncertainty("model"), TypeError, r"LaplacianUncertainty.__init__: model must be a torch.nn.Module, got str"),
        (lambda: LaplacianUncertainty(mlp(), ema_decay=1.0), ValueError, r"ema_decay must be in \[0.0, 1.0\), got 1.0"),
        (lambda: LaplacianUncertainty(mlp(), prior_precision=0.0), ValueError, r"prior_precision must be in \(0.0, inf\), got 0.0"),
        (lambda: LaplacianUncertainty(mlp(), head=nn.Linear(2, 2)), ValueError, r"head must be a submodule of model"),
        (lambda: LaplacianUncertainty(mlp(), head=nn.ReLU()), TypeError, r"head must be an nn.Linear, got ReLU"),
        (lambda: LaplacianUncertainty(nn.Sequential(nn.ReLU())), ValueError, r"model has no nn.Linear to use as the head"),
        (lambda: LaplacianUncertainty(mlp(), dataset_size=0), ValueError, r"dataset_size must be >= 1, got 0"),
        (lambda: LaplacianUncertainty(mlp(), method="laplace"), ValueError, r"method must be one of \('mahalanobis', 'kfac', 'diagonal', 'prior'\), got 'laplace'"),
        (lambda: LaplacianUncertainty(mlp(), params="body"), ValueError, r"params must be 'head' or 'all', got 'body'"),
        (lambda: LaplacianUncertainty(mlp(), score="bald"), ValueError, r"score must be 'epistemic' or 'entropy', got 'bald'"),
        (lambda: LaplacianUncertainty(mlp(), rank=0), ValueError, r"rank must be >= 1, got 0"),
        (lambda: LaplacianUncertainty(mlp(), prior_precision="fit"), ValueError, r"prior_precision must be a positive float or 'auto', got 'fit'"),
        (lambda: LaplacianUncertainty(mlp(), layers=[nn.ReLU()]), ValueError, r"layers must be 'first', 'all', 'head' or a non-empty list"),
        (lambda: LaplacianUncertainty(mlp(), layers=[nn.Linear(2, 2)]), ValueError, r"layers must be submodules of model"),
        (lambda: LaplacianUncertainty(mlp(), feature_decay=1.0), ValueError, r"feature_decay must be in \[0.0, 1.0\), got 1.0"),
        (lambda: LaplacianUncertainty(mlp(), class_conditional=1), TypeError, r"class_conditional must be a bool or None, got int"),
        (lambda: MCDropoutUncertainty(mlp()), ValueError, r"model has no dropout module"),
        (lambda: MCDropoutUncertainty(mlp(dropout=0.1), n_samples=0), ValueError, r"n_samples must be >= 1, got 0"),
        (lambda: MCDropoutUncertainty(mlp(dropout=0.1), chunk_size=2.5), TypeError, r"chunk_size must be an int, got float 2.5"),
        (lambda: MCDropoutUncertainty(mlp(dropout=0.1), score="var"), ValueError, r"score must be 'entropy' or 'bald', got 'var'"),
        (lambda: EnsembleUncertainty(mlp(), n_ensemble=1), ValueError, r"n_ensemble must be >= 2, got 1"),
        (lambda: EnsembleUncertainty(mlp(), temperature=-1.0), ValueError, r"temperature must be in \(0.0, inf\), got -1.0"),
        (lambda: EnsembleUncertainty(mlp(), student_factory=3), TypeError, r"student_factory must be callable, got int"),
        (lambda: EnsembleUncertainty(mlp(), student_factory=lambda: "x"), TypeError, r"must return an nn.Module, got str"),
    ],
)
def test_bad_constructor_arguments(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_bad_call_arguments():
    model = mlp()
    laplace = LaplacianUncertainty(model)
    with pytest.raises(ValueError, match=r"update_from_grads: no rows went through the head"):
        laplace.update_from_grads()
    F.cross_entropy(model(torch.randn(4, 2)), torch.zeros(4, dtype=torch.long)).backward()
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match=r"update_from_grads: no parameter has a .grad"):
        laplace.update_from_grads()
    with pytest.raises(ValueError, match=r"reduction must be 'mean' or 'sum', got 'max'"):
        laplace.update_from_grads(4, reduction="max")
    with pytest.raises(TypeError, match=r"estimate_uncertainty: data must be a torch.Tensor, got list"):
        laplace.estimate_uncertainty([[0.0, 1.0]])
    with pytest.raises(ValueError, match=r"estimate: data must have a non-empty first \(batch\) dimension, got shape \(0, 2\)"):
        laplace.estimate(torch.zeros(0, 2))
    with pytest.raises(ValueError, match=r"targets must have one class per logits row \(4\), got shape \(3,\)"):
        laplace.update_fisher(torch.randn(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"targets must be int64 or int32 class indices, got torch.float32"):
        laplace.update_fisher(torch.randn(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match=r"fisher\[0\] must have shape \(3, 32\), got \(3,\)"):
        laplace.load_state_dict({"fisher": [torch.zeros(3)] * 2, "updates": 1, "samples_seen": 1})
    with pytest.raises(ValueError, match=r"state lacks \['samples_seen', 'updates'\]"):
        laplace.load_state_dict({"fisher": []})
    ensemble = EnsembleUncertainty(model, n_ensemble=2)
    with pytest.raises(ValueError, match=r"students must be a list of 2 state dicts, got 3"):
        ensemble.load_state_dict({"students": [{}, {}, {}]})


def test_every_estimator_is_an_uncertainty_estimator():
    model = mlp(dropout=0.2)
    for estimator in (LaplacianUncertainty(model), MCDropoutUncertainty(model, n_samples=2), EnsembleUncertainty(model)):
        assert isinstance(estimator, UncertaintyEstimator)
        scores = estimator.estimate_uncertainty(torch.randn(6, 2))
        assert scores.dtype == torch.float32 and scores.shape == (6,) and torch.isfinite(scores).all()


def test_density_statistics_resume_from_a_state_dict_and_keep_folding_alike():
    """The moments and class sums live in one buffer per layer (one product per step): a state loaded
    into a fresh estimator must land in that buffer, so that both go on folding the same steps alike."""
    torch.manual_seed(5)
    x, y = blobs(30)
    model = mlp(width=6)
    first = LaplacianUncertainty(model, layers="all")
    for _ in range(2):
        F.cross_entropy(model(x), y).backward()
        first.update_from_grads()
        model.zero_grad(set_to_none=True)
    state = {k: [t.clone() for t in v] if isinstance(v, list) else v for k, v in first.state_dict().items()}
    first.close()
    second = LaplacianUncertainty(model, layers="all")
    second.load_state_dict(state)
    third = LaplacianUncertainty(model, layers="all", feature_decay=first.feature_decay)
    third.load_state_dict(state)
    for estimator in (second, third):
        F.cross_entropy(model(x[:17]), y[:17]).backward()
        estimator.update_from_grads()
        model.zero_grad(set_to_none=True)
    for a, b, old in zip((*second.feature_moments, *second.class_sums), (*third.feature_moments, *third.class_sums),
                         (*state["feature_moments"], *state["class_sums"])):
        if a.numel():
            assert torch.equal(a, b) and not torch.equal(a, old)  # both folded the step, from the loaded state
    # the reference: the EMA of the loaded moments and this step's, computed apart in float64
    with torch.no_grad():
        h = model[:-1](x[:17]).double()
    h1 = torch.cat([h, torch.ones(17, 1, dtype=torch.float64)], 1)
    decay = second.feature_decay
    expected = decay * state["feature_moments"][-1].double() + (1 - decay) * h1.T @ h1 / 17
    torch.testing.assert_close(second.feature_moments[-1].double(), expected, rtol=1e-5, atol=1e-6)
