"""The five built-in selection strategies driven from a plain training loop (no trainer), as in
`aql.strategies.base`'s docstring; the registry, and `aql_v2.strategy_options`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aql_kernels
from aql.config import ConfigError, config_from_dict
from aql.strategies import (STRATEGIES, AllDataStrategy, CurriculumStrategy, RandomStrategy, SelectionStrategy, StaleStrategy,
                            StreamingStrategy, StrategyContext, build_strategy, register_strategy)
from aql.strategies.base import split_selection

N, FEATURES, CLASSES = 300, 8, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_data(seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, FEATURES, generator=generator) * 2
    targets = torch.randint(0, CLASSES, (N,), generator=generator)
    inputs = centres[targets] + torch.randn(N, FEATURES, generator=generator)
    return inputs, targets


def run_epoch(strategy, epoch, model, optimizer, inputs, targets, batch_size=20, record=None):
    """One epoch of the loop in aql.strategies.base's docstring; returns the trained indices."""
    trained = []
    plan = strategy.epoch_plan(epoch)
    for indices, weights in strategy.batches(plan, batch_size):
        x, y = inputs[indices], targets[indices]
        if strategy.scores_candidates:
            with torch.no_grad():
                candidate = aql_kernels.softmax_scores(model(x), y)
            kept, kept_weights = split_selection(strategy.select(indices, candidate))
            if record is not None:
                record.append((indices, candidate, kept))
            indices, x, y = indices[kept], x[kept], y[kept]
            weights = kept_weights if weights is None else weights[kept]
            if not indices.numel():
                continue
        losses, scores = aql_kernels.cross_entropy_with_scores(model(x), y, reduction="none")
        loss = losses.mean() if weights is None else (losses * weights).sum() / weights.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        strategy.after_step(indices, scores)
        trained.append(indices)
    with torch.no_grad():
        val_loss = float(F.cross_entropy(model(inputs), targets))
    strategy.end_epoch({"val_loss": val_loss})
    return torch.cat(trained) if trained else torch.empty(0, dtype=torch.int64)


def model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Linear(FEATURES, CLASSES)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_none_visits_every_sample_once_per_epoch_in_a_fresh_order():
    inputs, targets = toy_data()
    model, optimizer = model_and_optimizer()
    strategy = AllDataStrategy(N, seed=3)
    epochs = [run_epoch(strategy, e, model, optimizer, inputs, targets) for e in range(2)]
    for trained in epochs:
        assert sorted(trained.tolist()) == list(range(N))
    assert not torch.equal(epochs[0], epochs[1])
    assert torch.equal(strategy.epoch_plan(1).indices, epochs[1])  # the plan is a function of (seed, epoch)
    assert not strategy.uses_scores and strategy.samples_per_epoch == N


def test_random_draws_a_fresh_uniform_budget_share_each_epoch():
    inputs, targets = toy_data()
    model, optimizer = model_and_optimizer()
    strategy = RandomStrategy(N, query_budget=0.25, seed=1)
    epochs = [run_epoch(strategy, e, model, optimizer, inputs, targets) for e in range(3)]
    for trained in epochs:
        assert trained.numel() == 75 and trained.unique().numel() == 75
    assert len(set(epochs[0].tolist()) & set(epochs[1].tolist())) < 40  # independent draws share ~19, not 75
    assert torch.equal(RandomStrategy(N, query_budget=0.25, seed=1).epoch_plan(2).indices, epochs[2])


def test_stale_trains_next_on_the_top_of_the_losses_it_stored():
    inputs, targets = toy_data()
    model, optimizer = model_and_optimizer()
    strategy = StaleStrategy(N, query_budget=0.2, exploration=0.0, seed=2)
    covered = torch.cat([run_epoch(strategy, e, model, optimizer, inputs, targets) for e in range(5)])
    assert sorted(covered.tolist()) == list(range(N))  # never-seen samples first: 5 epochs of 20% cover the data
    stored = strategy.store.scores.clone()
    assert torch.isfinite(stored).all()
    # the scores are the training forward's losses of the samples where they were last trained
    plan = strategy.epoch_plan(5)
    expected = torch.topk(stored, 60).indices
    assert sorted(plan.indices.tolist()) == sorted(expected.tolist()) and plan.weights is None
    # resuming from the state gives the same plan for the running epoch and the same next one
    copy = StaleStrategy(N, query_budget=0.2, exploration=0.0, seed=2)
    copy.load_state_dict(strategy.state_dict())
    assert torch.equal(copy.epoch_plan(5).indices, plan.indices)
    trained = run_epoch(strategy, 5, model, optimizer, inputs, targets)
    assert torch.equal(trained, plan.indices)
    with pytest.raises(ValueError, match="written by strategy 'stale', this is 'streaming'"):
        StreamingStrategy(N).load_state_dict(strategy.state_dict())


def test_stale_importance_weights_ride_in_the_plan():
    strategy = StaleStrategy(N, query_budget=0.2, exploration=0.5, importance_weights=True)
    strategy.store.update(torch.arange(N), torch.rand(N))
    plan = strategy.epoch_plan(0)
    assert plan.weights is not None and float(plan.weights.max()) > 5.0 and float(plan.weights.min()) == 1.0


def test_streaming_keeps_the_top_of_each_candidate_batch_and_about_its_budget():
    inputs, targets = toy_data()
    model, optimizer = model_and_optimizer()
    strategy = StreamingStrategy(N, query_budget=0.2, batch_tolerance=0.0, seed=4)
    record = []
    trained = torch.cat([run_epoch(strategy, e, model, optimizer, inputs, targets, record=record) for e in range(2)])
    assert strategy.candidate_batch_size(20) == 100
    for indices, candidate, kept in record:
        dropped = torch.ones(indices.numel(), dtype=torch.bool)
        dropped[kept] = False
        assert kept.numel() == 20  # tolerance 0: exactly the budget of every batch
        assert float(candidate.loss[kept].min()) >= float(candidate.loss[dropped].max())
    assert trained.numel() == 2 * 60
    copy = StreamingStrategy(N, query_budget=0.2, batch_tolerance=0.0, seed=4)
    copy.load_state_dict(strategy.state_dict())
    assert copy.selector.seen == strategy.selector.seen == 2 * N


def test_streaming_importance_weights_are_the_inverse_keep_rate():
    strategy = StreamingStrategy(100, query_budget=0.2, importance_weights=True)
    candidate = aql_kernels.softmax_scores(torch.randn(50, 5), torch.randint(0, 5, (50,)))
    positions, weights = strategy.select(torch.arange(50), candidate)
    assert weights.shape == positions.shape
    torch.testing.assert_close(weights, torch.full_like(weights, 1.0 / float(strategy.selector.keep_rate)))


def test_curriculum_keeps_in_band_samples_up_to_its_budget_and_advances_on_val_loss():
    inputs, targets = toy_data()
    model, optimizer = model_and_optimizer()
    strategy = CurriculumStrategy(N, num_classes=CLASSES, query_budget=0.2, stage_thresholds=(0.5, 0.9, 1.0),
                                  stage_advance_threshold=0.05)
    record = []
    for epoch in range(3):
        trained = run_epoch(strategy, epoch, model, optimizer, inputs, targets, record=record)
        assert trained.numel() <= strategy.samples_per_epoch == 60
    assert sum(kept.numel() for _, _, kept in record) > 0
    low_high = {0: (0.0, 0.5), 1: (0.5, 0.9), 2: (0.9, 1.0)}
    # end_epoch advances when the validation loss fell enough since the stage's first report
    fresh = CurriculumStrategy(N, num_classes=CLASSES, stage_thresholds=(0.5, 0.9, 1.0), stage_advance_threshold=0.1)
    assert fresh.end_epoch({"val_loss": 2.0}) == {"stage_advanced": False, "training_stage": 0}
    assert fresh.end_epoch({"val_loss": 1.7}) == {"stage_advanced": True, "training_stage": 1}
    assert fresh.end_epoch({"val_loss": float("nan")})["stage_advanced"] is False
    low, high = low_high[fresh.training_stage]
    candidates = aql_kernels.softmax_scores(torch.tensor([[9.0, 0, 0, 0], [0.0, 0, 0, 0], [1.0, 0.5, 0, 0], [2.0, 0, 0, 0]]))
    expected = [i for i, d in enumerate((candidates.entropy / math.log(4)).tolist()) if low < d <= high]
    assert fresh.select(torch.arange(4), candidates).tolist() == expected and expected  # stage 1's band (0.5, 0.9]


def test_builtin_strategies_are_registered_and_the_config_accepts_any_registered_name(tmp_path):
    assert {"none", "random", "stale", "streaming", "curriculum"} <= set(STRATEGIES)
    from aql import config as config_module

    assert set(config_module.SELECTION_STRATEGIES) == set(STRATEGIES)

    class EveryOther(SelectionStrategy):
        name = "every_other_test_only"
        uses_scores = False

        def __init__(self, num_samples, *, query_budget=1.0, seed=0, device="cpu", stride: int = 2):
            super().__init__(num_samples, query_budget=query_budget, seed=seed, device=device)
            self.stride = stride

        def epoch_plan(self, epoch):
            return self.host_plan(torch.arange(0, self.num_samples, self.stride))

    register_strategy(EveryOther)
    try:
        config = config_from_dict({"aql_v2": {"selection_strategy": "every_other_test_only", "strategy_options": {"stride": 3}}})
        strategy = build_strategy("every_other_test_only", config, StrategyContext(num_samples=10))
        assert strategy.epoch_plan(0).indices.tolist() == [0, 3, 6, 9]
        with pytest.raises(ConfigError, match=r"aql_v2.strategy_options.strides: not an option of strategy 'every_other_test_only'"
                                              r".*its options: stride"):
            config_from_dict({"aql_v2": {"selection_strategy": "every_other_test_only", "strategy_options": {"strides": 3}}})
    finally:
        del STRATEGIES["every_other_test_only"]


@pytest.mark.parametrize("strategy, options, match", [
    ("streaming", {"batch_tolerance": 0.0, "buffer_size": 5}, r"aql_v2.strategy_options.buffer_size: strategy 'streaming' takes "
                                                            r"buffer_size from aql_v2.buffer_size"),
    ("stale", {"seed": 3}, r"aql_v2.strategy_options.seed: strategy 'stale' takes seed from seed"),
    ("curriculum", {"lookahead": 3}, r"aql_v2.strategy_options.lookahead: not an option of strategy 'curriculum'"),
    ("none", {"exploration": 0.1}, r"aql_v2.strategy_options.exploration: not an option of strategy 'none'"),
    ("stale", [1], r"aql_v2.strategy_options: expected a mapping"),
])
def test_bad_strategy_options_are_refused_naming_the_key(strategy, options, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"aql_v2": {"selection_strategy": strategy, "strategy_options": options}})


def test_strategy_options_reach_the_constructor():
    config = config_from_dict({"aql_v2": {"selection_strategy": "streaming", "strategy_options": {"batch_tolerance": 0.0,
                                                                                                  "budget_feedback": False}}})
    strategy = build_strategy("streaming", config, StrategyContext(num_samples=50))
    assert strategy.selector.batch_tolerance == 0.0 and strategy.selector.budget_feedback is False
    config = config_from_dict({"aql_v2": {"selection_strategy": "curriculum", "strategy_options": {"max_lookahead": 3}}})
    assert build_strategy("curriculum", config, StrategyContext(num_samples=50, num_classes=4)).selector.max_lookahead == 3
