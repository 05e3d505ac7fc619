"""Candidate-scoring strategies (online, streaming, curriculum, meta) under torch.distributed on 2 gloo
processes. `select_global` over ranks that each hold part of a candidate batch's statistics (and of a
candidate scorer's values) makes the one-process selection, on fresh random and adversarial statistics
(NaN rows, ties, -0.0, batches smaller than the world). A 2-rank `AQLv2Trainer` run trains exactly the samples, in the same micro-batches and with the same importance
weights, as one process with the same global batch, reaches its parameters, is deterministic, and
resumes from a mid-epoch checkpoint (a non-empty queue of kept rows) to the same parameters. An odd
case (a candidate batch of 107 split 54 / 53, a last candidate batch of one sample, steps in which a
rank holds none of the rows) and token data (a 1-layer GPT-2, ignored targets, a sample without any) are
covered.

One spawn runs every 2-rank case; the one-process references run in the test process."""

from __future__ import annotations

import os

import pytest
import torch

import aql_kernels
from aql_kernels import SoftmaxScores

from .test_distributed import _config, _data, _interrupt_at, run_ranks

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:aql.trainer. the AQL overhead:RuntimeWarning")]

# query_budget 0.3: candidate batches of ceil(32 / 0.3) = 107 (an odd split), kept counts that leave rows
# queued between steps
CASES = {
    "online": {"selection_strategy": "online", "query_budget": 0.3},
    "online_top": {"selection_strategy": "online", "query_budget": 0.3, "strategy_options": {"pick": "top", "balanced": False}},
    "online_sample_weighted": {"selection_strategy": "online", "query_budget": 0.3, "strategy_options": {"importance_weights": True}},
    "streaming": {"selection_strategy": "streaming", "query_budget": 0.3, "buffer_size": 200},
    "streaming_weighted": {"selection_strategy": "streaming", "query_budget": 0.3, "buffer_size": 200, "importance_weights": True},
    "curriculum": {"selection_strategy": "curriculum", "query_budget": 0.3, "difficulty_stages": [0.5, 0.8, 1.0]},
    "meta": {"selection_strategy": "meta", "query_budget": 0.3, "strategy_options": {"holdout_batch": 48}},
}
#: the odd case: 97 samples, batch 4, candidate batches of 16 (the last one of 1 sample); random picks for
#: the first half epoch (the switch depends on the epoch progress that select counts)
ODD = ({"selection_strategy": "online", "query_budget": 0.25, "strategy_options": {"warmup_epochs": 0.5}},
       {"batch_size": 4, "gradient_accumulation": 1}, 97)
TRAINING = {"epochs": 2, "gradient_accumulation": 2}
#: token data: a 1-layer GPT-2 on generated sequences, 20% of the targets ignored (one sample without any)
TOKENS = "tokens"
NAMES = [*CASES, "odd", TOKENS]
STOP_AT = 3  # inside epoch 1 (2 steps per epoch)


def _token_data(n: int = 64, length: int = 16, vocab: int = 40):
    from aql.data import IndexedTensorDataset

    generator = torch.Generator().manual_seed(5)
    x = torch.randint(0, vocab, (n + 16, length), generator=generator)
    y = torch.roll(x, -1, 1)
    y[torch.rand(y.shape, generator=generator) < 0.2] = -100
    y[3] = -100
    return IndexedTensorDataset(x[:n], y[:n]), IndexedTensorDataset(x[n:], y[n:])


def _case_config(folder, name):
    if name == TOKENS:
        from aql.config import config_from_dict

        base = _config(folder, aql_v2={"selection_strategy": "online", "query_budget": 0.3,
                                       "strategy_options": {"balanced": False}}, **TRAINING, batch_size=8).to_dict()
        base["model"] = {"type": "gpt2", "vocab_size": 40, "n_positions": 16, "d_model": 16, "n_layers": 1, "n_heads": 2}
        base["data"] = {**base["data"], "name": "wikitext103", "seq_len": 16}
        return config_from_dict(base)
    if name == "odd":
        aql_v2, training, _ = ODD
        return _config(folder, aql_v2=aql_v2, **{**TRAINING, **training})
    return _config(folder, aql_v2=CASES[name], **TRAINING)


def _run(config, *, n=384, callbacks=(), resume=False):
    """A fresh model trained under `config`, recording every micro-batch: (step, sample indices, their
    weights or None, filler row?). Returns the outcome."""
    from aql.models import build_model
    from aql.trainer import AQLv2Trainer, seed_everything

    train, val = _token_data() if config.model.type == "gpt2" else _data(n)
    seed_everything(0)
    model = build_model(config.model)
    seed_everything(config.seed)
    trainer = AQLv2Trainer(model, config, train_data=train, val_data=val, callbacks=callbacks)
    log = []
    micro_step = trainer._micro_step

    def recording(x, y, index, weight, scale, shared=None):
        log.append((trainer.step, index.cpu().clone(), None if weight is None else weight.cpu().clone(),
                    bool(shared is not None and shared[1])))
        return micro_step(x, y, index, weight, scale, shared)

    trainer._micro_step = recording
    error = None
    try:
        trainer.fit(resume=resume)
    except KeyboardInterrupt as caught:
        error = str(caught)
    return {"params": {k: v.clone() for k, v in trainer.model.state_dict().items()}, "log": log, "error": error,
            "steps": trainer.step, "queued": len(trainer._pending),
            "policy": _policy(trainer.strategy),
            "history": [{k: v for k, v in m.items() if isinstance(v, (int, float))} for m in trainer.history]}


# --------------------------------------------------------------------------------- select_global
NUM_SAMPLES = 300


def _strategies(table: torch.Tensor, labels: torch.Tensor):
    """(name, factory) of candidate-scoring strategies; the candidate scorer is a fixed table lookup, so
    its values of a sample do not depend on which rank asks."""
    from aql.strategies.curriculum import CurriculumStrategy
    from aql.strategies.online import OnlineSelection
    from aql.strategies.streaming import StreamingStrategy

    def scorer(indices):
        return table.index_select(0, indices)

    n = NUM_SAMPLES
    return [
        ("online_uncertainty", lambda: OnlineSelection(n, query_budget=0.3, seed=5, score="uncertainty", candidate_scorer=scorer,
                                                       importance_weights=True, labels=labels, num_classes=5)),
        ("online_top_el2n", lambda: OnlineSelection(n, query_budget=0.4, seed=6, pick="top", balanced=False, warmup_epochs=0.2)),
        ("streaming_scorer", lambda: StreamingStrategy(n, query_budget=0.3, buffer_size=50, candidate_scorer=scorer,
                                                       importance_weights=True, seed=7)),
        ("streaming_el2n", lambda: StreamingStrategy(n, query_budget=0.5, buffer_size=40, score="el2n", seed=8)),
        ("curriculum_scorer", lambda: CurriculumStrategy(n, num_classes=5, query_budget=0.9, candidate_scorer=scorer, seed=9)),
        ("curriculum_entropy", lambda: CurriculumStrategy(n, num_classes=5, query_budget=0.9, seed=9)),
    ]


def _candidate_batches(generator: torch.Generator):
    """Candidate batches (indices, SoftmaxScores) of fresh random logits with NaN rows, tied rows and
    -0.0 logits; sizes include 1 (fewer than the ranks), odd and even ones."""
    batches = []
    for size in (37, 40, 1, 3, 64, 29, 50, 2, 41):
        index = torch.randperm(NUM_SAMPLES, generator=generator)[:size]
        logits = torch.randn(size, 5, generator=generator) * 3
        if size > 4:
            logits[1] = float("nan")
            logits[3] = logits[2]  # a tie in every statistic
            logits[4] = -0.0
        targets = torch.randint(0, 5, (size,), generator=generator)
        batches.append((index, aql_kernels.softmax_scores(logits, targets)))
    return batches


def _select_global(rank: int, world: int, inputs):
    table, labels, batches = inputs
    out = {}
    for name, make in _strategies(table, labels):
        strategy = make()
        strategy.attach_process_group()
        picks = []
        for index, scores in batches:
            mine = SoftmaxScores(*(None if field is None else field[rank::world] for field in scores))
            if name.startswith("curriculum"):
                strategy.epoch_plan(0)
                strategy._fill = 16
            picks.append(strategy.select_global(index, mine))
        out[name] = picks
    return out


def _policy(strategy):
    """meta: (the REINFORCE baseline, the policy's parameters, episodes); None for other strategies."""
    if strategy.name != "meta":
        return None
    selector = strategy.selector
    return selector.baseline, {k: v.clone() for k, v in selector.policy.state_dict().items()}, selector.episodes_trained


def _two_rank_cases(rank: int, world: int, folder: str, names, inputs):
    out = {"select_global": _select_global(rank, world, inputs)}
    for name in names:
        n = ODD[2] if name == "odd" else 384
        out[name] = _run(_case_config(f"{folder}/{name}", name), n=n)
        out[name + ":stopped"] = _run(_case_config(f"{folder}/{name}_resumed", name), n=n, callbacks=[_interrupt_at(STOP_AT)])
        out[name + ":resumed"] = _run(_case_config(f"{folder}/{name}_resumed", name), n=n, resume=True)
    out["online:again"] = _run(_case_config(f"{folder}/again", "online"))
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every 2-rank case in one spawn; fresh select_global inputs each run (the seed in `two_ranks[2]`)."""
    folder = tmp_path_factory.mktemp("candidates")
    seed = int.from_bytes(os.urandom(4), "little")
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(NUM_SAMPLES, generator=generator)
    table[torch.randperm(NUM_SAMPLES, generator=generator)[:30]] = 0.5  # ties
    inputs = (table, torch.randint(0, 5, (NUM_SAMPLES,), generator=generator), _candidate_batches(generator))
    return (*run_ranks(folder, _two_rank_cases, str(folder), NAMES, inputs), (seed, inputs))


def test_select_global_on_two_ranks_is_the_one_process_selection(two_ranks):
    seed, (table, labels, batches) = two_ranks[2]
    for name, make in _strategies(table, labels):
        strategy = make()  # one process: the whole candidate batch
        for i, (index, scores) in enumerate(batches):
            if name.startswith("curriculum"):
                strategy.epoch_plan(0)
                strategy._fill = 16
            positions, weights = strategy.select_global(index, scores)
            for rank in range(2):
                got, got_weights = two_ranks[rank]["select_global"][name][i]
                assert torch.equal(got, positions), f"seed {seed}: {name}, batch {i}, rank {rank}"
                assert (weights is None) == (got_weights is None), (name, i)
                assert weights is None or torch.equal(got_weights, weights), f"seed {seed}: {name}, batch {i}, rank {rank}"
        assert any(two_ranks[0]["select_global"][name][i][0].numel() for i in range(len(batches))), name


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    return {name: _run(_case_config(folder / name, name), n=ODD[2] if name == "odd" else 384) for name in NAMES}


def _merged(logs):
    """The ranks' micro-batch logs as one: per micro-batch (step, {sample: weight or None})."""
    assert len({len(log) for log in logs}) == 1, [len(log) for log in logs]
    merged = []
    for entries in zip(*logs):
        assert len({step for step, *_ in entries}) == 1
        rows = {}
        for _, index, weight, _ in entries:
            for i, sample in enumerate(index.tolist()):
                assert sample not in rows, f"sample {sample} trained on two ranks in one micro-batch"
                rows[sample] = None if weight is None else float(weight[i])
        merged.append((entries[0][0], rows))
    return merged


def _assert_same_batches(two, one, where):
    merged, single = _merged(two), _merged([one])
    assert len(merged) == len(single), where
    for i, ((step, rows), (step1, rows1)) in enumerate(zip(merged, single)):
        assert step == step1 and rows.keys() == rows1.keys(), f"{where}: micro-batch {i} (step {step})"
        for sample, weight in rows.items():
            if weight is None:
                assert rows1[sample] is None, (where, i, sample)
            else:
                assert weight == pytest.approx(rows1[sample], rel=1e-5), (where, i, sample)


@pytest.mark.parametrize("name", NAMES)
def test_two_ranks_select_and_train_as_one_process(two_ranks, one_process, name):
    zero, one = two_ranks[0][name], two_ranks[1][name]
    single = one_process[name]
    assert zero["steps"] == one["steps"] == single["steps"] > 0
    _assert_same_batches([zero["log"], one["log"]], single["log"], name)
    for key, value in single["params"].items():
        assert torch.equal(zero["params"][key], one["params"][key]), key  # DDP: the same on both ranks
        torch.testing.assert_close(zero["params"][key], value, rtol=1e-4, atol=1e-5)
    for double, alone in zip(zero["history"], single["history"]):
        assert double["samples_backpropagated"] == alone["samples_backpropagated"]
        assert double["train_loss"] == pytest.approx(alone["train_loss"], rel=1e-4)
    if name in ("online_sample_weighted", "streaming_weighted"):
        weights = [w for _, rows in _merged([single["log"]]) for w in rows.values()]
        assert weights and min(weights) != max(weights)  # the weights vary: the comparison can tell
    if name == "meta":  # every rank rewards the global batch: the policies stay one process's
        (baseline, policy, episodes), (baseline1, policy1, _), (alone, alone_policy, alone_episodes) = (
            zero["policy"], one["policy"], single["policy"])
        assert episodes == alone_episodes > 0 and baseline == baseline1 and baseline != 0
        assert baseline == pytest.approx(alone, rel=1e-3)
        for key, value in policy.items():
            assert torch.equal(value, policy1[key])
            torch.testing.assert_close(value, alone_policy[key], rtol=1e-3, atol=1e-5)
    if name == "odd":  # some step holds no row of one rank: it trained the zero-weighted filler row
        assert any(filler for *_, filler in zero["log"] + one["log"])


@pytest.mark.parametrize("name", NAMES)
def test_two_ranks_resume_mid_epoch_to_the_same_run(two_ranks, name):
    for rank in range(2):
        first, stopped, resumed = (two_ranks[rank][name + suffix] for suffix in ("", ":stopped", ":resumed"))
        assert stopped["error"] == f"stopped at {STOP_AT}" and stopped["steps"] == STOP_AT
        assert resumed["steps"] == first["steps"]
        for key, value in first["params"].items():
            assert torch.equal(value, resumed["params"][key]), (name, rank, key)
        # the micro-batches after the checkpoint are the uninterrupted run's
        done = len(stopped["log"])
        assert len(first["log"]) == done + len(resumed["log"])
        for (step, index, weight, _), (step1, index1, weight1, _) in zip(first["log"][done:], resumed["log"]):
            assert step == step1 and torch.equal(index, index1)
            assert (weight is None) == (weight1 is None) and (weight is None or torch.equal(weight, weight1))
    if name.startswith("streaming"):  # kept rows were queued in the checkpoint
        assert two_ranks[0][name + ":stopped"]["queued"] > 0, {k: v["queued"] for k, v in two_ranks[0].items() if k.endswith("stopped")}


def test_two_rank_runs_are_deterministic(two_ranks):
    first, again = two_ranks[0]["online"], two_ranks[0]["online:again"]
    for key, value in first["params"].items():
        assert torch.equal(value, again["params"][key]), key
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first["log"], again["log"]))


def test_shared_queue_hands_each_rank_its_rows_of_the_global_batch():
    from aql.training.batches import EpochLoader, SharedPendingSamples

    queue = SharedPendingSamples()
    owners = torch.tensor([True, False, False, True, True])
    x = torch.arange(3.0).unsqueeze(1)
    queue.append(owners, x, torch.arange(3), torch.tensor([10, 11, 12]), None)
    queue.append(torch.tensor([False, False]), x[:0], torch.arange(0), torch.tensor([], dtype=torch.int64), None)
    assert len(queue) == 7
    rows, total = queue.take(2)  # global rows 0, 1: this rank holds row 0
    assert total == 2 and rows[2].tolist() == [10]
    rows, total = queue.take(2)  # global rows 2, 3: row 3
    assert total == 2 and rows[2].tolist() == [11]
    rows, total = queue.take(2)  # rows 4, 5
    assert total == 2 and rows[2].tolist() == [12]
    rows, total = queue.take(2)  # row 6 is another rank's: none here
    assert total == 1 and rows is None and len(queue) == 0
    with pytest.raises(ValueError, match="marks 1 rows as this rank's, got 2 rows"):
        queue.append(torch.tensor([True, False]), x[:2], torch.arange(2), torch.arange(2), None)
    with pytest.raises(TypeError, match="mine must be a 1-D bool CPU tensor"):
        queue.append(torch.tensor([1, 0]), x[:1], torch.arange(1), torch.arange(1), None)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 1\], got 2"):
        EpochLoader(None, None, None, 4, rank=2, world=2)
