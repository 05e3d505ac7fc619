"""The selection study's strategies (`online`, `ranked`, `meta`) and the key rules they share:
exact against independent references, budget held exactly, deterministic, resumable."""

import math

import numpy as np
import pytest
import torch

import aql_kernels
from aql.data import IndexedTensorDataset
from aql.strategies import STRATEGIES, _keys
from aql.strategies.base import split_selection
from aql.strategies.irreducible import irreducible_losses
from aql.strategies.meta import MetaSelection
from aql.strategies.online import OnlineSelection
from aql.strategies.ranked import RankedSelection


def _scores(n, generator, *, classes=10):
    logits = torch.randn(n, classes, generator=generator) * 3
    targets = torch.randint(0, classes, (n,), generator=generator)
    return aql_kernels.softmax_scores(logits, targets), targets


# ------------------------------------------------------------------------------------------ keys
def _balanced_reference(keys: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Independent: fractional within-class rank (key descending, NaN last, ties by index), then the k
    smallest fractions, ties by index."""
    keys = np.where(np.isnan(keys), -np.inf, keys)
    frac = np.empty(len(keys))
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        order = rows[np.lexsort((rows, -keys[rows]))]
        frac[order] = (np.arange(len(order)) + 0.5) / len(order)
    chosen = np.lexsort((np.arange(len(keys)), frac))[:k]
    return np.sort(chosen)


@pytest.mark.parametrize("case", ["random", "ties", "nan", "skewed"])
def test_balanced_keys_match_reference(case):
    g = torch.Generator().manual_seed(hash(case) % 1000)
    n, classes = 997, 7
    keys = torch.randn(n, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    if case == "ties":
        keys = torch.randint(0, 3, (n,), generator=g).float()
    if case == "nan":
        keys[::5] = float("nan")
        keys[1::7] = -float("inf")
    if case == "skewed":
        labels = torch.where(torch.rand(n, generator=g) < 0.8, 0, labels)
    for k in (0, 1, 199, n):
        got = aql_kernels.topk_indices(_keys.balanced_keys(keys, labels, classes), k)
        np.testing.assert_array_equal(got.numpy(), _balanced_reference(keys.numpy().astype(np.float64), labels.numpy(), k))
    # quotas: every class within two rows of its proportional share
    k = 200
    chosen = aql_kernels.topk_indices(_keys.balanced_keys(keys, labels, classes), k)
    counts = torch.bincount(labels[chosen], minlength=classes).double()
    share = torch.bincount(labels, minlength=classes).double() * k / n
    assert (counts - share).abs().max() < 2.0


def test_sampling_keys_draw_proportionally():
    weights = torch.tensor([0.0, 1.0, 2.0, 5.0, 2.0])
    firsts = torch.zeros(5)
    g = torch.Generator().manual_seed(0)
    draws = 20000
    for _ in range(draws):
        firsts[torch.argmax(_keys.sampling_keys(weights, g))] += 1
    expected = weights / weights.sum()
    assert firsts[0] == 0  # weight zero is never drawn first while others remain
    assert torch.allclose(firsts / draws, expected, atol=0.012)


def test_inclusion_weights_bounded_and_normalised():
    g = torch.Generator().manual_seed(1)
    w = torch.rand(500, generator=g) ** 4
    out = _keys.inclusion_weights(w, 100, 4.0)
    assert math.isclose(float(out.mean()), 1.0, rel_tol=1e-5)
    assert float(out.max() / out.min()) <= 4.0 + 1e-4
    # rarer rows weigh more
    assert float(out[torch.argmin(w)]) >= float(out[torch.argmax(w)])


def test_band_keys_hold_the_band_size():
    g = torch.Generator().manual_seed(2)
    values = torch.randn(640, generator=g)
    for upper in (0.2, 0.5, 1.0):
        keys = _keys.band_keys(values, values, upper)
        inside = torch.isfinite(keys)
        assert int(inside.sum()) == round(upper * 640)
        assert float(values[inside].max()) <= float(values[~inside].min()) if upper < 1 else True


@pytest.mark.parametrize("budget", [0.1, 0.2, 0.37, 1.0])
def test_quota_holds_the_budget_exactly(budget):
    g = torch.Generator().manual_seed(3)
    seen = kept = 0
    for _ in range(50):
        batch = int(torch.randint(1, 700, (1,), generator=g))
        seen += batch
        take = _keys.quota(seen, kept, budget)
        assert 0 <= take <= batch
        kept += take
    assert kept == math.floor(budget * seen + 0.5)


# ------------------------------------------------------------------------------------------ online
def _drive_online(strategy, epochs=2, batch=32, g_seed=0, stop_after=None):
    """A plain loop without a model: fresh random scores per candidate batch; returns the selections."""
    g = torch.Generator().manual_seed(g_seed)
    picked = []
    steps = 0
    for epoch in range(strategy.epoch if hasattr(strategy, "epoch") else 0, epochs):
        plan = strategy.epoch_plan(epoch)
        skip = strategy._seen // strategy.candidate_batch_size(batch) if getattr(strategy, "_seen", 0) else 0
        for indices, _ in strategy.batches(plan, batch, skip=skip):
            scores, _ = _scores(indices.shape[0], g)
            positions, _ = split_selection(strategy.select(indices, scores))
            picked.append(indices[positions])
            strategy.after_step(indices[positions], scores)
            steps += 1
            if stop_after is not None and steps == stop_after:
                return picked
        strategy.end_epoch({})
    return picked


@pytest.mark.parametrize("options", [
    {"score": "loss", "balanced": False},
    {"score": "el2n", "balanced": True},
    {"score": "loss", "pick": "sample", "balanced": False, "importance_weights": True},
    {"score": "margin", "balanced": True, "warmup_epochs": 0.5},
    {"score": "loss", "balanced": True, "curriculum_start": 0.3, "curriculum_epochs": 1.0},
    {"score": "entropy", "order": "random", "curriculum_start": 0.3, "balanced": True},
])
def test_online_budget_exact_and_deterministic(options):
    n = 1000
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(4))
    make = lambda: OnlineSelection(n, query_budget=0.2, seed=5, labels=labels, **options)  # noqa: E731
    a, b = _drive_online(make()), _drive_online(make())
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    per_epoch = sum(p.numel() for p in a) / 2
    assert per_epoch == 200  # floor(0.2 * 1000 + 1/2) every epoch
    for epoch_picks in (torch.cat(a[: len(a) // 2]),):
        assert epoch_picks.unique().numel() == epoch_picks.numel()  # no sample twice in an epoch


def test_online_top_is_the_exact_top_of_the_scores():
    n = 640
    strategy = OnlineSelection(n, query_budget=0.25, seed=0, score="loss", pick="top", balanced=False)
    g = torch.Generator().manual_seed(6)
    plan = strategy.epoch_plan(0)
    indices, _ = next(strategy.batches(plan, 160))
    scores, _ = _scores(indices.shape[0], g)
    scores = scores._replace(loss=torch.where(torch.arange(640) % 3 == 0, float("nan"), scores.loss))
    positions = strategy.select(indices, scores)
    reference = np.lexsort((np.arange(640), -np.nan_to_num(scores.loss.double().numpy(), nan=-np.inf)))[:160]
    np.testing.assert_array_equal(np.sort(positions.numpy()), np.sort(reference))


def test_online_balanced_never_collapses_onto_classes():
    n = 1000
    labels = torch.arange(n) % 10
    strategy = OnlineSelection(n, query_budget=0.2, seed=0, labels=labels, score="loss", pick="top", balanced=True)
    plan = strategy.epoch_plan(0)
    for indices, _ in strategy.batches(plan, 20):
        # the loss is high only for class 0: a plain top-loss rule would keep class 0 alone
        loss = torch.where(labels[indices] == 0, 10.0, 0.1) + 0.01 * torch.rand(indices.shape[0])
        scores, _ = _scores(indices.shape[0], torch.Generator().manual_seed(0))
        positions = strategy.select(indices, scores._replace(loss=loss))
        counts = torch.bincount(labels[indices[positions]], minlength=10).double()
        share = torch.bincount(labels[indices], minlength=10).double() * positions.numel() / indices.numel()
        assert float((counts - share).abs().max()) < 2.0


def test_online_resumes_mid_epoch_identically():
    n = 900
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(7))
    options = dict(query_budget=0.2, seed=3, labels=labels, pick="sample", balanced=True)
    full = _drive_online(OnlineSelection(n, **options), epochs=2, batch=30)
    first = OnlineSelection(n, **options)
    head = _drive_online(first, epochs=2, batch=30, stop_after=4)  # 6 candidate batches of 150 per epoch
    state = first.state_dict()
    resumed = OnlineSelection(n, **options)
    resumed.load_state_dict(state)
    # the random scores of the harness restart too: regenerate them from the same stream position
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        _scores(150, g)
    tail = []
    plan = resumed.epoch_plan(resumed.epoch)
    for indices, _ in resumed.batches(plan, 30, skip=4):
        scores, _ = _scores(indices.shape[0], g)
        tail.append(indices[split_selection(resumed.select(indices, scores))[0]])
    resumed.end_epoch({})
    plan = resumed.epoch_plan(1)
    for indices, _ in resumed.batches(plan, 30):
        scores, _ = _scores(indices.shape[0], g)
        tail.append(indices[split_selection(resumed.select(indices, scores))[0]])
    assert len(full) == len(head + tail) == 12
    assert all(torch.equal(x, y) for x, y in zip(full, head + tail))


def test_online_rejects_bad_arguments():
    with pytest.raises(ValueError, match="score must be one of"):
        OnlineSelection(10, score="loss2", balanced=False)
    with pytest.raises(ValueError, match="balanced=True needs labels"):
        OnlineSelection(10)
    with pytest.raises(ValueError, match="score='reducible' needs irreducible"):
        OnlineSelection(10, score="reducible", balanced=False)
    with pytest.raises(ValueError, match="query_budget must be in"):
        OnlineSelection(10, query_budget=0.0, balanced=False)
    with pytest.raises(ValueError, match="labels must have num_samples=10"):
        OnlineSelection(10, labels=torch.zeros(9, dtype=torch.int64))
    with pytest.raises(ValueError, match="pick must be"):
        OnlineSelection(10, pick="best", balanced=False)


# ------------------------------------------------------------------------------------------ ranked
def test_ranked_unseen_first_in_a_seeded_random_order_then_top_scores():
    n = 100
    orders = []
    for seed in (0, 1):
        strategy = RankedSelection(n, query_budget=0.2, seed=seed, balanced=False)
        orders.append(strategy.epoch_plan(0).indices)
    assert not torch.equal(torch.sort(orders[0]).values, torch.sort(orders[1]).values)  # seeds differ from epoch 0
    assert not torch.equal(torch.sort(orders[0]).values, torch.arange(20))  # not the lowest indices
    strategy = RankedSelection(n, query_budget=0.2, seed=0, balanced=False)
    seen = set()
    for epoch in range(5):  # coverage: every sample once over 1 / budget epochs
        plan = strategy.epoch_plan(epoch)
        seen |= set(plan.indices.tolist())
        loss = plan.indices.float()  # score = index
        scores, _ = _scores(plan.indices.numel(), torch.Generator().manual_seed(epoch))
        strategy.after_step(plan.indices, scores._replace(loss=loss))
        strategy.end_epoch({})
    assert seen == set(range(n))
    assert torch.equal(torch.sort(strategy.epoch_plan(5).indices).values, torch.arange(80, 100))


def test_ranked_nan_scores_are_rescored_and_old_scores_age():
    n = 50
    strategy = RankedSelection(n, query_budget=0.2, seed=0, balanced=False, ageing=0.5)
    template, _ = _scores(n, torch.Generator().manual_seed(0))
    loss = torch.linspace(1.0, 2.0, n)
    loss[:5] = float("nan")
    strategy.after_step(torch.arange(n), template._replace(loss=loss))  # epoch 0 writes every sample
    strategy.end_epoch({})
    assert set(range(5)) <= set(strategy.epoch_plan(1).indices.tolist())  # NaN -> never seen -> first
    strategy.end_epoch({})
    # epoch 2: rows 10-14 rewritten with 1.2; rows 40-49 still hold ~1.8-2.0 from epoch 0, aged by
    # 0.5 ** 2 to ~0.45-0.5: the fresh rows outrank them although their raw score is lower
    fresh = torch.arange(10, 15)
    few, _ = _scores(5, torch.Generator().manual_seed(1))
    strategy.epoch = 2
    strategy.after_step(fresh, few._replace(loss=torch.full((5,), 1.2)))
    assert set(fresh.tolist()) <= set(strategy.epoch_plan(2).indices.tolist())
    no_ageing = RankedSelection(n, query_budget=0.2, seed=0, balanced=False, ageing=1.0)
    no_ageing.load_state_dict({**strategy.state_dict(), "plans": {}})
    assert not set(fresh.tolist()) & set(no_ageing.epoch_plan(2).indices.tolist())  # without ageing the old high scores win


def test_ranked_state_round_trip():
    n = 64
    labels = torch.arange(n) % 4
    a = RankedSelection(n, query_budget=0.25, seed=2, labels=labels, exploration=0.25)
    scores, _ = _scores(n, torch.Generator().manual_seed(1))
    a.after_step(torch.arange(n), scores)
    a.end_epoch({})
    b = RankedSelection(n, query_budget=0.25, seed=2, labels=labels, exploration=0.25)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.epoch_plan(1).indices, b.epoch_plan(1).indices)
    assert a.epoch_plan(1).indices.numel() == 16


# ------------------------------------------------------------------------------------------ meta
def test_meta_learns_online_and_holds_the_budget():
    torch.manual_seed(0)
    n = 512
    x = torch.randn(n, 8)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(8, 2)
    holdout = (torch.randn(64, 8), None)
    holdout = (holdout[0], (holdout[0][:, 0] > 0).long())
    strategy = MetaSelection(n, query_budget=0.25, seed=0, model=model, holdout=holdout, labels=y, num_classes=2, epochs=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    kept = 0
    for epoch in range(2):
        plan = strategy.epoch_plan(epoch)
        for indices, _ in strategy.batches(plan, 16):
            with torch.no_grad():
                scores = aql_kernels.softmax_scores(model(x[indices]), y[indices])
            positions = strategy.select(indices, scores)
            chosen = indices[positions]
            kept += chosen.numel()
            loss, s = aql_kernels.cross_entropy_with_scores(model(x[chosen]), y[chosen])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            strategy.after_step(chosen, s)
        strategy.end_epoch({})
    assert kept == 2 * 128
    assert strategy.selector.episodes_trained == 2 * 8
    assert strategy.extra_forwards > 0
    state = strategy.state_dict()
    clone = MetaSelection(n, query_budget=0.25, seed=0, model=model, holdout=holdout, labels=y, num_classes=2, epochs=2)
    clone.load_state_dict(state)
    assert clone.selector.episodes_trained == 16


# ------------------------------------------------------------------------------------------ irreducible
def test_irreducible_losses_flag_noisy_labels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    noisy = y.clone()
    noisy[:50] = 1 - noisy[:50]  # flipped labels: not learnable from a model trained on clean data
    holdout = IndexedTensorDataset(x[300:], y[300:])
    losses = irreducible_losses(IndexedTensorDataset(x[:300], noisy[:300]), holdout, model_factory=lambda: torch.nn.Linear(4, 2), seed=0, epochs=30,
                                learning_rate=0.05, batch_size=64)
    assert losses.shape == (300,) and losses.dtype == torch.float32 and torch.isfinite(losses).all()
    assert float(losses[:50].mean()) > 3 * float(losses[50:].mean())
    again = irreducible_losses(IndexedTensorDataset(x[:300], noisy[:300]), holdout, model_factory=lambda: torch.nn.Linear(4, 2), seed=0, epochs=30,
                               learning_rate=0.05, batch_size=64)
    assert torch.equal(losses, again)
    with pytest.raises(ValueError, match="holdout_data must be a non-empty dataset"):
        irreducible_losses(holdout, IndexedTensorDataset(x[:0], y[:0]), model_factory=lambda: torch.nn.Linear(4, 2))


def test_registered():
    assert {"online", "ranked", "meta"} <= set(STRATEGIES)


# ------------------------------------------------------------------------------------------ in the trainer
@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    from aql.data import mnist1d_datasets

    return mnist1d_datasets(1500, val_fraction=0.1, seed=11, cache_dir=tmp_path_factory.mktemp("mnist1d"))


@pytest.mark.parametrize("strategy, options, stop_step", [
    ("online", {"score": "loss", "balanced": True}, 11),
    ("online", {"score": "el2n", "pick": "sample", "balanced": False, "importance_weights": True}, 7),
    ("online", {"score": "reducible", "balanced": True}, 9),
    ("ranked", {"score": "loss", "balanced": True, "ageing": 0.5}, 13),
    ("meta", {"hidden": 8}, 10),
])
def test_new_strategies_resume_in_the_trainer_like_an_uninterrupted_run(strategy, options, stop_step, mnist, tmp_path, one_thread):
    """The trainer drives each strategy through the protocol alone: it trains at the budget, and an
    interrupted, resumed run repeats the uninterrupted one bit for bit."""
    from tests.aql.test_trainer import _interrupt_at, make_config, make_trainer, record_batches

    sections = {"aql_v2": {"selection_strategy": strategy, "strategy_options": options},
                "training": {"epochs": 3, "batch_size": 16}}
    reference = make_trainer(make_config(tmp_path / "reference", **sections), mnist)
    reference_batches = record_batches(reference)
    result = reference.fit()
    assert result["steps"] > stop_step
    assert result["samples_backpropagated"] == pytest.approx(3 * 0.2 * len(mnist[0]), abs=3)
    interrupted = make_trainer(make_config(tmp_path / "resumed", **sections), mnist, callbacks=[_interrupt_at(stop_step)])
    first = record_batches(interrupted)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    resumed = make_trainer(make_config(tmp_path / "resumed", **sections), mnist, model_seed=1)
    second = record_batches(resumed)
    resumed.fit(resume=True)
    assert len(first + second) == len(reference_batches)
    for (ref_index, ref_x), (index, x) in zip(reference_batches, first + second):
        assert torch.equal(ref_x, x)
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_strategy_options_are_checked_when_the_config_loads(tmp_path):
    from tests.aql.test_trainer import make_config

    from aql.config import ConfigError

    with pytest.raises(ConfigError, match="aql_v2.strategy_options.labels"):
        make_config(tmp_path, aql_v2={"selection_strategy": "online", "strategy_options": {"labels": [1, 2]}})
    with pytest.raises(ConfigError, match="aql_v2.strategy_options.colour"):
        make_config(tmp_path, aql_v2={"selection_strategy": "ranked", "strategy_options": {"colour": 1}})


def test_an_empty_mapping_override_clears_strategy_options(tmp_path):
    from aql.config import ConfigError, load_config

    from pathlib import Path

    demo = Path(__file__).resolve().parents[2] / "configs" / "mnist1d_demo.yaml"
    assert load_config(demo).aql_v2.strategy_options  # the demo's online options
    cleared = load_config(demo, ["aql_v2.selection_strategy=none", "aql_v2.strategy_options={}"])
    assert cleared.aql_v2.strategy_options == {} and cleared.aql_v2.selection_strategy == "none"
    with pytest.raises(ConfigError, match="set one key at a time"):
        load_config(demo, ["aql_v2.strategy_options={score: loss}"])
    with pytest.raises(ConfigError, match="aql_v2.strategy_options.score"):
        load_config(demo, ["aql_v2.selection_strategy=none"])  # online's options are no options of none


def test_curriculum_bands_an_estimator_score_by_its_quantile_whatever_its_scale():
    """`aql_v2.scorer: estimator`: an estimator's score (a density, a variance) has no entropy scale;
    the curriculum bands it by its quantile among the candidates, so the easy band is never empty."""
    from aql.strategies.curriculum import CurriculumStrategy

    n = 400
    huge = torch.linspace(1000.0, 2000.0, n)  # entropy / log(C) would clip every candidate to 1.0
    strategy = CurriculumStrategy(n, num_classes=10, query_budget=0.5, candidate_scorer=lambda idx: huge[idx])
    plan = strategy.epoch_plan(0)
    indices, _ = next(strategy.batches(plan, 40))
    scores, _ = _scores(indices.shape[0], torch.Generator().manual_seed(0))
    positions = strategy.select(indices, scores)
    assert positions.numel() > 0
    kept = huge[indices[positions]]
    threshold = torch.quantile(huge[indices], 0.3)
    assert bool((kept <= threshold + 1e-3).all())  # stage 0's band: the easiest 30% of the candidates


def test_online_sampling_survives_a_nan_score():
    """A NaN score (a diverged row) is drawn last; the other rows keep their score-proportional draw."""
    n = 640
    strategy = OnlineSelection(n, query_budget=0.25, seed=0, score="loss", pick="sample", balanced=False, smoothing=0.0)
    indices, _ = next(strategy.batches(strategy.epoch_plan(0), 160))
    scores, _ = _scores(indices.shape[0], torch.Generator().manual_seed(3))
    loss = torch.full((640,), 0.01)
    loss[:100] = 50.0  # a hundred rows carry almost all of the weight
    loss[100] = float("nan")
    positions = strategy.select(indices, scores._replace(loss=loss))
    assert positions.numel() == 160 and 100 not in positions.tolist()
    assert set(range(100)) <= set(positions.tolist())
