"""AQLv2Trainer end to end on small generated data: every strategy trains, selects about its budget and
reports overhead; a run interrupted after step k and resumed makes the same selections and reaches the
same parameters as an uninterrupted one; models and the LR schedule."""

from __future__ import annotations

import json
import math
import os
import signal
import time

import pytest
import torch
import torch.nn.functional as F

from aql.config import config_from_dict
from aql.data import ByteTokenizer, IndexedTensorDataset, mnist1d_datasets, sequence_dataset
from aql.models import GPT2LM, MNIST1DCNN, build_model
from aql.trainer import AQLv2Trainer, OverheadClock, WarmupCosine, overhead_percent, seed_everything
from aql.training.checkpoint import read_checkpoint

STRATEGIES = ("none", "random", "stale", "streaming", "curriculum")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    return mnist1d_datasets(1500, val_fraction=0.1, seed=11, cache_dir=tmp_path_factory.mktemp("mnist1d"))


def make_config(output_dir, **sections):
    raw = {
        "seed": 5, "device": "cpu",
        "model": {"type": "mnist1d_cnn", "channels": [16, 16]},
        "data": {"name": "mnist1d"},
        "training": {"batch_size": 32, "learning_rate": 3e-3, "warmup_steps": 2, "max_steps": 0, "gradient_accumulation": 1,
                     "epochs": 6, "eval_batch_size": 1000},
        "aql_v2": {"selection_strategy": "stale", "query_budget": 0.2, "exploration": 0.0, "target_overhead": 1.0},
        "logging": {"log_every": 5, "eval_every": 0, "save_every": 0, "wandb_project": None, "output_dir": str(output_dir),
                    "progress_bar": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return config_from_dict(raw)


def make_trainer(config, data, *, model_seed=0, callbacks=()):
    train, val, test = data
    seed_everything(model_seed)
    model = build_model(config.model)
    seed_everything(config.seed)
    return AQLv2Trainer(model, config, train_data=train, val_data=val, test_data=test, callbacks=callbacks)


def record_batches(trainer):
    """Wraps the trainer's micro-step to record what it back-propagates: (indices or None, inputs)."""
    seen = []
    original = trainer._micro_step

    def recording(x, y, index, weight, scale):
        seen.append((None if index is None else index.clone(), x.detach().clone()))
        return original(x, y, index, weight, scale)

    trainer._micro_step = recording
    return seen


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_selects_its_budget_and_reports_overhead(strategy, mnist, tmp_path):
    config = make_config(tmp_path, aql_v2={"selection_strategy": strategy, "exploration": 0.1})
    trainer = make_trainer(config, mnist)
    result = trainer.fit()
    history = result["history"]
    n = len(mnist[0])
    assert len(history) == 6 and result["epochs"] == 6
    for key in ("train_loss", "val_loss", "data_selected", "overhead_time", "overhead_pct", "samples_backpropagated",
                "tokens_backpropagated", "test_loss", "test_accuracy"):
        assert key in result and math.isfinite(result[key]), key
    assert result["samples_backpropagated"] == sum(m["samples_backpropagated"] for m in history)
    assert result["tokens_backpropagated"] == result["samples_backpropagated"]  # one target per sample
    trained = [m for m in history if m["samples_backpropagated"]]
    assert trained[-1]["val_loss"] < trained[0]["val_loss"] and trained[-1]["train_loss"] < trained[0]["train_loss"]
    assert trainer.metrics["data_selected"] == [m["data_selected"] for m in history]
    if strategy == "none":
        assert all(m["data_selected"] == 1.0 for m in history)
    if strategy in ("none", "random"):  # no AQL machinery runs
        assert result["overhead_time"] == 0.0 and result["overhead_pct"] == 0.0
    else:
        assert 0 < result["overhead_time"] < result["train_time"]
        assert result["overhead_pct"] == pytest.approx(overhead_percent(result["overhead_time"], result["train_time"]))
    if strategy in ("stale", "random"):
        assert all(m["data_selected"] == pytest.approx(round(0.2 * n) / n) for m in history)
    if strategy == "streaming":  # a running threshold with budget feedback: the budget up to a few samples
        assert abs(result["data_selected"] - 0.2) <= 0.01, result["data_selected"]
    if strategy == "curriculum":  # capped at the budget; a band that runs dry may give less
        assert all(m["data_selected"] <= 0.2 + 1e-9 for m in history) and result["samples_backpropagated"] > 0
    # the JSONL log: train intervals, one line per epoch, the final summary
    records = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()]
    events = [r["event"] for r in records]
    assert events.count("epoch") == 6 and events[-1] == "fit" and "train" in events
    assert all("overhead_pct" in r for r in records if r["event"] == "train")
    assert trainer.checkpoint_path.is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # atomic writes leave no temporaries


def test_schedule_is_sized_by_the_samples_back_propagated(mnist, tmp_path):
    n = len(mnist[0])
    full = make_trainer(make_config(tmp_path / "a", aql_v2={"selection_strategy": "none"}), mnist)
    subset = make_trainer(make_config(tmp_path / "b", aql_v2={"selection_strategy": "stale"}), mnist)
    accumulated = make_trainer(make_config(tmp_path / "c", training={"gradient_accumulation": 3}), mnist)
    capped = make_trainer(make_config(tmp_path / "d", training={"max_steps": 7}), mnist)
    assert full.total_steps == 6 * math.ceil(n / 32)
    assert subset.total_steps == 6 * math.ceil(round(0.2 * n) / 32)
    assert accumulated.total_steps == 6 * math.ceil(math.ceil(round(0.2 * n) / 32) / 3)
    assert capped.total_steps == 7
    result = capped.fit()
    assert result["steps"] == 7 and capped.scheduler.get_last_lr()[0] == 0.0  # cosine reached zero


def test_warmup_cosine_matches_the_formula():
    schedule = WarmupCosine(warmup_steps=4, total_steps=20)
    for step in range(25):
        if step < 4:
            expected = (step + 1) / 5
        else:
            expected = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 4) / 16)))
        assert schedule(step) == pytest.approx(expected, abs=1e-12)
    assert schedule(20) == pytest.approx(0.0, abs=1e-12) and schedule(100) == pytest.approx(0.0, abs=1e-12)
    short = WarmupCosine(warmup_steps=50, total_steps=3)  # warmup clipped to the run
    assert short.warmup_steps == 2 and short(3) == pytest.approx(0.0, abs=1e-12)
    assert overhead_percent(1.0, 101.0) == pytest.approx(1.0) and overhead_percent(0.0, 0.0) == 0.0


def _interrupt_at(step):
    def callback(trainer):
        if trainer.step == step:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does; the trainer defers it to the step's end

    return callback


@pytest.mark.parametrize("strategy, stop_step", [("stale", 13), ("streaming", 11), ("curriculum", 9), ("none", 12),
                                                       ("random", 10)])
def test_resume_after_an_interrupt_repeats_the_uninterrupted_run(strategy, stop_step, mnist, tmp_path):
    if strategy == "none":  # all data every epoch: a smaller set keeps the test short
        mnist = (IndexedTensorDataset(mnist[0].inputs[:300], mnist[0].targets[:300]), mnist[1], mnist[2])
    sections = {"aql_v2": {"selection_strategy": strategy, "exploration": 0.1}, "training": {"epochs": 4, "gradient_accumulation": 2,
                                                                                              "batch_size": 16}}
    reference = make_trainer(make_config(tmp_path / "reference", **sections), mnist)
    reference_batches = record_batches(reference)
    reference_result = reference.fit()
    assert reference_result["steps"] > stop_step

    interrupted = make_trainer(make_config(tmp_path / "resumed", **sections), mnist, callbacks=[_interrupt_at(stop_step)])
    first_batches = record_batches(interrupted)
    with pytest.raises(KeyboardInterrupt, match=f"checkpoint written at step {stop_step}"):
        interrupted.fit()
    assert interrupted.step == stop_step and interrupted.checkpoint_path.is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored

    # a fresh process's view: another model initialisation, everything else from the checkpoint
    resumed = make_trainer(make_config(tmp_path / "resumed", **sections), mnist, model_seed=1)
    second_batches = record_batches(resumed)
    resumed_result = resumed.fit(resume=True)

    combined = first_batches + second_batches
    assert len(combined) == len(reference_batches)
    for (ref_index, ref_x), (index, x) in zip(reference_batches, combined):
        if ref_index is not None:
            assert torch.equal(ref_index, index)
        assert torch.equal(ref_x, x)
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed_result["samples_backpropagated"] == reference_result["samples_backpropagated"]
    assert resumed_result["test_loss"] == reference_result["test_loss"]
    if strategy == "stale":
        assert torch.equal(reference.strategy.store.scores, resumed.strategy.store.scores)
    if strategy not in ("none", "random"):
        for a, b in zip(reference.uncertainty.fisher, resumed.uncertainty.fisher):
            assert torch.equal(a, b)


def test_keyboard_interrupt_from_a_callback_writes_a_checkpoint(mnist, tmp_path):
    def stop(trainer):
        if trainer.step == 3:
            raise KeyboardInterrupt

    trainer = make_trainer(make_config(tmp_path), mnist, callbacks=[stop])
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    state = read_checkpoint(trainer.checkpoint_path)
    assert state["step"] == 3 and state["epoch"] == 0 and state["position"]["consumed"] == 3
    for key in ("model", "optimizer", "scheduler", "uncertainty", "selection", "rng"):
        assert state[key] is not None, key
    assert {"torch", "numpy", "python"} <= set(state["rng"])


def test_periodic_checkpoints_and_eval_records(mnist, tmp_path):
    trainer = make_trainer(make_config(tmp_path, training={"epochs": 2}, logging={"save_every": 4, "eval_every": 3}), mnist)
    writes = []
    original = trainer.save_checkpoint
    trainer.save_checkpoint = lambda path=None: writes.append(trainer.step) or original(path)
    trainer.fit()
    per_epoch = math.ceil(round(0.2 * len(mnist[0])) / 32)
    expected = sorted(set(range(4, 2 * per_epoch + 1, 4)) | {per_epoch, 2 * per_epoch})
    assert sorted(set(writes)) == expected
    records = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "eval"] == list(range(3, 2 * per_epoch + 1, 3))


def test_gradient_accumulation_equals_one_large_batch(mnist, tmp_path):
    """Two micro-batches of 16 and one batch of 32 give the same update (strategy none, fp32)."""
    train = IndexedTensorDataset(mnist[0].inputs[:32], mnist[0].targets[:32])
    states = []
    for batch, accumulation in ((32, 1), (16, 2)):
        config = make_config(tmp_path / str(batch), aql_v2={"selection_strategy": "none"},
                             training={"batch_size": batch, "gradient_accumulation": accumulation, "epochs": 1, "grad_clip": 0.0})
        trainer = make_trainer(config, (train, None, None))
        trainer.fit()
        assert trainer.step == 1
        states.append(trainer.model.state_dict())
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_importance_weighted_mean_matches_a_float64_reference(mnist, tmp_path):
    config = make_config(tmp_path, aql_v2={"selection_strategy": "stale", "importance_weights": True}, training={"grad_clip": 0.0})
    trainer = make_trainer(config, mnist)
    x, y = mnist[0].inputs[:24], mnist[0].targets[:24]
    weight = torch.rand(24) * 5
    trainer._micro_step(x, y, torch.arange(24), weight, 1.0)
    got = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    reference = MNIST1DCNN([16, 16]).double()
    reference.load_state_dict(trainer.model.state_dict())
    losses = F.cross_entropy(reference(x.double()), y, reduction="none")
    ((losses * weight.double()).sum() / weight.double().sum()).backward()
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(got[name], parameter.grad.float(), rtol=1e-4, atol=1e-6, msg=name)


def test_stale_default_trains_on_the_plain_mean_despite_explored_weights(mnist, tmp_path):
    # The store's explored samples carry weight (N - top) / explored (here ~9.7); by default the plan
    # carries no weights and the loss is the plain mean, so those samples do not dominate the gradient.
    config = make_config(tmp_path, aql_v2={"selection_strategy": "stale", "exploration": 0.5}, training={"grad_clip": 0.0})
    trainer = make_trainer(config, mnist)
    assert config.aql_v2.importance_weights is False
    trainer.strategy.store.update(torch.arange(len(mnist[0])), torch.rand(len(mnist[0])))  # every sample seen
    x, y, index, weight = next(iter(trainer.epoch_loader(0)))
    assert weight is None
    weighted = make_trainer(make_config(tmp_path / "w", aql_v2={"selection_strategy": "stale", "exploration": 0.5,
                                                               "importance_weights": True}), mnist)
    weighted.strategy.store.update(torch.arange(len(mnist[0])), torch.rand(len(mnist[0])))
    weights = next(iter(weighted.epoch_loader(0)))[3]
    assert float(weights.max()) > 5.0 and float(weights.min()) == 1.0  # explored and top samples in one batch
    trainer._micro_step(x, y, index, weight, 1.0)
    got = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    reference = MNIST1DCNN([16, 16]).double()
    reference.load_state_dict(trainer.model.state_dict())
    F.cross_entropy(reference(x.double()), y).backward()
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(got[name], parameter.grad.float(), rtol=1e-4, atol=1e-6, msg=name)


def test_random_strategy_draws_a_fresh_uniform_subset_each_epoch(mnist, tmp_path):
    config = make_config(tmp_path, aql_v2={"selection_strategy": "random"}, training={"epochs": 2})
    trainer = make_trainer(config, mnist)
    assert trainer.uncertainty is None and not trainer.strategy.uses_scores
    seen = record_batches(trainer)
    trainer.fit()
    k, n = round(0.2 * len(mnist[0])), len(mnist[0])
    per_epoch = math.ceil(k / 32)
    epochs = [torch.cat([i for i, _ in seen[e * per_epoch:(e + 1) * per_epoch]]) for e in range(2)]
    for indices in epochs:
        assert indices.numel() == k and indices.unique().numel() == k and 0 <= int(indices.min()) and int(indices.max()) < n
    overlap = len(set(epochs[0].tolist()) & set(epochs[1].tolist()))
    assert overlap < 0.5 * k  # independent 20% draws share ~4% of the data, not the same subset
    # the same seed draws the same subsets
    again = make_trainer(make_config(tmp_path / "again", aql_v2={"selection_strategy": "random"}, training={"epochs": 2}), mnist)
    seen_again = record_batches(again)
    again.fit()
    assert all(torch.equal(a[0], b[0]) for a, b in zip(seen, seen_again))


def test_curriculum_trains_in_the_first_epoch_of_a_fresh_model(mnist, tmp_path):
    # 600 samples = 19 candidate batches of 32: fewer than the 2 x 16 that the empty easy bands of a
    # fresh model used to consume before anything trained.
    train = IndexedTensorDataset(mnist[0].inputs[:600], mnist[0].targets[:600])
    config = make_config(tmp_path, aql_v2={"selection_strategy": "curriculum"}, training={"epochs": 1})
    trainer = make_trainer(config, (train, mnist[1], None))
    result = trainer.fit()
    assert result["history"][0]["samples_backpropagated"] == round(0.2 * 600)
    assert trainer.strategy.training_stage == 2


def test_fisher_update_freq_is_honoured(mnist, tmp_path):
    for freq in (1, 3):
        config = make_config(tmp_path / str(freq), aql_v2={"selection_strategy": "stale", "fisher_update_freq": freq},
                             training={"epochs": 2})
        trainer = make_trainer(config, mnist)
        trainer.fit()
        assert trainer.uncertainty.updates == math.ceil(trainer.step / freq)
        # rows of the updated steps only: full batches of 32, and the epoch's short last one when it is updated
        assert 32 * (trainer.uncertainty.updates - 2) < trainer.uncertainty.samples_seen <= 32 * trainer.uncertainty.updates


def test_overhead_clock_counts_only_its_regions():
    clock = OverheadClock(torch.device("cpu"))
    busy = lambda seconds: time.sleep(seconds)  # noqa: E731
    token = clock.begin()
    busy(0.02)
    clock.end(token)
    busy(0.02)
    with clock.aql():
        busy(0.01)
    aql, total = clock.lap()
    assert 0.03 <= aql < total and total >= 0.05
    assert clock.lap()[0] == 0.0  # lap starts the next interval


def test_train_epoch_takes_a_plain_dataloader(mnist, tmp_path):
    """A user's DataLoader of (x, y, index) batches: stale scores land on the right samples."""
    config = make_config(tmp_path, aql_v2={"selection_strategy": "stale"})
    trainer = make_trainer(config, mnist)
    subset = torch.utils.data.Subset(mnist[0], list(range(40, 100)))
    loader = torch.utils.data.DataLoader(subset, batch_size=16, shuffle=True)
    metrics = trainer.train_epoch(loader)
    assert metrics["samples_backpropagated"] == 60 and trainer.step == 4 and trainer.epoch == 1
    seen = trainer.strategy.store.seen.nonzero().squeeze(1)
    assert seen.tolist() == list(range(40, 100))
    # the stored score of a sample is its loss at the time it was trained: finite and positive
    assert torch.isfinite(trainer.strategy.store.scores[40:100]).all() and (trainer.strategy.store.scores[40:100] > 0).all()
    assert torch.isinf(trainer.strategy.store.scores[:40]).all()


def test_wandb_absence_is_a_clear_error(mnist, tmp_path):
    try:
        import wandb  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("wandb is installed here; the message is for when it is not")
    config = make_config(tmp_path, logging={"wandb_project": "aql-test"})
    with pytest.raises(RuntimeError, match=r"wandb is not installed.*aql\[wandb\].*logging.wandb_project=null"):
        make_trainer(config, mnist)


def test_bad_arguments(mnist, tmp_path):
    config = make_config(tmp_path)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        AQLv2Trainer("cnn", config, train_data=mnist[0])
    with pytest.raises(TypeError, match="config must be an aql.config.Config"):
        AQLv2Trainer(build_model(config.model), {"training": {}}, train_data=mnist[0])
    with pytest.raises(ValueError, match="train_data is empty"):
        AQLv2Trainer(build_model(config.model), config, train_data=IndexedTensorDataset(torch.zeros(0, 40), torch.zeros(0, dtype=torch.long)))
    trainer = make_trainer(config, mnist)
    with pytest.raises(TypeError, match=r"batches must be \(x, y\)"):
        trainer.train_epoch([torch.zeros(2, 40)])
    with pytest.raises(ValueError, match="selection_strategy 'stale'"):
        other = make_trainer(make_config(tmp_path / "o", aql_v2={"selection_strategy": "none"}), mnist)
        other.load_state_dict(read_checkpoint(trainer.save_checkpoint(tmp_path / "x.pt")))


def test_models():
    cnn = MNIST1DCNN([8, 8, 8])
    assert cnn(torch.randn(5, 40)).shape == (5, 10)
    with pytest.raises(ValueError, match=r"x must be \[B, 40\]"):
        cnn(torch.randn(5, 41))
    with pytest.raises(ValueError, match="channels must be a non-empty list"):
        MNIST1DCNN([])
    with pytest.raises(ValueError, match="model.type must be one of"):
        build_model(type("M", (), {"type": "resnet"})())


def test_gpt2_tiny_forward_and_token_level_training(tmp_path):
    config = config_from_dict({
        "seed": 3, "device": "cpu",
        "model": {"type": "gpt2", "n_layers": 1, "n_heads": 2, "d_model": 16, "vocab_size": 257, "n_positions": 16},
        "data": {"name": "text_files", "text_files": ["unused.txt"], "tokenizer": "byte", "seq_len": 8},
        "training": {"batch_size": 4, "learning_rate": 1e-2, "warmup_steps": 0, "max_steps": 0, "gradient_accumulation": 1, "epochs": 3},
        "aql_v2": {"selection_strategy": "stale", "query_budget": 0.5, "exploration": 0.0, "score": "entropy"},
        "logging": {"wandb_project": None, "output_dir": str(tmp_path), "progress_bar": False, "log_every": 2},
    })
    model = build_model(config.model)
    assert isinstance(model, GPT2LM) and model.head is model.transformer.lm_head
    tokens = torch.randint(0, 257, (3, 8))
    logits = model(tokens)
    assert logits.shape == (24, 257)
    # the flat logits are the transformer's, row b * T + t
    torch.testing.assert_close(logits.view(3, 8, 257)[1, 5], model.transformer(input_ids=tokens).logits[1, 5])
    with pytest.raises(ValueError, match="exceeds n_positions"):
        model(torch.zeros(1, 17, dtype=torch.long))

    texts = ["the cat sat on the mat. " * 3, "a dog ran in the park! " * 3, "abc abc abc abc " * 4] * 3
    train = sequence_dataset(texts, ByteTokenizer(), 8)
    trainer = AQLv2Trainer(model, config, train_data=train, val_data=train)
    result = trainer.fit()
    assert result["tokens_backpropagated"] == 8 * result["samples_backpropagated"] > 0
    assert result["history"][-1]["val_loss"] < result["history"][0]["val_loss"]
    assert "val_perplexity" in result["history"][-1]
    assert torch.isfinite(trainer.strategy.store.scores[trainer.strategy.store.seen]).all()


@pytest.mark.parametrize("strategy, hook", [("stale", "after_step"), ("streaming", "select")])
def test_overhead_counts_the_strategys_work_and_not_evaluation(strategy, hook, mnist, tmp_path):
    """The strategy's per-step (after_step) or per-candidate-batch (select) work is AQL time; the
    validation pass is in neither AQL nor training time."""
    config = make_config(tmp_path, aql_v2={"selection_strategy": strategy}, training={"epochs": 1})
    trainer = make_trainer(config, mnist)
    calls, pause = [], 0.004
    original = getattr(trainer.strategy, hook)

    def slow(*args):
        calls.append(1)
        time.sleep(pause)
        return original(*args)

    setattr(trainer.strategy, hook, slow)
    evaluate = trainer.evaluate
    trainer.evaluate = lambda data: time.sleep(0.3) or evaluate(data)
    started = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - started
    assert calls and result["overhead_time"] >= len(calls) * pause
    # the slept time is AQL time, so it is no more than the overhead; evaluation (2 x 0.3 s) is outside both
    assert result["train_time"] < wall - 0.55 and result["overhead_time"] < result["train_time"]


def test_target_overhead_is_reported_and_exceeding_it_warns(mnist, tmp_path):
    config = make_config(tmp_path, aql_v2={"target_overhead": 0.0}, training={"epochs": 1})
    with pytest.warns(RuntimeWarning, match=r"AQL overhead of this run, [0-9.]+% of the training time, exceeds "
                                            r"aql_v2.target_overhead \(0.00%\)"):
        result = make_trainer(config, mnist).fit()
    assert result["target_overhead_pct"] == 0.0 and result["overhead_pct"] > 0.0
    config = make_config(tmp_path / "b", training={"epochs": 1})  # target 100%: met
    import warnings as warnings_module

    with warnings_module.catch_warnings():
        warnings_module.simplefilter("error", RuntimeWarning)
        assert make_trainer(config, mnist).fit()["target_overhead_pct"] == 100.0
