"""aql.integrations: the Lightning callback and the Hugging Face Trainer on tiny models and generated data.

Each run checks what a user relies on: the loss is the framework's own loss, the per-sample scores reach
the score table at the samples' dataset indices (compared with a float64 reference of a frozen model),
each epoch trains on the strategy's selection (the budget, and every sample once over the first
1 / budget epochs), the Fisher EMA follows the step's gradients, and a checkpoint restores the table.
"""

from __future__ import annotations

import importlib
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aql_kernels
from aql.integrations._core import SelectionSession
from aql.sampling import WithIndices
from aql.strategies import STRATEGIES, RandomStrategy, StaleStrategy

pytestmark = pytest.mark.usefixtures("one_thread")

N, D, C = 48, 6, 5


def _classification_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, C))


def _reference_losses(model: nn.Module, data) -> torch.Tensor:
    """float64 per-sample cross-entropy of the frozen model, independent of the fused kernel."""
    x, y = data.tensors
    with torch.no_grad():
        return F.cross_entropy(model.double()(x.double()), y, reduction="none").float()


# -- the shared session --------------------------------------------------------------------------------

def test_session_refuses_what_it_cannot_drive():
    with pytest.raises(TypeError, match="strategy must be an aql.strategies.SelectionStrategy"):
        SelectionSession("stale")
    with pytest.raises(ValueError, match="scores candidate batches"):
        SelectionSession(STRATEGIES["streaming"](10, query_budget=0.5))
    with pytest.raises(TypeError, match="estimator must have update_from_grads"):
        SelectionSession(StaleStrategy(10), estimator=object())
    with pytest.raises(ValueError, match="fisher_update_freq must be"):
        SelectionSession(StaleStrategy(10), fisher_update_freq=0)
    session = SelectionSession(StaleStrategy(4))
    scores = aql_kernels.softmax_scores(torch.randn(3, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="one score per sample expected \\(2 indices\\)"):
        session.record(torch.tensor([0, 1]), scores)
    with pytest.raises(ValueError, match="must be a 1-D integer tensor"):
        session.record(torch.tensor([0.0, 1.0, 2.0]), scores)


def test_session_drops_the_scores_of_a_skipped_step():
    strategy = StaleStrategy(4, query_budget=1.0, exploration=0.0)
    session = SelectionSession(strategy)
    scores = aql_kernels.softmax_scores(torch.randn(2, 3), torch.tensor([0, 1]))
    session.record(torch.tensor([2, 3]), scores)
    session.after_optimizer_step(applied=False)
    assert not strategy.store.seen.any()
    session.record(torch.tensor([2, 3]), scores)
    session.after_optimizer_step(applied=True)
    assert strategy.store.seen.tolist() == [False, False, True, True]
    torch.testing.assert_close(strategy.store.scores[2:], scores.loss)


@pytest.mark.parametrize("module, extra", [("aql.integrations.lightning", "lightning"), ("aql.integrations.huggingface", "huggingface")])
def test_a_missing_extra_names_the_pip_install(monkeypatch, module, extra):
    blocked = "lightning" if extra == "lightning" else "transformers"
    for name in list(sys.modules):
        if name == blocked or name.startswith(blocked + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, blocked, None)  # `import blocked` now raises ImportError
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=f"pip install ['\"]aql\\[{extra}\\]"):
        importlib.import_module(module)
    monkeypatch.delitem(sys.modules, module, raising=False)  # the next import sees the real package again


# -- Lightning ------------------------------------------------------------------------------------------

def _lightning():
    return pytest.importorskip("lightning.pytorch")


def _lightning_module(pl, *, returns: str = "scores", lr: float = 0.0):
    class Classifier(pl.LightningModule):
        """A LightningModule under the callback's contract; records what each step trained on."""

        def __init__(self):
            super().__init__()
            self.net = _mlp()
            self.trained: list[torch.Tensor] = []  # the index of every batch
            self.losses: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (loss, x, y)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y, index = batch
            logits = self(x)
            self.trained.append(index.clone())
            if returns == "scores":
                loss, scores = aql_kernels.cross_entropy_with_scores(logits, y)
                self.losses.append((loss.detach(), x, y))
                return {"loss": loss, "scores": scores, "index": index}
            loss = F.cross_entropy(logits, y)
            return {"loss": loss, "logits": logits, "targets": y, "index": index}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    return Classifier()


def _fit(pl, module, callback, data, *, epochs: int, batch_size: int = 4, accumulate: int = 1, ckpt_path=None, save_to=None):
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                         accumulate_grad_batches=accumulate, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=callback.dataloader(data, batch_size=batch_size), ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return trainer


def _epochs(trained: list[torch.Tensor], per_epoch: int) -> list[list[int]]:
    flat = torch.cat(trained).tolist()
    return [flat[i:i + per_epoch] for i in range(0, len(flat), per_epoch)]


@pytest.mark.parametrize("returns", ["scores", "logits"])
def test_lightning_scores_reach_the_table_and_epochs_follow_the_budget(returns):
    pl = _lightning()
    from aql.integrations.lightning import AQLCallback

    data = _classification_data()
    module = _lightning_module(pl, returns=returns)  # lr 0: the model stays as built, so every score has one reference
    strategy = StaleStrategy(N, query_budget=0.25, exploration=0.0, seed=3)
    callback = AQLCallback(strategy)
    trainer = _fit(pl, module, callback, data, epochs=4)

    k = round(0.25 * N)
    epochs = _epochs(module.trained, k)
    assert [len(e) for e in epochs] == [k] * 4  # the budget, every epoch
    assert sorted(i for e in epochs for i in e) == list(range(N))  # never-seen first: each sample once in 1 / budget epochs
    assert strategy.store.seen.all()
    torch.testing.assert_close(strategy.store.scores, _reference_losses(module.net, data), rtol=1e-5, atol=1e-6)
    for loss, x, y in module.losses:  # what Lightning back-propagated is F.cross_entropy of the batch
        torch.testing.assert_close(loss, F.cross_entropy(module.net(x.double()), y).float(), rtol=1e-5, atol=1e-6)
    assert trainer.callback_metrics["aql/data_selected"].item() == pytest.approx(0.25)
    assert math.isfinite(trainer.callback_metrics["aql/overhead_pct"].item())


def test_lightning_fisher_follows_the_accumulated_steps():
    pl = _lightning()
    from aql.integrations.lightning import AQLCallback
    from aql.uncertainty import LaplacianUncertainty

    data = _classification_data(1)
    module = _lightning_module(pl)
    estimator = LaplacianUncertainty(module.net, ema_decay=0.9, method="diagonal")
    callback = AQLCallback(RandomStrategy(N, query_budget=0.5, seed=2), estimator=estimator)
    _fit(pl, module, callback, data, epochs=1, batch_size=4, accumulate=2)

    # reference: per optimizer step (2 batches of 4), the mean-loss gradient of the frozen model, float64
    net = _mlp().double()
    x, y = data.tensors
    head = net[2]
    fisher = [torch.zeros_like(head.weight), torch.zeros_like(head.bias)]
    steps = torch.cat(module.trained).split(8)
    for index in steps:
        net.zero_grad()
        for half in index.split(4):  # Lightning scales each micro-batch's loss by 1 / accumulate
            (F.cross_entropy(net(x[half].double()), y[half]) / 2).backward()
        for f, p in zip(fisher, (head.weight, head.bias)):
            f.mul_(0.9).add_(0.1 * (math.sqrt(index.numel()) * p.grad) ** 2)
    assert estimator.updates == len(steps) == 3
    for mine, reference in zip(estimator.fisher, fisher):
        torch.testing.assert_close(mine, reference.float(), rtol=1e-4, atol=1e-7)


def test_lightning_checkpoint_restores_the_selection(tmp_path):
    pl = _lightning()
    from aql.integrations.lightning import AQLCallback

    data = _classification_data(2)

    def run(epochs, ckpt_path=None, save_to=None):
        module = _lightning_module(pl, lr=0.05)
        strategy = StaleStrategy(N, query_budget=0.25, exploration=0.25, seed=5)
        callback = AQLCallback(strategy)
        _fit(pl, module, callback, data, epochs=epochs, ckpt_path=ckpt_path, save_to=save_to)
        return module, strategy

    whole, whole_strategy = run(6)
    path = tmp_path / "two.ckpt"
    first, first_strategy = run(2, save_to=path)
    saved = first_strategy.state_dict()
    resumed, resumed_strategy = run(6, ckpt_path=str(path))

    k = round(0.25 * N)
    assert _epochs(first.trained, k) == _epochs(whole.trained, k)[:2]
    # the resumed run starts from the saved table and makes the uninterrupted run's selections
    assert _epochs(resumed.trained, k) == _epochs(whole.trained, k)[2:]
    assert len(_epochs(whole.trained, k)[5]) == k
    torch.testing.assert_close(resumed_strategy.store.scores, whole_strategy.store.scores)
    assert torch.equal(resumed_strategy.store.seen, whole_strategy.store.seen)
    assert saved["store"]["epoch"] == 2 and whole_strategy.store.epoch == resumed_strategy.store.epoch == 6


def test_lightning_contract_errors():
    pl = _lightning()
    from aql.integrations.lightning import AQLCallback

    callback = AQLCallback(StaleStrategy(N))
    with pytest.raises(ValueError, match="drop \\['shuffle'\\]"):
        callback.dataloader(_classification_data(), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="plans over 48 samples but the dataset has 3"):
        callback.dataloader(list(range(3)))
    with pytest.raises(ValueError, match="must return a dict with 'loss', 'index' and either 'scores'"):
        callback._unpack({"loss": torch.tensor(1.0)})
    with pytest.raises(TypeError, match="shift must be a bool"):
        AQLCallback(StaleStrategy(N), shift="yes")
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback])
    shuffled = torch.utils.data.DataLoader(WithIndices(_classification_data()), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="does not draw from the callback's sampler"):
        trainer.fit(_lightning_module(pl), train_dataloaders=shuffled)
    assert isinstance(callback, pl.Callback)


# -- Hugging Face Trainer -------------------------------------------------------------------------------

VOCAB, T = 97, 12


def _transformers():
    pytest.importorskip("accelerate")
    return pytest.importorskip("transformers")


def _gpt2(transformers, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=32, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def _token_data(n: int, seed: int = 0) -> list[dict]:
    """Generated sequences of 3..T tokens, right-padded: input_ids 0 and labels -100 at the padding."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        length = int(torch.randint(3, T + 1, (), generator=g))
        ids = torch.randint(1, VOCAB, (T,), generator=g)
        ids[length:] = 0
        labels = ids.clone()
        labels[length:] = -100
        items.append({"input_ids": ids, "attention_mask": (torch.arange(T) < length).long(), "labels": labels})
    return items


def _reference_sequence_losses(model, items) -> torch.Tensor:
    """float64 mean NLL of each sequence's next-token predictions (labels[:, 1:] against logits[:, :-1])."""
    ids = torch.stack([i["input_ids"] for i in items])
    mask = torch.stack([i["attention_mask"] for i in items])
    labels = torch.stack([i["labels"] for i in items])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none").view(len(items), -1)
    valid = (labels[:, 1:] != -100).double()
    return ((nll * valid).sum(1) / valid.sum(1)).float()


def _args(transformers, tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=4,
                   learning_rate=0.0, lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                   disable_tqdm=True, seed=0, dataloader_num_workers=0)
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def _spy_trained(strategy) -> list[int]:
    """The dataset indices the strategy's after_step receives, in order."""
    trained: list[int] = []
    after_step = strategy.after_step

    def spy(index, scores):
        trained.extend(index.tolist())
        after_step(index, scores)

    strategy.after_step = spy
    return trained


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_hf_loss_equals_the_trainers_own_loss(tmp_path, label_smoothing):
    transformers = _transformers()
    from aql.integrations.huggingface import INDEX_KEY, AQLTrainer

    items = _token_data(6, seed=1)
    model = _gpt2(transformers)
    args = _args(transformers, tmp_path, label_smoothing_factor=label_smoothing)
    stock = transformers.Trainer(model=model, args=args, train_dataset=items)
    ours = AQLTrainer(model=model, args=args, train_dataset=items, strategy=StaleStrategy(len(items)))
    batch = transformers.default_data_collator(items)
    valid = int((batch["labels"][:, 1:] != -100).sum())
    for num_items in (None, torch.tensor(valid + 5)):  # + 5: as if the accumulated step held more tokens
        expected = stock.compute_loss(model, dict(batch), num_items_in_batch=num_items)
        if label_smoothing == 0.0:
            torch.testing.assert_close(expected, model(**batch).loss if num_items is None else expected)
        model.zero_grad()
        expected.backward()
        expected_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        loss = ours.compute_loss(model, {**batch, INDEX_KEY: torch.arange(6)}, num_items_in_batch=num_items)
        loss.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        for mine, theirs in zip((p.grad for p in model.parameters()), expected_grads):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)
    index, scores = ours.aql_session._pending[-1]  # the same pass's per-sequence scores, queued for the strategy
    assert index.tolist() == list(range(6))
    torch.testing.assert_close(scores.loss, _reference_sequence_losses(model, items), rtol=1e-5, atol=1e-6)


def test_hf_run_selects_by_the_budget_and_writes_scores(tmp_path):
    transformers = _transformers()
    from aql.integrations.huggingface import AQLTrainer
    from aql.uncertainty import LaplacianUncertainty

    n = 32
    items = _token_data(n, seed=2)
    model = _gpt2(transformers)  # learning rate 0: the model stays as built, so every score has one reference
    strategy = StaleStrategy(n, query_budget=0.25, exploration=0.0, seed=1)
    trained = _spy_trained(strategy)
    estimator = LaplacianUncertainty(model, method="diagonal")
    trainer = AQLTrainer(model=model, args=_args(transformers, tmp_path), train_dataset=items, strategy=strategy, estimator=estimator)
    trainer.train()

    k = n // 4
    epochs = [trained[i:i + k] for i in range(0, len(trained), k)]
    assert [len(e) for e in epochs] == [k] * 4  # the budget, every epoch
    assert sorted(i for e in epochs for i in e) == list(range(n))  # never-seen first: each sample once in 1 / budget epochs
    torch.testing.assert_close(strategy.store.scores, _reference_sequence_losses(model, items), rtol=1e-5, atol=1e-6)
    assert trainer.state.max_steps == 4 * math.ceil(k / 4 / 2)  # the schedule is sized for the subset
    assert estimator.updates == trainer.state.max_steps  # one Fisher update per optimizer step
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == trainer.state.max_steps
    assert all(entry["aql_data_selected"] == 0.25 and math.isfinite(entry["aql_overhead_pct"]) for entry in logs)
    assert "aql_overhead_pct" in trainer.state.log_history[-1]  # the run's summary


def test_hf_schedule_runs_on_and_resume_restores_the_selection(tmp_path):
    transformers = _transformers()
    from aql.integrations.huggingface import AQLTrainer

    n = 24
    items = _token_data(n, seed=3)

    def run(folder, epochs, resume=None):
        strategy = StaleStrategy(n, query_budget=0.5, exploration=0.25, seed=2)
        trained = _spy_trained(strategy)
        args = _args(transformers, folder, num_train_epochs=epochs, learning_rate=1e-2, save_strategy="epoch")
        trainer = AQLTrainer(model=_gpt2(transformers), args=args, train_dataset=items, strategy=strategy)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, strategy, trained

    whole, whole_strategy, whole_trained = run(tmp_path / "whole", 4)
    rates = [entry["learning_rate"] for entry in whole.state.log_history if "loss" in entry]
    assert len(rates) == 4 * 2 and all(a > b for a, b in zip(rates, rates[1:]))  # linear decay over all epochs, no restart
    assert len(whole_trained) == 4 * n // 2
    checkpoint = tmp_path / "whole" / f"checkpoint-{2 * 2}"  # after epoch 2 (2 optimizer steps per epoch)
    assert (checkpoint / "aql_state.pt").is_file()
    resumed, resumed_strategy, resumed_trained = run(tmp_path / "resumed", 4, resume=str(checkpoint))
    assert resumed_trained == whole_trained[len(whole_trained) // 2:]  # the uninterrupted run's selections
    torch.testing.assert_close(resumed_strategy.store.scores, whole_strategy.store.scores)


def test_hf_refuses_what_it_cannot_honour(tmp_path):
    transformers = _transformers()
    from aql.integrations.huggingface import AQLTrainer, IndexedFeatures

    items = _token_data(4)
    model = _gpt2(transformers)
    with pytest.raises(ValueError, match="plans over 5 samples but train_dataset has 4"):
        AQLTrainer(model=model, args=_args(transformers, tmp_path), train_dataset=items, strategy=StaleStrategy(5))
    with pytest.raises(ValueError, match="train_sampling_strategy must be 'random'"):
        AQLTrainer(model=model, args=_args(transformers, tmp_path, train_sampling_strategy="sequential"), train_dataset=items,
                   strategy=StaleStrategy(4))
    with pytest.raises(ValueError, match="compute_loss_func replaces the loss"):
        AQLTrainer(model=model, args=_args(transformers, tmp_path), train_dataset=items, strategy=StaleStrategy(4),
                   compute_loss_func=lambda *a, **k: 0)
    with pytest.raises(TypeError, match="items must be mappings of features"):
        IndexedFeatures([(1, 2)])[0]
    trainer = AQLTrainer(model=model, args=_args(transformers, tmp_path), train_dataset=items, strategy=StaleStrategy(4))
    model.train()
    with pytest.raises(ValueError, match="a training batch without 'aql_index'"):
        trainer.compute_loss(model, transformers.default_data_collator(items))


def test_hf_takes_a_datasets_dataset_with_unused_columns(tmp_path):
    transformers = _transformers()
    datasets = pytest.importorskip("datasets")
    from aql.integrations.huggingface import AQLTrainer

    items = _token_data(16, seed=4)
    table = {key: [item[key].tolist() for item in items] for key in ("input_ids", "attention_mask", "labels")}
    table["text"] = [f"sample {i}" for i in range(16)]  # a column the model does not take: removed before collation
    dataset = datasets.Dataset.from_dict(table)
    dataset.set_format("torch", columns=["input_ids", "attention_mask", "labels"], output_all_columns=True)
    model = _gpt2(transformers)
    strategy = StaleStrategy(16, query_budget=0.5, exploration=0.0)
    trainer = AQLTrainer(model=model, args=_args(transformers, tmp_path, num_train_epochs=2), train_dataset=dataset, strategy=strategy)
    trainer.train()
    assert strategy.store.seen.all()  # two epochs at budget 0.5: every sample scored at its own index
    torch.testing.assert_close(strategy.store.scores, _reference_sequence_losses(model, items), rtol=1e-5, atol=1e-6)


def test_lightning_sequence_logits_are_scored_per_sequence_with_shift():
    pl = _lightning()
    from aql.integrations.lightning import AQLCallback

    vocab, length, n = 11, 7, 12
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    labels = ids.clone()
    labels[::3, 4:] = -100  # padding in every third sequence
    data = torch.utils.data.TensorDataset(ids, labels)

    class TinyLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, 8)
            self.head = nn.Linear(8, vocab)

        def training_step(self, batch, batch_idx):
            x, y, index = batch
            return {"loss": self.head(self.embed(x)).sum() * 0.0, "logits": self.head(self.embed(x)), "targets": y, "index": index}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    module = TinyLM()
    strategy = StaleStrategy(n, query_budget=1.0, exploration=0.0)
    _fit(pl, module, AQLCallback(strategy, shift=True), data, epochs=1)
    with torch.no_grad():
        logits = module.head(module.embed(ids)).double()
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none").view(n, -1)
    valid = (labels[:, 1:] != -100).double()
    torch.testing.assert_close(strategy.store.scores, ((nll * valid).sum(1) / valid.sum(1)).float(), rtol=1e-5, atol=1e-6)


def test_hf_with_a_tokenizer_and_the_language_modelling_collator(tmp_path):
    transformers = _transformers()
    tokenizers = pytest.importorskip("tokenizers")

    from aql.integrations.huggingface import AQLTrainer

    words = [f"w{i}" for i in range(VOCAB - 2)]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(["[UNK]", "[PAD]", *words])}, unk_token="[UNK]")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    g = torch.Generator().manual_seed(6)
    texts = [" ".join(words[int(j)] for j in torch.randint(0, len(words), (int(torch.randint(3, T + 1, (), generator=g)),), generator=g))
             for _ in range(12)]
    train_dataset = [dict(tokenizer(text)) for text in texts]  # lists of ids of different lengths: the collator pads
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
    gpt2 = _gpt2(transformers)
    strategy = StaleStrategy(12, query_budget=0.5, exploration=0.0)
    trainer = AQLTrainer(model=gpt2, args=_args(transformers, tmp_path, num_train_epochs=2), train_dataset=train_dataset,
                         data_collator=collator, processing_class=tokenizer, strategy=strategy)
    trainer.train()
    # each sequence alone, unpadded: the mean next-token NLL of the frozen model (learning rate 0)
    expected = []
    for item in train_dataset:
        ids = torch.tensor(item["input_ids"]).unsqueeze(0)
        with torch.no_grad():
            logits = gpt2(input_ids=ids).logits.double()
        expected.append(F.cross_entropy(logits[0, :-1], ids[0, 1:]).float())
    assert strategy.store.seen.all()
    torch.testing.assert_close(strategy.store.scores, torch.stack(expected), rtol=1e-5, atol=1e-5)
