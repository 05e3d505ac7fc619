"""An uncertainty estimator's score driving the selection: `online` with `score="uncertainty"` ranks by
the candidate scorer exactly; the pairing of score and scorer is checked; the selection study runs its
estimator methods (Laplace, MC dropout, ensemble) end to end, counts their FLOPs, and refuses bad
pairings; the trainer builds the scorer from `aql_v2.scorer: estimator`."""

import math

import pytest
import torch
import yaml

from aql import efficiency
from aql.strategies import STRATEGIES
from aql.strategies.online import OnlineSelection
from tests.aql.test_efficiency import CONFIG as STUDY_CONFIG
from aql.data import mnist1d_datasets
from tests.aql.test_trainer import make_config, make_trainer, record_batches

UNCERTAINTY_CONFIG = STUDY_CONFIG.parent / "mnist1d_uncertainty_selection.yaml"


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    return mnist1d_datasets(1500, val_fraction=0.1, seed=11, cache_dir=tmp_path_factory.mktemp("mnist1d"))


def _scores(batch: int):
    """SoftmaxScores-like candidate scores (only lse's device is read when score="uncertainty")."""
    import aql_kernels

    return aql_kernels.softmax_scores(torch.randn(batch, 4), torch.randint(0, 4, (batch,)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_online_top_by_uncertainty_keeps_the_scorers_top_k(seed):
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(500, generator=generator)
    table[::7] = table[3]  # ties
    calls = []

    def scorer(indices):
        calls.append(indices.clone())
        return table[indices]

    strategy = OnlineSelection(500, query_budget=0.25, score="uncertainty", pick="top", balanced=False, candidate_scorer=scorer)
    indices = torch.randperm(500, generator=generator)[:80]
    positions = strategy.select(indices, _scores(80))
    assert len(calls) == 1 and torch.equal(calls[0], indices)
    assert positions.shape == (20,)
    chosen = table[indices[positions]].double()
    rest = table[indices[torch.tensor([i for i in range(80) if i not in set(positions.tolist())])]].double()
    assert chosen.min() >= rest.max()  # the exact top 20 by the scorer's values (ties either side allowed)
    expected = torch.sort(table[indices].double(), descending=True).values[:20]
    assert torch.equal(torch.sort(chosen, descending=True).values, expected)


def test_online_sample_by_uncertainty_prefers_high_scores():
    table = torch.cat([torch.full((250,), 0.01), torch.full((250,), 10.0)])
    strategy = OnlineSelection(500, query_budget=0.2, score="uncertainty", pick="sample", balanced=False, smoothing=0.0,
                               candidate_scorer=lambda i: table[i])
    kept = []
    order = torch.randperm(500, generator=torch.Generator().manual_seed(0))
    for indices in order.split(100):  # each candidate batch mixes both halves
        kept.append(indices[strategy.select(indices, _scores(100))])
    kept = torch.cat(kept)
    assert kept.shape[0] == 100
    assert (kept >= 250).float().mean() > 0.9  # 1000x the weight: almost every draw from the high half


def test_score_and_scorer_must_go_together():
    with pytest.raises(ValueError, match="candidate_scorer"):
        OnlineSelection(10, score="uncertainty", balanced=False)
    with pytest.raises(ValueError, match="go together"):
        OnlineSelection(10, score="loss", balanced=False, candidate_scorer=lambda i: i.float())
    with pytest.raises(TypeError, match="callable"):
        OnlineSelection(10, score="uncertainty", balanced=False, candidate_scorer=3)
    with pytest.raises(ValueError, match="score must be one of"):
        STRATEGIES["ranked"](10, score="uncertainty", balanced=False)
    strategy = OnlineSelection(10, score="uncertainty", pick="top", balanced=False, candidate_scorer=lambda i: torch.zeros(3))
    with pytest.raises(ValueError, match="one score per index"):
        strategy.select(torch.arange(5), _scores(5))


def _tiny_study(tmp_path, methods):
    raw = yaml.safe_load(UNCERTAINTY_CONFIG.read_text())
    raw.pop("quick")
    raw.update(num_samples=500, epochs=2, budgets=[0.2], seeds=[0], tuning_seeds=[100], learning_rates=[3e-2],
               cache_dir=str(tmp_path / "data"))
    raw["methods"] = [m for m in raw["methods"] if m["name"] in methods]
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return efficiency.load_study(path)


def test_the_config_runs_every_estimator_beside_the_controls():
    study = efficiency.load_study(UNCERTAINTY_CONFIG)
    by_name = {m.name: m for m in study.methods}
    assert {"all_data", "all_data_short", "random"} <= set(by_name)
    assert {m.estimator for m in study.methods} == {"none", "laplace", "mc_dropout", "ensemble"}
    assert study.dropout > 0 and study.seeds == [0, 1, 2] and len(study.tuning_seeds) == 2


@pytest.mark.parametrize("name", ["laplace", "laplace_kfac", "mc_dropout", "ensemble"])
def test_study_runs_each_estimator_method(name, tmp_path, one_thread):
    study = _tiny_study(tmp_path, {"el2n", name})
    data = efficiency.load_data(study)
    by_name = {m.name: m for m in study.methods}
    run = efficiency.train_run(study, by_name[name], data, budget=0.2, learning_rate=3e-2, seed=0, evaluate_test=True)
    plain = efficiency.train_run(study, by_name["el2n"], data, budget=0.2, learning_rate=3e-2, seed=0, evaluate_test=True)
    n = data["train_x"].shape[0]
    assert run["samples_backpropagated"] == plain["samples_backpropagated"]
    assert abs(run["samples_backpropagated"] - 0.2 * n * study.epochs) <= study.epochs
    assert math.isfinite(run["test_accuracy"]) and 0 <= run["test_accuracy"] <= 1
    # the estimator's own passes are counted on top of the same training FLOPs
    assert run["flops"] > plain["flops"]
    if name == "mc_dropout":
        assert run["flops"] - plain["flops"] > 5 * plain["scoring_forwards"] * (plain["flops"] / (3 * plain["samples_backpropagated"] + plain["scoring_forwards"]))


@pytest.mark.parametrize("change, message", [
    ({"estimator": "bayes"}, "estimator must be one of"),
    ({"estimator": "laplace", "options": {"score": "loss"}}, "score: uncertainty"),
])
def test_bad_estimator_methods_are_refused(change, message, tmp_path):
    raw = yaml.safe_load(UNCERTAINTY_CONFIG.read_text())
    raw["methods"] = [{"name": "x", "strategy": "online", **change}]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(efficiency.StudyError, match=message):
        efficiency.load_study(path)


def test_trainer_ranks_online_candidates_by_the_estimator(mnist, tmp_path, one_thread):
    config = make_config(tmp_path, aql_v2={"selection_strategy": "online", "scorer": "estimator", "uncertainty_method": "laplace",
                                           "strategy_options": {"pick": "top", "balanced": False}},
                         training={"epochs": 1})
    trainer = make_trainer(config, mnist)
    assert trainer.strategy.score == "uncertainty" and callable(trainer.strategy.candidate_scorer)
    calls = []
    original = trainer.strategy.candidate_scorer

    def counting(indices):
        values = original(indices)
        calls.append((indices.clone(), values.clone()))
        return values

    trainer.strategy.candidate_scorer = counting
    seen = record_batches(trainer)
    trainer.fit()
    assert calls and seen
    # each back-propagated batch is the top of its candidates by the estimator's score
    indices, values = calls[-1]
    kept = seen[-1][0]
    assert kept is not None and set(kept.tolist()) <= set(indices.tolist())
    kept_values = values[torch.isin(indices, kept)]
    rest = values[~torch.isin(indices, kept)]
    assert rest.numel() == 0 or kept_values.min() >= rest.max()
